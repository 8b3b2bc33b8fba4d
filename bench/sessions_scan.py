"""Redis cost of an owner's scan: the whole live set every second vs only what changed.

A private ``redis-server`` (so its CPU is the scans' alone) holds ``--devices`` live devices
over ``--partitions`` partitions, recorded by the stage's own code. A round = one scan of every
partition, as an owner holding all of them does each ``scan_interval_s``:

* ``full`` — what the stage sent before the changes stream: ``ZRANGEBYSCORE live -inf now``
  (expired) and ``ZRANGEBYSCORE live now +inf`` (every live device) per partition;
* ``incremental`` — the stage's :meth:`~workers.blynk_sessions.SessionsStage._scan_owned`
  (per partition an atomic expiry script and ``XRANGE`` of the changes stream after the
  cursor, all partitions in one round trip), after its first full read.

``--churn`` devices become newly live before each round (written the way each design writes
them), so the changes are read too. Reported per round: Redis server CPU (utime+stime of
the redis-server process), bytes Redis sent, the client's CPU.

    .venv/bin/python -m bench.sessions_scan --devices 10000 --rounds 100 [--churn 10]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import time

from bench.common import Processes, cpu_seconds, free_port, machine, table, wait_port

CONFIG = """\
redis: {{url: "redis://127.0.0.1:{port}/0", prefix: "scan:"}}
blynk:
  servers: {{fra1: "https://fra1.blynk.cloud"}}
  default_server: fra1
blynk_sessions: {{partitions: {partitions}}}
templates:
  - name: valve
    id: TMPL01
    downlinks: mqtt
    datastreams:
      - {{name: Switch, pin: V1, type: integer, min: 0, max: 1}}
    downlink: {{pins: [V1]}}
"""


async def _run(port: int, redis_pid: int, args: argparse.Namespace) -> list[list[object]]:
    from pipeline import blynk_sessions as rules
    from pipeline.config import parse
    from pipeline.context import Context
    from pipeline.streams import now_ms
    from workers.blynk_sessions import LiveDevice, SessionsStage, _live_enc

    cfg = parse(CONFIG.format(port=port, partitions=args.partitions), "yaml", "scan.yaml",
                env={})
    ctx = Context.create(cfg)
    st = SessionsStage(ctx)
    redis = ctx.redis
    P = args.partitions
    serial = [0]

    def batch(n: int) -> dict[int, list[object]]:
        out: dict[int, list[object]] = {}
        deadline = now_ms() + 3_600_000
        for _ in range(n):
            i = serial[0]
            serial[0] += 1
            token = f"scan{i:08d}".ljust(32, "x")
            rec = _live_enc.encode(LiveDevice(token, "https://fra1.blynk.cloud", "valve"))
            out.setdefault(rules.partition_of(token, P), []).extend(
                [f"tts:a:d{i}", deadline, rec])
        return out

    async def write_old(per: dict[int, list[object]]) -> None:
        async with redis.pipeline(transaction=False) as pipe:
            for p, flat in per.items():
                for k in range(0, len(flat), 3):
                    key, deadline, record = flat[k:k + 3]
                    assert isinstance(deadline, int) and isinstance(record, bytes)
                    pipe.zadd(ctx.keys.sessions_live(p), {str(key): deadline})
                    pipe.hset(ctx.keys.sessions_devices(p), str(key), record)
            await pipe.execute()

    async def old_round() -> None:
        # The scan as it was: expired, then the whole live set, per partition.
        for p in range(P):
            now = now_ms()
            live_key = ctx.keys.sessions_live(p)
            await redis.zrangebyscore(live_key, "-inf", now)
            await redis.zrangebyscore(live_key, now, "+inf")

    async def new_round() -> None:
        await st._scan_owned()

    async def measure(name: str, write: object, scan: object) -> list[object]:
        await redis.flushdb()  # the private server's only database
        serial[0] = 0
        await write(batch(args.devices))  # type: ignore[operator]
        st.owned = set(range(P))
        st.by_partition.clear()
        st.wanted.clear()
        st._cursor.clear()
        st._resync_at.clear()
        for p in range(P):  # the acquiring owner's full read (not measured)
            await st._scan_partition(p)
        info0 = await redis.info("stats")
        cpu0, me0, t0 = cpu_seconds(redis_pid), time.process_time(), time.monotonic()
        for _ in range(args.rounds):
            if args.churn:
                await write(batch(args.churn))  # type: ignore[operator]
            await scan()  # type: ignore[operator]
        wall = time.monotonic() - t0
        cpu1, me1 = cpu_seconds(redis_pid), time.process_time()
        info1 = await redis.info("stats")
        out_bytes = info1["total_net_output_bytes"] - info0["total_net_output_bytes"]
        r = args.rounds
        return [name, f"{(cpu1 - cpu0) / r * 1000:.2f}", f"{out_bytes / r / 1024:.1f}",
                f"{(me1 - me0) / r * 1000:.2f}", f"{wall / r * 1000:.1f}"]

    rows = []
    try:
        for _ in range(args.repeat):
            rows.append(await measure("full (before)", write_old, old_round))
            rows.append(await measure("incremental (after)", st._record_live, new_round))
    finally:
        await ctx.close()
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--devices", type=int, default=10_000)
    ap.add_argument("--partitions", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=100)
    ap.add_argument("--churn", type=int, default=0, help="devices newly live per round")
    ap.add_argument("--repeat", type=int, default=2, help="alternating runs of each")
    args = ap.parse_args(argv)
    binary = shutil.which("redis-server")
    if binary is None:
        print("redis-server not found (needed: a private server measures only the scans)")
        return 2
    print(machine())
    with Processes() as procs:
        port = free_port()
        srv = procs.spawn("redis", [binary, "--port", str(port), "--bind", "127.0.0.1",
                                    "--save", "", "--appendonly", "no"])
        wait_port(port, proc=srv)
        rows = asyncio.run(_run(port, srv.pid, args))
    print(f"{args.devices} live devices, {args.partitions} partitions, {args.rounds} rounds, "
          f"{args.churn} newly live per round; load average {os.getloadavg()[0]:.2f}")
    print(table(["scan", "Redis CPU ms/round", "KiB sent/round", "client CPU ms/round",
                 "wall ms/round"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
