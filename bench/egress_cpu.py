"""Egress CPU per distinct-device write: one warm egress stage drains N writes of N devices.

The Blynk emulator runs as its own process (its CPU is not counted); the egress stage runs in
this process on uvloop against the real Redis, on a fresh key prefix that is deleted afterwards.
Each round: a warm-up pass (one write per device: connections open, tokens' regions known),
then N more writes are appended (not measured) and the same stage drains them in burst mode;
the figure is this process's CPU time over that drain divided by N. Redis's own CPU is not in it.

    .venv/bin/python -m bench.egress_cpu [--devices 30000] [--rounds 3]

Compare two versions of egress in the same session (the machine's load moves the figure): run
this from each checkout in turn, alternating, and keep the best round of each.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
import uuid
from collections.abc import Sequence

import uvloop

from bench.common import Processes, machine
from bench.e2e import start_emulator
from pipeline.config import BlynkConfig, Config, EgressConfig, RedisConfig
from pipeline.context import Context
from pipeline.events import BlynkWrite, encode
from pipeline.keys import WRITES, Keys
from pipeline.streams import StreamWriter, connect, now_ms
from workers.egress import EgressStage

REDIS_URL = "redis://127.0.0.1:6379/0"


def token(n: int) -> str:
    return f"bench{n:027d}"


async def append(writer: StreamWriter, keys: Keys, devices: int, ts: int) -> None:
    stream = keys.stream(WRITES)
    items = [(stream, encode(BlynkWrite(
        token=token(n), server="fra1", device_key=f"tts:bench:dev{n}",
        pins={"V1": float(n), "V3": float(ts)}, event_ts_ms=ts, received_ts_ms=ts,
        event_id=f"{n}-{ts}"))) for n in range(devices)]
    for i in range(0, len(items), 5000):
        await writer.add_many(items[i : i + 5000])


async def amain(url: str, devices: int, rounds: int) -> list[float]:
    prefix = f"bbbench:{uuid.uuid4().hex[:8]}:"
    redis = connect(REDIS_URL)
    keys = Keys(prefix)
    cfg = Config(redis=RedisConfig(url=REDIS_URL, prefix=prefix),
                 blynk=BlynkConfig(servers={"fra1": url}, default_server="fra1"),
                 egress=EgressConfig())
    ctx = Context(config=cfg, redis=redis, keys=keys, consumer="bench",
                  writer=StreamWriter(redis))
    stage = EgressStage(ctx, until_idle=True)
    # Its writes partitions and the devices' records in memory stay between passes, as in a
    # running replica (a burst-mode stage hands them back on return otherwise).
    stage.keep_partitions = True
    out: list[float] = []
    try:
        await stage.startup()
        ts = now_ms() - 10_000
        await append(ctx.writer, keys, devices, ts)
        await stage.main_loop(asyncio.Event())  # warm-up pass
        for r in range(rounds):
            await append(ctx.writer, keys, devices, ts + 1 + r)
            cpu0 = time.process_time()
            await stage.main_loop(asyncio.Event())
            out.append((time.process_time() - cpu0) / devices * 1e6)
    finally:
        await ctx.blynk().close()
        async for key in redis.scan_iter(match=f"{prefix}*", count=1000):
            await redis.delete(key)
        await redis.aclose()
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--devices", type=int, default=30_000)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    with Processes() as procs:
        names = [(f"dev{n}", token(n)) for n in range(args.devices)]
        _, url = start_emulator(procs, names, history_len=1)
        per_write = uvloop.run(amain(url, args.devices, args.rounds))
    print(machine())
    print("egress CPU µs per distinct-device write, by round:",
          ", ".join(f"{v:.1f}" for v in per_write), f"(best {min(per_write):.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
