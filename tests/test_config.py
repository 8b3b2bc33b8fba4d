"""Configuration fails loudly at start-up, naming the key and the file."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from blynk_bridge.cli import main
from pipeline.config import Config, load, parse
from pipeline.config_schema import default_yaml
from pipeline.errors import ConfigError

GOOD = """
redis: {url: "redis://127.0.0.1:6379/0"}
blynk:
  servers: {fra1: "http://127.0.0.1:8081"}
  default_server: fra1
templates:
  - name: weather
    datastreams:
      - {name: temperature, pin: V1, type: double, min: -40, max: 85}
tts:
  - name: farm
    app_id: farm-app
    host: 127.0.0.1
    insecure: true
    api_key: ${TTS_KEY}
    template: weather
devices:
  - source: tts
    integration: farm
    device: dev1
    token: "${TOKEN:-abcdefghijklmnopqrstuvwxyz123456}"
    template: weather
"""


def test_a_valid_file_loads_with_env_and_defaults() -> None:
    cfg = parse(GOOD, "yaml", "bridge.yaml", env={"TTS_KEY": "NNSXS.SECRET.KEY"})
    app = cfg.tts[0]
    assert app.username == "farm-app@ttn"
    assert app.effective_port == 1883
    assert app.api_key == "NNSXS.SECRET.KEY"
    assert "SECRET" not in repr(cfg)  # secrets never show in a config dump
    assert cfg.devices[0].token.endswith("3456")


def test_unknown_key_names_the_key_path_and_the_file() -> None:
    text = GOOD.replace("insecure: true", "insecure: true\n    insecur: true")
    with pytest.raises(ConfigError) as err:
        parse(text, "yaml", "/etc/bb/bridge.yaml", env={"TTS_KEY": "k"})
    msg = str(err.value)
    assert "/etc/bb/bridge.yaml" in msg and "insecur" in msg and "$.tts[0]" in msg


def test_missing_env_variable_is_named() -> None:
    with pytest.raises(ConfigError,
                       match=r"not set: \$\{TTS_KEY\} \(used by `tts\[0\]\.api_key`\)"):
        parse(GOOD, "yaml", "bridge.yaml", env={})


def test_secret_from_file(tmp_path: Path) -> None:
    secret = tmp_path / "key"
    secret.write_text("NNSXS.FROM.FILE\n")
    text = GOOD.replace("api_key: ${TTS_KEY}", f"api_key_file: {secret}")
    cfg = parse(text, "yaml", "bridge.yaml", env={})
    assert cfg.tts[0].api_key == "NNSXS.FROM.FILE"


def test_unknown_template_reference_is_an_error() -> None:
    text = GOOD.replace("template: weather\ndevices", "template: nope\ndevices")
    with pytest.raises(ConfigError, match=r"tts\[0\]\.template.*nope"):
        parse(text, "yaml", "bridge.yaml", env={"TTS_KEY": "k"})


def test_bad_pin_is_an_error() -> None:
    with pytest.raises(ConfigError, match=r"V0\.\.V255"):
        parse(GOOD.replace("pin: V1", "pin: V256"), "yaml", "bridge.yaml", env={"TTS_KEY": "k"})


def test_toml_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "bridge.toml"
    path.write_text('[redis]\nurl = "redis://127.0.0.1:6379/1"\n')
    assert load(path).redis.url.endswith("/1")


def test_check_config_explains_without_secrets(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "bridge.yaml"
    path.write_text(GOOD)
    monkeypatch.setenv("TTS_KEY", "NNSXS.VERYSECRET")
    assert main(["check-config", str(path)]) == 0
    out = capsys.readouterr().out
    assert "farm-app@ttn @ 127.0.0.1:1883 insecure" in out
    # -c as every other command takes the file; both at once is a usage error.
    assert main(["check-config", "-c", str(path)]) == 0
    assert capsys.readouterr().out == out
    assert main(["check-config", "-c", str(path), str(path)]) == 2
    assert "VERYSECRET" not in out


def test_check_config_reports_errors_with_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "bridge.yaml"
    path.write_text("redis: {urll: x}\n")
    assert main(["check-config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "urll" in err and str(path) in err


def test_ingest_hardening_options_default_and_are_checked() -> None:
    cfg = parse("particle: [{name: p, auth: none}]\ntts: [{name: t, app_id: a}]\n", "yaml",
                "b.yaml", env={})
    p, t = cfg.particle[0], cfg.tts[0]
    assert (p.device_id_from, p.html_unescape, p.max_clock_skew_s) == ("any", True, 300.0)
    assert t.max_clock_skew_s == 300.0
    for bad, where in (
        ("particle: [{name: p, auth: none, device_id_from: body}]",
         r"particle\[0\]\.device_id_from"),
        ("particle: [{name: p, auth: none, max_clock_skew_s: -1}]",
         r"particle\[0\]\.max_clock_skew_s"),
        ("tts: [{name: t, app_id: a, max_clock_skew_s: -5}]", r"tts\[0\]\.max_clock_skew_s"),
    ):
        with pytest.raises(ConfigError, match=where):
            parse(bad, "yaml", "b.yaml", env={})


def test_the_egress_partition_lease_outlasts_the_blynk_timeout() -> None:
    """An egress owner sends only while its partition lease is held for longer than a Blynk
    request can take: the lease ttl is derived from the timeout, and a set one must be at least
    twice the timeout."""
    cfg = parse("blynk: {timeout_s: 4}\n", "yaml", "b.yaml", env={})
    assert cfg.egress.partition_lease_ms(cfg.blynk.timeout_s) == 12_000
    assert cfg.egress.partition_lease_ms(1) == 5_000  # at least 5 s
    ok = parse("blynk: {timeout_s: 4}\negress: {lease_ttl_ms: 8000}\n", "yaml", "b.yaml", env={})
    assert ok.egress.partition_lease_ms(4) == 8_000
    with pytest.raises(ConfigError, match=r"egress\.lease_ttl_ms.*2 × `blynk\.timeout_s`"):
        parse("blynk: {timeout_s: 4}\negress: {lease_ttl_ms: 7999}\n", "yaml", "b.yaml", env={})


# --- environment values are substituted into parsed scalars, never into the text ---------------

PARTICLE = """
particle:
  - name: fleet
    auth:
      header: X-Secret
      secret: ${HOOK_SECRET}
