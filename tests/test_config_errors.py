"""Configuration errors say where: file, line and column of the key, and what would be right."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import msgspec.inspect as mi
import pytest
import yaml

from pipeline import config as config_mod
from pipeline.config import parse
from pipeline.errors import ConfigError

EXAMPLE = Path(__file__).resolve().parent.parent / "blynk_bridge" / "examples" / "bridge.yaml"
SECRETS = {"PARTICLE_WEBHOOK_SECRET": "s3cret-for-test", "BLYNK_CLIENT_ID": "c",
           "BLYNK_CLIENT_SECRET": "cs", "TTS_API_KEY": "NNSXS.K", "STATION3_TOKEN": "t",
           "BLYNK_WEBHOOK_SECRET": "s3cret-for-the-webhook"}


def error(text: str, env: dict[str, str] | None = None, fmt: str = "yaml") -> ConfigError:
    with pytest.raises(ConfigError) as err:
        parse(text, "toml" if fmt == "toml" else "yaml", "b.yaml", env=env or {})
    return err.value


def where(exc: ConfigError) -> list[tuple[str | None, int | None, int | None]]:
    return [(p.key, p.line, p.column) for p in exc.problems]


@pytest.mark.parametrize(("text", "key", "line", "col", "says"), [
    ("redis: {url: x}\negres:\n  max_in_flight: 3\n", "egres", 2, 1,
     "unknown key `egres` at the top level; did you mean `egress`?"),
    ("egress:\n  flush_count: 5\n  max_in_fligt: 3\n", "egress.max_in_fligt", 3, 3,
     "unknown key `max_in_fligt` in `$.egress`; did you mean `max_in_flight`?"),
    ("particle:\n  - name: p\n    auth: {headr: X, secret: s}\n", "particle[0].auth.headr", 3,
     12, "did you mean `header`?"),
    ("redis:\n  zzzzzz: 1\n", "redis.zzzzzz", 2, 3, "known keys: url, prefix, partitions"),
    ("particle:\n  - name: p\n    auth: {header: X, secret_fil: /run/s}\n",
     "particle[0].auth.secret_fil", 3, 23, "did you mean `secret_file`?"),
    ("egress:\n  max_in_flight: 0\n", "egress.max_in_flight", 2, 3,
     "`egress.max_in_flight` must be an integer >= 1, got 0"),
    ("monitor:\n  dead_retention_s: -5\n", "monitor.dead_retention_s", 2, 3, ">= 1, got -5"),
    ("transform:\n  dedup_window_s: 604800\n", "transform.dedup_window_s", 2, 3,
     "from 1 to 86400, got 604800"),
    ("blynk:\n  timeout_s: 0\n", "blynk.timeout_s", 2, 3, "must be a number > 0, got 0"),
    ("tts:\n  - name: t\n    app_id: a\n    port: 70000\n", "tts[0].port", 4, 5,
     "must be an integer from 1 to 65535, got 70000"),
    ("ingest_http: {port: -1}\n", "ingest_http.port", 1, 15, "from 0 to 65535, got -1"),
    ("metrics:\n  port: 65536\n", "metrics.port", 2, 3, "from 0 to 65535"),
    ("tts:\n  - name: t\n    app_id: a\n    downlink_f_port: 0\n", "tts[0].downlink_f_port",
     4, 5, "from 1 to 233, got 0"),
    ("tts:\n  - name: t\n", "tts[0]", 2, 5, "missing required key `app_id` in `$.tts[0]`"),
    ("ingest_http:\n  port: eighty\n", "ingest_http.port", 2, 3,
     "`ingest_http.port`: expected `int`, got `str`"),
    ("blynk:\n  servers:\n    a: 'http://x'\n    b: 3\n", "blynk.servers.b", 4, 5,
     "`blynk.servers.b`: expected `str`, got `int`"),
    ("tts:\n  - {name: t, app_id: a, template: nope}\n", "tts[0].template", 2, 26,
     "names unknown template 'nope'"),
    ("templates:\n  - name: w\n    datastreams:\n      - {name: t, pin: V1, min: 5, max: 1}\n",
     "templates[0].datastreams[0].max", 4, 36, "`max` (1) is below `min` (5)"),
    ("monitor:\n  allowed_hosts: [bridge.example.org, 'http://bb:9100']\n",
     "monitor.allowed_hosts[1]", 2, 39, "a host name without scheme or port"),
    # A key the file does not hold (a default) points at its nearest enclosing key.
    ("redis: {url: x}\nblynk:\n  servers: {a: 'http://x'}\n", "blynk.default_server", 2, 1,
     "`blynk.default_server` 'default' is not in `blynk.servers`"),
    ("particle:\n  - name: p\n    auth: {header: X, secret_file: /nonexistent/x}\n",
     "particle[0].auth.secret_file", 3, 23, "cannot read `secret_file`"),
])
def test_an_error_names_the_key_its_line_and_what_is_right(
        text: str, key: str, line: int, col: int, says: str) -> None:
    exc = error(text)
    assert where(exc) == [(key, line, col)]
    assert says in str(exc)
    assert str(exc).startswith(f"b.yaml:{line}:{col}: ")


def test_a_duplicate_key_is_an_error_naming_both_lines() -> None:
    exc = error("egress:\n  flush_count: 1\nredis: {url: x}\negress:\n  flush_count: 2\n")
    assert where(exc) == [("egress", 4, 1)]
    assert "duplicate key `egress` (first at line 1, column 1)" in str(exc)
    exc = error("tts:\n  - name: a\n    app_id: b\n    name: c\n")
    assert where(exc) == [("tts[0].name", 4, 5)]
    assert "first at line 2, column 5" in str(exc)
    exc = error("blynk: {servers: {a: 'http://x', a: 'http://y'}}\n")
    assert where(exc) == [("blynk.servers.a", 1, 34)]


def test_keys_brought_in_by_a_merge_may_be_overridden() -> None:
    text = ("x-common: &common {api_url: 'https://p.example', auth: none}\n"
            "particle:\n  - <<: *common\n    name: a\n    api_url: 'https://q.example'\n")
    # `x-common` is not a setting, but the merge itself is not a duplicate: the error is the
    # unknown key, not `api_url` written twice.
    assert "unknown key `x-common`" in str(error(text))


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n", "---\n", "~\n"])
def test_an_empty_file_is_an_error(text: str) -> None:
    exc = error(text)
    assert "holds no settings" in str(exc) and "config default" in str(exc)


def test_an_empty_toml_file_is_an_error() -> None:
    assert "holds no settings" in str(error("# nothing\n", fmt="toml"))


def test_a_syntax_error_has_its_line() -> None:
    exc = error("redis:\n  url: x\n blynk: [\n")
    assert exc.problems[0].line is not None and "not valid YAML" in str(exc)


def test_every_unset_variable_names_its_key_and_line() -> None:
    exc = error("particle:\n  - name: p\n    auth:\n      header: X\n      secret: ${HOOK}\n"
                "redis:\n  url: redis://${RHOST}:${RPORT:-6379}/0\n")
    assert where(exc) == [("particle[0].auth.secret", 5, 7), ("redis.url", 7, 3)]
    lines = str(exc).splitlines()
    assert lines[0] == ("b.yaml:5:7: environment variable not set: ${HOOK} "
                        "(used by `particle[0].auth.secret`)")
    assert lines[1].startswith("b.yaml:7:3: ") and "${RHOST}" in lines[1]


# --- properties over the shipped example: every error about a key in the file has its line ------


def _nodes(node: yaml.Node, path: tuple[str | int, ...] = ()
           ) -> Iterator[tuple[tuple[str | int, ...], yaml.Node, yaml.Node]]:
    """(path, key node, value node) of every mapping entry under ``node``."""
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            yield (*path, k.value), k, v
            yield from _nodes(v, (*path, k.value))
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            yield from _nodes(item, (*path, i))


TEXT = EXAMPLE.read_text()
ENTRIES = list(_nodes(yaml.compose(TEXT)))


def test_the_example_is_valid() -> None:
    config_mod.parse(TEXT, "yaml", "bridge.yaml", env=SECRETS)


@pytest.mark.parametrize(("path", "key", "value"),
                         [e for e in ENTRIES if isinstance(e[2], yaml.ScalarNode)],
                         ids=lambda e: str(e) if isinstance(e, tuple) else "")
def test_a_wrong_value_anywhere_in_the_example_names_its_line(
        path: tuple[str | int, ...], key: yaml.Node, value: yaml.Node) -> None:
    start, end = value.start_mark.index, value.end_mark.index
    exc = error(TEXT[:start] + "{wrong: [1]}" + TEXT[end:], env=SECRETS)
    assert exc.problems and all(p.line == key.start_mark.line + 1 for p in exc.problems), \
        (path, str(exc))
    assert f"bridge.yaml:{key.start_mark.line + 1}:" not in str(exc)  # origin is b.yaml
    assert str(exc).startswith(f"b.yaml:{key.start_mark.line + 1}:")


def _is_setting(path: tuple[str | int, ...]) -> bool:
    """True when the key at ``path`` is a struct field (not a free dict key, e.g. a region)."""
    return isinstance(mi_pick_struct(config_mod._type_at(path[:-1])), mi.StructType)


def mi_pick_struct(typ: mi.Type | None) -> mi.Type | None:
    options = typ.types if isinstance(typ, mi.UnionType) else (typ,)
    return next((t for t in options if isinstance(t, mi.StructType)), None)


@pytest.mark.parametrize(("path", "key", "value"),
                         [e for e in ENTRIES if _is_setting(e[0])],
                         ids=lambda e: str(e) if isinstance(e, tuple) else "")
def test_a_misspelt_key_anywhere_in_the_example_suggests_the_right_one(
        path: tuple[str | int, ...], key: yaml.Node, value: yaml.Node) -> None:
    start, end = key.start_mark.index, key.end_mark.index
    name = str(path[-1])
    exc = error(TEXT[:start] + name + "x" + TEXT[end:], env=SECRETS)
    line, col = key.start_mark.line + 1, key.start_mark.column + 1
    assert [(p.line, p.column) for p in exc.problems] == [(line, col)], str(exc)
    assert f"unknown key `{name}x`" in str(exc) and f"did you mean `{name}`?" in str(exc)


def _bounded_fields() -> Iterator[tuple[str, str, int | float, str]]:
    """(section text, field, an out-of-range value, the range's words) for every numeric setting
    with a range, in sections and in integration entries."""
    entries = {"tts": "tts:\n  - name: t\n    app_id: a\n",
               "particle": "particle:\n  - name: p\n    auth: none\n"}
    root = mi.type_info(config_mod.Config)
    assert isinstance(root, mi.StructType)
    for section in root.fields:
        struct = mi_pick_struct(section.type)
        if struct is None:
            seq = section.type if isinstance(section.type, mi.ListType) else None
            struct = mi_pick_struct(seq.item_type) if seq else None
        if not isinstance(struct, mi.StructType):
            continue
        head = entries.get(section.name, f"{section.name}:\n")
        indent = "    " if section.name in entries else "  "
        if section.name not in entries and isinstance(section.type, mi.ListType):
            continue
        for f in struct.fields:
            options = f.type.types if isinstance(f.type, mi.UnionType) else (f.type,)
            num = next((t for t in options if isinstance(t, (mi.IntType, mi.FloatType))), None)
            if num is None:
                continue
            for bad in _outside(num):
                yield head + f"{indent}{f.name}: {bad}\n", f.name, bad, indent


def _outside(num: mi.IntType | mi.FloatType) -> list[int | float]:
    out: list[int | float] = []
    if num.ge is not None:
        out.append(num.ge - 1)
    if num.gt is not None:
        out.append(num.gt)
    if num.le is not None:
        out.append(num.le + 1)
    if num.lt is not None:
        out.append(num.lt)
    return out


BOUNDED = list(_bounded_fields())


def test_numeric_settings_have_ranges() -> None:
    names = {f for _, f, _, _ in BOUNDED}
    for name in ("max_in_flight", "port", "partitions", "ttl_s", "dead_retention_s",
                 "max_connections_per_peer", "claim_idle_ms", "provision_max"):
        assert name in names, name


@pytest.mark.parametrize(("text", "field", "bad", "indent"), BOUNDED,
                         ids=[f"{t.split(':')[0]}.{f}={b}" for t, f, b, _ in BOUNDED])
def test_a_value_out_of_range_is_refused_on_its_line(
        text: str, field: str, bad: float, indent: str) -> None:
    exc = error(text)
    line = text.count("\n")
    assert [(p.line, p.column) for p in exc.problems] == [(line, len(indent) + 1)], str(exc)
    assert f"{field}` must be" in str(exc) and f"got {bad!r}" in str(exc)


def test_toml_errors_name_the_key_path_without_a_line() -> None:
    exc = error('[egress]\nmax_in_flight = 0\n', fmt="toml")
    assert where(exc) == [("egress.max_in_flight", None, None)]
    assert str(exc) == "b.yaml: `egress.max_in_flight` must be an integer >= 1, got 0"
    assert "Cannot overwrite a value" in str(error('[redis]\nurl = "a"\nurl = "b"\n',
                                                   fmt="toml"))


# --- a wrong value is never repeated: it may be a secret written in the wrong place ---------------

LEAKED = "c0ffee-secret-in-the-wrong-place-9d2f"


@pytest.mark.parametrize(("text", "key", "line", "col", "says"), [
    # `auth: ${SECRET}` instead of `auth: {header: …, secret: ${SECRET}}`: an easy slip.
    (f"particle:\n  - name: p\n    auth: {LEAKED}\n", "particle[0].auth", 3, 5,
     "`particle[0].auth` must be 'none' or a mapping"),
    (f"tts:\n  - name: t\n    app_id: a\n    webhook_auth: {LEAKED}\n",
     "tts[0].webhook_auth", 4, 5, "`tts[0].webhook_auth` must be 'none' or a mapping"),
    (f"devices:\n  - {{source: {LEAKED}, integration: i, device: d, token: x, template: k}}\n",
     "devices[0].source", 2, 6, "`devices[0].source` must be one of 'particle', 'tts'"),
], ids=["particle.auth", "tts.webhook_auth", "devices.source"])
def test_a_wrong_value_is_not_repeated_in_the_error(
        text: str, key: str, line: int, col: int, says: str) -> None:
    exc = error(text)
    assert LEAKED not in str(exc) and LEAKED[-6:] not in str(exc), str(exc)
    assert where(exc) == [(key, line, col)]
    assert says in str(exc)


def test_a_secret_file_read_into_a_choice_is_not_repeated(tmp_path: Path) -> None:
    """``auth_file:`` (meant: ``auth: {secret_file: …}``) reads the mounted secret into ``auth``."""
    secret = tmp_path / "hook"
    secret.write_text(LEAKED)
    exc = error(f"particle:\n  - name: p\n    auth_file: {secret}\n")
    assert LEAKED not in str(exc) and "`particle[0].auth` must be 'none' or a mapping" in str(exc)
    assert where(exc) == [("particle[0].auth", 3, 5)]


def test_a_misspelt_choice_suggests_the_right_one() -> None:
    exc = error("devices:\n  - {source: partcle, integration: i, device: d, token: x, "
                "template: k}\n")
    assert "did you mean 'particle'?" in str(exc) and "partcle" not in str(exc)


@pytest.mark.parametrize(("text", "says"), [
    ("monitor:\n  admin_token: 2001-13-45\n", "cannot read this timestamp"),  # month 13
    (f"monitor:\n  admin_token: !!int {LEAKED}\n", "cannot read this int"),
])
def test_a_value_yaml_cannot_construct_is_a_config_error_on_its_line(text: str, says: str) -> None:
    exc = error(text)
    assert [(p.line, p.column) for p in exc.problems] == [(2, 16)], str(exc)
    assert says in str(exc) and LEAKED not in str(exc)


@pytest.mark.parametrize(("text", "key", "line", "col"), [
    # `.inf` passes `> 0`, then `int(consumer_idle_s * 1000)` stopped the monitor with a traceback
    ("monitor:\n  consumer_idle_s: .inf\n", "monitor.consumer_idle_s", 2, 3),
    ("blynk:\n  timeout_s: .inf\n", "blynk.timeout_s", 2, 3),
    ("templates:\n  - name: k\n    datastreams:\n      - {name: t, pin: V1, max: -.inf}\n",
     "templates[0].datastreams[0].max", 4, 28),
], ids=["monitor.consumer_idle_s", "blynk.timeout_s", "datastream.max"])
def test_an_infinite_number_is_refused_on_its_line(text: str, key: str, line: int,
                                                   col: int) -> None:
    exc = error(text)
    assert where(exc) == [(key, line, col)], str(exc)
    assert f"`{key}` must be a finite number" in str(exc)
