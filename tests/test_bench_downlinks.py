"""The downlink bench stays runnable and its accounting holds: every command sent is
delivered to its device or counted as collapsed, for the bridge and the bare relay.

The bench itself (``python -m bench.downlinks``) is run by hand; nothing here times anything.
"""

from __future__ import annotations

import subprocess
import sys

from bench.common import ROOT


def test_bench_runs_and_accounts_for_every_command() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "bench.downlinks", "--rates", "100", "--seconds", "0.5",
         "--devices", "20"], capture_output=True, text=True, timeout=180, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {line.split()[0]: line.split() for line in proc.stdout.splitlines()
            if line.startswith(("bridge ", "bare "))}
    assert set(rows) == {"bridge", "bare"}
    for row in rows.values():
        sent, delivered, collapsed, lost = map(int, row[2:6])
        assert sent == 50 and delivered + collapsed == sent and lost == 0
