"""``blynk-bridge map --sample`` (dry run): genuine saved messages through the real parsers,
routing and mapping, with no Redis (the configuration points at a port nobody listens on) and
no Blynk."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from blynk_bridge import cli
from tests.conftest import FIXTURES, free_port

TOKEN = "Xq9sECRETtokenABCDEFGHIJKLmnop42"


@pytest.fixture
def config_file(tmp_path: Path) -> str:
    path = tmp_path / "bridge.yaml"
    path.write_text(f"""
redis: {{url: "redis://127.0.0.1:{free_port()}/0"}}   # nobody listens: no Redis needed
templates:
  - name: weather
    datastreams:
      - {{name: temperature, pin: V0, type: double}}
      - {{name: battery, pin: V1, type: double}}
      - {{name: presses, pin: V2, type: integer}}
      - {{name: state, pin: V4, type: string}}
      - {{name: RSSI, pin: V5, type: integer, min: -110, max: 0}}
      - {{name: level, pin: V6, type: integer}}
    mapping:
      sensorTemperature: temperature
      batteryVoltage: battery
      singlePressEventCounter: presses
      demo: state
tts:
  - {{name: farm, app_id: starter-kit, api_key: NNSXS.X, template: weather, provision: true}}
particle:
  - {{name: trackers, template: weather, provision: true, auth: none}}
  - {{name: closed, template: weather, auth: none}}
devices:
  - {{source: particle, integration: trackers, device: 3f002b000000000000000000,
      token: {TOKEN}, template: weather}}
""")
    return str(path)


def _map(capsys: pytest.CaptureFixture[str], config: str, sample: Path,
         *extra: str) -> tuple[int, str]:
    rc = cli.main(["map", "-c", config, "--sample", str(sample), *extra])
    out, _ = capsys.readouterr()
    return rc, out


def _doc(capsys: pytest.CaptureFixture[str], config: str, sample: Path,
         *extra: str) -> tuple[int, dict[str, object]]:
    rc, out = _map(capsys, config, sample, "--json", *extra)
    doc = json.loads(out)  # one JSON document
    assert isinstance(doc, dict)
    return rc, doc


def test_a_tts_uplink_shows_its_blynk_writes_and_unmapped_keys(
    capsys: pytest.CaptureFixture[str], config_file: str
) -> None:
    sample = FIXTURES / "tts" / "tts-uplink-02.json"
    rc, doc = _doc(capsys, config_file, sample)
    assert rc == 0
    assert doc["outcome"] == "write" and doc["source"] == "tts"
    assert doc["device"] == "eui-70b3d52dd600035a"
    assert doc["device_from"] == "created on first uplink" and doc["template"] == "weather"
    writes = doc["writes"]
    assert isinstance(writes, dict)
    assert {k: writes[k] for k in ("V0", "V1", "V2")} == {"V0": 21.5, "V1": 3.4, "V2": 16}
    assert "V5" in writes  # RSSI from the best gateway
    assert doc["unmapped"] == ["pressEvent", "thermistorProperlyConnected"]

    rc, out = _map(capsys, config_file, sample)
    assert rc == 0
    assert "V0    = 21.5" in out and "unmapped keys (no datastream): pressEvent" in out


def test_a_particle_form_webhook_from_the_static_table(
    capsys: pytest.CaptureFixture[str], config_file: str
) -> None:
    sample = FIXTURES / "particle" / "particle-webhook-01-default-form.txt"
    rc, doc = _doc(capsys, config_file, sample, "--integration", "trackers")
    assert rc == 0
    assert doc["source"] == "particle" and doc["integration"] == "trackers"
    assert doc["device_from"] == "static table"
    assert doc["writes"] == {"V4": "mydata"}
    rc, out = _map(capsys, config_file, sample, "--integration", "trackers")
    assert rc == 0 and "V4    = \"mydata\"" in out and TOKEN not in out


def test_a_value_that_does_not_fit_is_a_partial_dead_letter(
    capsys: pytest.CaptureFixture[str], config_file: str, tmp_path: Path
) -> None:
    sample = tmp_path / "up.json"
    sample.write_text(json.dumps({"level": "high", "state": "ok"}))
    rc, doc = _doc(capsys, config_file, sample, "--integration", "trackers",
                   "--query", "coreid=e00fce68aaaabbbbccccdddd&event=tank")
    assert rc == 1
    assert doc["outcome"] == "write" and doc["writes"] == {"V4": "ok"}
    assert doc["reason"] == "type_mismatch"
    assert doc["rejected"] and doc["rejected"][0]["pin"] == "V6"  # type: ignore[index]
    rc, out = _map(capsys, config_file, sample, "--integration", "trackers",
                   "--query", "coreid=e00fce68aaaabbbbccccdddd&event=tank")
    assert "DEAD LETTER type_mismatch" in out and "'level'" in out


def test_refused_skipped_and_unknown_device(
    capsys: pytest.CaptureFixture[str], config_file: str, tmp_path: Path
) -> None:
    rc, doc = _doc(capsys, config_file, FIXTURES / "tts" / "tts-uplink-10-invalid.json")
    assert rc == 1 and doc["outcome"] == "refused" and doc["source"] == "tts"
    assert doc["reason"] == "invalid_json" and doc["field"] == "$"

    rc, doc = _doc(capsys, config_file, FIXTURES / "tts" / "tts-join-01.json")
    assert rc == 0 and (doc["outcome"], doc["reason"]) == ("skipped", "join")

    sample = FIXTURES / "particle" / "particle-webhook-02.json"
    rc, doc = _doc(capsys, config_file, sample, "--integration", "closed",
                   "--query", "coreid=e00fce68aaaabbbbccccdddd&event=x")
    assert rc == 1 and (doc["outcome"], doc["reason"]) == ("dead", "unknown_device")

    rc, doc = _doc(capsys, config_file, sample, "--integration", "closed")
    assert rc == 1 and (doc["outcome"], doc["reason"]) == ("refused", "missing_field")

    # Two Particle integrations and none named: the command says which to choose.
    assert cli.main(["map", "-c", config_file, "--sample", str(sample)]) == 2
    assert "--integration" in capsys.readouterr().err


def test_map_runs_as_a_command_without_redis(config_file: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "blynk_bridge", "map", "-c", config_file, "--sample", "-"],
        input=(FIXTURES / "tts" / "tts-uplink-02.json").read_bytes(), capture_output=True,
        timeout=60)
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    assert b"Blynk writes" in proc.stdout and b"Traceback" not in proc.stderr
