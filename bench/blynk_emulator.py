"""How many ``batch/update`` requests/s the Blynk emulator serves on one core.

Starts, one after the other, (1) a bare aiohttp server whose handler does nothing and (2) the
emulator (``blynk-bridge emulate blynk``), each pinned to CPU 0 with ``taskset`` and uvloop, and
loads each from another process pinned to CPU 1 with keep-alive connections: ``wrk`` when it is
installed (``apt-get install -y wrk``), else an aiohttp client. Every emulator request is a real
``batch/update`` of three pins (double, integer, location) for one of ``--devices`` devices, so
the per-device rate limit (50/s) stays in force and is not hit (2,000 devices: up to 100,000
requests/s; a run that hits it says so, and its cheaper 429s would flatter the figure). Prints
requests/s of both and the ratio emulator/bare, both per wall-clock second and per CPU-second of
the server process (what one whole core would serve, robust to other load on the machine).

    .venv/bin/python bench/blynk_emulator.py [--duration 10] [--connections 64] [--devices 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def token(n: int) -> str:
    return f"bench{n:027d}"


def emulator_config(devices: int, port: int) -> dict[str, object]:
    return {
        "regions": {"fra1": port},
        "settings": {"device_rps": 50},
        "templates": [{"id": "TMPLbench0001", "name": "Bench", "datastreams": [
            {"id": 1, "pin": "V0", "name": "temperature", "type": "double", "min": -100,
             "max": 100},
            {"id": 2, "pin": "V1", "name": "humidity", "type": "integer", "min": 0, "max": 100},
            {"id": 3, "pin": "V3", "name": "location", "type": "location"}]}],
        "devices": [{"id": n, "name": f"Bench {n}", "token": token(n),
                     "template": "TMPLbench0001"} for n in range(1, devices + 1)],
    }


BARE = """
import sys, uvloop
from aiohttp import web
async def nothing(request):
    return web.Response()
app = web.Application()
app.router.add_get("/{tail:.*}", nothing)
uvloop.install()
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None)
"""

WRK_SCRIPT = """
local n = 0
local devices = {devices}
request = function()
  n = n + 1
  local d = (n % devices) + 1
  local t = string.format("bench%027d", d)
  return wrk.format("GET", "/external/api/batch/update?token=" .. t .. "&V0=" .. (n % 200 - 100)
    .. ".5&V1=" .. (n % 101) .. "&V3=-73.8731,40.8414")
end
"""


def pinned(cpu: int, argv: list[str]) -> list[str]:
    return ["taskset", "-c", str(cpu), *argv] if shutil.which("taskset") else argv


def wait_listening(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"server on port {port} did not start")


def run_wrk(url: str, duration: int, connections: int, devices: int,
            script: str | None) -> tuple[float, int, int]:
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{duration}s", "--latency"]
    if script:
        argv += ["-s", script]
    out = subprocess.run(pinned(1, [*argv, url]), capture_output=True, text=True,
                         check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    total = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return rps, total, int(m.group(1)) if m else 0


async def _aiohttp_load(url_of: list[str], duration: float, connections: int) -> tuple[int, int]:
    import aiohttp

    done = bad = 0
    stop = time.monotonic() + duration
    conn = aiohttp.TCPConnector(limit=connections)
    async with aiohttp.ClientSession(connector=conn) as s:
        async def worker(k: int) -> None:
            nonlocal done, bad
            i = k
            while time.monotonic() < stop:
                async with s.get(url_of[i % len(url_of)]) as r:
                    await r.read()
                    done += 1
                    bad += r.status >= 400
                i += connections
        await asyncio.gather(*(worker(k) for k in range(connections)))
    return done, bad


def run_aiohttp_load(urls: list[str], duration: int, connections: int) -> tuple[float, int, int]:
    t0 = time.monotonic()
    done, bad = asyncio.run(_aiohttp_load(urls, duration, connections))
    return done / (time.monotonic() - t0), done, bad


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (Linux ``/proc``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(name: str, server_argv: list[str], port: int, load: str, args: argparse.Namespace,
            path_script: str | None, urls: list[str]) -> tuple[float, float, int]:
    """(wall-clock req/s, req per server CPU-second, non-2xx answers).

    Requests per CPU-second is what one fully available core would serve: it holds still when
    other work on the machine steals CPU 0 from the server, which wall-clock req/s does not.
    """
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(pinned(0, server_argv), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, cwd=ROOT)
    try:
        wait_listening(port)
        cpu0 = cpu_seconds(proc.pid)
        if load == "wrk":
            rps, total, bad = run_wrk(urls[0], args.duration, args.connections, args.devices,
                                      path_script)
        else:
            rps, total, bad = run_aiohttp_load(urls, args.duration, args.connections)
        cpu = cpu_seconds(proc.pid) - cpu0
    finally:
        proc.terminate()
        proc.wait(10)
    per_cpu = total / cpu if cpu > 0 else float("nan")
    print(f"{name:<10} {rps:>8,.0f} req/s wall  {per_cpu:>8,.0f} req/CPU-s  "
          f"({total:,} requests, {cpu:.1f} CPU-s, {bad} non-2xx)")
    return rps, per_cpu, bad


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=int, default=10)
    p.add_argument("--connections", type=int, default=64)
    p.add_argument("--devices", type=int, default=2000)
    p.add_argument("--load", choices=["wrk", "aiohttp"],
                   default="wrk" if shutil.which("wrk") else "aiohttp")
    args = p.parse_args(argv)
    print(f"load generator: {args.load}, {args.connections} keep-alive connections, "
          f"{args.duration}s each; server pinned to CPU 0, load to CPU 1 "
          f"({os.cpu_count()} CPUs, python {sys.version.split()[0]})")
    with tempfile.TemporaryDirectory() as tmp:
        bare_port = free_port()
        bare_py = Path(tmp) / "bare.py"
        bare_py.write_text(BARE)
        bare_url = f"http://127.0.0.1:{bare_port}/external/api/batch/update?token=x&V0=1"
        bare = measure("bare", [PYTHON, str(bare_py), str(bare_port)], bare_port, args.load,
                       args, None, [bare_url])

        emu_port = free_port()
        cfg = Path(tmp) / "emulator.yaml"
        cfg.write_text(yaml.safe_dump(emulator_config(args.devices, emu_port)))
        script = Path(tmp) / "batch.lua"
        script.write_text(WRK_SCRIPT.replace("{devices}", str(args.devices)))
        base = f"http://127.0.0.1:{emu_port}/external/api/batch/update"
        urls = [f"{base}?token={token(d)}&V0={d % 200 - 100}.5&V1={d % 101}&V3=-73.8731,40.8414"
                for d in range(1, args.devices + 1)]
        emu = measure("emulator", [PYTHON, "-m", "blynk_bridge", "--log-level", "WARNING",
                                   "emulate", "blynk", "-c", str(cfg)],
                      emu_port, args.load, args, str(script), urls)
    print(f"ratio emulator/bare: {emu[0] / bare[0]:.2f} wall, {emu[1] / bare[1]:.2f} per CPU-s")
    print(f"load average now: {os.getloadavg()[0]:.2f} (other work on the machine skews wall)")
    if emu[2]:
        print(f"WARNING: {emu[2]} emulator answers were not 2xx")
    return 0


if __name__ == "__main__":
    sys.exit(main())
