"""Downlinks: Blynk webhook → TTS ``down/push`` latency and CPU per command, against a bare relay.

    .venv/bin/python -m bench.downlinks [--rates 100,1000] [--seconds 10] [--devices 1000]
        [--baseline-src DIR]

Each rate runs twice, in the same run, against a private Mosquitto (``bench/common.py``):

* **bridge**: ``blynk-bridge ingest-http`` and ``blynk-bridge downlink`` as separate processes
  on the real Redis, ``--devices`` TTS devices in the static table (so in the registry and its
  reverse index): Basic auth, parse, ``XADD`` (2xx only once Redis has it), read by the stage,
  resolve, type, echo check, latest-wins, QoS 1 publish, record + ack;
* **baseline** (with ``--baseline-src DIR``, e.g. ``git archive <commit> | tar -x -C DIR``): the
  same two stages run from another source tree (``PYTHONPATH=DIR``), to compare two versions in
  the same run;
* **bare**: the least a webhook → MQTT relay costs — one aiohttp handler that checks the same
  Basic auth, decodes the JSON, looks the token up in a dict and publishes the same TTS body
  with QoS 1 before answering (no Redis: nothing survives a crash, no latest-wins, no TTL).

The load generator (a child process) sends signed webhooks exactly as Blynk's Custom JSON body
renders them, paced at the rate, round-robin over the devices; every command has its own value
(a global sequence number) and a Blynk time that grows per device, so latest-wins collapses
commands only when they queue behind each other (counted: ``collapsed``). A subscriber (another
child) on ``v3/{app}@ttn/devices/+/down/push`` records when each command's value arrives.
Latency = webhook sent → ``down/push`` received (wall clock, one machine). CPU per command = CPU
time of the server process(es) from the first command to the last arrival, over commands
delivered. Results go to ``BENCHMARKS.md`` by hand, with the command and machine.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import secrets
import sys
import time
import urllib.request
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import aiohttp

from bench.common import (
    BenchError,
    PortTaken,
    Proc,
    Processes,
    UsageProbe,
    delete_prefix,
    fmt_ms,
    free_port,
    interrupt_as_exception,
    machine,
    percentile,
    start_mosquitto,
    table,
    wait_port,
)

REDIS_URL = "redis://127.0.0.1:6379/0"
USER, PASSWORD = "blynk", "bench-hook-pass"
AUTH = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
#: The README's Custom JSON body, as Blynk renders it.
BODY = ('{{"device_id": "{id}", "device_authToken": "{token}", "device_pin": "v3", '
        '"device_pinValue": "{value}", "timestamp_unix": "{ts}", "device_name": "{name}"}}')

CONFIG = """\
redis: {{url: "{redis}", prefix: "{prefix}"}}
streams: {{block_ms: 1000}}
ingest_http: {{host: 127.0.0.1, port: {port}}}
metrics: {{host: 127.0.0.1, port: "${{METRICS_PORT}}"}}
templates:
  - name: valve
    datastreams:
      - {{name: switch, pin: V2, type: integer, min: 0, max: 1}}
      - {{name: setpoint, pin: V3, type: integer}}
tts:
  - {{name: fleet, app_id: {app}, host: 127.0.0.1, port: {mqtt_port}, insecure: true,
      api_key: NNSXS.BENCH, template: valve, downlink_f_port: 2}}
blynk_webhooks:
  - {{name: app, auth: {{username: {user}, password: "{password}"}}}}
