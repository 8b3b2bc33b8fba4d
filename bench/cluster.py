"""transform + egress drain on one Redis vs a 3-master Redis Cluster (3 and 6 partitions):
rate and Redis CPU per uplink, per node, per stage, in one run.

    .venv/bin/python -m bench.cluster [--uplinks 60000] [--devices 5000] [--workers 1]

Each setup runs on private servers this bench starts (free ports, its own directory, no
persistence): one ``redis-server``, and one 3-master cluster (``scripts/services.sh
--cluster`` with ``BB_CLUSTER_PORTS``/``BB_CLUSTER_DIR`` of its own). Per run, a fresh key
prefix holds ``--devices`` registry rows and ``--uplinks`` realistic TTS uplinks (the ones of
``bench/transform.py``), in the cluster layout on the cluster (``redis.cluster: true``, each
device's uplinks in its partition); then ``--workers`` transform processes (the real stage,
burst mode) drain them, then ``--workers`` egress processes (the real stage, burst mode) drain
the writes into the Blynk emulator (``emulators/blynk``, its own process, limits off, its CPU
not counted). Checked: one write per uplink, no dead letter, every device's last value in the
emulator is its newest uplink's, nothing pending.

Redis CPU µs per uplink = CPU seconds the Redis process(es) used during a stage's drain /
uplinks (``/proc/<pid>/stat``, the same clock as ``INFO cpu``), per node and summed; worker
CPU likewise over the stage's processes. The load average is printed with every row.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from bench.common import (
    ROOT,
    Processes,
    UsageProbe,
    cluster_port,
    free_port,
    machine,
    table,
    wait_port,
)
from bench.transform import (
    FIXTURE,
    button_uplink,
    config_text,
    register_devices,
    start_emulator,
)

STAGES = ("transform", "egress")



def _config(url: str, prefix: str, partitions: int, cluster: bool, blynk_url: str) -> str:
    text = config_text(url).replace('prefix: "bbb:"}',
                                    f'prefix: "{prefix}", partitions: {partitions}, '
                                    f'cluster: {"true" if cluster else "false"}}}')
    text = text.replace('"http://127.0.0.1:9"', f'"{blynk_url}"')
    assert prefix in text and blynk_url in text
    return text



async def emulator_values(blynk_url: str) -> dict[str, int]:
    """Device name → its V3 value (the newest uplink's counter) in the emulator."""
    import aiohttp

    async with aiohttp.ClientSession() as http, \
            http.get(blynk_url + "/_admin/devices") as resp:
        resp.raise_for_status()
        devices = await resp.json(content_type=None)
    return {d["name"]: int(d["values"]["v3"]["value"]) for d in devices
            if "v3" in d["values"]}


async def emulator_messages(blynk_url: str) -> int:
    """Messages the emulator's organization was charged (one per device write request)."""
    import aiohttp

    async with aiohttp.ClientSession() as http, \
            http.get(blynk_url + "/_admin/counts") as resp:
        resp.raise_for_status()
        return int((await resp.json(content_type=None))["organization"]["messages"])


async def reset_emulator(blynk_url: str) -> None:
    import aiohttp

    async with aiohttp.ClientSession() as http, \
            http.post(blynk_url + "/_admin/reset") as resp:
        resp.raise_for_status()


async def fill(cfg_text: str, uplinks: int, devices: int) -> dict[str, int]:
    """Registry rows and uplinks; returns device → its newest uplink's counter."""
    import random

    from pipeline import config as config_mod
    from pipeline import events
    from pipeline.streams import connect

    cfg = config_mod.parse(cfg_text, "yaml", "bench", env={})
    keys = cfg.redis.keys()
    redis = connect(cfg.redis.url, cluster=cfg.redis.is_cluster)
    payload = json.loads(FIXTURE.read_text())["uplink_message"]["decoded_payload"]
    rnd = random.Random(1)
    newest: dict[str, int] = {}
    await register_devices(redis, keys, devices)
    now = int(time.time() * 1000)
    for start in range(0, uplinks, 5000):
        async with redis.pipeline(transaction=False) as pipe:
            for i in range(start, min(start + 5000, uplinks)):
                u = button_uplink(payload, f"as:up:{i:08d}", rnd.randrange(devices), i,
                                  counter=i, ts_ms=now + i)
                newest[u.device] = i
                pipe.xadd(keys.stream_for("uplinks", "tts", u.device),
                          {events.FIELD: events.encode(u)})
            await pipe.execute()
    await redis.aclose()
    return newest


async def worker(cfg_text: str, name: str, stage_name: str) -> None:
    from pipeline import config as config_mod
    from pipeline.context import Context
    from workers.egress import EgressStage
    from workers.transform import TransformStage

    cfg = config_mod.parse(cfg_text, "yaml", "bench", env={})
    ctx = Context.create(cfg, consumer=name)
    stage = (TransformStage(ctx, until_idle=True) if stage_name == "transform"
             else EgressStage(ctx, until_idle=True))
    await stage.startup()
    p = f"{cfg.redis.prefix}{stage_name}:"
    await ctx.redis.rpush(f"{p}ready", name)
    await ctx.redis.blpop([f"{p}go"], timeout=0)
    t0 = time.time()
    await stage.main_loop(asyncio.Event())
    await ctx.redis.rpush(f"{p}done", json.dumps({"t0": t0, "t1": time.time()}))
    await stage.shutdown()
    await ctx.close()


async def drain(procs: Processes, redis: Any, path: Path, prefix: str, stage: str,
                pids: dict[str, int], workers: int, uplinks: int) -> dict[str, Any]:
    """Start ``workers`` processes of ``stage``, release them together, and measure the drain:
    rate, Redis CPU µs per uplink per node, worker CPU µs per uplink, load average."""
    from bench.common import go_and_collect

    children = [procs.spawn(f"{prefix}{stage}{i}", [
        sys.executable, "-m", "bench.cluster", "--worker", str(path), "--stage", stage,
        "--name", f"{stage}{i}"]) for i in range(workers)]
    while await redis.llen(f"{prefix}{stage}:ready") < workers:
        procs.check_alive()
        await asyncio.sleep(0.05)
    probe = UsageProbe({**pids, **{c.name: c.pid for c in children}})
    probe.start()
    reports = await go_and_collect(redis, f"{prefix}{stage}:", workers, procs)
    usage = probe.stop()
    load = os.getloadavg()[0]
    for c in children:
        procs.stop(c, grace_s=30)
    seconds = max(r["t1"] for r in reports) - min(r["t0"] for r in reports)
    return {"rate": uplinks / seconds, "seconds": seconds, "load": load,
            "redis_us": {u.name: u.cpu_s / uplinks * 1e6 for u in usage if u.name in pids},
            "worker_us": sum(u.cpu_s for u in usage if u.name not in pids) / uplinks * 1e6}


async def run_one(procs: Processes, url: str, pids: dict[str, int], partitions: int,
                  cluster: bool, workers: int, uplinks: int, devices: int,
                  blynk_url: str) -> dict[str, dict[str, Any]]:
    from pipeline import config as config_mod
    from pipeline.streams import connect

    prefix = f"bbc{uuid.uuid4().hex[:6]}:"
    text = _config(url, prefix, partitions, cluster, blynk_url)
    path = procs.dir / f"{prefix[:-1]}.yaml"
    path.write_text(text)
    newest = await fill(text, uplinks, devices)
    await reset_emulator(blynk_url)
    cfg = config_mod.parse(text, "yaml", "bench", env={})
    keys = cfg.redis.keys()
    redis = connect(url, cluster=cluster)
    out = {"transform": await drain(procs, redis, path, prefix, "transform", pids, workers,
                                    uplinks)}
    produced = sum([int(await redis.xlen(s)) for s in keys.streams("writes")])
    out["egress"] = await drain(procs, redis, path, prefix, "egress", pids, workers, uplinks)
    dead = sum([int(await redis.xlen(s)) for s in keys.dead_streams()])
    pending = 0
    for s in keys.streams("writes"):
        pending += int((await redis.xpending(s, "egress"))["pending"])
    await redis.aclose()
    if produced != uplinks or dead or pending:
        raise SystemExit(f"{produced} writes for {uplinks} uplinks, {dead} dead letters, "
                         f"{pending} writes pending")
    written = await emulator_values(blynk_url)
    wrong = {d: (v, written.get(d)) for d, v in newest.items() if written.get(d) != v}
    if wrong:
        raise SystemExit(f"{len(wrong)} devices' last value in Blynk is not their newest "
                         f"uplink's, e.g. {list(wrong.items())[:3]}")
    out["egress"]["messages"] = await emulator_messages(blynk_url)
    return out


def start_cluster(procs: Processes) -> tuple[str, dict[str, int]]:
    ports = [cluster_port() for _ in range(3)]
    env = {**os.environ, "BB_CLUSTER_PORTS": " ".join(map(str, ports)),
           "BB_CLUSTER_DIR": str(procs.dir / "cluster")}
    done = subprocess.run(["bash", str(ROOT / "scripts" / "services.sh"), "--cluster"],
                          capture_output=True, text=True, timeout=180, env=env)
    pids = {f"redis:{p}": int((procs.dir / "cluster" / str(p) / "redis.pid").read_text())
            for p in ports if (procs.dir / "cluster" / str(p) / "redis.pid").exists()}
    if done.returncode != 0:
        raise SystemExit(f"could not start a cluster: {done.stderr.strip()}")
    return "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in ports), pids


async def main(args: argparse.Namespace) -> None:
    import signal

    results = []
    with Processes() as procs:
        port = free_port()
        proc = procs.spawn("redis", ["redis-server", "--port", str(port), "--bind", "127.0.0.1",
                                     "--save", "", "--appendonly", "no",
                                     "--dir", str(procs.dir)])
        wait_port(port, proc=proc)
        url1 = f"redis://127.0.0.1:{port}/0"
        blynk_url = start_emulator(procs, args.devices, history_len=0)
        curl, cpids = start_cluster(procs)
        try:
            plan = [("1 Redis, 1 partition", url1, {"redis": proc.pid}, 1, False),
                    ("1 Redis, 3 partitions", url1, {"redis": proc.pid}, 3, False),
                    ("cluster 3 masters, 3 partitions", curl, cpids, 3, True),
                    ("cluster 3 masters, 6 partitions", curl, cpids, 6, True)]
            for name, url, pids, parts, cluster in plan:
                res = await run_one(procs, url, pids, parts, cluster, args.workers,
                                    args.uplinks, args.devices, blynk_url)
                print(f"{name}: " + ", ".join(f"{st} {res[st]['rate']:,.0f} uplinks/s"
                                              for st in STAGES), file=sys.stderr)
                results.append((name, res))
        finally:
            for pid in cpids.values():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
    print(f"transform drain, then egress drain into the Blynk emulator, {args.workers} "
          f"worker(s) each: {args.uplinks:,} uplinks over {args.devices:,} devices")
    print(f"machine: {machine()}")
    for name, res in results:
        print(f"{name}: {res['egress']['messages'] / args.uplinks:.2f} Blynk messages per "
              f"uplink (the rest coalesced)")
    rows = []
    for name, res in results:
        for st in STAGES:
            per_node = res[st]["redis_us"]
            rows.append([name, st, f"{res[st]['rate']:,.0f}", f"{res[st]['worker_us']:.1f}",
                         f"{sum(per_node.values()):.1f}",
                         " / ".join(f"{v:.1f}" for v in per_node.values()),
                         f"{res[st]['load']:.1f}"])
        total = {n: sum(res[st]["redis_us"][n] for st in STAGES) for n in res["egress"]["redis_us"]}
        rows.append([name, "both", "", f"{sum(res[st]['worker_us'] for st in STAGES):.1f}",
                     f"{sum(total.values()):.1f}",
                     " / ".join(f"{v:.1f}" for v in total.values()), ""])
    print(table(["setup", "stage", "uplinks/s", "worker CPU µs/uplink",
                 "Redis CPU µs/uplink (sum)", "per node", "load"], rows))


def cli() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--uplinks", type=int, default=60_000)
    p.add_argument("--devices", type=int, default=5_000)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--worker")
    p.add_argument("--name")
    p.add_argument("--stage", choices=STAGES, default="transform")
    a = p.parse_args()
    import uvloop

    if a.worker:
        uvloop.run(worker(Path(a.worker).read_text(), a.name, a.stage))
    else:
        uvloop.run(main(a))


if __name__ == "__main__":
    cli()
