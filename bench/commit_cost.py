"""Redis CPU of transform's commit script, taken apart: where a batch's call spends Redis's
time, by variants of the script on a private ``redis-server`` (issue 15 goal 5).

    .venv/bin/python -m bench.commit_cost [--uplinks 20000] [--rounds 3]

Each pass: ``--uplinks`` uplink entries are appended and read (``XREADGROUP COUNT 500``,
unmeasured) and then committed in batches of 500, measured: Redis CPU (``INFO cpu`` user + sys)
over the commits ÷ uplinks. The outputs are ``BlynkWrite`` entries of ``bench.transform``'s
7-pin template, as transform writes them. The de-dup state is filled first (unmeasured) so that
no shard resize falls in the measured pass (steady operation), unless ``--fill``.

Variants: **commit** (the script as transform runs it), **claims only** (the script with the
claims and acks, no outputs), **no claims** (the script with outputs and acks, no de-dup),
**pipelined** (what the no-op ceiling's first hop does after its read: an ``XADD`` per entry
and one ``XACK``, pipelined from the client), **zadd only** (one pipelined ``ZADD NX`` per
claim into 512 sorted sets, no script: the claim's bare command). With
``COMMIT_COST_STATS=1`` each pass also prints ``INFO commandstats`` usec per uplink.

``--cuts`` adds the commit script with one part cut out of its text, to take its cost apart
(each is the commit's cost minus that part's): **- ZADD** (the claim's ``ZADD NX`` answers
"new" without running), **- claim Lua** (the claim function is not called), **- claim loop**
(the loop over the claims does not run), **- XADD** (the outputs are not appended). Their
outputs and de-dup state are wrong, of course: they measure, they do not commit.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any

from bench.common import ROOT, Processes, machine, redis_cpu_seconds, start_redis, table

BATCH = 500
PREFIX = "bbc:"


def cuts() -> dict[str, tuple[str, str]]:
    """``--cuts``: variant → (text of the commit script, its replacement)."""
    from pipeline import dedup

    return {
        "- ZADD": ("if redis.call('ZADD', k, 'NX', score, d) == 1 then", "if k and score then"),
        "- claim Lua": (f"old = dd_claim(st, d, string.sub(blob, o + {dedup.HEX_FROM}, "
                        f"o + {dedup.CLAIM_BYTES}))", "old = nil"),
        "- claim loop": ("for i = 1, #cbase do\n  local st = states[cbase[i]]",
                         "for i = 1, 0 do\n  local st = states[cbase[i]]"),
        "- XADD": ("    redis.call('XADD', KEYS[base + si], '*', 'd', ARGV[pos])\n", ""),
    }


def write_of(i: int) -> bytes:
    from pipeline import events

    return events.encode(events.BlynkWrite(
        token=f"{i:032x}", server="http://127.0.0.1:38123", device_key=f"tts:app1:eui-{i:016x}",
        pins={"V0": 21.5 + i % 7, "V1": i % 100, "V2": 3.61, "V3": 1, "V4": i % 2, "V10": 7,
              "V11": -87.5},
        event_ts_ms=1_765_000_000_000 + i, received_ts_ms=1_765_000_000_050 + i,
        event_id=f"as:up:01{i:08d}"))


async def one_pass(redis: Any, variant: str, uplinks: int, start: int) -> float:
    from pipeline import dedup
    from pipeline.keys import Keys
    from pipeline.streams import Entry
    from workers.transform import scripts
    from workers.transform.scripts import CLAIM, Commit

    keys = Keys(PREFIX)
    src, out = keys.stream("uplinks"), keys.stream("writes")
    await redis.delete(src)
    for s in range(0, uplinks, 5000):
        async with redis.pipeline(transaction=False) as pipe:
            for _ in range(s, min(s + 5000, uplinks)):
                pipe.xadd(src, {b"d": b"x" * 200})
            await pipe.execute()
    await redis.xgroup_create(src, "g", id="0")
    batches: list[list[Entry]] = []
    while True:
        reply = await redis.xreadgroup("g", "c", {src: ">"}, count=BATCH)
        got = reply[0][1] if reply else []
        if not got:
            break
        batches.append([Entry(src, i.decode(), None) for i, _ in got])
    full = scripts._COMMIT
    cut = cuts().get(variant)
    if cut is not None:
        assert cut[0] in full, f"{variant}: the commit script changed, see cuts()"
        scripts._COMMIT = full.replace(cut[0], cut[1])
    try:
        commit = Commit(redis, keys, "g")
    finally:
        scripts._COMMIT = full
    await redis.config_resetstat()
    cpu0 = await redis_cpu_seconds(redis)
    n = start
    for b in batches:
        ids = range(n, n + len(b))
        n += len(b)
        if variant in ("commit", "no claims", "claims only") or variant in cuts():
            claims = [(src, f"as:up:{i:010d}", dedup.mark(src, e.id), CLAIM)
                      for i, e in zip(ids, b, strict=True)] if variant != "no claims" else []
            outputs = [(out, (j + 1) if claims else 0, write_of(i))
                       for j, i in enumerate(ids)] if variant != "claims only" else []
            res = await commit.run(0, 3600, claims, outputs, b)
            assert res == [], res
        elif variant == "pipelined":
            async with redis.pipeline(transaction=False) as pipe:
                for i in ids:
                    pipe.xadd(out, {b"d": write_of(i)})
                pipe.xack(src, "g", *[e.id for e in b])
                await pipe.execute()
        elif variant == "zadd only":
            async with redis.pipeline(transaction=False) as pipe:
                for i in ids:
                    d = dedup.digest(f"as:up:{i:010d}")
                    pipe.zadd(f"{PREFIX}zz:{int.from_bytes(d[:3], 'big') % 512}",
                              {d: float((i // 1000) << 32 | i)}, nx=True)
                await pipe.execute()
        else:
            raise ValueError(variant)
    cpu = await redis_cpu_seconds(redis) - cpu0
    stats = await redis.info("commandstats")
    if os.environ.get("COMMIT_COST_STATS"):
        print(variant, {k.removeprefix("cmdstat_"): round(v["usec"] / uplinks, 2)
                        for k, v in stats.items() if v["usec"] / uplinks >= 0.01},
              file=sys.stderr)
    await redis.xtrim(out, maxlen=0)
    return cpu * 1e6 / uplinks


async def amain(args: argparse.Namespace) -> int:
    from pipeline.streams import connect

    load = os.getloadavg()[0]
    variants = args.variants.split(",") + (list(cuts()) if args.cuts else [])
    res: dict[str, list[float]] = {v: [] for v in variants}
    with Processes() as procs:
        port = start_redis(procs)
        redis = connect(f"redis://127.0.0.1:{port}/0")
        await redis.flushall()  # the private server of this bench only
        # Fill the de-dup state (unmeasured): 84,000 events leave 2,048 shards (~41 events
        # each), their moves done, and room for ~47,000 more events before the next doubling.
        n = 0
        if not args.fill:
            n = 84_000
            await one_pass(redis, "commit", n, 0)
        for _ in range(args.rounds):
            for v in variants:
                res[v].append(await one_pass(redis, v, args.uplinks, n))
                n += args.uplinks  # the next pass's events are new whatever this one did
        await redis.aclose()
    print(f"Redis CPU of transform's commit, µs per uplink: {args.uplinks:,} uplinks a pass, "
          f"batch {BATCH}, {args.rounds} rounds; load before {load:.2f}")
    print(f"machine: {machine()}")
    print(table(["variant", "min", "median", "all"],
                [[v, f"{min(x):.2f}", f"{sorted(x)[len(x) // 2]:.2f}",
                  " ".join(f"{y:.2f}" for y in x)] for v, x in res.items()]))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--uplinks", type=int, default=20_000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--fill", action="store_true", help="no de-dup fill first")
    p.add_argument("--cuts", action="store_true", help="add the commit with parts cut out")
    p.add_argument("--variants", default="commit,claims only,no claims,pipelined,zadd only")
    args = p.parse_args(argv)
    os.chdir(ROOT)
    import uvloop

    return uvloop.run(amain(args))


if __name__ == "__main__":
    sys.exit(main())
