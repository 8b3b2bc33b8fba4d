"""Fuzz the running bridge: hostile and semi-valid webhooks and MQTT payloads through the real
stages, counting 5xx, logged errors, crashes and Redis memory.

    .venv/bin/python -m bench.fuzz --count 100000 --seed 1 --mqtt-share 0.3
    .venv/bin/python -m bench.fuzz --seed 1 --show 4711      # print input 4711 of that run

In one process, as the tests run them: the Blynk emulator (device and platform API), and the
stages ingest-http, ingest-mqtt, transform, egress and monitor against the real Redis (a fresh
key prefix per run, deleted at the end; never a flush) and a Mosquitto (a private one on a free
port unless ``--mqtt-port``). :mod:`bench.fuzz_inputs` draws the inputs from the seed; up to
``--concurrency`` webhooks are in flight over real HTTP, and ``--mqtt-share`` of the inputs are
published on the TTS topics of the application ingest-mqtt holds. Survivors go on through
transform (registry, de-duplication, mapping, provisioning of one integration's devices) and
egress (to the emulator).

Counted: HTTP answers by status (a 5xx fails the run), transport errors, log records at ERROR
or above from any logger and exceptions reaching the event loop's handler (any fails the run),
a stage that stops before it is asked (fails the run), MQTT messages received and how each was
accounted for (appended, dead-lettered, skipped, dropped: the sum must match), and whether the
streams drain afterwards. Every ``--sample-every`` inputs: Redis ``used_memory`` (the whole
server: other users move it) and the sum of ``MEMORY USAGE`` over the run's own keys by key
family; the growth per 10,000 inputs in the first and last third of the run tells whether the
bridge's footprint levels off under the caps (``--dead-max-len``, ``--dedup-window-s``, the
8 KiB dead-letter truncation, unmapped-key caps). Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import faulthandler
import hashlib
import json
import logging
import secrets
import signal
import sys
import time
import traceback
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, field
from typing import Any

import aiohttp
from prometheus_client import REGISTRY

from bench.common import Processes, free_port, machine, start_mosquitto
from bench.fuzz_inputs import Case, Fixtures, Generator, MqttCase, Pools
from emulators.blynk import (
    BlynkEmulator,
    DatastreamSpec,
    DeviceSpec,
    EmulatorSpec,
    MetafieldSpec,
    OAuthClient,
    TemplateSpec,
)
from pipeline import config as config_mod
from pipeline import mqtt
from pipeline.context import Context
from pipeline.keys import GROUP_EGRESS, GROUP_TRANSFORM
from pipeline.lifecycle import Stage, run_stages
from pipeline.streams import Redis, connect
from workers import egress, ingest_http, ingest_mqtt, monitor, transform

REDIS_URL = "redis://127.0.0.1:6379/0"
TEMPLATE_ID = "TMPLfuzz0001"
MAX_BODY = 64 * 1024
MAX_PAYLOAD = 256 * 1024
#: (datastream name, pin, type, min, max): the keys the generator's values use, mapped.
DATASTREAMS: list[tuple[str, str, str, float | None, float | None]] = [
    ("t", "V1", "double", None, None), ("v", "V2", "integer", None, None),
    ("value", "V3", "integer", None, None), ("temperature", "V4", "double", -40, 85),
    ("humidity", "V5", "double", 0, 100), ("battery", "V6", "integer", 0, 100),
    ("pressEvent", "V7", "integer", None, None), ("batteryVoltage", "V8", "double", None, None),
    ("sensorTemperature", "V9", "double", None, None), ("occupied", "V10", "integer", None, None),
    ("type", "V11", "string", None, None), ("RSSI", "V12", "integer", -150, 0),
    ("SNR", "V13", "double", None, None), ("coordinates", "V14", "location", None, None),
]


@dataclass
class Options:
    count: int = 100_000
    seed: int = 1
    mqtt_share: float = 0.3
    concurrency: int = 64
    sample_every: int = 0  # 0: count / 40
    dead_max_len: int = 2_000
    dedup_window_s: int = 60
    mqtt_host: str = "127.0.0.1"
    mqtt_port: int = 0  # 0: a private Mosquitto
    redis_url: str = REDIS_URL
    drain_timeout_s: float = 120.0
    progress: bool = True


@dataclass
class Sample:
    inputs: int
    elapsed_s: float
    used_memory: int
    prefix_bytes: int
    prefix_keys: int
    backlog: int
    families: dict[str, int] = field(default_factory=dict)

    @property
    def retained(self) -> int:
        """What stays once the pipeline caught up: the run's keys but the uplinks and writes
        streams (their size follows the backlog of the moment, trimmed once acknowledged)."""
        return self.prefix_bytes - self.families.get("uplinks", 0) - self.families.get(
            "writes", 0)


@dataclass
class Result:
    options: dict[str, Any]
    inputs: int = 0
    http: dict[str, int] = field(default_factory=dict)
    http_5xx: int = 0
    transport_errors: dict[str, int] = field(default_factory=dict)
    mqtt_published: int = 0
    mqtt: dict[str, int] = field(default_factory=dict)
    mqtt_unaccounted: int = 0
    errors_logged: int = 0
    warnings_logged: int = 0
    loop_exceptions: int = 0
    crashes: int = 0
    drained: bool = False
    pipeline: dict[str, int] = field(default_factory=dict)
    samples: list[Sample] = field(default_factory=list)
    #: The last sample: after the streams drained and the monitor trimmed.
    after_drain: Sample | None = None
    growth_per_10k: dict[str, float] = field(default_factory=dict)
    #: Key families still growing at the end: family → (first, last third) bytes per 10k.
    still_growing: dict[str, tuple[int, int]] = field(default_factory=dict)
    bounded: bool = False
    elapsed_s: float = 0.0
    first_5xx: list[str] = field(default_factory=list)
    first_errors: list[str] = field(default_factory=list)
    keys_deleted: int = 0

    @property
    def ok(self) -> bool:
        return (self.http_5xx == 0 and self.errors_logged == 0 and self.loop_exceptions == 0
                and self.crashes == 0 and self.mqtt_unaccounted == 0 and self.drained
                and self.bounded)


# --- the bridge under test -------------------------------------------------------------------


def token_for(source: str, device: str) -> str:
    return hashlib.sha256(f"fuzz\0{source}\0{device}".encode()).hexdigest()[:32]


def make_pools(app_id: str) -> Pools:
    return Pools(
        particle_known=("e00fce68ece1d3d21a73dcc9", "3f002b000000000000000000",
                        *(f"e00fce68ece1d3d21a73dc{i:02x}" for i in range(4))),
        particle_unknown=("ffffffffffffffffffffff00", "ffffffffffffffffffffff01"),
        particle_provision=tuple(f"prov{i:04d}" for i in range(16)),
        tts_known=("eui-70b3d52dd600035a", "dev1", "dev2",
                   *(f"fuzz-{i:02d}" for i in range(5))),
        tts_unknown=("ghost-00", "ghost-01"),
        tokens=(),
        header_secret=secrets.token_hex(8), basic_user="particle",
        basic_password=secrets.token_hex(8), tts_key="NNSXS." + secrets.token_hex(8),
        app_id=app_id,
    )


def with_tokens(pools: Pools) -> Pools:
    return Pools(**{**asdict(pools), "tokens": tuple(token_for("particle", d)
                                                    for d in pools.particle_known)})


def emulator(pools: Pools) -> BlynkEmulator:
    devices = [DeviceSpec(name=f"{src}-{d}", token=token_for(src, d), template=TEMPLATE_ID)
               for src, ids in (("particle", pools.particle_known), ("tts", pools.tts_known))
               for d in ids]
    return BlynkEmulator.from_spec(EmulatorSpec(
        regions={"fra1": 0},
        oauth_clients=[OAuthClient(client_id="fuzz", client_secret="fuzz-secret")],
        templates=[TemplateSpec(
            id=TEMPLATE_ID, name="Fuzz",
            datastreams=[DatastreamSpec(id=i + 1, pin=pin, name=name, type=t,  # type: ignore[arg-type]
                                        min=lo, max=hi)
                         for i, (name, pin, t, lo, hi) in enumerate(DATASTREAMS)],
            metafields=[MetafieldSpec(id=1, name="Device Name"),
                        MetafieldSpec(id=2, name="Particle Device"),
                        MetafieldSpec(id=3, name="TheThingsNetwork Device")])],
        devices=devices,
    ))


def bridge_config(opts: Options, pools: Pools, prefix: str, blynk_url: str, http_port: int,
                  mqtt_port: int) -> config_mod.Config:
    def ds(name: str, pin: str, t: str, lo: float | None, hi: float | None) -> dict[str, Any]:
        bounds = {k: v for k, v in (("min", lo), ("max", hi)) if v is not None}
        return {"name": name, "pin": pin, "type": t, **bounds}

    header = {"header": "X-Particle-Secret", "secret": pools.header_secret}
    mq = {"host": opts.mqtt_host, "port": mqtt_port, "insecure": True, "template": "kit"}
    devices = [{"source": "particle", "integration": name, "device": d,
                "token": token_for("particle", d), "template": "kit"}
               for name in ("hdr", "basic", "strict") for d in pools.particle_known]
    devices += [{"source": "tts", "integration": name, "device": d,
                 "token": token_for("tts", d), "template": "kit"}
                for name in ("mq", "hook") for d in pools.tts_known]
    cfg = {
        "redis": {"url": opts.redis_url, "prefix": prefix},
        "streams": {"block_ms": 200, "batch": 500, "claim_idle_ms": 10_000},
        "blynk": {"servers": {"fra1": blynk_url}, "default_server": "fra1",
                  "platform": {"url": blynk_url, "client_id": "fuzz",
                               "client_secret": "fuzz-secret"}},
        "templates": [{"name": "kit", "id": TEMPLATE_ID,
                       "datastreams": [ds(*d) for d in DATASTREAMS]}],
        "particle": [
            {"name": "hdr", "template": "kit", "auth": header},
            {"name": "basic", "template": "kit",
             "auth": {"username": pools.basic_user, "password": pools.basic_password}},
            {"name": "strict", "template": "kit", "auth": header, "device_id_from": "query"},
            {"name": "open", "template": "kit", "provision": True, "auth": "none"},
        ],
        "tts": [
            {"name": "mq", "app_id": pools.app_id, **mq},
            {"name": "hook", "app_id": f"{pools.app_id}-hook", **mq,
             "webhook_auth": {"header": "X-Downlink-Apikey", "secret": pools.tts_key}},
        ],
        "devices": devices,
        "ingest_http": {"host": "127.0.0.1", "port": http_port, "max_body_bytes": MAX_BODY},
        "ingest_mqtt": {"max_payload_bytes": MAX_PAYLOAD},
        "transform": {"dedup_window_s": opts.dedup_window_s},
        "egress": {"flush_age_ms": 20},
        "monitor": {"interval_s": 1.0, "dead_max_len": opts.dead_max_len},
    }
    return config_mod.parse(json.dumps(cfg), "yaml", "fuzz.yaml", env={})


# --- counting --------------------------------------------------------------------------------


class LogTally(logging.Handler):
    """Counts records at WARNING and above; keeps the first few errors with their traceback."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.by_level: Counter[str] = Counter()
        self.by_logger: Counter[str] = Counter()
        self.first_errors: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.by_level[record.levelname] += 1
        if record.levelno >= logging.ERROR:
            self.by_logger[record.name] += 1
            if len(self.first_errors) < 5:
                text = f"{record.name}: {record.getMessage()[:500]}"
                if record.exc_info:
                    text += "\n" + "".join(traceback.format_exception(*record.exc_info))[-3000:]
                self.first_errors.append(text)

    @property
    def errors(self) -> int:
        return sum(n for lvl, n in self.by_level.items() if lvl in ("ERROR", "CRITICAL"))


