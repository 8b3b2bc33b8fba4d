"""Memory of idle Blynk device MQTT sessions: one client object per session vs many per loop.

Each client kind runs in a child process of its own against a private Mosquitto: the child
measures its RSS after imports, opens N sessions (username ``device``, password a token,
subscribed to ``downlink/#``, keepalive 45 s, as a Blynk device session), waits until every one
is subscribed, collects garbage, and measures again. ``RSS per session`` = the difference / N.

Kinds: ``aiomqtt`` (the locked dependency; one aiomqtt.Client — a paho client plus its asyncio
glue — per session), ``gmqtt`` and ``amqtt`` (maintained asyncio clients, if importable:
install them into a scratch directory, e.g. ``pip install --target /tmp/h12amqtt amqtt==0.12.1``,
and pass ``--extra-path``; neither is a dependency), ``lean`` (:mod:`pipeline.blynk.device_mqtt`).

    .venv/bin/python -m bench.sessions --sessions 2000 [--kinds lean,aiomqtt,gmqtt]
        [--extra-path /tmp/h12libs]

``--latency`` measures the whole channel instead: the Blynk emulator (its device MQTT API, one
process), ``blynk-bridge blynk-sessions`` and ``blynk-bridge downlink`` (one process each), the
real Redis and a private Mosquitto standing in for TTS. ``--devices`` devices of a
``downlinks: mqtt`` template are made live by one BlynkWrite each (what transform hands egress);
once every session is up, the stage's RSS is read (sessions per process, RSS per session) and
app writes (``POST /_admin/devices/{id}/app-write``, each a distinct value) are sent at each
rate, round-robin; a subscriber on ``down/push`` records each value's arrival. Latency = app
write sent → ``down/push`` received.

    .venv/bin/python -m bench.sessions --latency --devices 10000 --rates 100,1000
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
import urllib.request
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import aiohttp

from bench.common import (
    Processes,
    SessionCounter,
    fmt_mib,
    machine,
    rss_bytes,
    start_mosquitto,
    table,
)
from bench.sessions_fleet import EMULATOR, VALVE_TEMPLATE, go_live


def _rss() -> int:
    return rss_bytes(os.getpid())[0]


async def _lean(n: int, port: int, conc: int) -> list[Any]:
    from pipeline.blynk.device_mqtt import Keepalive, Session, mcu_info, open_session

    h = SessionCounter(n, log_closes=True)
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
    await asyncio.wait_for(h.ready.wait(), 60)
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


async def _amqtt(n: int, port: int, conc: int) -> list[Any]:
    from amqtt.client import MQTTClient

    sem = asyncio.Semaphore(conc)
    clients = []

    async def one(i: int) -> None:
        c = MQTTClient(client_id=f"m{os.getpid()}-{i}",
                       config={"keep_alive": 45, "auto_reconnect": False})
        async with sem:
            await c.connect(f"mqtt://device:token-{i:028d}@127.0.0.1:{port}/")
            await c.subscribe([("downlink/#", 0)])
        clients.append(c)

    await asyncio.gather(*(one(i) for i in range(n)))
    return clients


def child(kind: str, n: int, port: int, conc: int) -> None:
    import uvloop

    async def main() -> None:
        # Import the client library before the baseline so only sessions are counted.
        if kind == "aiomqtt":
            import aiomqtt  # noqa: F401
        elif kind == "gmqtt":
            import gmqtt  # noqa: F401
        elif kind == "amqtt":
            import amqtt.client  # noqa: F401
        else:
            import pipeline.blynk.device_mqtt  # noqa: F401
        gc.collect()
        base = _rss()
        t0 = time.monotonic()
        fn = {"lean": _lean, "aiomqtt": _aiomqtt, "gmqtt": _gmqtt, "amqtt": _amqtt}[kind]
        held = await fn(n, port, conc)
        opened_s = time.monotonic() - t0
        gc.collect()
        await asyncio.sleep(1)
        after = _rss()
        print(json.dumps({"kind": kind, "n": len(held), "base": base, "after": after,
                          "open_s": opened_s}), flush=True)

    uvloop.run(main())


# --- latency: app write → down/push through the sessions channel ------------------------------

BRIDGE = """\
redis: {{url: "{redis}", prefix: "{prefix}"}}
streams: {{block_ms: 1000}}
metrics: {{host: 127.0.0.1, port: "${{METRICS_PORT}}"}}
blynk:
  servers: {{fra1: "http://127.0.0.1:{http_port}"}}
  default_server: fra1
