"""Blynk messages per uplink when devices send bursts: egress vs a naive one-request-per-uplink.

Every round, each of ``--devices`` devices sends a burst of B uplinks (two pins each) at once —
B uplinks per device per flush window — and the round ends when the consumer has acknowledged
all of them (group pending and lag 0). The same rounds go through

* **egress** — the real stage (``workers.egress``): coalesced, one ``batch/update`` per device
  per flush, LWW order, rate limit; and
* **naive** — what a user would otherwise write: read an entry, send its values in one
  ``batch/update``, ack (one Blynk message per uplink, same client, same concurrency cap).

Both talk to the Blynk emulator over real HTTP on loopback, in this process, against the real
Redis; messages are counted by the emulator (``org_messages``: every admitted device-API
request). Goal (issue 5): ≤ 0.2 messages per uplink with 5 uplinks per device per window.
``ms/round`` is the time from a round's XADD to its last ack: egress waits up to one flush age
(100 ms) on purpose so a burst becomes one message; it is not a throughput figure.

    .venv/bin/python -m bench.egress_messages [--devices 200] [--rounds 10] [--bursts 1,5,10]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

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


@dataclass
class Result:
    name: str
    burst: int
    uplinks: int
    messages: int
    refused: int
    seconds: float

    @property
    def per_uplink(self) -> float:
        return self.messages / self.uplinks if self.uplinks else float("nan")


async def rounds(redis: Redis, keys: Keys, devices: int, burst: int, n_rounds: int) -> int:
    """Send the bursts round by round; each round ends when everything was acknowledged."""
    writer = StreamWriter(redis)
    stream = keys.stream(WRITES)
    sent = 0
    for r in range(n_rounds):
        t = now_ms()
        batch = [
            (stream, encode(BlynkWrite(
                token=token(d), server="fra1", device_key=f"bench:app:dev-{d}",
                pins={"V1": r + i / 10, "V2": r * burst + i}, event_ts_ms=t + i,
                received_ts_ms=t + i, event_id=f"{r}-{d}-{i}")))
            for d in range(devices) for i in range(burst)
        ]
        await writer.add_many(batch)
        sent += len(batch)
        await drained(redis, stream)
    return sent


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


def context(url: str, redis: Redis, prefix: str, consumer: str) -> Context:
    cfg = Config(
        redis=RedisConfig(prefix=prefix),
        blynk=BlynkConfig(servers={"fra1": url}, default_server="fra1"),
        egress=EgressConfig(),
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


Consumer = Callable[[Context, asyncio.Event], Awaitable[None]]


async def scenario(name: str, consumer: Consumer, devices: int, burst: int,
                   n_rounds: int) -> Result:
    emu = emulator(devices)
    prefix = f"bbbench:{uuid.uuid4().hex[:8]}:"
    redis = connect("redis://127.0.0.1:6379/0")
    try:
        async with emu.serve({"fra1": 0}) as urls:
            ctx = context(urls["fra1"], redis, prefix, f"{name}-1")
            stop = asyncio.Event()
            task = asyncio.create_task(consumer(ctx, stop))
            started = time.monotonic()
            uplinks = await rounds(redis, ctx.keys, devices, burst, n_rounds)
            seconds = time.monotonic() - started
            stop.set()
            await asyncio.wait_for(task, 30)
            await ctx.blynk().close()
            return Result(name, burst, uplinks, emu.org_messages, sum(emu.refused.values()),
                          seconds)
    finally:
        async for key in redis.scan_iter(match=f"{prefix}*", count=1000):
            await redis.delete(key)
        await redis.aclose()


async def main_async(args: argparse.Namespace) -> int:
    print(f"egress_messages: {args.devices} devices, {args.rounds} rounds; {machine()}")
    results: list[Result] = []
    for burst in args.bursts:
        naive = await scenario("naive", run_naive, args.devices, burst, args.rounds)
        egress = await scenario("egress", run_egress, args.devices, burst, args.rounds)
        results += [naive, egress]
    rows = []
    for naive, egress in zip(results[::2], results[1::2], strict=True):
        for r in (naive, egress):
            rows.append([
                r.name, r.burst, r.uplinks, r.messages, f"{r.per_uplink:.3f}",
                f"{r.messages / (args.devices * args.rounds):.2f}",
                f"{naive.messages / r.messages:.1f}x" if r.messages else "-",
                r.refused, f"{r.seconds / args.rounds * 1000:,.0f}",
            ])
    print(table(["consumer", "uplinks/device/window", "uplinks", "Blynk messages",
                 "messages/uplink", "messages/device/window", "fewer than naive",
                 "refused (429)", "ms/round"], rows))
    five = [r for r in results if r.name == "egress" and r.burst == 5]
    if five:
        ok = five[0].per_uplink <= 0.2
        print(f"goal ≤ 0.2 messages/uplink at 5 uplinks/device/window: "
              f"{five[0].per_uplink:.3f} {'MET' if ok else 'NOT MET'}")
    return 0


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--devices", type=int, default=200)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--bursts", type=lambda s: [int(x) for x in s.split(",")], default=[1, 5, 10],
                   help="uplinks per device per flush window, comma-separated")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    return asyncio.run(main_async(parse(argv)))


if __name__ == "__main__":
    sys.exit(main())