ingest_http:
  port: ${PORT:-8081}
"""


@pytest.mark.parametrize("secret", [
    "abc#def", "abc #def", 'quo"te', "x, header: Evil", "}{[", "123456", "a: b", "'single",
    "${NOT_A_VAR}",
])
def test_a_secret_with_yaml_syntax_stays_one_value(secret: str) -> None:
    cfg = parse(PARTICLE, "yaml", "bridge.yaml", env={"HOOK_SECRET": secret})
    auth = cfg.particle[0].auth
    assert auth is not None and not isinstance(auth, str)
    assert auth.header == "X-Secret" and auth.secret == secret
    assert cfg.ingest_http.port == 8081


def test_a_secret_with_toml_syntax_stays_one_value() -> None:
    text = ('[[particle]]\nname = "fleet"\nauth = {header = "X-Secret", secret = "${S}"}\n'
            '[ingest_http]\nport = "${PORT}"\n')
    cfg = parse(text, "toml", "bridge.toml", env={"S": 'x", header = "Evil', "PORT": "9000"})
    auth = cfg.particle[0].auth
    assert auth is not None and not isinstance(auth, str) and auth.header == "X-Secret"
    assert auth.secret == 'x", header = "Evil'
    assert cfg.ingest_http.port == 9000


def test_an_unset_variable_names_the_key_that_uses_it() -> None:
    with pytest.raises(ConfigError) as err:
        parse(PARTICLE, "yaml", "/etc/bb/bridge.yaml", env={})
    msg = str(err.value)
    assert "/etc/bb/bridge.yaml" in msg and "${HOOK_SECRET}" in msg
    assert "particle[0].auth.secret" in msg


def test_a_substituted_value_is_still_type_checked() -> None:
    with pytest.raises(ConfigError, match="port"):
        parse(PARTICLE, "yaml", "bridge.yaml", env={"HOOK_SECRET": "s", "PORT": "eighty"})


# --- inbound integrations need auth, and never a demo secret ------------------------------------


def test_a_particle_integration_without_auth_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"particle\[0\]\.auth.*auth: none"):
        parse("particle:\n  - {name: fleet}\n", "yaml", "bridge.yaml", env={})


def test_auth_none_must_be_written_out() -> None:
    cfg = parse("particle:\n  - {name: fleet, auth: none}\n", "yaml", "bridge.yaml", env={})
    assert cfg.particle[0].auth == "none"


@pytest.mark.parametrize("secret", ["demo-webhook-secret", "demo-secret", "demo-blynk-secret"])
def test_a_demo_secret_is_refused(secret: str) -> None:
    with pytest.raises(ConfigError, match=r"particle\[0\]\.auth\.secret.*demo"):
        parse(PARTICLE, "yaml", "bridge.yaml", env={"HOOK_SECRET": secret})
    text = ("tts:\n  - name: a\n    app_id: a\n    webhook_auth: {username: u, password: "
            f"{secret}}}\n")
    with pytest.raises(ConfigError, match=r"tts\[0\]\.webhook_auth\.password.*demo"):
        parse(text, "yaml", "bridge.yaml", env={})
    # A Blynk webhook's secret lets its sender command devices: the same rule.
    text = f"blynk_webhooks:\n  - {{name: app, auth: {{header: X-S, secret: {secret}}}}}\n"
    with pytest.raises(ConfigError, match=r"blynk_webhooks\[0\]\.auth\.secret.*demo"):
        parse(text, "yaml", "bridge.yaml", env={})


def test_a_blynk_webhook_without_auth_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"blynk_webhooks\[0\]\.auth. is missing"):
        parse("blynk_webhooks:\n  - {name: app}\n", "yaml", "bridge.yaml", env={})


EXAMPLE = Path(__file__).resolve().parent.parent / "blynk_bridge" / "examples" / "bridge.yaml"


def test_the_example_holds_no_usable_secret_and_binds_loopback() -> None:
    text = EXAMPLE.read_text()
    for demo in ("demo-webhook-secret", "demo-secret", "demo-blynk-secret", "NNSXS.DEMO",
                 "demo0000"):
        assert demo not in text, demo
    # Without the secrets in the environment it does not start; it names what is missing.
    with pytest.raises(ConfigError) as err:
        load(EXAMPLE, env={})
    for var, key in (("PARTICLE_WEBHOOK_SECRET", "particle[0].auth.secret"),
                     ("TTS_API_KEY", "tts[0].api_key"),
                     ("BLYNK_CLIENT_SECRET", "blynk.platform.client_secret"),
                     ("BLYNK_WEBHOOK_SECRET", "blynk_webhooks[0].auth.secret")):
        assert f"${{{var}}} (used by `{key}`)" in str(err.value)
    secrets = {"PARTICLE_WEBHOOK_SECRET": "s3cret-for-test", "BLYNK_CLIENT_ID": "c",
               "BLYNK_CLIENT_SECRET": "cs", "TTS_API_KEY": "NNSXS.K", "STATION3_TOKEN": "t",
               "BLYNK_WEBHOOK_SECRET": "s3cret-for-the-webhook"}
    cfg = load(EXAMPLE, env=secrets)
    assert cfg.ingest_http.host == "127.0.0.1"
    assert cfg.metrics.host == "127.0.0.1"


def test_check_config_masks_the_redis_password(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "bridge.yaml"
    path.write_text('redis: {url: "redis://bridge:Pa55w0rd-XYZ@redis.example:6379/0"}\n'
                    'blynk: {servers: {default: "https://u:BlynkPw-999@blynk.example"}}\n')
    assert main(["check-config", str(path)]) == 0
    out = capsys.readouterr().out
    assert "redis.example:6379" in out and "blynk.example" in out
    assert "Pa55w0rd" not in out and "BlynkPw" not in out


# --- check-config --json, `config schema`, `config default` -------------------------------------


def test_check_config_json_is_one_document_with_lines(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TTS_KEY", raising=False)
    path = tmp_path / "bridge.yaml"
    path.write_text("redis: {url: x}\negress:\n  max_in_flight: 0\n")
    assert main(["check-config", "--json", str(path)]) == 2
    doc = json.loads(capsys.readouterr().out)
    assert doc == {"ok": False, "file": str(path), "errors": [{
        "message": "`egress.max_in_flight` must be an integer >= 1, got 0",
        "key": "egress.max_in_flight", "line": 3, "column": 3}]}
    path.write_text(GOOD)
    assert main(["check-config", "--json", str(path)]) == 2  # TTS_KEY is not set
    doc = json.loads(capsys.readouterr().out)
    assert [(e["key"], e["line"]) for e in doc["errors"]] == [("tts[0].api_key", 15)]
    assert main(["check-config", "--json", str(tmp_path / "missing.yaml")]) == 2
    doc = json.loads(capsys.readouterr().out)
    assert doc["ok"] is False and "cannot read" in doc["errors"][0]["message"]
    path.write_text("redis: {url: x}\n")
    assert main(["check-config", "--json", str(path)]) == 0
    assert json.loads(capsys.readouterr().out) == {"ok": True, "file": str(path), "errors": []}


def test_config_default_prints_a_commented_file_that_loads_to_the_defaults(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["config", "default"]) == 0
    text = capsys.readouterr().out
    path = tmp_path / "bridge.yaml"
    path.write_text(text)
    assert load(path, env={}) == Config()
    assert main(["check-config", str(path)]) == 0
    # Every setting of every section is in it, described where the code describes it.
    for name in ("max_in_flight", "handover_after_ms", "dead_max_len", "prefix", "client_secret",
                 "webhook_auth", "datastreams", "device_id_from"):
        assert f"{name}:" in text, name
    assert "# Deliveries of one entry before it is dead-lettered" in text
    assert "yaml-language-server: $schema=" in text


def test_the_commented_examples_of_the_default_file_are_settings(tmp_path: Path) -> None:
    """Uncommented, each list section's example names only keys the loader knows."""
    text = default_yaml()
    for section in ("templates", "tts", "particle", "devices", "blynk_webhooks"):
        block = text.split(f"\n# {section}:\n", 1)[1].split(f"\n{section}: []", 1)[0]
        data = yaml.safe_load(f"{section}:\n" + "\n".join(
            line[2:] for line in block.splitlines()))
        entry = data[section][0]
        with pytest.raises(ConfigError) as err:  # placeholders are not values, keys are keys
            parse(yaml.safe_dump({section: [entry]}), "yaml", "b.yaml", env={})
        assert "unknown key" not in str(err.value), (section, str(err.value))