blynk_sessions:
  servers: {{fra1: "mqtt://127.0.0.1:{mqtt_port}"}}
  connect_rate: 2000
  connect_burst: 200
""" + VALVE_TEMPLATE + """\
tts:
  - {{name: fleet, app_id: {app}, host: 127.0.0.1, port: {broker}, insecure: true,
      api_key: NNSXS.BENCH, template: valve, downlink_f_port: 2}}
devices:
{devices}
"""


def run_app_writes(http_port: int, rate: float, seconds: float, devices: int,
                   first: int) -> None:
    """``rate × seconds`` app writes, paced; print ``{value: sent ns}`` and bad answers."""
    from bench.downlinks import _run, paced_posts, post_counting

    base = f"http://127.0.0.1:{http_port}/_admin/devices"
    sent: dict[int, int] = {}
    bad: dict[str, int] = {}

    async def post(http: aiohttp.ClientSession, value: int) -> None:
        sent[value] = time.time_ns()
        await post_counting(http, f"{base}/{value % devices + 1}/app-write", bad,
                            json={"pin": "V3", "value": value})

    elapsed = _run(paced_posts(rate, seconds, first, post))
    print(json.dumps({"sent": sent, "bad": bad, "elapsed": elapsed}), flush=True)


async def _make_live(prefix: str, devices: int, server: str) -> None:
    from bench.downlinks import REDIS_URL, device_name, token_of
    from pipeline.keys import Keys
    from pipeline.streams import connect

    redis = connect(REDIS_URL)
    try:
        await go_live(redis, Keys(prefix), devices, token_of, device_name, lambda i: server)
    finally:
        await redis.aclose()


async def _replicas(prefix: str) -> int:
    """How many blynk-sessions replicas have written their heartbeat."""
    from bench.downlinks import REDIS_URL
    from pipeline.keys import Keys
    from pipeline.streams import connect

    redis = connect(REDIS_URL)
    try:
        return int(await redis.zcard(Keys(prefix).sessions_replicas()))
    finally:
        await redis.aclose()


def _admin_sessions(http_port: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/_admin/mqtt", timeout=10) as r:
        return int(json.loads(r.read())["sessions"])


def latency(args: argparse.Namespace) -> int:
    from bench.common import BenchError, delete_prefix, fmt_ms, free_port, percentile, wait_port
    from bench.downlinks import (
        REDIS_URL,
        _python,
        device_name,
        start_subscriber,
        token_of,
    )

    rows: list[list[object]] = []
    print(machine())
    with Processes(keep_dir=args.keep_logs) as procs:
        print(f"logs: {procs.dir}", file=sys.stderr)
        _, broker = start_mosquitto(procs)
        http_port, mqtt_port, metrics_port = free_port(), free_port(), free_port()
        app = f"bench-sess-{os.getpid()}"
        prefix = f"bbbench:sess:{os.getpid()}:"
        emu_devices = "\n".join(
            f"  - {{name: {device_name(i)}, token: {token_of(i)}, template: TMPL01, "
            f"id: {i + 1}}}" for i in range(args.devices))
        emu_cfg = procs.dir / "blynk.yaml"
        emu_cfg.write_text(EMULATOR.format(region="fra1", http_port=http_port, mqtt_port=mqtt_port,
                                           devices=emu_devices))
        rows_cfg = "\n".join(
            f"  - {{source: tts, integration: fleet, device: {device_name(i)}, "
            f"token: {token_of(i)}, template: valve}}" for i in range(args.devices))
        bridge_cfg = procs.dir / "bridge.yaml"
        bridge_cfg.write_text(BRIDGE.format(redis=REDIS_URL, prefix=prefix, http_port=http_port,
                                            mqtt_port=mqtt_port, app=app, broker=broker,
                                            devices=rows_cfg))
        emu = procs.spawn("blynk", [sys.executable, "-m", "blynk_bridge", "--log-level",
                                    "WARNING", "emulate", "blynk", "-c", str(emu_cfg)])
        wait_port(http_port, proc=emu, timeout_s=120)
        procs.spawn("downlink", [sys.executable, "-m", "blynk_bridge", "--log-level",
                                        "WARNING", "--log-format", "text", "downlink", "-c",
                                        str(bridge_cfg)], env={"METRICS_PORT": str(free_port())})
        sess = procs.spawn("sessions", [sys.executable, "-m", "blynk_bridge", "--log-level",
                                        "WARNING", "--log-format", "text", "blynk-sessions", "-c",
                                        str(bridge_cfg)], env={"METRICS_PORT": str(metrics_port)})
        wait_port(metrics_port, proc=sess, timeout_s=120)
        # The stage's watch sees the writes made after its startup: wait for its first heartbeat
        # (written by the main loop, so startup has returned) before making the devices live.
        t0 = time.monotonic()
        while not asyncio.run(_replicas(prefix)):
            procs.check_alive()
            if time.monotonic() - t0 > 120:
                raise BenchError("blynk-sessions did not start within 120 s")
            time.sleep(0.1)
        rss0 = rss_bytes(sess.pid)[0]
        t0 = time.monotonic()
        asyncio.run(_make_live(prefix, args.devices, f"http://127.0.0.1:{http_port}"))
        while _admin_sessions(http_port) < args.devices:
            procs.check_alive()
            if time.monotonic() - t0 > args.open_timeout:
                raise BenchError(f"sessions did not all open within {args.open_timeout} s "
                                 f"({_admin_sessions(http_port)} did)")
            time.sleep(0.2)
        open_s = time.monotonic() - t0
        time.sleep(args.settle_s)
        rss1 = rss_bytes(sess.pid)[0]
        print(f"blynk-sessions: {args.devices} sessions opened in {open_s:.1f} s; RSS "
              f"{fmt_mib(rss0)} MiB with none, {fmt_mib(rss1)} MiB with all: "
              f"{(rss1 - rss0) / args.devices / 1024:.1f} KiB per session")
        sub = start_subscriber(procs, broker, app)
        assert sub.popen.stdout is not None and sub.popen.stdin is not None
        first = 0
        results = []
        for rate in [float(r) for r in args.rates.split(",")]:
            gen = procs.spawn("load", _python(
                f"from bench.sessions import run_app_writes; run_app_writes({http_port}, "
                f"{rate}, {args.seconds}, {args.devices}, {first})"), pipes=True)
            assert gen.popen.stdout is not None
            load = json.loads(gen.popen.stdout.read().decode())
            gen.popen.wait()
            results.append((rate, load))
            first += 10_000_000
        answered = sum(len(ld["sent"]) - sum(ld["bad"].values()) for _, ld in results)
        sub.popen.stdin.write(f"{answered}\n".encode())
        sub.popen.stdin.flush()
        got = {int(k): v for k, v in json.loads(sub.popen.stdout.readline())["got"].items()}
        for rate, load in results:
            lat = sorted((got[int(v)] - ns) / 1e6 for v, ns in load["sent"].items()
                         if int(v) in got)
            rows.append([f"{rate:.0f}/s", len(load["sent"]), len(lat),
                         len(load["sent"]) - len(lat), fmt_ms(percentile(lat, 50)),
                         fmt_ms(percentile(lat, 99)), str(load["bad"] or "-")])
        procs.stop(sub)
        asyncio.run(delete_prefix(REDIS_URL, prefix))
    print(f"load average {os.getloadavg()[0]:.2f}")
    print(table(["rate", "sent", "delivered", "missing", "p50 ms", "p99 ms", "refused"], rows))
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--latency", action="store_true", help="app write → down/push (see above)")
    ap.add_argument("--devices", type=int, default=10_000)
    ap.add_argument("--rates", default="100,1000")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--open-timeout", type=float, default=600.0)
    ap.add_argument("--settle-s", type=float, default=2.0,
                    help="--latency: wait this long after the opens before reading the RSS")
    ap.add_argument("--keep-logs", action="store_true")
    ap.add_argument("--sessions", type=int, default=2000)
    ap.add_argument("--kinds", default="lean,aiomqtt,gmqtt")
    ap.add_argument("--concurrency", type=int, default=50, help="connects in flight")
    ap.add_argument("--extra-path", default="",
                    help="directories (comma-separated) with gmqtt/amqtt (not locked)")
    ap.add_argument("--child", nargs=3, metavar=("KIND", "N", "PORT"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.latency:
        return latency(args)
    if args.child:
        for extra in filter(None, args.extra_path.split(",")):
            sys.path.append(extra)
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
