"""Blynk messages per uplink when devices send bursts: egress vs a naive one-request-per-uplink.

Every round, each of ``--devices`` devices sends a burst of B uplinks (two pins each): the
burst's i-th uplinks of every device are appended together, ``--gap-ms`` after the (i-1)-th (0:
the whole burst at once), so later uplinks of a burst arrive while the device's first write may
be under way. The round ends when the consumer has acknowledged all of them (group pending and
lag 0). The same rounds go through

* **egress** — the real stage (``workers.egress``) with its defaults (``flush_age_ms`` 0: a
  device's first value goes at once, what arrives while it is under way or rate-limited is
  coalesced into its next write);
* **egress flush_age_ms=100** — the same stage waiting up to 100 ms for more values of a
  device (the old default; fewer messages, more latency); and
* **naive** — what a user would otherwise write: read an entry, send its values in one
  ``batch/update``, ack (one Blynk message per uplink, same client, same concurrency cap).

All talk to the Blynk emulator over real HTTP on loopback, in this process, against the real
Redis; the emulator answers after ``--blynk-latency-ms`` (50: Blynk's cloud is tens of ms away
from most places; with loopback answers a write is under way for a millisecond, and coalescing
by default rests on the per-device rate limit alone, whose 20 ms a burst spread by a busy
machine outlasts). Messages are counted by the emulator (``org_messages``: every admitted
device-API request) after a warm-up round of one uplink per device. Goals (issue 15): with 5
uplinks per device per burst, ≤ 0.4 messages per uplink by default and ≤ 0.2 with
``flush_age_ms: 100``. ``ms/round`` is the time from a round's first XADD to its last ack (the
appending child's start-up included), not a throughput figure.

    .venv/bin/python -m bench.egress_messages [--devices 100] [--rounds 10] [--bursts 1,5,10]
                                              [--gap-ms 2] [--blynk-latency-ms 50]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from bench.common import machine, table
from emulators.blynk.model import DatastreamSpec, DeviceSpec, TemplateSpec
from emulators.blynk.server import BlynkEmulator
from emulators.blynk.settings import EmulatorSpec, Settings
from pipeline.blynk.outcomes import Ok
from pipeline.config import BlynkConfig, Config, EgressConfig, RedisConfig
from pipeline.context import Context
from pipeline.events import BlynkWrite, decode_write, encode
from pipeline.keys import GROUP_EGRESS, WRITES, Keys
from pipeline.streams import Redis, StreamReader, StreamWriter, connect, now_ms
from workers.egress import EgressStage

TEMPLATE = "TMPLbench0001"
REDIS_URL = "redis://127.0.0.1:6379/0"


def token(n: int) -> str:
    return f"bench{n:027d}"


def emulator(devices: int) -> BlynkEmulator:
    spec = EmulatorSpec(
        regions={"fra1": 0},
        # the documented 50 req/s per device stays on: the naive consumer must live with it too
        settings=Settings(request_log_len=0, history_len=10),
        templates=[TemplateSpec(id=TEMPLATE, name="Bench", datastreams=[
            DatastreamSpec(id=1, pin="V1", name="temperature", type="double"),
            DatastreamSpec(id=2, pin="V2", name="counter", type="integer"),
        ])],
        devices=[DeviceSpec(name=f"Bench {n}", token=token(n), template=TEMPLATE, id=n + 1)
                 for n in range(devices)],
    )
    return BlynkEmulator.from_spec(spec)


#: The consumers compared, by name: (run, ``egress`` config).
SCENARIOS: dict[str, tuple[str, dict[str, int]]] = {
    "naive": ("naive", {}),
    "egress": ("egress", {}),
    "egress flush_age_ms=100": ("egress", {"flush_age_ms": 100}),
}
#: Goal per consumer at 5 uplinks per device per burst (messages per uplink).
GOALS = {"egress": 0.4, "egress flush_age_ms=100": 0.2}


@dataclass
class Result:
    name: str
    burst: int
    uplinks: int
    messages: int
    refused: int
    seconds: float
    #: Longest time from a burst's first append to its last (the achieved spread).
    span_s: float

    @property
    def per_uplink(self) -> float:
        return self.messages / self.uplinks if self.uplinks else float("nan")


async def rounds(redis: Redis, keys: Keys, devices: int, burst: int, n_rounds: int,
                 gap_s: float, first: int = 1) -> tuple[int, float]:
    """Send the bursts round by round (numbered from ``first``); each round ends when
    everything was acknowledged. Returns the uplinks sent and the longest burst span."""
    stream = keys.stream(WRITES)
    sent = 0
    span = 0.0
    for r in range(first, first + n_rounds):
        waves: list[list[tuple[str, bytes]]] = [[] for _ in range(burst if gap_s else 1)]
        for i in range(burst):
            t = now_ms()
            waves[i if gap_s else 0] += [
                (stream, encode(BlynkWrite(
                    token=token(d), server="fra1", device_key=f"bench:app:dev-{d}",
                    pins={"V1": r + i / 10, "V2": r * burst + i}, event_ts_ms=t + i,
                    received_ts_ms=t + i, event_id=f"{r}-{d}-{i}")))
                for d in range(devices)
            ]
        span = max(span, await append_elsewhere(waves, gap_s))
        sent += sum(len(wave) for wave in waves)
        await drained(redis, stream)
    return sent, span


async def append_elsewhere(waves: list[list[tuple[str, bytes]]], gap_s: float) -> float:
    """Append the waves ``gap_s`` apart from a child process, so their spacing does not depend
    on how busy egress and the emulator keep this process; returns the time from the first
    append to the last (measured by the child)."""
    with tempfile.NamedTemporaryFile(suffix=".msgpack") as f:
        f.write(msgspec.msgpack.encode(waves))
        f.flush()
        child = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bench.egress_messages", "_append", f.name, str(gap_s),
            stdout=asyncio.subprocess.PIPE)
        out, _ = await child.communicate()
    if child.returncode != 0:
        raise RuntimeError(f"the appending child failed ({child.returncode})")
    return float(out)


async def append_waves(waves: list[list[tuple[str, bytes]]], gap_s: float) -> float:
    """The child's side of :func:`append_elsewhere`."""
    redis = connect(REDIS_URL)
    try:
        writer = StreamWriter(redis)
        first = time.monotonic()
        for i, wave in enumerate(waves):
            if i:
                await asyncio.sleep(gap_s)
            await writer.add_many(wave)
        return time.monotonic() - first
    finally:
        await redis.aclose()


