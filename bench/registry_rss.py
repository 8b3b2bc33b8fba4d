"""Worker memory vs fleet size: a transform worker's RSS with 1,000,000 registered devices, next
to the same run over a near-empty registry.

    .venv/bin/python -m bench.registry_rss [--devices 1000000] [--uplinks 200000]

On a private ``redis-server``, for each run: register the devices (pipelined ``HSET``s, 10k per
round trip), append ``--uplinks`` uplinks for devices drawn at random from the registry, drain
them with one transform worker process (burst mode) and read its RSS (``VmRSS``/``VmHWM``) when
the stream is empty. Runs:

* **1k devices** — the baseline: the registry is (almost) empty, every lookup hits the cache;
* **1M devices, cache 100k** (the default ``transform.cache_size``) — most uplinks miss;
* **1M devices, cache 10k** — the cache, not the fleet, sets the memory.

The worker's memory must follow ``cache_size``, never the number of registered devices.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from bench.common import Processes, fmt_mib, go_and_collect, machine, table
from bench.transform import fill, start_redis


async def run(procs: Processes, url: str, devices: int, uplinks: int, cache: int
              ) -> dict[str, float]:
    from pipeline.streams import connect

    redis = connect(url)
    await redis.flushall()
    await fill(url, uplinks, devices)
    used = int((await redis.info("memory"))["used_memory"])
    child = procs.spawn(f"rss-{devices}-{cache}", [
        sys.executable, "-m", "bench.transform", "--worker", "transform", "--url", url,
        "--name", "w0", "--cache", str(cache)])
    while await redis.llen("bbb:ready") < 1:
        procs.check_alive()
        await asyncio.sleep(0.05)
    [report] = await go_and_collect(redis, "bbb:", 1, procs)
    procs.stop(child, grace_s=30)
    written = await redis.xlen("bbb:writes")
    await redis.aclose()
    if written != uplinks:
        raise SystemExit(f"{written} writes for {uplinks} uplinks")
    return {"rss": report["rss"], "peak": report["peak_rss"], "cached": report["cached"],
            "redis": used, "rate": uplinks / (report["t1"] - report["t0"])}


async def main(args: argparse.Namespace) -> None:
    plan = [(1_000, 100_000), (args.devices, 100_000), (args.devices, 10_000)]
    rows = []
    with Processes() as procs:
        port, _ = start_redis(procs)
        url = f"redis://127.0.0.1:{port}/0"
        base = None
        for devices, cache in plan:
            res = await run(procs, url, devices, args.uplinks, cache)
            base = base or res
            print(f"{devices:,} devices, cache {cache:,}: RSS {fmt_mib(int(res['rss']))} MiB, "
                  f"peak {fmt_mib(int(res['peak']))} MiB, {res['cached']:,} cached",
                  file=sys.stderr)
            rows.append([f"{devices:,} devices, cache_size {cache:,}",
                         fmt_mib(int(res["rss"])), fmt_mib(int(res["peak"])),
                         f"{(res['peak'] - base['peak']) / 1048576:+.0f}",
                         f"{int(res['cached']):,}", fmt_mib(int(res["redis"])),
                         f"{res['rate']:,.0f}"])
    print(f"transform worker memory: {args.uplinks:,} uplinks for random registered devices")
    print(f"machine: {machine()}")
    print(table(["registry", "RSS MiB", "peak MiB", "peak vs 1k", "cached rows",
                 "redis MiB", "uplinks/s"], rows))


def cli() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--devices", type=int, default=1_000_000)
    p.add_argument("--uplinks", type=int, default=200_000)
    asyncio.run(main(p.parse_args()))


if __name__ == "__main__":
    cli()
