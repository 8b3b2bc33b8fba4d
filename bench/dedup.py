"""Redis CPU per de-dup claim and Redis memory per uplink in the window: the current
:mod:`pipeline.dedup` against the schemes it replaced, in the same run.

    .venv/bin/python -m bench.dedup [--uplinks 1000000] [--window-s 3600]
                                    [--steady-window-s 16] [--steady-s 64] [--ref cae0806]

Each scheme on its own private ``redis-server`` (no persistence, free port), claims in batches
of 500 as transform sends them; Redis CPU = ``INFO cpu`` user + sys, memory = ``INFO memory``
``used_memory``:

* **SET**: ``SET seen:<event id> <stream>/<entry id> NX EX <window> GET`` per claim, in one
  script per batch (the scheme before issue 13);
* **buckets**: ``pipeline/dedup.py`` at ``--ref`` (git), the per-half-window time buckets of
  sharded hashes that took the window to ~31 bytes per uplink;
* **now**: ``pipeline/dedup.py`` of the working tree.

Two runs per scheme:

* **fill**: ``--uplinks`` distinct events claimed from an empty Redis with a long window
  (``--window-s``): nothing expires, so memory / N is the bytes each event costs while it is
  in the window, and the CPU includes every resize of a first start;
* **steady**: a short window (``--steady-window-s``) and claims at full speed for
  ``--steady-s`` seconds, so events leave the window as fast as new ones come: CPU per claim
  over the second half, and memory / (claims per second × window) = bytes per uplink in the
  window, whatever the scheme keeps beyond it.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import ModuleType
from typing import Any

from bench.common import ROOT, Processes, machine, redis_cpu_seconds, start_redis, table

BATCH = 500

_SET_CLAIM = """
local out = {}
for i = 1, #KEYS do
  out[i] = redis.call('SET', KEYS[i], ARGV[i + 1], 'NX', 'EX', ARGV[1], 'GET')
