"""Configuration fails loudly at start-up, naming the key and the file."""

from __future__ import annotations

from pathlib import Path

import pytest

from blynk_bridge.cli import main
from pipeline.config import load, parse
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


@pytest.mark.parametrize("secret", ["demo-webhook-secret", "demo-secret"])
def test_a_demo_secret_is_refused(secret: str) -> None:
    with pytest.raises(ConfigError, match=r"particle\[0\]\.auth\.secret.*demo"):
        parse(PARTICLE, "yaml", "bridge.yaml", env={"HOOK_SECRET": secret})
    text = ("tts:\n  - name: a\n    app_id: a\n    webhook_auth: {username: u, password: "
            f"{secret}}}\n")
    with pytest.raises(ConfigError, match=r"tts\[0\]\.webhook_auth\.password.*demo"):
        parse(text, "yaml", "bridge.yaml", env={})


EXAMPLE = Path(__file__).resolve().parent.parent / "blynk_bridge" / "examples" / "bridge.yaml"


def test_the_example_holds_no_usable_secret_and_binds_loopback() -> None:
    text = EXAMPLE.read_text()
    for demo in ("demo-webhook-secret", "demo-secret", "NNSXS.DEMO", "demo0000"):
        assert demo not in text, demo
    # Without the secrets in the environment it does not start; it names what is missing.
    with pytest.raises(ConfigError) as err:
        load(EXAMPLE, env={})
    for var, key in (("PARTICLE_WEBHOOK_SECRET", "particle[0].auth.secret"),
                     ("TTS_API_KEY", "tts[0].api_key"),
                     ("BLYNK_CLIENT_SECRET", "blynk.platform.client_secret")):
        assert f"${{{var}}} (used by `{key}`)" in str(err.value)
    secrets = {"PARTICLE_WEBHOOK_SECRET": "s3cret-for-test", "BLYNK_CLIENT_ID": "c",
               "BLYNK_CLIENT_SECRET": "cs", "TTS_API_KEY": "NNSXS.K", "STATION3_TOKEN": "t"}
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


def test_a_moved_key_is_still_read_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    env = {"TTS_KEY": "NNSXS.SECRET.KEY"}
    old = parse(GOOD + "downlink: {echo_window_ms: 5000}\n", "yaml", "bridge.yaml", env=env)
    assert old.echo.window_ms == 5000
    assert "`downlink.echo_window_ms` is deprecated; use `echo.window_ms`" in caplog.text
    new = parse(GOOD + "echo: {window_ms: 7000}\n", "yaml", "bridge.yaml", env=env)
    assert new.echo.window_ms == 7000
    with pytest.raises(ConfigError, match=r"bridge.yaml: `downlink.echo_window_ms` is the old "
                                          r"name of `echo.window_ms`"):
        parse(GOOD + "downlink: {echo_window_ms: 5000}\necho: {window_ms: 7000}\n", "yaml",
              "bridge.yaml", env=env)


def test_each_stage_has_its_own_backoff_and_cache() -> None:
    cfg = parse(GOOD + "transform: {max_backoff_s: 2, cache_size: 10}\n"
                "egress: {max_backoff_s: 9}\ndownlink: {cache_size: 20}\n", "yaml",
                "bridge.yaml", env={"TTS_KEY": "NNSXS.SECRET.KEY"})
    assert (cfg.transform.max_backoff_s, cfg.egress.max_backoff_s) == (2, 9)
    assert (cfg.transform.cache_size, cfg.downlink.cache_size) == (10, 20)


STAGE_SECTIONS = {"transform", "egress", "downlink", "ingest_http", "ingest_mqtt", "monitor"}


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
        assert not (read & STAGE_SECTIONS) - {stage}, f"{f.name} reads {read & STAGE_SECTIONS}"