def _conforms(value: Any, schema: dict[str, Any], defs: dict[str, Any]) -> bool:
    """The JSON Schema keywords `msgspec.json.schema` and `config_schema` write, checked."""
    if "$ref" in schema:
        return _conforms(value, defs[schema["$ref"].rsplit("/", 1)[1]], defs)
    if "anyOf" in schema:
        return any(_conforms(value, s, defs) for s in schema["anyOf"])
    if "enum" in schema and value not in schema["enum"]:
        return False
    kinds = {"object": dict, "array": list, "string": str, "boolean": bool,
             "null": type(None), "integer": int, "number": (int, float)}
    kind = schema.get("type")
    if kind is not None and (not isinstance(value, kinds[kind])
                             or (kind in ("integer", "number") and isinstance(value, bool))):
        return False
    if isinstance(value, str) and "pattern" in schema and not re.search(schema["pattern"],
                                                                        value):
        return False
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value < schema.get("minimum", value) or value > schema.get("maximum", value):
            return False
        if "exclusiveMinimum" in schema and value <= schema["exclusiveMinimum"]:
            return False
    if isinstance(value, list):
        return all(_conforms(v, schema.get("items", {}), defs) for v in value)
    if isinstance(value, dict):
        props = schema.get("properties", {})
        if any(k not in value for k in schema.get("required", [])):
            return False
        extra = schema.get("additionalProperties", True)
        for k, v in value.items():
            sub = props.get(k, extra)
            if sub is False or (isinstance(sub, dict) and not _conforms(v, sub, defs)):
                return False
    return True


