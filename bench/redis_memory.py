"""Redis memory per uplink in the de-duplication window, per registered device and per stream
entry in flight.

    .venv/bin/python -m bench.redis_memory [--uplinks 1000000] [--devices 50000]
                                           [--entries 100000] [--window-s 3600]

A private ``redis-server`` per figure (no persistence, free port) so nobody else's keys move
it; each figure is the ``INFO memory`` ``used_memory`` delta over N items divided by N:

* **de-dup blocks** (:mod:`pipeline.dedup`): N distinct events committed in blocks of 500
  (one ``APPEND`` each, as transform's commit script makes them) over the window's
  :data:`pipeline.dedup.STEPS` step keys, each created with its expiry;
* **registry**: N devices through ``Registry.register`` (row, reverse index, change log);
* **stream entries**: N realistic TTS uplinks (``tts-uplink-02``'s payload and radio) appended
  to an uplinks stream, and N ``BlynkWrite`` s to a writes stream;
* **egress records** (:mod:`pipeline.order`): N devices' records of 7 pins committed into their
  partition's hash (``LastWritten.commit``), and before: one ``SET … PX`` key per device.

The window figure multiplies the per-event cost by what the window holds: a step's block
lives ``window + 2 steps`` (``1 + 2/STEPS`` windows, ``1 + 1.5/STEPS`` on average).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from pathlib import Path
from typing import Any

from bench.common import ROOT, Processes, machine, redis_cpu_seconds, start_redis, table

FIXTURE = ROOT / "tests" / "fixtures" / "tts" / "tts-uplink-02.json"
BATCH = 500

async def _used(redis: Any) -> int:
    return int((await redis.info("memory"))["used_memory"])


class Measure:
    """``used_memory`` and Redis CPU deltas around one fill."""

    def __init__(self, redis: Any) -> None:
        self.redis = redis
        self.mem0 = 0
        self.cpu0 = 0.0

    async def __aenter__(self) -> Measure:
        self.mem0 = await _used(self.redis)
        self.cpu0 = await redis_cpu_seconds(self.redis)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.mem = await _used(self.redis) - self.mem0
        self.cpu = await redis_cpu_seconds(self.redis) - self.cpu0


async def dedup_fill(redis: Any, n: int, window: int) -> float:
    from pipeline import dedup
    from pipeline.keys import Keys

    keys = Keys("dd:")
    stream = keys.stream("uplinks")
    ttl = dedup.block_ttl_ms(window)
    async with Measure(redis) as m:
        for o in range(0, n, BATCH):
            key = dedup.block_key(keys, stream, window, o * dedup.STEPS // n)
            blk = dedup.block((dedup.digest(f"ev-{i}"), i) for i in range(o, min(n, o + BATCH)))
            if await redis.append(key, blk) == len(blk):
                await redis.pexpire(key, ttl)
    return m.mem / n


async def registry(redis: Any, prefix: str, n: int) -> float:
    from pipeline.keys import Keys
    from pipeline.registry import Registry

    reg = Registry(redis, Keys(prefix))
    async with Measure(redis) as m:
        sem = asyncio.Semaphore(64)

        async def one(d: int) -> None:
            async with sem:
                await reg.register(f"tts:app:eui-{d:016x}", token=f"{d:032x}", template="button",
                                   blynk_id=d + 1)

        await asyncio.gather(*(one(d) for d in range(n)))
    return m.mem / n


async def stream_entries(redis: Any, prefix: str, n: int) -> tuple[float, float]:
    from pipeline import events
    from pipeline.keys import Keys

    payload = json.loads(FIXTURE.read_text())["uplink_message"]["decoded_payload"]
    keys = Keys(prefix)
    now = int(time.time() * 1000)
    out = []
    for kind in ("uplinks", "writes"):
        stream = keys.stream(kind)
        async with Measure(redis) as m:
            for start in range(0, n, 5000):
                async with redis.pipeline(transaction=False) as pipe:
                    for i in range(start, min(start + 5000, n)):
                        d = i % 10_000
                        data: bytes
                        if kind == "uplinks":
                            values = dict(payload)
                            values["singlePressEventCounter"] = i
                            data = events.encode(events.Uplink(
                                event_id=f"as:up:01HW{i:022d}", source="tts", integration="app",
                                device=f"eui-{d:016x}", event_ts_ms=now + i,
                                received_ts_ms=now + i, values=values,
                                device_meta={"dev_eui": f"{d:016X}"},
                                radio=events.Radio(rssi=-31 - (i % 60), snr=9.5, gateways=1,
                                                   f_cnt=i, f_port=2)))
                        else:
                            data = events.encode(events.BlynkWrite(
                                token=f"{d:032x}", server="https://fra1.blynk.cloud",
                                device_key=f"tts:app:eui-{d:016x}",
                                pins={"V0": 3.3, "V1": i % 5, "V2": 21.5, "V10": -31},
                                event_ts_ms=now + i, received_ts_ms=now + i,
                                event_id=f"as:up:01HW{i:022d}"))
                        pipe.xadd(stream, {events.FIELD: data})
                    await pipe.execute()
        out.append(m.mem / n)
    return out[0], out[1]


async def egress_records(redis: Any, prefix: str, n: int) -> tuple[float, float]:
    """Bytes per record: one key per device (before), a field of the partition's hash (now)."""
    from pipeline.keys import GROUP_EGRESS, WRITES, Keys
    from pipeline.order import LastWritten, PartitionCommit, Record, encode

    keys = Keys(prefix)
    now = int(time.time() * 1000)
    devices = [f"tts:app:eui-{d:016x}" for d in range(n)]

    def record(d: int) -> Record:
        return Record({f"V{p}": now - 1000 * p - d for p in range(7)}, tat_us=now * 1000,
                      version=12, newest=now - d)

    async with Measure(redis) as before:
        for start in range(0, n, 1000):
            async with redis.pipeline(transaction=False) as pipe:
                for d in range(start, min(start + 1000, n)):
                    pipe.set(keys.last_written(devices[d]), encode(record(d), stored_ms=now),
                             px=40 * 86_400_000)
                await pipe.execute()
    book = LastWritten(redis, keys)
    await redis.set(keys.egress_lease(0), "bench")
    async with Measure(redis) as hashed:
        for start in range(0, n, 1000):
            await book.commit({0: PartitionCommit(
                keys.stream(WRITES), "bench",
                [(devices[d], record(d)) for d in range(start, min(start + 1000, n))])},
                GROUP_EGRESS)
    return before.mem / n, hashed.mem / n


