"""The worker's CPU and wall time per egress commit (:meth:`pipeline.order.LastWritten.commit`).

One partition whose lease holds the commit's token, on the real Redis (a fresh key prefix,
deleted afterwards): commits of ``n`` 7-pin records and ``n`` acks each, for several ``n`` —
1 to 5 is a commit at ~1,000 writes a second (``COMMIT_LINGER_S`` 5 ms), hundreds one in burst
mode. Prints per ``n`` this process's CPU and the wall time per commit, best of ``--rounds``.
Redis's own CPU is not in it (``bench.redis_cost``).

    .venv/bin/python -m bench.order_commit [--rounds 3]

Compare two versions in the same session (the machine's load moves the figures): run this
from each checkout in turn, alternating.
"""

from __future__ import annotations

import argparse
import sys
import time
import uuid
from collections.abc import Sequence

import uvloop

from bench.common import machine
from pipeline.keys import GROUP_EGRESS, WRITES, Keys
from pipeline.order import LastWritten, PartitionCommit, Record
from pipeline.streams import connect

REDIS_URL = "redis://127.0.0.1:6379/0"
SIZES = (1, 5, 50, 500)


async def amain(rounds: int) -> list[tuple[int, float, float]]:
    """Per size: (n, CPU µs, wall µs) per commit, best round by CPU."""
    redis = connect(REDIS_URL)
    keys = Keys(f"bbbench:{uuid.uuid4().hex[:8]}:")
    lease, stream = keys.egress_lease(0), keys.stream(WRITES, 0)
    out: list[tuple[int, float, float]] = []
    try:
        await redis.set(lease, "bench", px=600_000)
        book = LastWritten(redis, keys)
        seq = 0
        for n in SIZES:
            records = [(f"tts:bench:dev{i}", Record({f"V{j}": 1_000 + j for j in range(7)},
                                                    newest=1_006)) for i in range(n)]
            calls = max(20, 4_000 // n)
            best = (float("inf"), float("inf"))
            for _ in range(rounds):
                cpu0, wall0 = time.process_time(), time.perf_counter()
                for _ in range(calls):
                    seq += 1
                    part = PartitionCommit(stream, "bench", records,
                                           [f"{seq}-{i}" for i in range(n)])
                    if not (await book.commit({0: part}, GROUP_EGRESS))[0]:
                        raise RuntimeError("the commit was fenced off")
                best = min(best, ((time.process_time() - cpu0) / calls * 1e6,
                                  (time.perf_counter() - wall0) / calls * 1e6))
            out.append((n, *best))
    finally:
        await redis.delete(lease, keys.records(0), stream)
        await redis.aclose()
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    print(machine())
    for n, cpu, wall in uvloop.run(amain(args.rounds)):
        print(f"{n:4d} records + acks per commit: {cpu:7.0f} µs CPU, {wall:7.0f} µs wall per "
              f"commit ({cpu / n:6.1f} µs CPU per write)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
