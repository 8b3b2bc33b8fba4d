"""transform drain rate: a preloaded uplinks stream drained by 1 and 2 worker processes, as a
ratio to the Redis ceiling measured in the same run.

    .venv/bin/python -m bench.transform [--uplinks 200000] [--devices 10000] [--rounds 2]
    .venv/bin/python -m bench.transform --profile      # cProfile of one worker, top functions

Each round starts from scratch on a private ``redis-server`` (no persistence, free port): the
registry holds ``--devices`` devices (pipelined ``HSET``s), the uplinks stream holds
``--uplinks`` realistic TTS uplinks (tts-uplink-02's decoded payload and radio, random devices),
then worker processes are started, wait on a start signal, and drain the stream:

* **ceiling** (one process): ``XREADGROUP`` a batch → ``XADD`` every entry, unchanged, to an
  output stream → ``XACK``, with no work in between: through the shared
  ``StreamWriter.add_many`` + ``StreamReader.ack`` (one pipelined command per entry), and
  through transform's ``Emit`` script (one command per batch) — the ratio uses the faster;
* **transform x1 / x2**: the real stage (``workers.transform``, uvloop, burst mode): decode,
  de-dup in memory, registry cache, mapping, one commit script call (registry version check,
  ``XADD`` of the ``BlynkWrite``s, ``XACK``, de-dup block). With one uplinks partition (the
  default) x2 is one owner and a warm standby.

Rate = uplinks / (last worker done − first worker started); every run checks that the output
stream holds one entry per uplink and nothing was dead-lettered. On a shared machine the rate
moves with whatever else runs; the worker CPU time per uplink is the steadier figure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.common import (
    ROOT,
    Processes,
    UsageProbe,
    free_port,
    go_and_collect,
    machine,
    table,
    wait_port,
)

if TYPE_CHECKING:
    from pipeline import events

FIXTURE = ROOT / "tests" / "fixtures" / "tts" / "tts-uplink-02.json"
PREFIX = "bbb:"
BATCH = 500

#: The uplinks' template (``tts-uplink-02.json``'s fields onto pins) and the TTS app using it.
BUTTON = """\
templates:
  - name: button
    datastreams:
      - {{name: batteryVoltage, pin: V0, type: double, min: 0, max: 3.6}}
      - {{name: pressEvent, pin: V1, type: integer}}
      - {{name: sensorTemperature, pin: V2, type: double, min: -40, max: 85}}
      - {{name: singlePressEventCounter, pin: V3, type: integer}}
      - {{name: thermistorProperlyConnected, pin: V4, type: integer}}
      - {{name: RSSI, pin: V10, type: integer, min: -110, max: 0}}
      - {{name: SNR, pin: V11, type: double, min: -20, max: 30}}
tts:
  - {{name: app, app_id: starter-kit, template: button}}