async def main(args: argparse.Namespace) -> None:
    from pipeline import dedup
    from pipeline.streams import connect

    n, w = args.uplinks, args.window_s

    async def on_fresh_redis(fill: Any, *a: Any) -> Any:
        # One private server per figure: the keyspace's own hash table doubles as keys are
        # added, and a doubling during another figure's fill would be charged to it.
        with Processes() as procs:
            redis = connect(f"redis://127.0.0.1:{start_redis(procs)}/0")
            try:
                return await fill(redis, *a)
            finally:
                await redis.aclose()

    now_b = await on_fresh_redis(dedup_fill, n, w)
    device_b = await on_fresh_redis(registry, "reg:", args.devices)
    uplink_b, write_b = await on_fresh_redis(stream_entries, "st:", args.entries)
    record_before_b, record_b = await on_fresh_redis(egress_records, "eg:", args.devices)

    avg = 1 + 1.5 / dedup.STEPS
    most = 1 + 2 / dedup.STEPS
    print(f"Redis memory: {n:,} event ids (window {w} s), {args.devices:,} devices, "
          f"{args.entries:,} stream entries; private redis-server")
    print(f"machine: {machine()}")
    print(table(
        ["item", "bytes each", "bytes per uplink in the window (avg / most)", "x before"],
        [["de-dup blocks", f"{now_b:.1f}", f"{now_b * avg:.1f} / {now_b * most:.1f}", ""],
         ["registered device (row + index + change log)", f"{device_b:.0f}", "", ""],
         ["uplinks stream entry in flight", f"{uplink_b:.0f}", "", ""],
         ["writes stream entry in flight", f"{write_b:.0f}", "", ""],
         ["egress record, before: a key per device", f"{record_before_b:.0f}", "", "1.00"],
         ["egress record, now: a field of its partition's hash", f"{record_b:.0f}", "",
          f"{record_b / record_before_b:.2f}"]]))


def cli() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--uplinks", type=int, default=1_000_000)
    p.add_argument("--devices", type=int, default=50_000)
    p.add_argument("--entries", type=int, default=100_000)
    p.add_argument("--window-s", type=int, default=3600)
    args = p.parse_args()
    os.chdir(Path(ROOT))
    asyncio.run(main(args))


if __name__ == "__main__":
    cli()
