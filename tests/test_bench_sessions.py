"""The sessions bench stays runnable: both modes run on a small fleet and account for every
session and every command (``python -m bench.sessions`` is run by hand; nothing here times
anything)."""

from __future__ import annotations

import subprocess
import sys

from bench.common import ROOT


def test_memory_mode_opens_every_session() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "bench.sessions", "--sessions", "50", "--kinds", "lean,aiomqtt"],
        capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {line.split()[0]: line.split() for line in proc.stdout.splitlines()
            if line.startswith(("lean ", "aiomqtt "))}
    assert set(rows) == {"lean", "aiomqtt"}
    assert all(row[1] == "50" for row in rows.values())


def test_latency_mode_delivers_every_command() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "bench.sessions", "--latency", "--devices", "30", "--rates", "20",
         "--seconds", "1", "--open-timeout", "120"],
        capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (row,) = [line.split() for line in proc.stdout.splitlines() if line.startswith("20/s ")]
    sent, delivered, missing = map(int, row[1:4])
    assert sent == 20 and delivered == 20 and missing == 0
