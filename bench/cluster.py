"""transform drain on one Redis vs a 3-master Redis Cluster (3 and 6 partitions): rate and
Redis CPU per uplink, per node, in one run.

    .venv/bin/python -m bench.cluster [--uplinks 60000] [--devices 5000] [--workers 1]

Each setup runs on private servers this bench starts (free ports, its own directory, no
persistence): one ``redis-server``, and one 3-master cluster (``scripts/services.sh
--cluster`` with ``BB_CLUSTER_PORTS``/``BB_CLUSTER_DIR`` of its own). Per run, a fresh key
prefix holds ``--devices`` registry rows and ``--uplinks`` realistic TTS uplinks (the ones of
``bench/transform.py``), in the cluster layout on the cluster (``redis.cluster: true``, each
device's uplinks in its partition); then ``--workers`` transform processes (the real stage,
burst mode) drain them. Checked: one write per uplink, no dead letter.

Redis CPU µs per uplink = CPU seconds the Redis process(es) used during the drain / uplinks,
per node and summed. Egress is not measured here (its Redis work is two script calls per
flush per partition: ``pipeline/order.py``).
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

from bench.common import ROOT, Processes, UsageProbe, free_port, machine, table, wait_port
from bench.transform import FIXTURE, config_text


def _config(url: str, prefix: str, partitions: int, cluster: bool) -> str:
    text = config_text(url).replace('prefix: "bbb:"}',
                                    f'prefix: "{prefix}", partitions: {partitions}, '
                                    f'cluster: {"true" if cluster else "false"}}}')
    assert prefix in text
    return text


async def fill(cfg_text: str, uplinks: int, devices: int) -> None:
    import random

    from pipeline import config as config_mod
    from pipeline import events
    from pipeline.streams import connect

    cfg = config_mod.parse(cfg_text, "yaml", "bench", env={})
    keys = cfg.redis.keys()
    redis = connect(cfg.redis.url, cluster=cfg.redis.is_cluster)
    payload = json.loads(FIXTURE.read_text())["uplink_message"]["decoded_payload"]
    rnd = random.Random(1)
    for start in range(0, devices, 5000):
        async with redis.pipeline(transaction=False) as pipe:
            for d in range(start, min(start + 5000, devices)):
                pipe.hset(keys.device("tts", "app", f"eui-{d:016x}"), mapping={
                    "token": f"{d:032x}", "template": "button", "server": "",
                    "status": "ok", "id": str(d + 1)})
            await pipe.execute()
    now = int(time.time() * 1000)
    for start in range(0, uplinks, 5000):
        async with redis.pipeline(transaction=False) as pipe:
            for i in range(start, min(start + 5000, uplinks)):
                d = rnd.randrange(devices)
                values = dict(payload)
                values["singlePressEventCounter"] = i
                device = f"eui-{d:016x}"
                u = events.Uplink(
                    event_id=f"as:up:{i:08d}", source="tts", integration="app", device=device,
                    event_ts_ms=now + i, received_ts_ms=now + i, values=values,
                    device_meta={"dev_eui": f"{d:016X}"},
                    radio=events.Radio(rssi=-31 - (i % 60), snr=9.5, gateways=1, f_cnt=i,
                                       f_port=2))
                pipe.xadd(keys.stream_for("uplinks", "tts", device),
                          {events.FIELD: events.encode(u)})
            await pipe.execute()
    await redis.aclose()


async def worker(cfg_text: str, name: str) -> None:
    from pipeline import config as config_mod
    from pipeline.context import Context
    from workers.transform import TransformStage

    cfg = config_mod.parse(cfg_text, "yaml", "bench", env={})
    ctx = Context.create(cfg, consumer=name)
    stage = TransformStage(ctx, until_idle=True)
    await stage.startup()
    p = cfg.redis.prefix
    await ctx.redis.rpush(f"{p}ready", name)
    await ctx.redis.blpop([f"{p}go"], timeout=0)
    t0 = time.time()
    await stage.main_loop(asyncio.Event())
    await ctx.redis.rpush(f"{p}done", json.dumps({"t0": t0, "t1": time.time()}))
    await stage.shutdown()
    await ctx.close()


async def run_one(procs: Processes, url: str, pids: dict[str, int], partitions: int,
                  cluster: bool, workers: int, uplinks: int, devices: int) -> dict[str, object]:
    from bench.common import go_and_collect
    from pipeline import config as config_mod
    from pipeline.streams import connect

    prefix = f"bbc{uuid.uuid4().hex[:6]}:"
    text = _config(url, prefix, partitions, cluster)
    path = procs.dir / f"{prefix[:-1]}.yaml"
    path.write_text(text)
    await fill(text, uplinks, devices)
    cfg = config_mod.parse(text, "yaml", "bench", env={})
    keys = cfg.redis.keys()
    redis = connect(url, cluster=cluster)
    children = [procs.spawn(f"{prefix}w{i}", [sys.executable, "-m", "bench.cluster",
                                              "--worker", str(path), "--name", f"w{i}"])
                for i in range(workers)]
    while await redis.llen(f"{prefix}ready") < workers:
        procs.check_alive()
        await asyncio.sleep(0.05)
    probe = UsageProbe({**pids, **{c.name: c.pid for c in children}})
    probe.start()
    reports = await go_and_collect(redis, prefix, workers, procs)
    usage = probe.stop()
    for c in children:
        procs.stop(c, grace_s=30)
    produced = sum([int(await redis.xlen(s)) for s in keys.streams("writes")])
    dead = sum([int(await redis.xlen(s)) for s in keys.dead_streams()])
    await redis.aclose()
    if produced != uplinks or dead:
        raise SystemExit(f"{produced} writes for {uplinks} uplinks, {dead} dead letters")
    seconds = max(r["t1"] for r in reports) - min(r["t0"] for r in reports)
    redis_us = {u.name: u.cpu_s / uplinks * 1e6 for u in usage if u.name in pids}
    worker_us = sum(u.cpu_s for u in usage if u.name not in pids) / uplinks * 1e6
    return {"rate": uplinks / seconds, "seconds": seconds, "redis_us": redis_us,
            "worker_us": worker_us}


def _cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000) is free and valid too."""
    import socket

    while True:
        port = free_port()
        if port + 10000 <= 65535:
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port + 10000))
                except OSError:
                    continue
            return port