"""

#: ``BUTTON``'s pins and their types, for the Blynk emulator's template (:func:`start_emulator`).
BUTTON_PINS = [("V0", "double"), ("V1", "integer"), ("V2", "double"), ("V3", "integer"),
               ("V4", "integer"), ("V10", "integer"), ("V11", "double")]

CONFIG = """
redis: {{url: "{url}", prefix: "{prefix}"}}
streams: {{batch: {batch}, block_ms: 200}}
blynk: {{servers: {{default: "http://127.0.0.1:9"}}}}
transform: {{cache_size: {cache}}}
""" + BUTTON


def config_text(url: str, cache: int = 100_000) -> str:
    return CONFIG.format(url=url, prefix=PREFIX, batch=BATCH, cache=cache)


# --- filling Redis ------------------------------------------------------------------------------


def button_uplink(payload: dict[str, Any], event_id: str, device: int, i: int, *, counter: int,
                  ts_ms: int) -> events.Uplink:
    """The fixture's uplink as TTS ingest stores it, for device ``eui-{device:016x}``: its
    press counter set to ``counter``, radio varied by ``i`` (frame counter, RSSI)."""
    from pipeline import events

    values = dict(payload)
    values["singlePressEventCounter"] = counter
    return events.Uplink(
        event_id=event_id, source="tts", integration="app",
        device=f"eui-{device:016x}", event_ts_ms=ts_ms, received_ts_ms=ts_ms,
        values=values, device_meta={"dev_eui": f"{device:016X}"},
        radio=events.Radio(rssi=-31 - (i % 60), snr=9.5, gateways=1, f_cnt=i, f_port=2))


async def fill(url: str, uplinks: int, devices: int, *, seed: int = 1) -> None:
    """Register ``devices`` devices and append ``uplinks`` uplinks for random ones."""
    from pipeline import events
    from pipeline.keys import Keys
    from pipeline.streams import connect

    payload = json.loads(FIXTURE.read_text())["uplink_message"]["decoded_payload"]
    rnd = random.Random(seed)
    redis = connect(url)
    keys = Keys(PREFIX)
    await register_devices(redis, keys, devices)
    stream = keys.stream("uplinks")
    now = int(time.time() * 1000)
    chunk = 5000
    for start in range(0, uplinks, chunk):
        async with redis.pipeline(transaction=False) as pipe:
            for i in range(start, min(start + chunk, uplinks)):
                u = button_uplink(payload, f"as:up:{i:08d}", rnd.randrange(devices), i,
                                  counter=i, ts_ms=now + i)
                pipe.xadd(stream, {events.FIELD: events.encode(u)})
            await pipe.execute()
    await redis.aclose()


def token(d: int) -> str:
    """The registry token of device ``d`` (:func:`register_devices`)."""
    return f"{d:032x}"


def start_emulator(procs: Processes, devices: int, *, history_len: int) -> str:
    """The Blynk emulator (its own process) with the device of every registry row of
    :func:`register_devices` on ``BUTTON``'s pins, its limits off; returns its URL."""
    port = free_port()
    spec = {
        "regions": {"fra1": port}, "host": "127.0.0.1",
        "settings": {"device_rps": None, "daily_updates": None, "history_len": history_len,
                     "request_log_len": 0, "monthly_messages": None},
        "templates": [{"id": "TMPLBUTTON", "name": "button",
                       "datastreams": [{"id": i + 1, "pin": pin, "name": pin, "type": kind}
                                       for i, (pin, kind) in enumerate(BUTTON_PINS)]}],
        "devices": [{"name": f"eui-{d:016x}", "token": token(d), "template": "TMPLBUTTON",
                     "id": d + 1} for d in range(devices)],
    }
    path = procs.dir / "blynk-emulator.yaml"
    path.write_text(json.dumps(spec))  # JSON is YAML
    proc = procs.spawn("blynk-emulator", [sys.executable, "-m", "blynk_bridge", "emulate",
                                          "blynk", "-c", str(path)])
    wait_port(port, timeout_s=60, proc=proc)
    return f"http://127.0.0.1:{port}"


async def register_devices(redis: object, keys: object, devices: int) -> None:
    """Registry rows written directly with pipelined ``HSET``s (a bulk import, no change log)."""
    from redis.asyncio.cluster import RedisCluster

    from pipeline.keys import Keys
    from pipeline.streams import Redis

    assert isinstance(keys, Keys) and isinstance(redis, Redis | RedisCluster)
    chunk = 10_000
    for start in range(0, devices, chunk):
        async with redis.pipeline(transaction=False) as pipe:
            for d in range(start, min(start + chunk, devices)):
                pipe.hset(keys.device("tts", "app", f"eui-{d:016x}"), mapping={
                    "token": token(d), "template": "button", "server": "",
                    "status": "ok", "id": str(d + 1)})
            await pipe.execute()


# --- workers (child processes) ------------------------------------------------------------------


async def _wait_go(redis: object) -> float:
    from pipeline.streams import Redis

    assert isinstance(redis, Redis)
    await redis.blpop(["bbb:go"], timeout=0)
    return time.time()


async def _report(redis: object, name: str, t0: float, count: int, **extra: object) -> None:
    from bench.common import rss_bytes
    from pipeline.streams import Redis

    assert isinstance(redis, Redis)
    t1 = time.time()
    rss, peak = rss_bytes(os.getpid())
    await redis.rpush("bbb:done", json.dumps({"name": name, "t0": t0, "t1": t1, "count": count,
                                              "rss": rss, "peak_rss": peak, **extra}))


