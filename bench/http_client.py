"""Client CPU per Blynk ``batch/update``: the lean HttpClient against aiohttp's client.

Starts the Blynk emulator (``blynk-bridge emulate blynk``) pinned to CPU 0 and, in this process
pinned to CPU 1 (uvloop), sends ``--requests`` real ``batch/update`` GETs of three pins for
``--devices`` distinct devices, ``--inflight`` at a time, three ways one after the other:

* ``aiohttp``: ``ClientSession.get`` (the baseline of the same run),
* ``request``: :meth:`pipeline.blynk.http.HttpClient.request` (egress's coroutine path),
* ``nowait``: :meth:`HttpClient.send_nowait` from callbacks (egress's task-free path).

Prints this process's CPU time (user + system) per request and the ratio to aiohttp: what the
device-API client costs egress per distinct-device write, framing and parsing the answer
included. Every answer must be a 200 (the run fails otherwise).

    .venv/bin/python -m bench.http_client [--requests 30000] [--inflight 64] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from bench.blynk_emulator import emulator_config, free_port, pinned, token, wait_listening
from bench.common import pin_cpu
from pipeline.blynk.http import HttpClient, Response

ROOT = Path(__file__).resolve().parent.parent


#: What came back other than a 200 (status or exception name → count), reported on failure.
OTHER: Counter[int | str] = Counter()


def note(status: int | str) -> bool:
    if status == 200:
        return True
    OTHER[status] += 1
    return False


def targets(devices: int, n: int) -> list[str]:
    return [f"/external/api/batch/update?token={token(i % devices + 1)}&V0={i % 200 - 100}.5"
            f"&V1={i % 101}&V3=-73.8731,40.8414" for i in range(n)]


async def via_aiohttp(base: str, paths: list[str], inflight: int) -> int:
    ok = 0
    conn = aiohttp.TCPConnector(limit=inflight)
    async with aiohttp.ClientSession(connector=conn) as s:
        async def worker(k: int) -> None:
            nonlocal ok
            for path in paths[k::inflight]:
                async with s.get(base + path) as r:
                    await r.read()
                    ok += note(r.status)
        await asyncio.gather(*(worker(k) for k in range(inflight)))
    return ok


async def via_request(base: str, paths: list[str], inflight: int) -> int:
    ok = 0
    client = HttpClient(limit=inflight)

    async def worker(k: int) -> None:
        nonlocal ok
        for path in paths[k::inflight]:
            resp = await client.request(base, path)  # (not `ok += await …`: a lost update)
            ok += note(resp.status)

    try:
        await asyncio.gather(*(worker(k) for k in range(inflight)))
    finally:
        await client.close()
    return ok


async def via_nowait(base: str, paths: list[str], inflight: int) -> int:
    """Warm ``inflight`` connections with ``request``, then send the rest from callbacks."""
    ok = 0
    client = HttpClient(limit=inflight)
    finished = asyncio.get_running_loop().create_future()
    todo = iter(paths[inflight:])
    left = len(paths)

    def send() -> None:
        for path in todo:
            if not client.send_nowait(base, path, on_done):
                raise RuntimeError("no idle connection for send_nowait")
            return

    def on_done(resp: Response | BaseException) -> None:
        nonlocal ok, left
        ok += note(resp.status if isinstance(resp, Response) else type(resp).__name__)
        left -= 1
        if left == 0:
            finished.set_result(None)
        else:
            send()

    async def warm(path: str) -> None:
        nonlocal ok, left
        resp = await client.request(base, path)
        ok += note(resp.status)
        left -= 1

    try:
        await asyncio.gather(*(warm(p) for p in paths[:inflight]))
        for _ in range(inflight):
            send()
        await finished
    finally:
        await client.close()
    return ok


Way = Callable[[str, list[str], int], Coroutine[Any, Any, int]]
WAYS: dict[str, Way] = {"aiohttp": via_aiohttp, "request": via_request, "nowait": via_nowait}


def run(way: Way, base: str, paths: list[str], inflight: int) -> tuple[float, float]:
    """(CPU µs per request, wall seconds) of one pass."""
    import uvloop

    t0, c0 = time.monotonic(), time.process_time()
    ok = uvloop.run(way(base, paths, inflight))
    cpu, wall = time.process_time() - c0, time.monotonic() - t0
    if ok != len(paths):
        raise SystemExit(f"{len(paths) - ok} of {len(paths)} answers were not 200: {OTHER}")
    return cpu / len(paths) * 1e6, wall


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=30_000)
    p.add_argument("--devices", type=int, default=5_000)
    p.add_argument("--inflight", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    pin_cpu(1)
    print(f"{args.requests:,} batch/update GETs per pass, {args.devices:,} devices, "
          f"{args.inflight} in flight; emulator on CPU 0, client on CPU 1; "
          f"load average {os.getloadavg()[0]:.2f}")
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        cfg = Path(tmp) / "emulator.yaml"
        config = emulator_config(args.devices, port)
        config["settings"] = {"device_rps": None, "daily_updates": None}
        cfg.write_text(yaml.safe_dump(config))
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        proc = subprocess.Popen(pinned(0, [sys.executable, "-m", "blynk_bridge", "--log-level",
                                           "WARNING", "emulate", "blynk", "-c", str(cfg)]),
                                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                cwd=ROOT)
        try:
            wait_listening(port)
            base = f"http://127.0.0.1:{port}"
            paths = targets(args.devices, args.requests)
            best: dict[str, float] = {}
            for r in range(args.rounds):
                for name, way in WAYS.items():
                    us, wall = run(way, base, paths, args.inflight)
                    best[name] = min(best.get(name, us), us)
                    print(f"round {r + 1} {name:<8} {us:6.1f} CPU µs/request "
                          f"({len(paths) / wall:,.0f} req/s wall)")
        finally:
            proc.terminate()
            proc.wait(10)
    print("best of rounds: " + ", ".join(
        f"{n} {us:.1f} µs ({us / best['aiohttp']:.2f}× aiohttp)" for n, us in best.items()))
    print(f"load average now: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
