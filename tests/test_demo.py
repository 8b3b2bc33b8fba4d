"""``make demo`` stays true: the demo runs the whole pipeline, accounts for every uplink, and
runs the downlink round trip (a switch flipped in the emulated app over its HTTP admin API →
webhook → ingest-http → downlink → TTS ``down/push`` → ``down/sent``, the device's next uplink
back into Blynk); Ctrl-C stops it cleanly with its summary, also at a rate the machine cannot
keep up with and with its stdout piped, and leaves no key."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import aiohttp
import pytest

from pipeline.streams import Redis
from tests.conftest import free_port
from tests.wait import wait_until

ARGS = ["--devices", "6", "--rate", "30", "--particle-devices", "3", "--particle-rate", "6",
        "--flip-every", "0.5"]
DOWN = (r"downlinks: (\d+) switch flips in the app; (\d+) webhooks sent to the bridge "
        r"\((\d+) dropped over Blynk's limit\); (\d+) received; (\d+) commands sent down; "
        r"(\d+) delivered by TTS \(down/sent\); (\d+) failed")


def _demo(*extra: str) -> list[str]:
    return [sys.executable, "-m", "blynk_bridge", "--log-level", "WARNING", "demo", *ARGS,
            *extra]


def test_demo_runs_the_whole_pipeline_and_drains(tmp_path: Path) -> None:
    proc = subprocess.run(_demo("--duration", "1.5"), capture_output=True, text=True, timeout=120,
                          cwd=tmp_path)
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


def test_ctrl_c_stops_the_demo_cleanly_after_a_round_trip(tmp_path: Path) -> None:
    port = free_port()
    proc = subprocess.Popen(_demo("--metrics-port", str(port)), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=tmp_path)
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


# --- Ctrl-C at a rate the machine cannot keep up with --------------------------------------------

#: Far more than one 2-core machine bridges in one process: the streams fill while it runs.
FAST = ["--devices", "40", "--rate", "1500", "--particle-devices", "5", "--particle-rate", "50",
        "--progress-s", "0.5"]
PROGRESS = re.compile(r"^progress \S+: sent (\d+) .*?; ingested (\d+);", re.M)


class Output:
    """A child's stdout (the read end of a pipe) read without blocking, as ``tee`` would."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        os.set_blocking(fd, False)
        self.text = ""
        self.closed = False

    def read(self) -> str:
        while not self.closed:
            try:
                chunk = os.read(self.fd, 65536)
            except BlockingIOError:
                break
            if not chunk:
                break
            self.text += chunk.decode(errors="replace")
        return self.text

    def close(self) -> None:
        """The reader goes away (``tee`` killed by the same Ctrl-C)."""
        os.close(self.fd)
        self.closed = True

    def moving(self) -> bool:
        """A progress line says uplinks were sent and ingested."""
        return any(int(sent) > 0 and int(ingested) > 0
                   for sent, ingested in PROGRESS.findall(self.read()))


async def _fast_demo_stopped(redis: Redis, cwd: Path, signals: int,
                             close_stdout: bool) -> tuple[int, str, str]:
    """Run the demo at a high rate, piped; once it makes progress, run the operator command it
    prints, then send SIGINT ``signals`` times (optionally after closing its stdout, as a
    ``tee`` killed by the same Ctrl-C); return its exit code, stdout and stderr, after checking
    it left no key behind."""
    read_end, write_end = os.pipe()
    out = Output(read_end)
    with tempfile.TemporaryFile() as err:
        proc = await asyncio.create_subprocess_exec(*_demo_fast(), stdout=write_end, stderr=err,
                                                    cwd=cwd)
        os.close(write_end)

        def stderr() -> str:
            err.seek(0)
            return err.read().decode(errors="replace")

        try:
            await wait_until(lambda: out.moving() or proc.returncode is not None, timeout_s=90,
                             what="a progress line with uplinks sent and ingested")
            assert proc.returncode is None, out.read() + stderr()[-3000:]
            # Run as `python -m blynk_bridge`, the line says so (make demo: .venv/bin/…).
            found = re.search(r"BB_PREFIX=(bbdemo:[0-9a-f]+:) (.+) lag -c (\S+)", out.read())
            assert found, out.read()
            prefix = found.group(1)
            assert await _keys(redis, prefix)  # the run has keys while it runs
            await _paste_works(found.group(0), prefix, cwd)
            page = re.search(r"status page  (http://127\.0\.0\.1:\d+/)", out.read())
            assert page, out.read()
            await _page_served(page.group(1))
            if close_stdout:
                out.close()
            proc.send_signal(signal.SIGINT)
            if signals > 1:
                # Two signals sent at once may arrive as one: the second after the first landed.
                await wait_until(lambda: "demo: stopping" in stderr(),
                                 what="the demo to take the first Ctrl-C")
                proc.send_signal(signal.SIGINT)
            # Bounded: a demo that hangs fails here, however slow the machine is.
            await asyncio.wait_for(_drained_until_exit(proc, out), 60)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            if not out.closed:
                out.close()
        text = stderr()
    assert await _keys(redis, prefix) == [], "the demo left keys behind"
    assert proc.returncode is not None
    return proc.returncode, out.text, text


async def _page_served(base: str) -> None:
    """The status page the demo printed is there, and its data names the demo's process."""
    async with aiohttp.ClientSession() as http:
        async with http.get(base) as resp:
            assert resp.status == 200 and "text/html" in resp.headers["Content-Type"]

        async def demo_alive() -> bool:
            async with http.get(base + "status.json") as resp:
                data = await resp.json()
            return any(r["name"].startswith("demo@") for r in data["replicas"])

        await wait_until(demo_alive, what="the demo's process on its status page")


