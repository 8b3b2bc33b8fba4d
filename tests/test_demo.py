"""``make demo`` stays true: the demo runs the whole pipeline and accounts for every uplink."""

from __future__ import annotations

import re
import subprocess
import sys


def test_demo_runs_the_whole_pipeline_and_drains() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "blynk_bridge", "--log-level", "WARNING", "demo",
         "--duration", "3", "--devices", "6", "--rate", "30", "--particle-devices", "3",
         "--particle-rate", "6"],
        capture_output=True, text=True, timeout=120,
    )
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
