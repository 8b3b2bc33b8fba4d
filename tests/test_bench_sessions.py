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
         "--seconds", "1", "--open-timeout", "120", "--settle-s", "0"],
        capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (row,) = [line.split() for line in proc.stdout.splitlines() if line.startswith("20/s ")]
    sent, delivered, missing = map(int, row[1:4])
    assert sent == 20 and delivered == 20 and missing == 0


def _run(*argv: str) -> str:
    proc = subprocess.run([sys.executable, "-m", *argv], capture_output=True, text=True,
                          timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stdout


def test_fleet_mode_holds_every_session_across_replicas() -> None:
    out = _run("bench.sessions_fleet", "--devices", "60", "--replicas", "2", "--emulators", "2",
               "--partitions", "8", "--idle-s", "0", "--settle-s", "0")
    assert "60 of 60 sessions open" in out
    procs = [line.split()[0] for line in out.splitlines()
             if line.startswith(("blynk", "sessions"))]
    assert sorted(p.rstrip("-0123456789") for p in procs) == ["blynk"] * 2 + ["sessions"] * 2


def test_scan_bench_runs_both_scans() -> None:
    out = _run("bench.sessions_scan", "--devices", "200", "--rounds", "3", "--repeat", "1",
               "--churn", "2")
    assert [line.split("(")[0].strip() for line in out.splitlines()
            if line.startswith(("full ", "incremental "))] == ["full", "incremental"]


def test_uplink_paths_bench_delivers_every_update_on_both_wires() -> None:
    out = _run("bench.uplink_paths", "--devices", "20", "--updates", "100", "--repeat", "1")
    rows = [line.split() for line in out.splitlines() if line.startswith(("https ", "mqtt "))]
    assert [(r[0], r[1], r[2]) for r in rows] == [("https", "400", "0"), ("mqtt", "400", "0")]