async def worker_transform(url: str, name: str, profile: bool, cache: int) -> None:
    from pipeline import config as config_mod
    from pipeline.context import Context
    from workers.transform import TransformStage

    cfg = config_mod.parse(config_text(url, cache), "yaml", "bench", env={})
    ctx = Context.create(cfg, consumer=name)
    stage = TransformStage(ctx, until_idle=True)
    await stage.startup()
    await ctx.redis.rpush("bbb:ready", name)
    t0 = await _wait_go(ctx.redis)
    if profile:
        import cProfile
        import pstats

        prof = cProfile.Profile()
        prof.enable()
        await stage.main_loop(asyncio.Event())
        prof.disable()
        stats = pstats.Stats(prof, stream=sys.stderr)
        stats.sort_stats("tottime").print_stats(25)
    else:
        await stage.main_loop(asyncio.Event())
    await _report(ctx.redis, name, t0, 0, cached=len(stage.registry))
    await stage.shutdown()
    await ctx.close()


async def worker_ceiling(url: str, name: str, script: bool) -> None:
    """XREADGROUP → XADD of the same bytes → XACK, no work in between: with the shared
    ``StreamWriter.add_many`` + ``StreamReader.ack`` (pipeline), or with transform's one-call
    ``Emit`` script (script)."""
    from pipeline.keys import Keys
    from pipeline.streams import StreamReader, StreamWriter, connect
    from workers.transform import Emit

    redis = connect(url)
    keys = Keys(PREFIX)
    reader = StreamReader(redis, keys, [keys.stream("uplinks")], "ceiling", name,
                          stage="ceiling", batch=BATCH, block_ms=200)
    writer = StreamWriter(redis)
    emit = Emit(redis, "ceiling")
    out = keys.stream("ceiling-out")
    await reader.ensure_group()
    await redis.rpush("bbb:ready", name)
    t0 = await _wait_go(redis)
    n = 0
    while True:
        entries = await reader.read(block=False)
        if not entries:
            break
        if script:
            await emit.run([(out, e.data or b"") for e in entries], entries)
        else:
            await writer.add_many([(out, e.data or b"") for e in entries])
            await reader.ack(entries)
        n += len(entries)
    await _report(redis, name, t0, n)
    await redis.aclose()


def worker_main(argv: list[str]) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--worker", choices=["transform", "ceiling", "ceiling-script"],
                   required=True)
    p.add_argument("--url", required=True)
    p.add_argument("--name", required=True)
    p.add_argument("--profile", action="store_true")
    p.add_argument("--cache", type=int, default=100_000)
    a = p.parse_args(argv)
    import uvloop

    if a.worker == "transform":
        uvloop.run(worker_transform(a.url, a.name, a.profile, a.cache))
    else:
        uvloop.run(worker_ceiling(a.url, a.name, a.worker == "ceiling-script"))


# --- the driver ---------------------------------------------------------------------------------


def start_redis(procs: Processes) -> tuple[int, int]:
    port = free_port()
    proc = procs.spawn("redis", ["redis-server", "--port", str(port), "--bind", "127.0.0.1",
                                 "--save", "", "--appendonly", "no", "--dir", str(procs.dir)])
    wait_port(port, proc=proc)
    return port, proc.pid


async def run_one(procs: Processes, url: str, redis_pid: int, kind: str, workers: int,
                  uplinks: int, devices: int, profile: bool = False) -> dict[str, float]:
    from pipeline.keys import Keys
    from pipeline.streams import connect

    redis = connect(url)
    await redis.flushall()
    await fill(url, uplinks, devices)
    children = [
        procs.spawn(f"{kind}-{workers}-{i}", [sys.executable, "-m", "bench.transform",
                                              "--worker", kind, "--url", url,
                                              "--name", f"w{i}"]
                    + (["--profile"] if profile else []))
        for i in range(workers)
    ]
    while await redis.llen("bbb:ready") < workers:
        procs.check_alive()
        await asyncio.sleep(0.05)
    probe = UsageProbe({"redis": redis_pid, **{c.name: c.pid for c in children}})
    probe.start()
    reports = await go_and_collect(redis, "bbb:", workers, procs)
    usage = probe.stop()
    for c in children:
        procs.stop(c, grace_s=30)
        if profile:
            print(c.tail(60), file=sys.stderr)
    keys = Keys(PREFIX)
    out = keys.stream("writes") if kind == "transform" else keys.stream("ceiling-out")
    produced = await redis.xlen(out)
    deadn = await redis.xlen(keys.dead)
    if produced != uplinks or deadn:
        raise SystemExit(f"{kind} x{workers}: {produced} outputs for {uplinks} uplinks, "
                         f"{deadn} dead letters")
    await redis.aclose()
    t0 = min(r["t0"] for r in reports)
    t1 = max(r["t1"] for r in reports)
    cpu = {u.name: u.cpu_pct for u in usage}
    worker_cpu_s = sum(u.cpu_s for u in usage if u.name != "redis")
    return {"rate": uplinks / (t1 - t0), "seconds": t1 - t0,
            "redis_cpu": cpu["redis"],
            "worker_cpu": sum(v for k, v in cpu.items() if k != "redis"),
            "us_per_uplink": worker_cpu_s / uplinks * 1e6}