def start_cluster(procs: Processes) -> tuple[str, dict[str, int]]:
    ports = [_cluster_port() for _ in range(3)]
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
        curl, cpids = start_cluster(procs)
        try:
            plan = [("1 Redis, 1 partition", url1, {"redis": proc.pid}, 1, False),
                    ("1 Redis, 3 partitions", url1, {"redis": proc.pid}, 3, False),
                    ("cluster 3 masters, 3 partitions", curl, cpids, 3, True),
                    ("cluster 3 masters, 6 partitions", curl, cpids, 6, True)]
            for name, url, pids, parts, cluster in plan:
                res = await run_one(procs, url, pids, parts, cluster, args.workers,
                                    args.uplinks, args.devices)
                print(f"{name}: {res['rate']:,.0f} uplinks/s", file=sys.stderr)
                results.append((name, res))
        finally:
            for pid in cpids.values():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
    print(f"transform drain, {args.workers} worker(s): {args.uplinks:,} uplinks over "
          f"{args.devices:,} devices")
    print(f"machine: {machine()}")
    rows = []
    for name, res in results:
        per_node = res["redis_us"]
        assert isinstance(per_node, dict)
        rows.append([name, f"{res['rate']:,.0f}", f"{res['worker_us']:.1f}",
                     f"{sum(per_node.values()):.1f}",
                     " / ".join(f"{v:.1f}" for v in per_node.values())])
    print(table(["setup", "uplinks/s", "worker CPU µs/uplink", "Redis CPU µs/uplink (sum)",
                 "per node"], rows))


def cli() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--uplinks", type=int, default=60_000)
    p.add_argument("--devices", type=int, default=5_000)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--worker")
    p.add_argument("--name")
    a = p.parse_args()
    import uvloop

    if a.worker:
        uvloop.run(worker(Path(a.worker).read_text(), a.name))
    else:
        uvloop.run(main(a))


if __name__ == "__main__":
    cli()
