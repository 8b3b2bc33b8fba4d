"""Pure rules of the blynk-sessions stage (pipeline/blynk_sessions.py): table tests."""

from __future__ import annotations

import random

import pytest

from pipeline import blynk_sessions as rules
from pipeline import config as config_mod
from pipeline.blynk_webhook import event_id
from pipeline.errors import ConfigError
from pipeline.lease import fair_share


def cfg(extra: str = "") -> config_mod.Config:
    text = """
blynk:
  servers: {fra1: "https://fra1.blynk.cloud", lab: "http://127.0.0.1:9001"}
  default_server: fra1
blynk_sessions:
  servers: {lab: "mqtt://127.0.0.1:9002"}
templates:
  - name: valve
    downlinks: mqtt
    datastreams:
      - {name: Switch, pin: V1, type: integer}
      - {name: Temperature, pin: V2, type: double}
      - {name: Where, pin: V3, type: location}
    downlink: {pins: [v1, V3]}
""" + extra
    return config_mod.parse(text, "yaml", "t.yaml", env={})


def servers() -> rules.Servers:
    c = cfg()
    return rules.Servers(c.blynk, c.blynk_sessions)


def test_addresses_come_from_config_or_blynk_ports() -> None:
    s = servers()
    assert s.address("https://fra1.blynk.cloud") == rules.Address("fra1.blynk.cloud", 8883, True)
    assert s.address("http://127.0.0.1:9001/") == rules.Address("127.0.0.1", 9002, False)
    assert s.address(None) == rules.Address("fra1.blynk.cloud", 8883, True)
    assert s.address("https://ny3.blynk.cloud") == rules.Address("ny3.blynk.cloud", 8883, True)
    assert s.address("https://evil.example") is None
    assert s.address("http://ny3.blynk.cloud") is None  # never the token in clear text


@pytest.mark.parametrize(("payload", "want"), [
    (b"ny3.blynk.cloud:8883", (rules.Address("ny3.blynk.cloud", 8883, True),
                               "https://ny3.blynk.cloud")),
    (b"127.0.0.1:9002", (rules.Address("127.0.0.1", 9002, False), "http://127.0.0.1:9001")),
    (b"evil.example:8883", None),
    (b"blynk.cloud.evil.example:8883", None),
    (b"ny3.blynk.cloud:1883", None),
    (b"ny3.blynk.cloud", None),
    (b"\xff:1", None),
    (b"", None),
    # not a host name: each would fail (or raise ValueError) at connect, and be remembered
    (b".blynk.cloud:8883", None),
    (b"x\x00.blynk.cloud:8883", None),
    (b"evil.example/.blynk.cloud:8883", None),
    (b"evil.example:443/.blynk.cloud:8883", None),
    (b"a" * 64 + b".blynk.cloud:8883", None),
])
def test_redirects_go_only_to_blynk_hosts(payload: bytes, want: object) -> None:
    assert servers().redirect(payload, tls=False) == want


def test_a_redirect_never_downgrades_a_tls_session_to_plain_mqtt() -> None:
    s = servers()
    # From mqtts: a configured plain-MQTT server is refused (the token would go in clear) ...
    assert s.redirect(b"127.0.0.1:9002", tls=True) is None
    # ... a TLS one is followed.
    assert s.redirect(b"ny3.blynk.cloud:8883", tls=True) == (
        rules.Address("ny3.blynk.cloud", 8883, True), "https://ny3.blynk.cloud")


def test_commands_only_for_command_pins_with_the_webhook_contract() -> None:
    pins = rules.command_pins(cfg().templates[0])
    assert pins == {"Switch": "V1", "Where": "V3"}
    d = rules.command("tok", pins, "downlink/ds/Switch", b"1", 1_700_000_000_000)
    assert d is not None
    assert (d.pin, d.value, d.token, d.origin, d.ts_ms) == ("V1", "1", "tok", "mqtt",
                                                            1_700_000_000_000)
    assert d.event_id == event_id(None, "tok", "V1", 1_700_000_000_000, "1")
    loc = rules.command("tok", pins, "downlink/ds/Where", b"2.35\x0048.85", 1)
    assert loc is not None and loc.value == "2.35,48.85"
    assert rules.command("tok", pins, "downlink/ds/Temperature", b"20", 1) is None
    assert rules.command("tok", pins, "downlink/meta/x", b"20", 1) is None
    with pytest.raises(ValueError):
        rules.command("tok", pins, "downlink/ds/Switch", b"x" * 1025, 1)
    with pytest.raises(UnicodeDecodeError):
        rules.command("tok", pins, "downlink/ds/Switch", b"\xff", 1)


def test_only_new_values_are_forwarded() -> None:
    assert rules.is_new("1", None)
    assert not rules.is_new("1.0", "1")
    assert rules.is_new("0", "1")


def test_shares_deadlines_and_backoff() -> None:
    assert fair_share(64, 1) == 64
    assert fair_share(64, 3) == 22
    assert fair_share(64, 0) == 64
    assert rules.offline_deadline_ms(1_000_000, None, 600) == 1_600_000
    # uplinks 100 s apart: 3 × 100 s is under the 600 s minimum, over a 60 s one
    assert rules.offline_deadline_ms(10_000_000, 9_900_000, 600) == 10_600_000
    assert rules.offline_deadline_ms(10_000_000, 9_900_000, 60) == 10_300_000
    rng = random.Random(1)
    assert all(0 <= rules.backoff_s(n, 30, rng) <= min(30, 2 ** n) for n in range(20))
    assert all(0 <= rules.backoff_s(n, 30, rng, base_s=0.1) <= min(30, 0.1 * 2 ** n)
               for n in range(20))
    parts = {rules.partition_of(f"token-{i}", 8) for i in range(200)}
    assert parts == set(range(8))


def test_config_requires_command_pins_and_valid_servers() -> None:
    with pytest.raises(ConfigError, match=r"downlink\.pins"):
        config_mod.parse("templates: [{name: t, downlinks: mqtt}]", "yaml", "t.yaml", env={})
    with pytest.raises(ConfigError, match=r"blynk_sessions\.servers\.nope"):
        config_mod.parse('blynk_sessions: {servers: {nope: "mqtt://h:1"}}', "yaml", "t.yaml",
                         env={})
    with pytest.raises(ConfigError, match=r"mqtt\[s\]://host:port"):
        config_mod.parse('blynk_sessions: {servers: {default: "tcp://h:1"}}', "yaml", "t.yaml",
                         env={})