async def main(args: argparse.Namespace) -> None:
    with Processes() as procs:
        port, redis_pid = start_redis(procs)
        url = f"redis://127.0.0.1:{port}/0"
        if args.profile:
            await run_one(procs, url, redis_pid, "transform", 1, args.uplinks, args.devices,
                          profile=True)
            return
        plan = [("ceiling", 1), ("ceiling-script", 1), ("transform", 1), ("transform", 2)]
        best: dict[tuple[str, int], dict[str, float]] = {}
        for r in range(args.rounds):
            for kind, n in plan:
                res = await run_one(procs, url, redis_pid, kind, n, args.uplinks, args.devices)
                print(f"round {r + 1}: {kind} x{n}: {res['rate']:,.0f} uplinks/s "
                      f"({res['seconds']:.2f} s, redis {res['redis_cpu']:.0f}% CPU, "
                      f"workers {res['worker_cpu']:.0f}% CPU, "
                      f"{res['us_per_uplink']:.1f} CPU µs/uplink)", file=sys.stderr)
                if (kind, n) not in best or res["rate"] > best[(kind, n)]["rate"]:
                    best[(kind, n)] = res
    ceiling = max(best[("ceiling", 1)]["rate"], best[("ceiling-script", 1)]["rate"])
    one = best[("transform", 1)]["rate"]
    rows = []
    for (kind, n), res in best.items():
        rows.append([f"{kind} x{n}", f"{res['rate']:,.0f}", f"{res['seconds']:.2f}",
                     f"{res['redis_cpu']:.0f}", f"{res['worker_cpu']:.0f}",
                     f"{res['us_per_uplink']:.1f}",
                     f"{res['rate'] / ceiling:.2f}", f"{res['rate'] / one:.2f}"])
    print(f"transform drain: {args.uplinks:,} uplinks over {args.devices:,} registered devices, "
          f"batch {BATCH}, best of {args.rounds}")
    print(f"machine: {machine()}")
    print(table(["run", "uplinks/s", "seconds", "redis CPU %", "workers CPU %",
                 "worker CPU µs/uplink", "x best ceiling", "x transform x1"], rows))
    # What two workers could do at best here: every core busy with workers and Redis at the
    # CPU cost per uplink measured with one worker (nothing else running, no waiting).
    x1 = best[("transform", 1)]
    redis_us = x1["redis_cpu"] / 100 * x1["seconds"] / args.uplinks * 1e6
    cores = os.cpu_count() or 1
    bound = cores / ((x1["us_per_uplink"] + redis_us) / 1e6)
    print(f"CPU bound on {cores} cores: {cores} / (worker {x1['us_per_uplink']:.1f} + Redis "
          f"{redis_us:.1f} CPU µs per uplink) = {bound:,.0f} uplinks/s = {bound / one:.2f}x "
          f"transform x1; two workers reached {best[('transform', 2)]['rate'] / bound:.0%} "
          f"of it")


def cli() -> None:
    if "--worker" in sys.argv:
        worker_main(sys.argv[1:])
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--uplinks", type=int, default=200_000)
    p.add_argument("--devices", type=int, default=10_000)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--profile", action="store_true")
    args = p.parse_args()
    os.chdir(Path(ROOT))
    asyncio.run(main(args))


if __name__ == "__main__":
    cli()