def test_config_schema_accepts_the_files_the_loader_accepts(
    capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["config", "schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    defs = schema["definitions"]
    assert schema["$ref"] == "#/definitions/Config"
    assert schema["$schema"] == "http://json-schema.org/draft-07/schema#"  # what VS Code reads
    assert "$defs" not in json.dumps(schema)
    for text in (EXAMPLE.read_text(), default_yaml(), GOOD, PARTICLE,
                 "tts: [{name: t, app_id: a, api_key_file: /run/secrets/k}]\n"):
        assert _conforms(yaml.safe_load(text), schema, defs), text[:60]
    # …and flags what the loader refuses: an unknown key, a number out of range, a bad enum.
    for bad in ("egres: {}", "egress: {max_in_flight: 0}", "tts: [{name: t}]",
                "ingest_http: {port: 70000}", "particle: [{name: p, device_id_from: body}]"):
        assert not _conforms(yaml.safe_load(bad), schema, defs), bad
    # Descriptions come from the `#:` comments of pipeline/config.py.
    egress = defs["EgressConfig"]["properties"]
    assert "timestamped upload" in egress["live_window_s"]["description"]
    assert defs["PlatformConfig"]["description"].startswith("Blynk Platform API")


@pytest.mark.parametrize("redis", ['{url: "redis+cluster://127.0.0.1:7001,127.0.0.1:7002"}',
                                   "{cluster: true}"])
def test_cluster_mode_is_accepted_and_gives_the_tagged_layout(redis: str) -> None:
    cfg = parse(f"redis: {redis}\n", "yaml", "b.yaml", env={})
    assert cfg.redis.is_cluster
    keys = cfg.redis.keys()
    assert keys.cluster and keys.stream("uplinks").startswith("bb:{p0.")
    assert not parse("redis: {}\n", "yaml", "b.yaml", env={}).redis.keys().cluster


def test_cluster_mode_takes_downlinks_with_their_keys_in_the_devices_partition() -> None:
    cfg = parse("redis: {cluster: true, partitions: 3}\nblynk_webhooks: [{name: w, auth: "
                "{username: u, password: s3cret-Very-long}}]\n", "yaml", "b.yaml", env={})
    keys = cfg.redis.keys()
    device = "tts:app:dev-1"
    tag = keys.last_written(device).partition("}")[0]
    assert keys.down_last(device).startswith(tag + "}:")
    assert keys.echo("ref", "V1", device).startswith(tag + "}:")
    assert keys.echo("ref", "V1", device + "#0123") == keys.echo("ref", "V1", device)


def test_a_moved_key_is_still_read_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    env = {"TTS_KEY": "NNSXS.SECRET.KEY"}
    old = parse(GOOD + "downlink: {echo_window_ms: 5000}\n", "yaml", "bridge.yaml", env=env)
    assert old.echo.window_ms == 5000
    assert "`downlink.echo_window_ms` is deprecated; use `echo.window_ms`" in caplog.text
    new = parse(GOOD + "echo: {window_ms: 7000}\n", "yaml", "bridge.yaml", env=env)
    assert new.echo.window_ms == 7000
    with pytest.raises(ConfigError, match=r"bridge.yaml:\d+:\d+: `downlink.echo_window_ms` is "
                                          r"the old name of `echo.window_ms`"):
        parse(GOOD + "downlink: {echo_window_ms: 5000}\necho: {window_ms: 7000}\n", "yaml",
              "bridge.yaml", env=env)


def test_each_stage_has_its_own_backoff_and_cache() -> None:
    cfg = parse(GOOD + "transform: {max_backoff_s: 2, cache_size: 10}\n"
                "egress: {max_backoff_s: 9}\ndownlink: {cache_size: 20}\n", "yaml",
                "bridge.yaml", env={"TTS_KEY": "NNSXS.SECRET.KEY"})
    assert (cfg.transform.max_backoff_s, cfg.egress.max_backoff_s) == (2, 9)
    assert (cfg.transform.cache_size, cfg.downlink.cache_size) == (10, 20)


STAGE_SECTIONS = {"transform", "egress", "downlink", "ingest_http", "ingest_mqtt", "monitor",
                  "blynk_sessions"}


#: The reads of another stage's section that are the same fact seen from two sides.
SHARED_READS = {
    # TTS applications that take webhooks report downlink outcomes to ingest-http, which
    # matches them exactly as the downlink stage does (pipeline/downlink_outcomes.py).
    "ingest_http": {"downlink"},
    # Replaying a dead uplink forgets its de-dup entry, whose bucket transform's window names.
    "monitor": {"transform"},
}


@pytest.mark.parametrize("stage", sorted(STAGE_SECTIONS))
def test_a_stage_reads_only_its_own_section(stage: str) -> None:
    """Shared settings live in shared sections (``streams``, ``echo``…), not in a stage's."""
    import re

    root = Path(__file__).resolve().parents[1] / "workers"
    files = [root / f"{stage}.py"] if (root / f"{stage}.py").exists() \
        else sorted((root / stage).glob("*.py"))
    assert files
    for f in files:
        read = set(re.findall(r"\b(?:config|cfg)\.(\w+)", f.read_text()))
        allowed = {stage} | SHARED_READS.get(stage, set())
        assert not (read & STAGE_SECTIONS) - allowed, f"{f.name} reads {read & STAGE_SECTIONS}"


def test_check_config_names_the_downlink_entries(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "bridge.yaml"
    path.write_text("templates:\n  - {name: valve, downlinks: mqtt, downlink: {pins: [V8]},\n"
                    "     datastreams: [{name: valve, pin: V8, type: integer}]}\n"
                    "blynk_webhooks:\n"
                    "  - {name: app, auth: {username: blynk, password: s3cret-Very-long}}\n")
    assert main(["check-config", str(path)]) == 0
    out = capsys.readouterr().out
    assert "Blynk webhook app: POST /blynk/app; auth basic" in out
    assert "Blynk device sessions (blynk-sessions) for templates valve" in out
    assert "s3cret" not in out