devices:
{devices}
"""


def device_name(i: int) -> str:
    return f"valve-{i:05d}"


def token_of(i: int) -> str:
    return f"benchdown{i:05d}".ljust(32, "x")


def _run(coro: Any) -> Any:
    try:
        import uvloop

        return uvloop.run(coro)
    except ImportError:  # pragma: no cover
        return asyncio.run(coro)


# --- the bare relay (child process) ---------------------------------------------------------


def serve_bare(port: int, mqtt_port: int, app: str, devices: int) -> None:
    """One aiohttp handler: auth, decode, look up, publish QoS 1, answer."""
    from aiohttp import web

    from pipeline import mqtt

    by_token = {token_of(i): device_name(i) for i in range(devices)}
    decode = json.loads

    async def amain() -> None:
        settings = mqtt.Settings(host="127.0.0.1", port=mqtt_port,
                                 client_id=f"bare-{secrets.token_hex(3)}")
        async with mqtt.Session(settings) as session:
            async def handler(request: web.Request) -> web.Response:
                if request.headers.get("Authorization") != AUTH:
                    return web.Response(status=401)
                body = decode(await request.read())
                device = by_token.get(body["device_authToken"])
                if device is None:
                    return web.Response(status=404)
                down = {"downlinks": [{"f_port": 2, "decoded_payload": {
                    "name": "setpoint", "pin": body["device_pin"],
                    "ts": int(body["timestamp_unix"]), "value": int(body["device_pinValue"])},
                    "priority": "NORMAL"}]}
                await session.publish(f"v3/{app}@ttn/devices/{device}/down/push",
                                      json.dumps(down).encode(), qos=1)
                return web.Response()

            web_app = web.Application()
            web_app.router.add_post("/blynk/app", handler)
            runner = web.AppRunner(web_app, access_log=None)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", port).start()
            await asyncio.Event().wait()

    _run(amain())


# --- the subscriber (child process) -------------------------------------------------------


def run_subscriber(mqtt_port: int, app: str) -> None:
    """Print ``ready``; record each push's value and arrival; once stdin names how many were
    answered, wait for them (or 5 s of silence) and print ``{value: arrival ns}``."""
    from pipeline import mqtt

    async def amain() -> None:
        got: dict[int, int] = {}
        dupes = 0
        loop = asyncio.get_running_loop()
        settings = mqtt.Settings(host="127.0.0.1", port=mqtt_port,
                                 client_id=f"devices-{secrets.token_hex(3)}")
        async with mqtt.Session(settings) as session:
            await session.subscribe([f"v3/{app}@ttn/devices/+/down/push"])
            print("ready", flush=True)
            progress = asyncio.Event()

            async def read() -> None:
                nonlocal dupes
                async for _topic, payload in session.messages():
                    now = time.time_ns()
                    value = json.loads(payload)["downlinks"][0]["decoded_payload"]["value"]
                    if value in got:
                        dupes += 1
                    got.setdefault(value, now)
                    progress.set()

            reader = asyncio.create_task(read())
            expected = int(await loop.run_in_executor(None, sys.stdin.readline))
            while True:
                progress.clear()  # before the check: a message after it wakes the wait
                if len(got) >= expected:
                    break
                try:
                    await asyncio.wait_for(progress.wait(), 5.0)
                except TimeoutError:
                    break  # 5 s without a message: the rest is not coming
            reader.cancel()
        print(json.dumps({"got": got, "dupes": dupes}), flush=True)

    _run(amain())


# --- the load generator (child process) -----------------------------------------------------


Post = Callable[["aiohttp.ClientSession", int], Coroutine[Any, Any, None]]


async def paced_posts(rate: float, seconds: float, first: int, post: Post) -> float:
    """Run ``post(http, first + k)`` for ``k < rate × seconds`` on a schedule of ``rate`` per
    second (a late start goes at once, none is skipped), all concurrent on one HTTP session;
    return the seconds it took. ``post`` records what it sent and how it was answered."""
    import aiohttp

    n = int(rate * seconds)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=256)) as http:
        tasks: set[asyncio.Task[None]] = set()
        start = time.monotonic()
        for k in range(n):
            delay = start + k / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            t = asyncio.create_task(post(http, first + k))
            tasks.add(t)
            t.add_done_callback(tasks.discard)
        await asyncio.gather(*tasks)
        elapsed = time.monotonic() - start
    return elapsed


async def post_counting(http: aiohttp.ClientSession, url: str, bad: dict[str, int],
                        **kwargs: Any) -> None:
    """POST and count any answer but 200 (or a client error) in ``bad`` by status / error name."""
    import aiohttp

    try:
        async with http.post(url, **kwargs) as resp:
            await resp.read()
            if resp.status != 200:
                bad[str(resp.status)] = bad.get(str(resp.status), 0) + 1
    except aiohttp.ClientError as exc:
        bad[type(exc).__name__] = bad.get(type(exc).__name__, 0) + 1


def run_load(port: int, rate: float, seconds: float, devices: int, first: int) -> None:
    """Send ``rate × seconds`` webhooks, paced; print ``{value: sent ns}`` and bad answers."""
    url = f"http://127.0.0.1:{port}/blynk/app"
    headers = {"Authorization": AUTH, "Content-Type": "application/json"}
    sent: dict[int, int] = {}
    bad: dict[str, int] = {}

    async def post(http: aiohttp.ClientSession, value: int) -> None:
        i = value % devices
        ts_ms = time.time_ns() // 1_000_000
        body = BODY.format(id=i + 1, token=token_of(i), value=value, ts=ts_ms,
                           name=device_name(i)).encode()
        sent[value] = time.time_ns()
        await post_counting(http, url, bad, data=body, headers=headers)

    elapsed = _run(paced_posts(rate, seconds, first, post))
    print(json.dumps({"sent": sent, "bad": bad, "elapsed": elapsed}), flush=True)


# --- one round --------------------------------------------------------------------------


def _python(code: str) -> list[str]:
    from bench.common import ROOT

    return [sys.executable, "-c", f"import sys; sys.path.insert(0, {str(ROOT)!r}); {code}"]


def start_subscriber(procs: Processes, mqtt_port: int, app: str) -> Proc:
    """:func:`run_subscriber` in a child process, returned once it says it is subscribed."""
    sub = procs.spawn("subscriber", _python(
        f"from bench.downlinks import run_subscriber; run_subscriber({mqtt_port}, {app!r})"),
        pipes=True)
    assert sub.popen.stdout is not None and sub.popen.stdin is not None
    if sub.popen.stdout.readline().strip() != b"ready":
        raise BenchError(f"subscriber did not start; log: {sub.log_path}\n{sub.tail()}")
    return sub


def _scrape(port: int) -> dict[str, float]:
    """``bb_downlinks_total`` by outcome from a process's /metrics."""
    out: dict[str, float] = {}
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        for line in resp.read().decode().splitlines():
            if line.startswith("bb_downlinks_total{"):
                labels, value = line.rsplit(" ", 1)
                outcome = labels.split('outcome="', 1)[1].split('"', 1)[0]
                out[outcome] = out.get(outcome, 0.0) + float(value)
    return out