def metric_totals() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every ``bb_*_total`` sample of this process (deltas between two calls are the run's)."""
    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for fam in REGISTRY.collect():
        if not fam.name.startswith("bb_"):
            continue
        for s in fam.samples:
            if s.name.endswith("_total"):
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def delta(before: dict[Any, float], after: dict[Any, float], name: str,
          **labels: str) -> int:
    total = 0.0
    for (n, lbl), v in after.items():
        if n == name and all(dict(lbl).get(k) == want for k, want in labels.items()):
            total += v - before.get((n, lbl), 0.0)
    return int(total)


# --- Redis memory ----------------------------------------------------------------------------


def _family(key: bytes, prefix: bytes) -> str:
    rest = key[len(prefix):]
    head = rest.split(b":", 1)[0].strip(b"{")
    return head.decode("ascii", "replace") or "?"


async def sample_memory(redis: Redis, prefix: str, inputs: int, t0: float,
                        backlog: int) -> Sample:
    info = await redis.info("memory")
    pre = prefix.encode()
    keys = [k async for k in redis.scan_iter(match=prefix + "*", count=5000)]
    families: Counter[str] = Counter()
    total = 0
    for i in range(0, len(keys), 1000):
        chunk = keys[i:i + 1000]
        async with redis.pipeline(transaction=False) as pipe:
            for k in chunk:
                pipe.memory_usage(k)
            sizes = await pipe.execute()
        for k, size in zip(chunk, sizes, strict=True):
            families[_family(k, pre)] += int(size or 0)
            total += int(size or 0)
    return Sample(inputs, round(time.monotonic() - t0, 1), int(info["used_memory"]), total,
                  len(keys), backlog, dict(families))


async def backlog_of(redis: Redis, ctx: Context) -> int:
    """Entries not yet acknowledged by transform (uplinks) and egress (writes)."""
    total = 0
    for key, group in ((ctx.keys.stream("uplinks"), GROUP_TRANSFORM),
                       (ctx.keys.stream("writes"), GROUP_EGRESS)):
        if not await redis.exists(key):
            continue
        for g in await redis.xinfo_groups(key):
            name = g["name"].decode() if isinstance(g["name"], bytes) else g["name"]
            if name == group:
                total += int(g.get("lag") or 0) + int(g["pending"])
    return total


def growth(samples: list[Sample]) -> dict[str, float]:
    """Bytes retained by the run's keys (:attr:`Sample.retained`) per 10,000 inputs over the
    first and the last third of the inputs (samples taken while sending)."""
    if len(samples) < 4:
        return {}
    third = max(1, len(samples) // 3)

    def slope(a: Sample, b: Sample) -> float:
        return (b.retained - a.retained) / max(1, b.inputs - a.inputs) * 10_000

    return {"first_third": round(slope(samples[0], samples[third])),
            "last_third": round(slope(samples[-1 - third], samples[-1])),
            "whole_run": round(slope(samples[0], samples[-1]))}


#: A family adding less than this per 10,000 inputs in the last third counts as level.
LEVEL_BYTES_PER_10K = 64 * 1024


def growing_families(samples: list[Sample]) -> dict[str, tuple[int, int]]:
    """Key families (but the two streams, see :attr:`Sample.retained`) still growing in the
    last third: more than :data:`LEVEL_BYTES_PER_10K` per 10,000 inputs and more than a fifth
    of their first third's rate. Family → (first, last third) bytes per 10,000 inputs."""
    if len(samples) < 4:
        return {}
    third = max(1, len(samples) // 3)
    out: dict[str, tuple[int, int]] = {}
    names = {f for s in samples for f in s.families} - {"uplinks", "writes"}
    for name in sorted(names):
        def slope(a: Sample, b: Sample, name: str = name) -> int:
            return round((b.families.get(name, 0) - a.families.get(name, 0))
                         / max(1, b.inputs - a.inputs) * 10_000)

        first = slope(samples[0], samples[third])
        last = slope(samples[-1 - third], samples[-1])
        if last > max(LEVEL_BYTES_PER_10K, 0.2 * first):
            out[name] = (first, last)
    return out


# --- driving ---------------------------------------------------------------------------------


async def _chunks(body: bytes) -> AsyncIterator[bytes]:
    for i in range(0, len(body), 16 * 1024):
        yield body[i:i + 16 * 1024]


class Driver:
    """Sends cases, tallies answers."""

    def __init__(self, base: str, http: aiohttp.ClientSession, pub: mqtt.Session,
                 result: Result) -> None:
        self.base = base
        self.http = http
        self.pub = pub
        self.result = result
        self.by_kind: Counter[str] = Counter()

    async def send(self, case: Case) -> None:
        r = self.result
        if isinstance(case, MqttCase):
            await self.pub.publish(case.topic, case.payload)
            r.mqtt_published += 1
            return
        try:
            data: Any = _chunks(case.body) if case.chunked else (case.body or None)
            async with self.http.request(
                case.method, self.base + case.path, params=case.query or None,
                data=data, headers=case.headers, skip_auto_headers=("Content-Type",),
            ) as resp:
                await resp.read()
                status = resp.status
        except (aiohttp.ClientError, TimeoutError, ValueError, UnicodeError) as exc:
            name = type(exc).__name__
            r.transport_errors[name] = r.transport_errors.get(name, 0) + 1
            return
        key = str(status)
        r.http[key] = r.http.get(key, 0) + 1
        if status >= 500:
            r.http_5xx += 1
            if len(r.first_5xx) < 10:
                r.first_5xx.append(f"input {case.n} ({case.kind}) → {status}")


async def run(opts: Options) -> Result:
    result = Result(options=asdict(opts))
    sample_every = opts.sample_every or max(100, opts.count // 40)
    prefix = f"bbfuzz:{secrets.token_hex(5)}:"
    app_id = f"fuzz-{secrets.token_hex(4)}"
    pools = with_tokens(make_pools(app_id))
    tally = LogTally()
    root = logging.getLogger()
    root.addHandler(tally)
    loop = asyncio.get_running_loop()
    previous_handler = loop.get_exception_handler()

    def on_loop_exception(lp: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        result.loop_exceptions += 1
        lp.default_exception_handler(context)

    loop.set_exception_handler(on_loop_exception)
    # `kill -USR2 <pid>`: print where every task waits (a hung run's diagnosis).
    loop.add_signal_handler(signal.SIGUSR2, _dump_tasks)
    procs = Processes()
    redis = connect(opts.redis_url)
    try:
        mqtt_port = opts.mqtt_port
        if not mqtt_port:
            _, mqtt_port = start_mosquitto(procs)
        emu = emulator(pools)
        async with emu.serve({"fra1": 0}) as urls:
            http_port = free_port()
            cfg = bridge_config(opts, pools, prefix, urls["fra1"], http_port, mqtt_port)
            await _run_bridge(opts, cfg, pools, redis, result, tally, sample_every,
                              f"http://127.0.0.1:{http_port}")
    finally:
        loop.set_exception_handler(previous_handler)
        root.removeHandler(tally)
        result.errors_logged = tally.errors
        result.warnings_logged = tally.by_level.get("WARNING", 0)
        result.first_errors = tally.first_errors
        result.keys_deleted = await _delete_prefix(redis, prefix)
        await redis.aclose()
        procs.stop_all()
        with contextlib.suppress(OSError):
            procs.__exit__(None, None, None)
    result.growth_per_10k = growth(result.samples)
    result.still_growing = growing_families(result.samples)
    result.bounded = bool(result.growth_per_10k) and not result.still_growing
    return result


def _dump_tasks() -> None:
    """Each task's chain of awaits (``Task.print_stack`` shows only the outermost frame)."""
    for t in asyncio.all_tasks():
        lines = [f"--- task {t.get_name()}"]
        coro: Any = t.get_coro()
        while coro is not None:
            frame = getattr(coro, "cr_frame", None) or getattr(coro, "ag_frame", None)
            if frame is not None:
                lines.append(f"    {frame.f_code.co_filename}:{frame.f_lineno} "
                             f"{frame.f_code.co_name}")
            coro = getattr(coro, "cr_await", None) or getattr(coro, "ag_await", None)
        print("\n".join(lines), file=sys.stderr)
    import gc

    for obj in gc.get_objects():
        if isinstance(obj, asyncio.Task) and obj.done() and not obj.cancelled() \
                and obj.exception() is not None:
            exc = obj.exception()
            print(f"--- finished task {obj.get_name()} raised {exc!r}", file=sys.stderr)
            traceback.print_exception(exc, file=sys.stderr)
    sys.stderr.flush()


async def _run_bridge(opts: Options, cfg: config_mod.Config, pools: Pools, redis: Redis,
                      result: Result, tally: LogTally, sample_every: int, base: str) -> None:
    ctx = Context.create(cfg, consumer="fuzz")
    stop = asyncio.Event()
    mqtt_stage = ingest_mqtt.build(ctx)
    stages: list[Stage] = [ingest_http.build(ctx), mqtt_stage, transform.build(ctx),
                           egress.build(ctx), monitor.build(ctx)]
    task = asyncio.create_task(run_stages(stages, stop=stop, install_signals=False,
                                          grace_s=30), name="fuzz-stages")
    gen = Generator(opts.seed, Fixtures.load(), pools, max_body=MAX_BODY,
                    max_payload=MAX_PAYLOAD, mqtt_share=opts.mqtt_share,
                    now_ms=int(time.time() * 1000))
    t0 = time.monotonic()
    try:
        await _until(lambda: _ready(mqtt_stage, task), 30, "the stages to start")
        before = metric_totals()
        result.samples.append(await sample_memory(redis, ctx.keys.prefix, 0, t0, 0))
        connector = aiohttp.TCPConnector(limit=opts.concurrency)
        settings = mqtt.Settings(opts.mqtt_host, cfg.tts[0].effective_port,
                                 client_id=f"fuzz-pub-{pools.app_id}")
        async with aiohttp.ClientSession(
            connector=connector, timeout=aiohttp.ClientTimeout(total=60)
        ) as http, mqtt.Session(settings) as pub:
            driver = Driver(base, http, pub, result)
            sent = 0
            next_sample = sample_every

            async def worker() -> None:
                nonlocal sent
                while sent < opts.count and not task.done():
                    sent += 1
                    await driver.send(gen.next())
                    result.inputs += 1

            workers = [asyncio.create_task(worker()) for _ in range(opts.concurrency)]
            while not all(w.done() for w in workers):
                await asyncio.wait(workers, timeout=0.05)
                failed = [w for w in workers if w.done() and w.exception() is not None]
                if failed:  # a bench bug: stop at once rather than limp on
                    for w in workers:
                        w.cancel()
                    raise failed[0].exception()  # type: ignore[misc]
                if result.inputs >= next_sample or all(w.done() for w in workers):
                    next_sample = (result.inputs // sample_every + 1) * sample_every
                    s = await sample_memory(redis, ctx.keys.prefix, result.inputs, t0,
                                            await backlog_of(redis, ctx))
                    result.samples.append(s)
                    if opts.progress:
                        print(f"fuzz: {s.inputs:>7} inputs {s.elapsed_s:>6.0f}s  run keys "
                              f"{s.prefix_keys:>6} {s.prefix_bytes / 1048576:7.2f} MiB  "
                              f"backlog {s.backlog:>6}  5xx {result.http_5xx}  "
                              f"errors {tally.errors}", file=sys.stderr, flush=True)
            for w in workers:
                w.result()
        accounted = _mqtt_accounted(before)
        # Every published message must end appended, dead-lettered, skipped or dropped; stop
        # waiting once the count has not moved for 10 s (the rest is reported as unaccounted).
        last, moved = -1, time.monotonic()
        while accounted() < result.mqtt_published and not task.done() \
                and time.monotonic() - moved < 10:
            if accounted() != last:
                last, moved = accounted(), time.monotonic()
            await asyncio.sleep(0.1)
        for name, connected in mqtt_stage.connected.items():
            if not connected.is_set():
                result.crashes += 1
                tally.first_errors.append(f"ingest-mqtt: the session of {name} is down")
        drained_by = time.monotonic() + opts.drain_timeout_s
        while time.monotonic() < drained_by and not task.done():
            if await backlog_of(redis, ctx) == 0:
                result.drained = True
                break
            await asyncio.sleep(0.2)
        result.elapsed_s = round(time.monotonic() - t0, 1)
        # Monitor trims every interval: one more pass so the last sample shows the steady state.
        await asyncio.sleep(cfg.monitor.interval_s * 2)
        result.after_drain = await sample_memory(redis, ctx.keys.prefix, result.inputs, t0,
                                                 await backlog_of(redis, ctx))
        after = metric_totals()
        _account(result, before, after)
    finally:
        if task.done():
            result.crashes += 1
            exc = task.exception() if not task.cancelled() else None
            tally.first_errors.append(f"stages stopped by themselves: {exc!r}")
        stop.set()
        await asyncio.wait([task], timeout=60)
        if not task.done():
            result.crashes += 1
            tally.first_errors.append("the stages did not stop within 60 s of the stop request")
            await _force_stop(task)
        await ctx.close()


async def _force_stop(task: asyncio.Task[None]) -> None:
    """Cancel every task but this one until the stages are gone: a task that swallowed its
    cancellation must not keep a hung bridge (and so the bench) alive."""
    me = asyncio.current_task()
    for _ in range(50):
        if task.done():
            return
        for t in asyncio.all_tasks():
            if t is not me:
                t.cancel()
        await asyncio.wait([task], timeout=0.2)


def _mqtt_accounted(before: dict[Any, float]) -> Any:
    """MQTT messages ingest-mqtt has finished with (its received counter is published in
    steps of 64, so it cannot tell when the last message was handled)."""
    def accounted() -> int:
        now = metric_totals()
        return (delta(before, now, "bb_ingested_total", source="tts", integration="mq")
                + delta(before, now, "bb_dead_letters_total", stage="ingest-mqtt")
                + delta(before, now, "bb_tts_skipped_total", integration="mq")
                + delta(before, now, "bb_ingest_dropped_total", source="tts", integration="mq"))

    return accounted


async def _ready(stage: ingest_mqtt.IngestMqtt, task: asyncio.Task[None]) -> bool:
    if task.done():
        raise RuntimeError(f"stages stopped while starting: {task.exception()!r}")
    return all(e.is_set() for e in stage.subscribed.values())


async def _until(check: Any, timeout_s: float, what: str, fail: bool = True) -> None:
    deadline = time.monotonic() + timeout_s
    while not await check():
        if time.monotonic() > deadline:
            if fail:
                raise TimeoutError(f"timed out waiting for {what}")
            return
        await asyncio.sleep(0.05)


def _account(result: Result, before: dict[Any, float], after: dict[Any, float]) -> None:
    def d(name: str, **labels: str) -> int:
        return delta(before, after, name, **labels)

    mq = {
        "received": d("bb_mqtt_received_total", integration="mq"),
        "appended": d("bb_ingested_total", source="tts", integration="mq"),
        "dead_lettered": d("bb_dead_letters_total", stage="ingest-mqtt"),
        "skipped": d("bb_tts_skipped_total", integration="mq"),
        "dropped": d("bb_ingest_dropped_total", source="tts", integration="mq"),
    }
    result.mqtt = mq
    # ``received`` is published in steps of 64 (informative only); the outcomes are exact.
    result.mqtt_unaccounted = result.mqtt_published - (
        mq["appended"] + mq["dead_lettered"] + mq["skipped"] + mq["dropped"])
    result.pipeline = {
        "ingested_http": d("bb_ingested_total") - mq["appended"],
        "rejected_http": d("bb_rejected_total") - mq["dead_lettered"],
        "transformed": d("bb_transformed_total"),
        "duplicates": d("bb_duplicates_total"),
        "unmapped_keys": d("bb_unmapped_keys_total"),
        "dead_letters": d("bb_dead_letters_total"),
        "values_written": d("bb_written_values_total"),
        "provisioned": d("bb_provisioned_total", outcome="created"),
        "dead_trimmed": d("bb_stream_trimmed_total"),
        "event_time_clamped": d("bb_event_time_clamped_total"),
    }
    reasons: Counter[str] = Counter()
    for (n, lbl), v in after.items():
        if n == "bb_dead_letters_total":
            reasons[dict(lbl)["reason"]] += int(v - before.get((n, lbl), 0.0))
    for reason, n in reasons.most_common(8):
        if n:
            result.pipeline[f"dead:{reason}"] = n


async def _delete_prefix(redis: Redis, prefix: str) -> int:
    deleted = 0
    batch: list[Any] = []
    async for key in redis.scan_iter(match=prefix + "*", count=5000):
        batch.append(key)
        if len(batch) >= 1000:
            deleted += int(await redis.delete(*batch))
            batch = []
    if batch:
        deleted += int(await redis.delete(*batch))
    return deleted


# --- report ----------------------------------------------------------------------------------


def report(result: Result) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(file=sys.stdout, width=110)
    t = Table(title=f"bench.fuzz — {result.inputs:,} inputs, seed {result.options['seed']}, "
                    f"{result.elapsed_s:.0f} s", show_header=True)
    t.add_column("what")
    t.add_column("figure", justify="right")
    http_total = sum(result.http.values())
    classes: Counter[str] = Counter()
    for status, n in result.http.items():
        classes[f"{status[0]}xx"] += n
    t.add_row("HTTP answers", f"{http_total:,}")
    for cls in sorted(classes):
        t.add_row(f"  {cls}", f"{classes[cls]:,}")
    t.add_row("  by status", ", ".join(f"{s}: {n:,}" for s, n in sorted(result.http.items())))
    t.add_row("[bold]HTTP 5xx", f"[bold]{result.http_5xx}")
    t.add_row("transport errors", ", ".join(f"{k}: {v}" for k, v in
                                             result.transport_errors.items()) or "0")
    t.add_row("MQTT published", f"{result.mqtt_published:,}")
    t.add_row("  " + ", ".join(result.mqtt), ", ".join(f"{v:,}" for v in result.mqtt.values()))
    t.add_row("[bold]MQTT unaccounted", f"[bold]{result.mqtt_unaccounted}")
    t.add_row("[bold]errors logged / loop exceptions",
              f"[bold]{result.errors_logged} / {result.loop_exceptions}")
    t.add_row("warnings logged", f"{result.warnings_logged:,}")
    t.add_row("[bold]stage crashes", f"[bold]{result.crashes}")
    t.add_row("drained after the run", str(result.drained))
    for k, v in result.pipeline.items():
        t.add_row(f"pipeline {k}", f"{v:,}")
    console.print(t)

    m = Table(title="Redis memory (run's keys: sum of MEMORY USAGE; used_memory: whole server)")
    for col in ("inputs", "s", "run keys", "run MiB", "retained MiB", "used_memory MiB",
                "backlog", "largest families (KiB)"):
        m.add_column(col, justify="right" if col != "largest families (KiB)" else "left")
    step = max(1, len(result.samples) // 12)
    shown = result.samples[::step]
    if result.samples and shown[-1] is not result.samples[-1]:
        shown.append(result.samples[-1])
    if result.after_drain is not None:
        shown.append(result.after_drain)
    for s in shown:
        fam = sorted(s.families.items(), key=lambda kv: -kv[1])[:4]
        label = "drained" if s is result.after_drain else f"{s.inputs:,}"
        m.add_row(label, f"{s.elapsed_s:.0f}", f"{s.prefix_keys:,}",
                  f"{s.prefix_bytes / 1048576:.2f}", f"{s.retained / 1048576:.2f}",
                  f"{s.used_memory / 1048576:.0f}", f"{s.backlog:,}",
                  ", ".join(f"{k} {v // 1024:,}" for k, v in fam))
    console.print(m)
    g = result.growth_per_10k
    if g:
        console.print(f"retained bytes' growth per 10,000 inputs: first third "
                      f"{g['first_third'] / 1024:,.0f} KiB, last third "
                      f"{g['last_third'] / 1024:,.0f} KiB → "
                      f"{'bounded (levels off)' if result.bounded else 'STILL GROWING'}")
    for name, (first, last) in result.still_growing.items():
        console.print(f"[red]still growing: {name}: {first / 1024:,.0f} KiB per 10,000 inputs "
                      f"in the first third, {last / 1024:,.0f} KiB in the last")
    for line in result.first_5xx + result.first_errors:
        console.print(f"[red]{line}")
    console.print(f"machine: {machine()}")


def summary_json(result: Result) -> str:
    last = result.after_drain
    peak = max((s.prefix_bytes for s in result.samples), default=0)
    peak_retained = max((s.retained for s in result.samples), default=0)
    return json.dumps({
        "bench": "fuzz", "seed": result.options["seed"], "inputs": result.inputs,
        "mqtt_share": result.options["mqtt_share"], "elapsed_s": result.elapsed_s,
        "http": result.http, "http_5xx": result.http_5xx,
        "transport_errors": result.transport_errors, "mqtt_published": result.mqtt_published,
        "mqtt": result.mqtt, "mqtt_unaccounted": result.mqtt_unaccounted,
        "errors_logged": result.errors_logged, "loop_exceptions": result.loop_exceptions,
        "crashes": result.crashes, "drained": result.drained, "pipeline": result.pipeline,
        "run_bytes_peak": peak, "retained_bytes_peak": peak_retained,
        "run_bytes_drained": last.prefix_bytes if last else 0,
        "families_drained": last.families if last else {},
        "growth_per_10k": result.growth_per_10k, "still_growing": result.still_growing,
        "bounded": result.bounded, "ok": result.ok,
    })


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.fuzz", description=__doc__.split("\n")[0])
    p.add_argument("--count", type=int, default=Options.count)
    p.add_argument("--seed", type=int, default=Options.seed)
    p.add_argument("--mqtt-share", type=float, default=Options.mqtt_share)
    p.add_argument("--concurrency", type=int, default=Options.concurrency)
    p.add_argument("--sample-every", type=int, default=0)
    p.add_argument("--dead-max-len", type=int, default=Options.dead_max_len)
    p.add_argument("--dedup-window-s", type=int, default=Options.dedup_window_s)
    p.add_argument("--mqtt-port", type=int, default=0,
                   help="use the Mosquitto on this port (default: start a private one)")
    p.add_argument("--redis-url", default=REDIS_URL)
    p.add_argument("--show", type=int, default=None, metavar="N",
                   help="print input N of this seed's run and exit")
    a = p.parse_args(argv)
    opts = Options(count=a.count, seed=a.seed, mqtt_share=a.mqtt_share,
                   concurrency=a.concurrency, sample_every=a.sample_every,
                   dead_max_len=a.dead_max_len, dedup_window_s=a.dedup_window_s,
                   mqtt_port=a.mqtt_port, redis_url=a.redis_url)
    if a.show is not None:
        # Secrets and ids differ per run; the shape of input N is the seed's.
        gen = Generator(a.seed, Fixtures.load(), with_tokens(make_pools("fuzz-app")),
                        max_body=MAX_BODY, max_payload=MAX_PAYLOAD, mqtt_share=a.mqtt_share,
                        now_ms=int(time.time() * 1000))
        case = gen.case(a.show)
        print(repr(case)[:20_000])
        return 0
    # `kill -USR1 <pid>` prints every thread's stack: how to see where a hung run waits.
    faulthandler.register(signal.SIGUSR1)
    logging.getLogger().setLevel(logging.WARNING)
    logging.getLogger("blynk_bridge").setLevel(logging.WARNING)
    try:
        import uvloop

        result = uvloop.run(run(opts))
    except ImportError:  # pragma: no cover
        result = asyncio.run(run(opts))
    report(result)
    print(summary_json(result))
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
