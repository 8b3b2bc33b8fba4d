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
    with pytest.raises(ConfigError, match=r"\$\{TTS_KEY\} is not set"):
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
    cfg = parse("particle: [{name: p}]\ntts: [{name: t, app_id: a}]\n", "yaml", "b.yaml", env={})
    p, t = cfg.particle[0], cfg.tts[0]
    assert (p.device_id_from, p.html_unescape, p.max_clock_skew_s) == ("any", True, 300.0)
    assert t.max_clock_skew_s == 300.0
    for bad, where in (
        ("particle: [{name: p, device_id_from: body}]", r"particle\[0\]\.device_id_from"),
        ("particle: [{name: p, max_clock_skew_s: -1}]", r"particle\[0\]\.max_clock_skew_s"),
        ("tts: [{name: t, app_id: a, max_clock_skew_s: -5}]", r"tts\[0\]\.max_clock_skew_s"),
    ):
        with pytest.raises(ConfigError, match=where):
            parse(bad, "yaml", "b.yaml", env={})
