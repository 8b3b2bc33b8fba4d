"""The stages on a real 3-master Redis Cluster (cluster key layout): transform while one
partition's slot moves between masters (every uplink appended is written once it is over, none
is left pending, nothing is dead-lettered); the whole pipeline
(ingest-http → transform → egress → Blynk) while a partition's slot moves; and ingest-http →
transform → egress → Blynk while one master's process is stopped (what waits, what is refused,
that nothing is lost).

Appends and batch commits caught between the two masters (``TRYAGAIN``/``ASK`` on a key
already moved) fail as a whole and are retried, as ingest and the consume loop retry them.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from redis.exceptions import RedisError

from emulators.blynk import DatastreamSpec, DeviceSpec
from pipeline import config as config_mod
from pipeline import events
from pipeline.context import Context
from pipeline.events import Uplink
from pipeline.keys import GROUP_EGRESS, GROUP_TRANSFORM, UPLINKS, WRITES, Keys
from pipeline.streams import Redis, StreamWriter
from tests.conftest import free_port
from tests.rig import (
    blynk_spec,
    parse_config,
    run_bridge,
    serve_blynk,
    switch_template,
    tts_uplink_body,
)
from tests.test_cluster import _move_slot, _port
from tests.wait import wait_until
from workers import egress, ingest_http, transform
from workers.transform import TransformStage

DEVICES = [f"dev-{i}" for i in range(12)]

CONFIG = """
blynk: {servers: {default: "http://127.0.0.1:1"}}
streams: {batch: 50, block_ms: 200}
templates:
  - name: t
    datastreams: [{name: n, pin: V1, type: integer}]
tts:
  - {name: app, app_id: a, template: t}
devices:
"""


def _config(prefix: str) -> config_mod.Config:
    rows = "".join(f"  - {{source: tts, integration: app, device: {d}, token: TOK-{d}, "
                   f"template: t}}\n" for d in DEVICES)
    text = CONFIG + rows + f"redis: {{prefix: '{prefix}', partitions: 3, cluster: true}}\n"
    return config_mod.parse(text, "yaml", "test.yaml", env={})


async def _written(redis: Redis, keys: Keys) -> list[str]:
    out: list[str] = []
    for stream in keys.streams(WRITES):
        for _, fields in await redis.xrange(stream):
            out.append(events.decode_write(fields[events.FIELD]).event_id)
    return out


async def test_transform_loses_nothing_while_a_partition_slot_moves(
        cluster_redis: Redis, prefix: str, caplog: pytest.LogCaptureFixture) -> None:
    cfg = _config(prefix)
    keys = cfg.redis.keys()
    assert keys.cluster and keys.partitions == 3
    ctx = Context(config=cfg, redis=cluster_redis, keys=keys, consumer="t1",
                  writer=StreamWriter(cluster_redis))
    moving = keys.stream(UPLINKS, 1)
    slot = cluster_redis.keyslot(moving)  # type: ignore[attr-defined]
    source = _port(cluster_redis.get_node_from_key(moving).name)  # type: ignore[attr-defined]
    target = next(_port(n.name) for n in cluster_redis.get_primaries()  # type: ignore[attr-defined]
                  if _port(n.name) != source)
    # The slot holds a whole partition: its streams, rows, registry version and de-dup state.
    assert cluster_redis.keyslot(keys.stream(WRITES, 1)) == slot  # type: ignore[attr-defined]
    assert cluster_redis.keyslot(keys.registry_version(1)) == slot  # type: ignore[attr-defined]

    stage = TransformStage(ctx)
    await stage.startup()
    stop = asyncio.Event()
    runner = asyncio.create_task(stage.main_loop(stop))
    appended: list[str] = []
    retried = 0
    producing = asyncio.Event()
    producing.set()

    async def producer() -> None:
        nonlocal retried
        i = 0
        while producing.is_set():
            batch = [Uplink(event_id=f"ev-{i + k}", source="tts", integration="app",
                            device=DEVICES[(i + k) % len(DEVICES)], event_ts_ms=1_000 + i + k,
                            received_ts_ms=1_000 + i + k, values={"n": i + k})
                     for k in range(24)]
            try:
                await ctx.writer.add_many([(keys.stream_for(UPLINKS, u.source, u.device),
                                            events.encode(u)) for u in batch])
            except RedisError:
                retried += 1  # caught between two masters: appended again, as ingest would
                continue
            appended.extend(u.event_id for u in batch)
            i += len(batch)
            await asyncio.sleep(0.01)  # pacing the load, not synchronization

    feeding = asyncio.create_task(producer())
    moved = 0
    try:
        await wait_until(lambda: len(appended) >= 600, timeout_s=120, what="uplinks before")
        moved = await _move_slot(slot, source, target, step=1)  # the pipeline runs between
        after = len(appended)
        await wait_until(lambda: len(appended) >= after + 600, timeout_s=120,
                         what="uplinks after the move")
        producing.clear()
        await feeding
        want = set(appended)

        async def all_written() -> bool:
            return set(await _written(cluster_redis, keys)) >= want

        await wait_until(all_written, timeout_s=180, what="every uplink written", interval=0.2)
    finally:
        producing.clear()
        with contextlib.suppress(Exception):
            await feeding
        stop.set()
        await runner
        await stage.shutdown()
        await ctx.writer.close()
        if moved:
            await _move_slot(slot, target, source)  # the shared cluster as it was
    assert moved > 0
    written = await _written(cluster_redis, keys)
    assert set(written) == set(appended)
    for stream in keys.streams(UPLINKS):
        assert int((await cluster_redis.xpending(stream, GROUP_TRANSFORM))["pending"]) == 0
    for stream in keys.dead_streams():
        assert await cluster_redis.xlen(stream) == 0
    print(f"slot {slot}: {moved} keys moved {source} -> {target}; {len(appended)} uplinks, "
          f"{len(written) - len(set(written))} written twice, appends retried {retried}, "
          f"batches retried {caplog.text.count('batch left pending')}")


# ---- a stopped master -----------------------------------------------------------------------

#: How long the master stays stopped: "a few seconds", well below both the private cluster's
#: ``cluster-node-timeout`` (60 s: with no replicas, a master down past it marks the cluster
#: failed, every master then refusing with ``CLUSTERDOWN``; ``scripts/services.sh``'s default of
#: 5 s would allow a stop of ~4 s) and redis-py's cluster socket timeout (5 s, retried), past
#: which a waiting append fails and ingest answers 503 ``redis_unavailable``.
STOP_S = 3.0

STOPPED_CONFIG = """
redis: {{url: "{url}", prefix: "{prefix}", partitions: 6}}
streams: {{block_ms: 100}}
blynk: {{servers: {{fra1: "{blynk_url}"}}, default_server: fra1}}
ingest_http: {{host: 127.0.0.1, port: {port}}}
templates:
  - name: t
    datastreams: [{{name: n, pin: V1, type: integer}}]