async def drained(redis: Redis, stream: str, limit_s: float = 120.0) -> None:
    """Poll (bounded) until the egress group has read and acknowledged everything."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        groups = await redis.xinfo_groups(stream)
        g = next((g for g in groups if g["name"] == GROUP_EGRESS.encode()), None)
        if g is not None and g["pending"] == 0 and g["lag"] == 0:
            return
        await asyncio.sleep(0.005)
    raise TimeoutError("the consumer did not drain the stream")


def context(url: str, redis: Redis, prefix: str, consumer: str,
            egress: dict[str, int]) -> Context:
    cfg = Config(
        redis=RedisConfig(prefix=prefix),
        blynk=BlynkConfig(servers={"fra1": url}, default_server="fra1"),
        egress=EgressConfig(**egress),
    )
    return Context(config=cfg, redis=redis, keys=Keys(prefix), consumer=consumer,
                   writer=StreamWriter(redis))


async def run_egress(ctx: Context, stop: asyncio.Event) -> None:
    stage = EgressStage(ctx)
    await stage.startup()
    await stage.main_loop(stop)


async def run_naive(ctx: Context, stop: asyncio.Event) -> None:
    """One Blynk request per entry, acked after its 2xx (concurrency capped like egress)."""
    reader = StreamReader(ctx.redis, ctx.keys, ctx.keys.streams(WRITES), GROUP_EGRESS,
                          ctx.consumer, stage="naive", block_ms=100)
    await reader.ensure_group()
    client = ctx.blynk()
    slots = asyncio.Semaphore(ctx.config.egress.max_in_flight)

    async def send(data: bytes) -> bool:
        w = decode_write(data)
        async with slots:
            return isinstance(await client.batch_update(w.server, w.token, w.pins), Ok)

    while not stop.is_set():
        entries = await reader.read()
        oks = await asyncio.gather(*(send(e.data or b"") for e in entries))
        await reader.ack([e for e, ok in zip(entries, oks, strict=True) if ok])
        if not all(oks):
            reader.retry_pending()


Consumer = Callable[[Context, asyncio.Event], Coroutine[Any, Any, None]]


CONSUMERS: dict[str, Consumer] = {"naive": run_naive, "egress": run_egress}


async def scenario(name: str, devices: int, burst: int, n_rounds: int, gap_s: float,
                   latency_ms: float) -> Result:
    kind, egress = SCENARIOS[name]
    emu = emulator(devices)
    prefix = f"bbbench:{uuid.uuid4().hex[:8]}:"
    redis = connect(REDIS_URL)
    try:
        async with emu.serve({"fra1": 0}) as urls:
            ctx = context(urls["fra1"], redis, prefix, f"{kind}-1", egress)
            if latency_ms:
                emu.faults.set(latency_ms=latency_ms)
            stop = asyncio.Event()
            task = asyncio.create_task(CONSUMERS[kind](ctx, stop))
            # Warm-up, not counted: one uplink per device (connections opened, regions known).
            await rounds(redis, ctx.keys, devices, 1, 1, 0, first=0)
            warm_messages = emu.org_messages
            started = time.monotonic()
            uplinks, span = await rounds(redis, ctx.keys, devices, burst, n_rounds, gap_s)
            seconds = time.monotonic() - started
            stop.set()
            await asyncio.wait_for(task, 30)
            await ctx.blynk().close()
            return Result(name, burst, uplinks, emu.org_messages - warm_messages,
                          sum(emu.refused.values()),
                          seconds, span)
    finally:
        async for key in redis.scan_iter(match=f"{prefix}*", count=1000):
            await redis.delete(key)
        await redis.aclose()


async def main_async(args: argparse.Namespace) -> int:
    print(f"egress_messages: {args.devices} devices, {args.rounds} rounds, {args.gap_ms} ms "
          f"between the uplinks of a burst, Blynk answering in {args.blynk_latency_ms} ms; "
          f"{machine()}")
    rows = []
    met = True
    for burst in args.bursts:
        results = [await scenario(name, args.devices, burst, args.rounds, args.gap_ms / 1000,
                                  args.blynk_latency_ms)
                   for name in SCENARIOS]
        naive = results[0]
        for r in results:
            rows.append([
                r.name, r.burst, r.uplinks, r.messages, f"{r.per_uplink:.3f}",
                f"{r.messages / (args.devices * args.rounds):.2f}",
                f"{naive.messages / r.messages:.1f}x" if r.messages else "-",
                r.refused, f"{r.span_s * 1000:,.0f}", f"{r.seconds / args.rounds * 1000:,.0f}",
            ])
            goal = GOALS.get(r.name)
            if burst == 5 and goal is not None:
                ok = r.per_uplink <= goal
                met = met and ok
                print(f"goal {r.name}: ≤ {goal} messages/uplink at 5 uplinks/device/burst: "
                      f"{r.per_uplink:.3f} {'MET' if ok else 'NOT MET'}")
    print(table(["consumer", "uplinks/device/burst", "uplinks", "Blynk messages",
                 "messages/uplink", "messages/device/burst", "fewer than naive",
                 "refused (429)", "burst span ms (max)", "ms/round"], rows))
    return 0 if met else 1


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--devices", type=int, default=100,
                   help="devices (x burst = entries held per burst: past egress.flush_count, "
                        "500, a flush is due before the burst is complete)")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--bursts", type=lambda s: [int(x) for x in s.split(",")], default=[1, 5, 10],
                   help="uplinks per device per burst, comma-separated")
    p.add_argument("--gap-ms", type=float, default=2.0,
                   help="between the uplinks of a burst (0: the whole burst at once)")
    p.add_argument("--blynk-latency-ms", type=float, default=50.0,
                   help="the emulator's answer time (Blynk's cloud answers in 50 ms or more "
                        "from most places; 0: loopback speed)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_append"]:
        waves = msgspec.msgpack.decode(Path(argv[1]).read_bytes(),
                                       type=list[list[tuple[str, bytes]]])
        print(asyncio.run(append_waves(waves, float(argv[2]))))
        return 0
    return asyncio.run(main_async(parse(argv)))


if __name__ == "__main__":
    sys.exit(main())