async def _paste_works(line: str, prefix: str, cwd: Path) -> None:
    """The ready-to-paste line the demo printed runs as it is, and shows the demo's own
    streams."""
    command = line + " --json"
    lag = await asyncio.create_subprocess_exec(
        "bash", "-c", command, cwd=cwd, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    shown, problem = await asyncio.wait_for(lag.communicate(), 60)
    assert lag.returncode == 0, problem.decode()
    streams = {s["key"]: s for s in json.loads(shown)["streams"]}
    assert streams[f"{prefix}uplinks"]["length"] > 0


async def _drained_until_exit(proc: asyncio.subprocess.Process, out: Output) -> None:
    """Wait for the exit, reading stdout meanwhile (a full pipe would block the demo)."""
    waiting = asyncio.ensure_future(proc.wait())
    while not waiting.done():
        out.read()
        await asyncio.wait({waiting}, timeout=0.1)
    out.read()


def _demo_fast() -> list[str]:
    return [sys.executable, "-m", "blynk_bridge", "--log-level", "WARNING", "demo", *FAST]


async def _keys(redis: Redis, prefix: str) -> list[bytes]:
    return [k async for k in redis.scan_iter(match=f"{prefix}*", count=1000)]


async def test_ctrl_c_stops_a_fast_piped_demo_and_removes_its_keys(
    redis: Redis, tmp_path: Path
) -> None:
    rc, out, err = await _fast_demo_stopped(redis, tmp_path, signals=1, close_stdout=False)
    assert rc == 0, err[-3000:]
    assert "Traceback" not in err
    assert "demo summary" in out
    assert "status page  http://127.0.0.1:" in out and "/metrics" in out


async def test_a_second_ctrl_c_quits_at_once_even_when_tee_died(
    redis: Redis, tmp_path: Path
) -> None:
    rc, _out, err = await _fast_demo_stopped(redis, tmp_path, signals=2, close_stdout=True)
    assert rc == 130, err[-3000:]
    assert "Traceback" not in err and "BrokenPipeError" not in err


# ---- the parts a user sees first, without running the demo -------------------------------------


def test_the_fleet_is_created_at_once_in_the_emulated_blynk() -> None:
    """60 devices under the example's limits (1/s, 10 at once) would park uplinks for minutes."""
    from blynk_bridge import demo
    from pipeline import config as config_mod

    env = {"PARTICLE_WEBHOOK_SECRET": "s3cret-for-test", "BLYNK_WEBHOOK_SECRET": "s3cret-hook",
           "BLYNK_CLIENT_ID": "c", "BLYNK_CLIENT_SECRET": "cs", "TTS_API_KEY": "NNSXS.K",
           "STATION3_TOKEN": "t"}
    cfg = demo._provision_at_once(config_mod.load(demo.EXAMPLES / "bridge.yaml", env=env), 60)
    for integ in [*cfg.tts, *cfg.particle]:
        assert integ.provision_burst >= 60 and integ.provision_rate >= 60
        assert integ.provision_max >= 60


def _snapshot() -> object:
    from blynk_bridge.demo import Snapshot

    return Snapshot(
        sent_tts=3000, sent_particle=300, ingested=3290, transformed=3290, written=12000,
        blynk_messages=2500, blynk_devices=61, dead={"no_decoded_payload": 10},
        lag=[(f"bbdemo:6c6ac1:{s}", g, 10, 0, 0) for s, g in
             (("uplinks", "transform"), ("writes", "egress"), ("downlinks", "downlink"))],
        statuses=[("tts:farm", "Connected", "3s ago", ""),
                  ("particle:trackers", "Connected", "3s ago", ""),
                  ("blynk:http://127.0.0.1:1", "Connected", "3s ago", "")],
        devices=[(f"eui-70b3d57ed00000{i:02}", "21.5", "50", "-80") for i in range(6)],
        flips=2, webhooks={"sent": 4, "dropped_rate": 0}, switches=[
            (f"eui-70b3d57ed00000{i:02}", "1", "1", "1", "0.48 s") for i in range(3)],
        trips=[480, 490])


@pytest.mark.parametrize(("width", "height"), [(80, 24), (100, 40), (200, 80)])
def test_the_live_view_fits_the_terminal(width: int, height: int) -> None:
    """Taller than the terminal, rich's live view would show its top and "..."; the flow table
    (one line per row at 80 columns) and the footer always show."""
    import io

    from rich.console import Console

    from blynk_bridge.demo import _height, _render

    console = Console(file=io.StringIO(), width=width, height=height, force_terminal=True)
    view = _render(_snapshot(), time.monotonic() - 30, False, console)  # type: ignore[arg-type]
    assert _height(console, view) <= height
    console.print(view)
    text = console.file.getvalue()  # type: ignore[attr-defined]
    assert "round trips" in text and "Ctrl-C stops" in text
    if height >= 80:
        for title in ("streams", "switches flipped", "integrations", "Blynk heard from"):
            assert title in text, title


def test_the_ready_to_paste_line_runs_this_blynk_bridge(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``make demo`` runs .venv/bin/blynk-bridge, which a new user's PATH does not hold."""
    from blynk_bridge.demo import _cli

    script = tmp_path / "venv" / "bin" / "blynk-bridge"
    script.parent.mkdir(parents=True)
    script.write_text("")
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.setattr(sys, "argv", [str(script), "demo"])
    assert _cli() == str(script)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["venv/bin/blynk-bridge", "demo"])
    assert _cli() == "venv/bin/blynk-bridge"
    script.chmod(0o755)
    monkeypatch.setenv("PATH", str(script.parent))
    assert _cli() == "blynk-bridge"
    monkeypatch.setattr(sys, "argv", ["-m", "demo"])  # python -m blynk_bridge
    assert _cli() == f"{sys.executable} -m blynk_bridge"
