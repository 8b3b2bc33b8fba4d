"""Redis CPU per uplink of transform + egress, as a ratio to the no-op ceiling measured in the
same run (issue 15 goal 5), and the Redis commands that cost it.

    .venv/bin/python -m bench.redis_cost [--uplinks 30000] [--rounds 2]

Why: one Redis carries a whole deployment (or one node of a cluster carries its share), so the
Redis CPU each uplink costs is the ceiling of the deployment; the bridge's stages can be
replicated, Redis's main thread cannot.

Each round, on a private ``redis-server`` (no persistence, free port; nothing else uses it, so
its CPU is ours alone) and a Blynk emulator process:

* **ceiling**: ``--uplinks`` TTS uplinks (``bench.transform``'s realistic payload, every uplink a
  distinct registered device) are appended; hop 1 reads them (``XREADGROUP COUNT 500``), appends
  each unchanged to a second stream (pipelined ``XADD``) and acks them (one ``XACK``); hop 2
  reads that stream and acks. That is the least Redis work two stages of a stream pipeline can
  do per uplink: ``XREADGROUP`` + ``XADD`` + ``XACK`` for the first hop, ``XREADGROUP`` +
  ``XACK`` for the second (egress's output is Blynk, not a stream).
* **bridge**: the same uplinks through the real transform stage (burst mode, warm registry cache)
  and then the real egress stage (burst mode, warm connections) writing to the emulator.

Before each measured pass a warm-up pass of the same size runs unmeasured (caches, connections,
egress's per-device state exist, as in steady operation). Figures: the Redis server's CPU
(``INFO cpu`` ``used_cpu_user`` + ``used_cpu_sys``, µs resolution) over each pass ÷ uplinks, and
``INFO commandstats`` deltas per command (``usec`` per uplink, calls per uplink). Commands run
inside a script are counted both under their own name and inside the script's ``evalsha``
(Redis counts the script's whole time there), so the table marks scripts. Every pass checks
that each uplink came out (one write per uplink, nothing dead-lettered).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from bench.common import ROOT, Processes, machine, table
from bench.transform import BUTTON, start_emulator

PREFIX = "bbr:"
BATCH = 500

CONFIG = """
redis: {{url: "{url}", prefix: "{prefix}"}}
streams: {{batch: {batch}, block_ms: 200}}
blynk: {{servers: {{default: "{blynk}"}}, default_server: default}}
transform: {{cache_size: 1000000}}
""" + BUTTON



# --- Redis's own counters -----------------------------------------------------------------------


@dataclass
class RedisCost:
    """What Redis spent over one pass."""

    uplinks: int
    cpu_us: float
    #: command → (calls, usec) over the pass.
    commands: dict[str, tuple[int, int]] = field(default_factory=dict)

    @property
    def per_uplink_us(self) -> float:
        return self.cpu_us / self.uplinks

    def top(self, n: int = 8) -> list[tuple[str, float, float]]:
        """(command, usec per uplink, calls per uplink), most expensive first."""
        rows = [(name, usec / self.uplinks, calls / self.uplinks)
                for name, (calls, usec) in self.commands.items()]
        return sorted(rows, key=lambda r: -r[1])[:n]


async def _snapshot(redis: Any) -> tuple[float, dict[str, tuple[int, int]]]:
    cpu = await redis.info("cpu")
    stats = await redis.info("commandstats")
    commands = {}
    for key, value in stats.items():
        name = key.removeprefix("cmdstat_")
        commands[name] = (int(value["calls"]), int(value["usec"]))
    return (float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])) * 1e6, commands


class Meter:
    """Redis CPU and command stats between :meth:`start` and :meth:`stop`."""

    def __init__(self, redis: Any) -> None:
        self.redis = redis
        self._cpu0 = 0.0
        self._cmd0: dict[str, tuple[int, int]] = {}

    async def start(self) -> None:
        self._cpu0, self._cmd0 = await _snapshot(self.redis)

    async def stop(self, uplinks: int) -> RedisCost:
        cpu1, cmd1 = await _snapshot(self.redis)
        delta = {}
        for name, (calls, usec) in cmd1.items():
            c0, u0 = self._cmd0.get(name, (0, 0))
            if name == "info":
                continue  # the meter's own
            if calls > c0:
                delta[name] = (calls - c0, usec - u0)
        return RedisCost(uplinks, cpu1 - self._cpu0, delta)


# --- load ---------------------------------------------------------------------------------------


async def append_uplinks(redis: Any, uplinks: int, devices: int, pass_no: int) -> None:
    """``uplinks`` uplinks round robin over ``devices`` registered devices, newer than any of an
    earlier pass, with ids never used before (transform drops repeated ids)."""
    from bench.transform import FIXTURE, button_uplink
    from pipeline import events
    from pipeline.keys import Keys

    payload = json.loads(FIXTURE.read_text())["uplink_message"]["decoded_payload"]
    stream = Keys(PREFIX).stream("uplinks")
    now = int(time.time() * 1000) - 600_000 + pass_no * 100_000
    for start in range(0, uplinks, 5000):
        async with redis.pipeline(transaction=False) as pipe:
            for i in range(start, min(start + 5000, uplinks)):
                u = button_uplink(payload, f"as:up:{pass_no:02d}{i:08d}", i % devices, i,
                                  counter=pass_no * uplinks + i, ts_ms=now + i)
                pipe.xadd(stream, {events.FIELD: events.encode(u)})
            await pipe.execute()


# --- the no-op ceiling --------------------------------------------------------------------------


async def noop_hop(redis: Any, source: str, group: str, out: str | None) -> int:
    """Drain ``source`` with ``XREADGROUP COUNT 500``; per batch one pipeline: an ``XADD`` of
    each entry to ``out`` (unless None) and one ``XACK``. Returns entries handled."""
    from redis.exceptions import ResponseError

    with contextlib.suppress(ResponseError):  # the group exists (an earlier pass)
        await redis.xgroup_create(source, group, id="0", mkstream=True)
    n = 0
    while True:
        reply = await redis.xreadgroup(group, "c", {source: ">"}, count=BATCH)
        entries = reply[0][1] if reply else []
        if not entries:
            return n
        async with redis.pipeline(transaction=False) as pipe:
            if out is not None:
                for _, fields in entries:
                    pipe.xadd(out, fields)
            pipe.xack(source, group, *[entry_id for entry_id, _ in entries])
            await pipe.execute()
        n += len(entries)


async def ceiling_pass(redis: Any, uplinks: int, devices: int, pass_no: int,
                       meter: Meter | None) -> RedisCost | None:
    from pipeline.keys import Keys

    keys = Keys(PREFIX)
    await append_uplinks(redis, uplinks, devices, pass_no)
    if meter:
        await meter.start()
    first = await noop_hop(redis, keys.stream("uplinks"), "noop1", keys.stream("noop-out"))
    second = await noop_hop(redis, keys.stream("noop-out"), "noop2", None)
    cost = await meter.stop(uplinks) if meter else None
    if first != uplinks or second != uplinks:
        raise SystemExit(f"ceiling: {first} / {second} entries for {uplinks} uplinks")
    return cost


# --- the bridge ---------------------------------------------------------------------------------


class Bridge:
    """transform and egress stages in this process, in burst mode, on the private Redis."""

    def __init__(self, url: str, blynk_url: str) -> None:
        from pipeline import config as config_mod
        from pipeline.context import Context

        cfg = config_mod.parse(CONFIG.format(url=url, prefix=PREFIX, batch=BATCH,
                                             blynk=blynk_url), "yaml", "bench", env={})
        self.t_ctx = Context.create(cfg, consumer="t")
        self.e_ctx = Context.create(cfg, consumer="e")
        self.transform: Any = None
        self.egress: Any = None

    async def start(self) -> None:
        from workers.egress import EgressStage
        from workers.transform import TransformStage

        self.transform = TransformStage(self.t_ctx, until_idle=True)
        self.egress = EgressStage(self.e_ctx, until_idle=True)
        # Its writes partitions and the devices' records in memory stay between passes, as in
        # a running replica (a burst-mode stage hands them back on return otherwise).
        self.egress.keep_partitions = True
        # Transform's uplinks partitions and their de-dup windows in memory, likewise.
        self.transform.keep_partitions = True
        await self.transform.startup()
        await self.egress.startup()

    async def run_pass(self, redis: Any, uplinks: int, devices: int, pass_no: int,
                       meter: Meter | None) -> tuple[RedisCost | None, RedisCost | None]:
        from pipeline.keys import Keys

        keys = Keys(PREFIX)
        writes0 = await redis.xlen(keys.stream("writes"))
        await append_uplinks(redis, uplinks, devices, pass_no)
        if meter:
            await meter.start()
        await self.transform.main_loop(asyncio.Event())
        t_cost = await meter.stop(uplinks) if meter else None
        made = await redis.xlen(keys.stream("writes")) - writes0
        if meter:
            await meter.start()
        await self.egress.main_loop(asyncio.Event())
        e_cost = await meter.stop(uplinks) if meter else None
        dead = await redis.xlen(keys.dead)
        if made != uplinks or dead:
            raise SystemExit(f"bridge: {made} writes for {uplinks} uplinks, {dead} dead letters")
        return t_cost, e_cost

    async def close(self) -> None:
        for stage in (self.transform, self.egress):
            if stage is not None:
                await stage.shutdown()
        with_blynk = self.e_ctx
        await with_blynk.blynk().close()
        await self.t_ctx.close()
        await self.e_ctx.close()



# --- the run ------------------------------------------------------------------------------------


async def one_round(url: str, blynk_url: str, uplinks: int,
                    devices: int) -> dict[str, RedisCost]:
    from bench.transform import register_devices
    from pipeline.keys import Keys
    from pipeline.streams import connect

    redis = connect(url)
    await redis.flushall()  # the private server of this bench only
    await register_devices(redis, Keys(PREFIX), devices)
    await redis.config_resetstat()
    meter = Meter(redis)
    out: dict[str, RedisCost] = {}
    await ceiling_pass(redis, uplinks, devices, 0, None)  # warm-up
    cost = await ceiling_pass(redis, uplinks, devices, 1, meter)
    assert cost is not None
    out["ceiling"] = cost
    keys = Keys(PREFIX)
    await redis.delete(keys.stream("uplinks"), keys.stream("noop-out"))  # the bridge's own next
    bridge = Bridge(url, blynk_url)
    try:
        await bridge.start()
        await bridge.run_pass(redis, uplinks, devices, 2, None)  # warm-up
        t_cost, e_cost = await bridge.run_pass(redis, uplinks, devices, 3, meter)
    finally:
        await bridge.close()
    assert t_cost is not None and e_cost is not None
    out["transform"], out["egress"] = t_cost, e_cost
    await redis.aclose()
    return out


def merged(a: RedisCost, b: RedisCost) -> RedisCost:
    cmds = dict(a.commands)
    for name, (calls, usec) in b.commands.items():
        c0, u0 = cmds.get(name, (0, 0))
        cmds[name] = (c0 + calls, u0 + usec)
    return RedisCost(a.uplinks, a.cpu_us + b.cpu_us, cmds)


async def amain(args: argparse.Namespace) -> int:
    from bench.transform import start_redis

    load = os.getloadavg()[0]
    with Processes() as procs:
        port, _ = start_redis(procs)
        url = f"redis://127.0.0.1:{port}/0"
        devices = args.devices or args.uplinks
        blynk_url = start_emulator(procs, devices, history_len=1)
        rounds = []
        for r in range(args.rounds):
            res = await one_round(url, blynk_url, args.uplinks, devices)
            bridge = merged(res["transform"], res["egress"])
            print(f"round {r + 1}: Redis CPU µs/uplink: ceiling "
                  f"{res['ceiling'].per_uplink_us:.1f}, transform "
                  f"{res['transform'].per_uplink_us:.1f}, egress "
                  f"{res['egress'].per_uplink_us:.1f} -> bridge / ceiling "
                  f"{bridge.per_uplink_us / res['ceiling'].per_uplink_us:.2f}", file=sys.stderr)
            rounds.append(res)
    best = min(rounds, key=lambda res: (res["transform"].per_uplink_us
                                        + res["egress"].per_uplink_us)
               / res["ceiling"].per_uplink_us)
    ceiling = best["ceiling"]
    bridge = merged(best["transform"], best["egress"])
    devices = args.devices or args.uplinks
    print(f"Redis CPU per uplink: {args.uplinks:,} uplinks round robin over {devices:,} devices, "
          f"batch {BATCH}, best of {args.rounds} rounds (by ratio); load before {load:.2f}")
    print(f"machine: {machine()}")
    rows = [[name, f"{c.per_uplink_us:.2f}", f"{c.per_uplink_us / ceiling.per_uplink_us:.2f}"]
            for name, c in (("no-op ceiling (2 hops)", ceiling),
                            ("transform", best["transform"]), ("egress", best["egress"]),
                            ("transform + egress", bridge))]
    print(table(["pass", "Redis CPU µs/uplink", "x ceiling"], rows))
    print(f"ratio transform + egress / no-op ceiling = "
          f"{bridge.per_uplink_us / ceiling.per_uplink_us:.2f} (goal <= 1.5)")
    for name, cost in (("ceiling", ceiling), ("transform", best["transform"]),
                       ("egress", best["egress"])):
        print(f"\ntop Redis commands, {name} (commandstats usec and calls per uplink; "
              f"evalsha/eval include the commands their scripts run; usec is Redis's wall "
              f"clock, inflated on a loaded machine):")
        print(table(["command", "µs/uplink", "calls/uplink"],
                    [[n, f"{u:.2f}", f"{c:.3f}"] for n, u, c in cost.top(args.top)]))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--uplinks", type=int, default=30_000,
                   help="uplinks per pass, each of a distinct device")
    p.add_argument("--devices", type=int, default=0,
                   help="registered devices, uplinks round robin over them (default: one per "
                        "uplink, so egress coalesces nothing)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--top", type=int, default=8, help="commands listed per pass")
    args = p.parse_args(argv)
    os.chdir(ROOT)
    import uvloop

    return uvloop.run(amain(args))


if __name__ == "__main__":
    sys.exit(main())