def one_round(procs: Processes, kind: str, rate: float, args: argparse.Namespace,
              mqtt_port: int, first: int) -> dict[str, Any]:
    app = f"bench-down-{secrets.token_hex(3)}"
    port = free_port()
    servers = []
    metrics_port = free_port()
    prefix = f"bbbench:down:{secrets.token_hex(3)}:"
    # "baseline": the bridge run from another source tree (same venv, same config)
    tree = {"PYTHONPATH": args.baseline_src} if kind == "baseline" else {}
    if kind == "bare":
        servers.append(procs.spawn("bare", _python(
            f"from bench.downlinks import serve_bare; serve_bare({port}, {mqtt_port}, "
            f"{app!r}, {args.devices})")))
    else:
        rows = "\n".join(
            f"  - {{source: tts, integration: fleet, device: {device_name(i)}, "
            f"token: {token_of(i)}, template: valve}}" for i in range(args.devices))
        config = procs.dir / f"bridge-{port}.yaml"
        config.write_text(CONFIG.format(redis=REDIS_URL, prefix=prefix, port=port,
                                        app=app, mqtt_port=mqtt_port, user=USER,
                                        password=PASSWORD, devices=rows))
        for stage, mport in (("ingest-http", free_port()), ("downlink", metrics_port)):
            servers.append(procs.spawn(stage, [
                sys.executable, "-m", "blynk_bridge", "--log-level", "WARNING",
                "--log-format", "text", stage, "-c", str(config)],
                env={"METRICS_PORT": str(mport), **tree},
                cwd=Path(args.baseline_src) if tree else None))
    try:
        wait_port(port, proc=servers[0])
        if kind != "bare":
            wait_port(metrics_port, proc=servers[1])
    except BenchError:
        for s in reversed(servers):
            procs.stop(s)
        raise
    sub = start_subscriber(procs, mqtt_port, app)
    assert sub.popen.stdout is not None and sub.popen.stdin is not None
    # warm-up: one command per device reaches its device (connections made, caches filled)
    warm = _load(procs, port, 500.0, args.devices / 500.0, args, first)
    sub_in = sub.popen.stdin
    probe = UsageProbe({s.name: s.pid for s in servers})
    before = _scrape(metrics_port) if kind != "bare" else {}
    probe.start()
    load = _load(procs, port, rate, args.seconds, args, first + len(warm["sent"]))
    answered = len(load["sent"]) - sum(load["bad"].values())
    sub_in.write(f"{len(warm['sent']) + answered}\n".encode())
    sub_in.flush()
    result = json.loads(sub.popen.stdout.readline())
    usage = probe.stop()
    after = _scrape(metrics_port) if kind != "bare" else {}
    procs.stop(sub)
    for s in reversed(servers):
        procs.stop(s)
    if kind != "bare":
        asyncio.run(delete_prefix(REDIS_URL, prefix))
    got = {int(k): v for k, v in result["got"].items()}
    lat = sorted((got[int(v)] - ns) / 1e6 for v, ns in load["sent"].items() if int(v) in got)
    cpu = {u.name: u.cpu_s for u in usage}
    delivered = len(lat)
    collapsed = sum(after.get(o, 0) - before.get(o, 0)
                    for o in ("superseded", "stale", "duplicate"))
    return {
        "kind": kind, "rate": rate, "sent": len(load["sent"]), "bad": load["bad"],
        "delivered": delivered, "collapsed": int(collapsed), "dupes": result["dupes"],
        "lost": len(load["sent"]) - delivered - int(collapsed),
        "throughput": delivered / max(load["elapsed"], 1e-9),
        "p50": percentile(lat, 50), "p99": percentile(lat, 99), "max": lat[-1] if lat else 0.0,
        "cpu_us": {k: 1e6 * v / max(1, delivered) for k, v in cpu.items()},
    }


