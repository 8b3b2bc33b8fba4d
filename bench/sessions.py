"""Memory of idle Blynk device MQTT sessions: one client object per session vs many per loop.

Each client kind runs in a child process of its own against a private Mosquitto: the child
measures its RSS after imports, opens N sessions (username ``device``, password a token,
subscribed to ``downlink/#``, keepalive 45 s, as a Blynk device session), waits until every one
is subscribed, collects garbage, and measures again. ``RSS per session`` = the difference / N.

Kinds: ``aiomqtt`` (the locked dependency; one aiomqtt.Client — a paho client plus its asyncio
glue — per session), ``gmqtt`` (a maintained asyncio client, if importable: install it into a
scratch directory and pass ``--extra-path``), ``lean`` (:mod:`pipeline.blynk.device_mqtt`).

    .venv/bin/python -m bench.sessions --sessions 2000 [--kinds lean,aiomqtt,gmqtt]
        [--extra-path /tmp/h12libs]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import subprocess
import sys
import time
from typing import Any

from bench.common import Processes, fmt_mib, machine, rss_bytes, start_mosquitto, table


def _rss() -> int:
    return rss_bytes(os.getpid())[0]


async def _lean(n: int, port: int, conc: int) -> list[Any]:
    from pipeline.blynk.device_mqtt import Keepalive, Session, mcu_info, open_session

    ready = asyncio.Event()
    count = [0]

    class H:
        def session_ready(self, s: Session) -> None:
            count[0] += 1
            if count[0] == n:
                ready.set()

        def session_message(self, s: Session, topic: str, payload: bytes) -> None:
            pass

        def session_closed(self, s: Session, reason: str) -> None:
            print(f"closed: {reason}", file=sys.stderr)

    h = H()
    ka = Keepalive(45)
    sem = asyncio.Semaphore(conc)
    sessions = []

    async def one(i: int) -> None:
        s = Session(f"k{i}", f"token-{i:028d}", h, info=mcu_info("TMPL0001"))
        async with sem:
            await open_session(s, "127.0.0.1", port)
        ka.add(s)
        sessions.append(s)

    await asyncio.gather(*(one(i) for i in range(n)))
    await asyncio.wait_for(ready.wait(), 60)
    return sessions


async def _aiomqtt(n: int, port: int, conc: int) -> list[Any]:
    import aiomqtt

    sem = asyncio.Semaphore(conc)
    clients = []

    async def one(i: int) -> None:
        c = aiomqtt.Client("127.0.0.1", port, username="device", password=f"token-{i:028d}",
                           identifier=f"a{os.getpid()}-{i}", keepalive=45)
        async with sem:
            await c.__aenter__()
            await c.subscribe("downlink/#")
        clients.append(c)

    await asyncio.gather(*(one(i) for i in range(n)))
    return clients


async def _gmqtt(n: int, port: int, conc: int) -> list[Any]:
    import gmqtt

    sem = asyncio.Semaphore(conc)
    clients = []

    async def one(i: int) -> None:
        c = gmqtt.Client(f"g{os.getpid()}-{i}")
        c.set_auth_credentials("device", f"token-{i:028d}")
        async with sem:
            await c.connect("127.0.0.1", port, keepalive=45)
            c.subscribe("downlink/#")
        clients.append(c)

    await asyncio.gather(*(one(i) for i in range(n)))
    await asyncio.sleep(2)  # SUBACKs
    return clients


def child(kind: str, n: int, port: int, conc: int) -> None:
    import uvloop

    async def main() -> None:
        # Import the client library before the baseline so only sessions are counted.
        if kind == "aiomqtt":
            import aiomqtt  # noqa: F401
        elif kind == "gmqtt":
            import gmqtt  # noqa: F401
        else:
            import pipeline.blynk.device_mqtt  # noqa: F401
        gc.collect()
        base = _rss()
        t0 = time.monotonic()
        fn = {"lean": _lean, "aiomqtt": _aiomqtt, "gmqtt": _gmqtt}[kind]
        held = await fn(n, port, conc)
        opened_s = time.monotonic() - t0
        gc.collect()
        await asyncio.sleep(1)
        after = _rss()
        print(json.dumps({"kind": kind, "n": len(held), "base": base, "after": after,
                          "open_s": opened_s}), flush=True)

    uvloop.run(main())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--sessions", type=int, default=2000)
    ap.add_argument("--kinds", default="lean,aiomqtt,gmqtt")
    ap.add_argument("--concurrency", type=int, default=50, help="connects in flight")
    ap.add_argument("--extra-path", default="", help="directory with gmqtt (not locked)")
    ap.add_argument("--child", nargs=3, metavar=("KIND", "N", "PORT"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        if args.extra_path:
            sys.path.append(args.extra_path)
        child(args.child[0], int(args.child[1]), int(args.child[2]), args.concurrency)
        return 0
    rows = []
    with Processes() as procs:
        _, port = start_mosquitto(procs)
        for kind in args.kinds.split(","):
            cmd = [sys.executable, "-m", "bench.sessions", "--concurrency",
                   str(args.concurrency), "--extra-path", args.extra_path,
                   "--child", kind, str(args.sessions), str(port)]
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
            if out.returncode != 0:
                rows.append([kind, "-", "-", "-", "-", out.stderr.strip().splitlines()[-1][:60]])
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            per = (r["after"] - r["base"]) / max(1, r["n"])
            rows.append([kind, r["n"], fmt_mib(r["base"]), fmt_mib(r["after"]),
                         f"{per / 1024:.1f} KiB", f"{r['open_s']:.1f} s"])
    lean = next((r for r in rows if r[0] == "lean" and r[1] != "-"), None)
    print(machine())
    print(table(["client", "sessions", "RSS before", "RSS after", "RSS/session", "open time"],
                rows))
    if lean is not None:
        base = float(str(lean[4]).split()[0])
        for r in rows:
            if r is not lean and r[1] != "-":
                print(f"{r[0]}: {float(str(r[4]).split()[0]) / base:.1f}x the lean client's "
                      "RSS per session")
    return 0


if __name__ == "__main__":
    sys.exit(main())
