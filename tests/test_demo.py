"""``make demo`` stays true: the demo runs the whole pipeline, accounts for every uplink, and
runs the downlink round trip (a switch flipped in the emulated app over its HTTP admin API →
webhook → ingest-http → downlink → TTS ``down/push`` → ``down/sent``, the device's next uplink
back into Blynk); Ctrl-C stops it cleanly with its summary."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
import urllib.request

import pytest

from tests.conftest import free_port

ARGS = ["--devices", "6", "--rate", "30", "--particle-devices", "3", "--particle-rate", "6",
        "--flip-every", "0.5"]
DOWN = (r"downlinks: (\d+) switch flips in the app; (\d+) webhooks sent to the bridge "
        r"\((\d+) dropped over Blynk's limit\); (\d+) received; (\d+) commands sent down; "
        r"(\d+) delivered by TTS \(down/sent\); (\d+) failed")


def _demo(*extra: str) -> list[str]:
    return [sys.executable, "-m", "blynk_bridge", "--log-level", "WARNING", "demo", *ARGS,
            *extra]


def test_demo_runs_the_whole_pipeline_and_drains() -> None:
    proc = subprocess.run(_demo("--duration", "3"), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = " ".join(proc.stdout.split())
    summary = re.search(
        r"sent (\d+) \(TTS (\d+), Particle (\d+)\); ingested (\d+); transformed (\d+); "
        r"(\d+) values written to Blynk in (\d+) messages; (\d+) devices in Blynk; "
        r"dead letters (\d+)", out)
    assert summary, out
    sent, tts, particle, ingested, transformed, values, messages, devices, dead = map(
        int, summary.groups())
    assert tts > 0 and particle > 0
    assert ingested + dead >= sent  # every uplink accounted for (dead: e.g. no decoded payload)
    assert transformed == ingested
    assert values > 0 and 0 < messages <= ingested
    assert devices >= 6 + 3  # the fleets' devices were created in Blynk on first uplink
    assert "every uplink was written to Blynk" in out
    down = re.search(DOWN, out)
    assert down, out
    flips, hooks, dropped, received, sent_down, acked, failed = map(int, down.groups())
    # every app change fired the webhook, and so did each device's report of its new state
    assert flips > 0 and hooks + dropped >= flips
    assert received == hooks and 0 < sent_down <= received and acked == sent_down
    assert failed == 0
    trips = re.search(r"round trips: (\d+) of (\d+) flips came back from the device", out)
    assert trips, out
    assert int(trips[2]) == flips and int(trips[1]) <= flips


def _sent_down(port: int) -> float:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as resp:
            text = resp.read().decode()
    except OSError:
        return 0.0
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("bb_downlink_outcomes_total{") and 'outcome="sent"' in line)


def test_ctrl_c_stops_the_demo_cleanly_after_a_round_trip() -> None:
    port = free_port()
    proc = subprocess.Popen(_demo("--metrics-port", str(port)), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while _sent_down(port) < 1:  # a command acknowledged by the emulated TTS
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"no acknowledged downlink; demo: {proc.communicate()[1][-2000:]}")
            time.sleep(0.2)  # polling a real condition (the demo's /metrics), bounded above
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err[-3000:]
    out = " ".join(out.split())
    down = re.search(DOWN, out)
    assert down, out
    assert int(down.group(6)) >= 1
    assert "Traceback" not in err