end
return out
"""

Claim = Callable[[list[tuple[str, str, bytes]], int], Awaitable[Any]]


async def _mem(redis: Any) -> int:
    return int((await redis.info("memory"))["used_memory"])


def load_ref(ref: str) -> ModuleType:
    """``pipeline/dedup.py`` as it was at git ``ref``, as a module of its own."""
    src = subprocess.run(["git", "show", f"{ref}:pipeline/dedup.py"], cwd=ROOT, check=True,
                         capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp(prefix="bench-dedup-")) / "dedup_ref.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("dedup_ref", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def claimer(scheme: str, redis: Any, prefix: str, ref: ModuleType | None) -> Claim:
    from pipeline import dedup
    from pipeline.keys import Keys

    if scheme == "SET":
        script = redis.register_script(_SET_CLAIM)

        async def claim_set(batch: list[tuple[str, str, bytes]], window: int) -> Any:
            return await script(keys=[f"{prefix}seen:{e}" for _, e, _ in batch],
                                args=[window, *(m for _, _, m in batch)])
        return claim_set
    mod = ref if scheme == "buckets" else dedup
    assert mod is not None
    return mod.Claims(redis, Keys(prefix)).run  # type: ignore[no-any-return]


def batch(stream: str, first: int, n: int) -> list[tuple[str, str, bytes]]:
    from pipeline import dedup

    return [(stream, f"as:up:01HW{j:022d}", dedup.mark(stream, f"{1_700_000_000_000 + j}-0"))
            for j in range(first, first + n)]


async def fill(claim: Claim, redis: Any, stream: str, n: int, window: int,
               ) -> tuple[float, float]:
    """Bytes per event and Redis CPU µs per claim of ``n`` new events from an empty Redis."""
    mem0, cpu0 = await _mem(redis), await redis_cpu_seconds(redis)
    for i in range(0, n, BATCH):
        got = await claim(batch(stream, i, min(BATCH, n - i)), window)
        assert not any(got), "a new event answered as seen"
    return (await _mem(redis) - mem0) / n, (await redis_cpu_seconds(redis) - cpu0) / n * 1e6


async def steady(claim: Claim, redis: Any, stream: str, window: int, seconds: float,
                 ) -> tuple[float, float, float]:
    """Claims at full speed for ``seconds``: Redis CPU µs per claim over the second half,
    bytes per uplink in the window at the end, claims per second."""
    mem0 = await _mem(redis)
    t0 = time.monotonic()
    i, half_i, half_t, cpu_half = 0, 0, 0.0, 0.0
    while (now := time.monotonic()) - t0 < seconds:
        if not half_t and now - t0 >= seconds / 2:
            half_i, half_t, cpu_half = i, now, await redis_cpu_seconds(redis)
        await claim(batch(stream, i, BATCH), window)
        i += BATCH
    cpu = await redis_cpu_seconds(redis) - cpu_half
    rate = (i - half_i) / (time.monotonic() - half_t)
    return cpu / (i - half_i) * 1e6, (await _mem(redis) - mem0) / (rate * window), rate


async def one(scheme: str, ref: ModuleType | None, mode: str, args: argparse.Namespace,
              ) -> tuple[float, ...]:
    from pipeline.keys import Keys
    from pipeline.streams import connect

    # One private server per figure: the keyspace's own hash table doubles as keys are added,
    # and a doubling during another figure's fill would be charged to it.
    with Processes() as procs:
        redis = connect(f"redis://127.0.0.1:{start_redis(procs)}/0")
        try:
            prefix = f"{mode}:"
            stream = Keys(prefix).stream("uplinks")
            claim = claimer(scheme, redis, prefix, ref)
            if mode == "fill":
                return await fill(claim, redis, stream, args.uplinks, args.window_s)
            return await steady(claim, redis, stream, args.steady_window_s, args.steady_s)
        finally:
            await redis.aclose()


async def main(args: argparse.Namespace) -> None:
    from pipeline import dedup

    ref = load_ref(args.ref)
    rows = []
    base_cpu: dict[str, float] = {}
    for scheme in ("SET", "buckets", "now"):
        fb, fc = await one(scheme, ref, "fill", args)
        sc, sb, rate = await one(scheme, ref, "steady", args)
        base_cpu.setdefault("fill", fc)
        base_cpu.setdefault("steady", sc)
        rows.append([scheme, f"{fb:.1f}", f"{fc:.2f}", f"{fc / base_cpu['fill']:.2f}",
                     f"{sb:.1f}", f"{sc:.2f}", f"{sc / base_cpu['steady']:.2f}",
                     f"{rate:,.0f}"])
        print(f"  {scheme}: fill {fb:.1f} B, {fc:.2f} µs; steady {sb:.1f} B/uplink in the "
              f"window, {sc:.2f} µs, {rate:,.0f} claims/s", flush=True)
    print(f"de-dup claims: fill {args.uplinks:,} events (window {args.window_s} s); steady "
          f"{args.steady_s:.0f} s at full speed (window {args.steady_window_s} s); buckets = "
          f"{args.ref}, now = working tree (SWEEPS {dedup.SWEEPS}); private redis-server")
    print(f"machine: {machine()}; load {os.getloadavg()[0]:.1f}")
    print(table(["scheme", "fill: bytes each", "fill: CPU µs/claim", "x SET",
                 "steady: bytes/uplink in window", "steady: CPU µs/claim", "x SET",
                 "claims/s"], rows))


def cli() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--uplinks", type=int, default=1_000_000)
    p.add_argument("--window-s", type=int, default=3600)
    p.add_argument("--steady-window-s", type=int, default=16)
    p.add_argument("--steady-s", type=float, default=64.0)
    p.add_argument("--ref", default="cae0806", help="git ref of the buckets scheme")
    args = p.parse_args()
    os.chdir(Path(ROOT))
    sys.path.insert(0, str(ROOT))
    asyncio.run(main(args))


if __name__ == "__main__":
    cli()