def _load(procs: Processes, port: int, rate: float, seconds: float, args: argparse.Namespace,
          first: int) -> dict[str, Any]:
    gen = procs.spawn("load", _python(
        f"from bench.downlinks import run_load; run_load({port}, {rate}, {seconds}, "
        f"{args.devices}, {first})"), pipes=True)
    assert gen.popen.stdout is not None
    out = gen.popen.stdout.read().decode()
    gen.popen.wait()
    procs.stop(gen)
    if not out.strip():
        raise BenchError(f"load generator printed nothing; log: {gen.log_path}\n{gen.tail()}")
    data: dict[str, Any] = json.loads(out)
    data["sent"] = {int(k): v for k, v in data["sent"].items()}
    return data


def _round(procs: Processes, kind: str, rate: float, args: argparse.Namespace,
           mqtt_port: int, first: int) -> dict[str, Any]:
    """:func:`one_round`, again with fresh ports when a server lost its port to another
    process before binding it (:class:`~bench.common.PortTaken`; nothing was measured yet)."""
    for attempt in range(3):
        try:
            return one_round(procs, kind, rate, args, mqtt_port, first + attempt * 1_000_000)
        except PortTaken as exc:
            if attempt == 2:
                raise
            print(f"{kind}: {str(exc).splitlines()[0]}; again with fresh ports", file=sys.stderr)
    raise AssertionError("unreachable")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rates", default="100,1000", help="commands per second, comma-separated")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--no-bare", action="store_true", help="skip the bare relay baseline")
    parser.add_argument("--baseline-src", default=None,
                        help="also run the bridge from this source tree (another version)")
    args = parser.parse_args(argv)
    rates = [float(r) for r in args.rates.split(",")]
    print(f"machine: {machine()}; load average {os.getloadavg()[0]:.2f}")
    rows: list[list[object]] = []
    results: list[dict[str, Any]] = []
    with interrupt_as_exception(), Processes() as procs:
        _, mqtt_port = start_mosquitto(procs)
        first = 0
        for rate in rates:
            kinds = ["bridge"] + ["baseline"] * bool(args.baseline_src) + ["bare"] * (
                not args.no_bare)
            for kind in kinds:
                res = _round(procs, kind, rate, args, mqtt_port, first)
                first += 10_000_000
                results.append(res)
                cpu = res["cpu_us"]
                rows.append([
                    kind, f"{rate:,.0f}", res["sent"], res["delivered"], res["collapsed"],
                    res["lost"], f"{res['throughput']:,.0f}", fmt_ms(res["p50"]),
                    fmt_ms(res["p99"]), fmt_ms(res["max"]),
                    " + ".join(f"{k} {v:.0f}" for k, v in cpu.items()),
                    f"{sum(cpu.values()):.0f}"])
                print(f"{kind} at {rate:,.0f}/s: {res}", file=sys.stderr)
    print(table(["system", "offered/s", "sent", "delivered", "collapsed", "lost", "delivered/s",
                 "p50 ms", "p99 ms", "max ms", "CPU µs/command by process", "CPU µs/command"],
                rows))
    for rate in rates:
        by = {r["kind"]: r for r in results if r["rate"] == rate}
        if "baseline" in by and by["baseline"]["delivered"]:
            b, r = by["bridge"], by["baseline"]
            print(f"at {rate:,.0f}/s: bridge / baseline — p50 {b['p50'] / r['p50']:.2f}×, p99 "
                  f"{b['p99'] / r['p99']:.2f}×, CPU per command "
                  f"{sum(b['cpu_us'].values()) / sum(r['cpu_us'].values()):.2f}×, downlink "
                  f"stage CPU {b['cpu_us']['downlink'] / r['cpu_us']['downlink']:.2f}×")
        if "bare" in by and by["bare"]["delivered"]:
            b, r = by["bridge"], by["bare"]
            print(f"at {rate:,.0f}/s: bridge / bare — p50 {b['p50'] / r['p50']:.2f}×, p99 "
                  f"{b['p99'] / r['p99']:.2f}×, CPU per command "
                  f"{sum(b['cpu_us'].values()) / sum(r['cpu_us'].values()):.2f}×")
    bad = [r for r in results if r["bad"] or r["lost"] > 0]
    for r in bad:
        print(f"{r['kind']} at {r['rate']:,.0f}/s: bad answers {r['bad']}, lost {r['lost']}",
              file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