tts:
  - {{name: app, app_id: a, template: t, webhook_auth: none}}
devices:
"""


def _token(i: int) -> str:
    return f"TOK{i:029d}"


@asynccontextmanager
async def _whole_pipeline(url: str, prefix: str) -> AsyncIterator[Any]:
    """ingest-http → transform → egress on the cluster at ``url`` (6 partitions), writing to a
    Blynk emulator that knows :data:`DEVICES`: yields ``(emulator, its URL, config, bridge)``."""
    spec = blynk_spec([switch_template("TMPL1", "T", DatastreamSpec(
        id=1, pin="V1", name="n", type="integer"))], [
        DeviceSpec(name=d, token=_token(i), template="TMPL1", id=i + 1)
        for i, d in enumerate(DEVICES)])
    async with serve_blynk(spec) as (emu, blynk_url):
        rows = "".join(f"  - {{source: tts, integration: app, device: {d}, "
                       f"token: {_token(i)}, template: t}}\n" for i, d in enumerate(DEVICES))
        cfg = parse_config(STOPPED_CONFIG.format(url=url, prefix=prefix, blynk_url=blynk_url,
                                                 port=free_port()) + rows)
        async with run_bridge(cfg, (ingest_http, transform, egress)) as bridge:
            yield emu, blynk_url, cfg, bridge


async def test_a_stopped_master_delays_uplinks_refuses_none_and_loses_none(
        private_cluster: tuple[str, dict[int, int]], prefix: str) -> None:
    """ingest-http → transform → egress → the Blynk emulator on a private 3-master cluster, 6
    partitions; one master's process is stopped (SIGSTOP) for :data:`STOP_S`.

    What is delayed: an uplink of a partition on the stopped master is not answered (its
    ``XADD`` waits) and not written to Blynk until the master runs again. The other masters'
    uplinks are answered (a group commit per stream) and reach Blynk during the stop (the
    readers read each partition on its own; a batch, a flush and a commit then hold only the
    running masters' devices). The master is stopped once egress has committed the first
    round: egress group-commits its writes' records across masters, so a commit caught by the
    stop would hold up every commit (and device lease) behind it until the master runs again.
    What is refused: nothing, within redis-py's socket timeout — every uplink is answered 200,
    the held ones once the master is back. What is lost: nothing — every uplink reaches Blynk,
    nothing is dead-lettered or left pending."""
    url, pids = private_cluster
    async with _whole_pipeline(url, prefix) as (_, blynk_url, cfg, bridge):
        keys = cfg.redis.keys()
        redis = bridge.ctx.redis
        node = {d: _port(redis.get_node_from_key(  # type: ignore[attr-defined]
            keys.stream_for(UPLINKS, "tts", d)).name) for d in DEVICES}
        stopped = node[DEVICES[0]]
        held = [d for d in DEVICES if node[d] == stopped]
        assert len(set(node.values())) == 3, node  # 6 partitions spread over 3 masters

        async def post(device: str, n: int) -> int:
            async with bridge.http.post(
                    f"{bridge.ingest_url}/tts/app",
                    data=tts_uplink_body("a", device, n, {"n": n}),
                    headers={"Content-Type": "application/json"}) as resp:
                return resp.status

        async def in_blynk() -> dict[str, int]:
            async with bridge.http.get(f"{blynk_url}/_admin/devices") as resp:
                state = await resp.json()
            return {d["name"]: d["values"]["v1"]["value"] for d in state
                    if "v1" in d["values"]}

        async def all_at(n: int) -> bool:
            return await in_blynk() == dict.fromkeys(DEVICES, n)

        async def egress_done() -> bool:
            return all([int((await redis.xpending(s, GROUP_EGRESS))["pending"]) == 0
                        for s in keys.streams(WRITES)])

        # First uplinks before the stop: scripts loaded on every master, connections open,
        # and egress's commits of them done (module docstring: a commit caught by the stop
        # would hold up the others).
        assert await asyncio.gather(*(post(d, 1) for d in DEVICES)) == [200] * len(DEVICES)
        await wait_until(lambda: all_at(1), what="the first uplinks in Blynk")
        await wait_until(egress_done, what="egress acknowledged the first uplinks")

        others = [d for d in DEVICES if d not in held]

        async def others_through() -> bool:
            if not all(posts[d].done() for d in others):
                return False
            now = await in_blynk()
            return all(now[d] == 2 for d in others)

        os.kill(pids[stopped], signal.SIGSTOP)
        stopped_at = asyncio.get_running_loop().time()
        try:
            posts = {d: asyncio.create_task(post(d, 2)) for d in DEVICES}
            # The other masters' partitions take their uplinks meanwhile and deliver them
            # to Blynk (the deadline is the stop's length: the master runs again after it).
            await wait_until(others_through, timeout_s=STOP_S,
                             what="the other masters' uplinks answered and in Blynk")
            rest = STOP_S - (asyncio.get_running_loop().time() - stopped_at)
            await asyncio.sleep(max(rest, 0))  # the outage's length, not a synchronization
            answered = sorted(d for d, t in posts.items() if t.done())
            during = await in_blynk()
        finally:
            os.kill(pids[stopped], signal.SIGCONT)
        # ...while the stopped master's wait: not answered, not written to Blynk.
        assert sorted(set(DEVICES) - set(held)) == answered
        assert [posts[d].result() for d in answered] == [200] * len(answered)
        assert all(during[d] == 1 for d in held), during
        print(f"master {stopped} stopped {STOP_S} s, holding {held}: in Blynk meanwhile "
              f"{sorted(d for d in DEVICES if during[d] == 2)}")

        statuses = await asyncio.gather(*posts.values())
        assert statuses == [200] * len(DEVICES)  # nothing refused
        await wait_until(lambda: all_at(2), what="every uplink in Blynk after the stop")
        # Nothing lost, nothing dead, nothing pending; one write per uplink.
        written = await _written(redis, keys)
        assert len(written) == len(set(written)) == 2 * len(DEVICES)
        for stream in keys.dead_streams():
            assert await redis.xlen(stream) == 0
        for stream in keys.streams(UPLINKS):
            assert int((await redis.xpending(stream, GROUP_TRANSFORM))["pending"]) == 0

        await wait_until(egress_done, what="egress acknowledged every write")
async def test_the_whole_pipeline_loses_nothing_while_a_partition_slot_moves(
        private_cluster: tuple[str, dict[int, int]], prefix: str) -> None:
    """ingest-http → transform → egress → the Blynk emulator while one partition's slot moves
    between masters a key at a time (``MIGRATING``/``IMPORTING``, ``MIGRATE``): its uplinks
    and writes streams, registry rows, de-dup state and egress's device records (``records``)
    move under the running stages, whose commands meet ``ASK``/``TRYAGAIN`` and then
    ``MOVED``. Every uplink answered 200 is written for Blynk, Blynk ends at each device's
    newest value and never went backwards, nothing is dead-lettered or left pending.

    On a private cluster: the move changes where every test's partition of that slot lives,
    and two suites moving the same slot of the shared cluster at once would collide."""
    url, _ = private_cluster
    async with _whole_pipeline(url, prefix) as (emu, _, cfg, bridge):
        keys = cfg.redis.keys()
        redis = bridge.ctx.redis
        moving = keys.stream_for(UPLINKS, "tts", DEVICES[0])
        slot = redis.keyslot(moving)  # type: ignore[attr-defined]
        source = _port(redis.get_node_from_key(moving).name)  # type: ignore[attr-defined]
        target = next(_port(n.name) for n in redis.get_primaries()  # type: ignore[attr-defined]
                      if _port(n.name) != source)
        in_slot = [d for d in DEVICES if redis.keyslot(  # type: ignore[attr-defined]
            keys.stream_for(UPLINKS, "tts", d)) == slot]
        # The slot holds the partition's devices' records and its writes stream too.
        assert redis.keyslot(  # type: ignore[attr-defined]
            keys.records(keys.partition_of_stream(moving))) == slot
        assert redis.keyslot(keys.stream(  # type: ignore[attr-defined]
            WRITES, keys.partition_of_stream(moving))) == slot

        answered: dict[str, int] = dict.fromkeys(DEVICES, 0)
        ok: dict[str, set[int]] = {d: set() for d in DEVICES}
        refused: list[int] = []
        posting = asyncio.Event()
        posting.set()

        async def poster(device: str) -> None:
            n = 0
            while posting.is_set():
                n += 1
                async with bridge.http.post(
                        f"{bridge.ingest_url}/tts/app",
                        data=tts_uplink_body("a", device, n, {"n": n}),
                        headers={"Content-Type": "application/json"}) as resp:
                    if resp.status == 200:
                        answered[device] = n
                        ok[device].add(n)
                    else:
                        refused.append(resp.status)

        def history(device: str) -> list[int]:
            dev = next(d for d in emu.model.devices.values() if d.name == device)
            return [int(v) for _, v in dev.history.get("V1", ())]

        def all_at(want: dict[str, int]) -> bool:
            return all(history(d)[-1:] == [n] for d, n in want.items())

        posters = [asyncio.create_task(poster(d)) for d in DEVICES]
        moved = 0
        try:
            await wait_until(lambda: all(history(d) for d in DEVICES),
                             what="every device's first uplinks in Blynk")

            async def progress() -> None:
                # Between two keys moved, every device has newer uplinks answered: the
                # stages run on the half-moved slot (its scripts meet ASK, or TRYAGAIN
                # while their keys are split between the masters).
                now = dict(answered)
                await wait_until(lambda: all(answered[d] > now[d] for d in DEVICES),
                                 what="uplinks answered mid-move")

            moved = await _move_slot(slot, source, target, step=1, between=progress)
            after = dict(answered)
            await wait_until(lambda: all(answered[d] > after[d] + 2 for d in DEVICES),
                             what="uplinks answered after the move")
        finally:
            posting.clear()
            await asyncio.gather(*posters)
        assert _port(redis.get_node_from_key(moving).name) == target  # type: ignore[attr-defined]
        await wait_until(lambda: all_at(answered), what="each device's newest value in Blynk")

        async def egress_done() -> bool:
            return all([int((await redis.xpending(s, GROUP_EGRESS))["pending"]) == 0
                        for s in keys.streams(WRITES)])

        await wait_until(egress_done, what="egress acknowledged every write")
        # Every uplink answered 200 was written for Blynk; Blynk never went backwards.
        values: dict[str, set[int]] = {d: set() for d in DEVICES}
        for stream in keys.streams(WRITES):
            for _, fields in await redis.xrange(stream):
                w = events.decode_write(fields[events.FIELD])
                values[w.device_key.rsplit(":", 1)[1]].add(int(w.pins["V1"]))
        for d in DEVICES:
            assert values[d] >= ok[d], (d, sorted(ok[d] - values[d]))
            assert history(d) == sorted(history(d)), (d, history(d))
        assert await bridge.dead() == []
        for stream in keys.streams(UPLINKS):
            assert int((await redis.xpending(stream, GROUP_TRANSFORM))["pending"]) == 0
        assert set(refused) <= {503}  # redis_unavailable: the device cloud sends it again
        print(f"slot {slot}: {moved} keys moved {source} -> {target} holding {in_slot}; "
              f"{sum(answered.values())} uplinks answered 200, refused {refused}")
