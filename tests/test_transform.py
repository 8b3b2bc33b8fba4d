"""The transform stage on the real Redis (and on the Redis Cluster): writes, de-duplication, dead
letters, invalidation."""

from __future__ import annotations

import json
import textwrap
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from pipeline import config as config_mod
from pipeline import dedup, events
from pipeline.context import Context
from pipeline.events import Radio, Uplink, Value
from pipeline.keys import GROUP_TRANSFORM, Keys
from pipeline.registry import Registry
from pipeline.streams import Redis, StreamReader, StreamWriter
from workers.transform import Commit, TransformStage
from workers.transform.scripts import FENCED, VERSION_MOVED

pytestmark = pytest.mark.cluster_too

CONFIG = """
blynk:
  servers: {default: "http://127.0.0.1:1", fra1: "https://fra1.blynk.cloud"}
streams: {batch: 50, block_ms: 100}
templates:
  - name: button
    datastreams:
      - {name: batteryVoltage, pin: V0, type: double, min: 0, max: 3.3}
      - {name: pressEvent, pin: V1, type: integer}
      - {name: sensorTemperature, pin: V2, type: double, history: true}
      - {name: RSSI, pin: V10, type: integer, min: -110, max: 0}
  - name: blueprint
    datastreams:
      - {name: last_publish, pin: V6, type: string}
      - {name: millis, pin: V14, type: integer}
    mapping: {PARTICLE_PUBLISHED_AT: V6}
tts:
  - {name: app, app_id: starter-kit, template: button}
particle:
  - {name: prod, template: blueprint, auth: none}
devices:
  - {source: tts, integration: app, device: eui-70b3d52dd600035a, token: TOKEN-A,
     template: button, server: fra1}
"""


def make_config(prefix: str, extra: str = "", devices: str = "") -> config_mod.Config:
    """``extra``: more sections; ``devices``: rows (``  - {…}`` lines) added to the table."""
    text = (CONFIG.replace("\ndevices:\n", f"\ndevices:\n{devices}")
            + textwrap.dedent(extra) + f"\nredis: {{prefix: '{prefix}'}}\n")
    return config_mod.parse(text, "yaml", "test.yaml", env={})


@pytest.fixture
async def ctx(redis: Redis, keys: Keys, prefix: str) -> AsyncIterator[Context]:
    c = Context(config=make_config(prefix), redis=redis, keys=keys, consumer="t1",
                writer=StreamWriter(redis))
    yield c
    await c.writer.close()


FixturePath = Callable[[str], Path]
DEVICE = "eui-70b3d52dd600035a"


def button_uplink(fixture_path: FixturePath, **kw: Any) -> Uplink:
    msg = json.loads(fixture_path("tts/tts-uplink-02.json").read_text())
    up = msg["uplink_message"]
    base: dict[str, Any] = dict(
        event_id="as:up:1", source="tts", integration="app", device=DEVICE,
        event_ts_ms=1_744_804_453_995, received_ts_ms=1_744_804_454_000,
        values=up["decoded_payload"], radio=Radio(rssi=-31, snr=9.5, gateways=1),
    )
    base.update(kw)
    return Uplink(**base)


#: The de-duplication window of :data:`CONFIG` (the default).
WINDOW = 3600


async def owner(ctx: Context, event_id: str) -> int | None:
    """The mark that owns ``event_id`` as committed in the uplinks partition's de-dup blocks."""
    return await dedup.committed(ctx.redis, ctx.keys, ctx.keys.stream("uplinks"), WINDOW,
                                 event_id)


async def add(ctx: Context, *uplinks: Uplink) -> None:
    await ctx.writer.add_many([(ctx.keys.stream("uplinks"), events.encode(u)) for u in uplinks])


async def run(ctx: Context) -> TransformStage:
    import asyncio

    stage = TransformStage(ctx, until_idle=True)
    await stage.startup()
    await stage.main_loop(asyncio.Event())
    await stage.shutdown()
    return stage


async def writes(ctx: Context) -> list[events.BlynkWrite]:
    rows = await ctx.redis.xrange(ctx.keys.stream("writes"))
    return [events.decode_write(f[events.FIELD]) for _, f in rows]


async def dead(ctx: Context) -> list[events.DeadLetter]:
    """Every dead letter (of every dead stream: one per partition in the cluster layout)."""
    out = []
    for stream in ctx.keys.dead_streams():
        rows = await ctx.redis.xrange(stream)
        out += [events.decode_dead(f[events.FIELD]) for _, f in rows]
    return out


async def pending(ctx: Context) -> int:
    info = await ctx.redis.xpending(ctx.keys.stream("uplinks"), GROUP_TRANSFORM)
    return int(info["pending"])


async def test_static_device_uplink_becomes_one_write(ctx: Context,
                                                      fixture_path: FixturePath) -> None:
    await add(ctx, button_uplink(fixture_path))
    await run(ctx)
    [w] = await writes(ctx)
    assert w.token == "TOKEN-A" and w.server == "https://fra1.blynk.cloud"
    assert w.device_key == f"tts:app:{DEVICE}" and w.event_id == "as:up:1"
    assert w.pins == {"V0": 3.3, "V1": 1, "V2": 21.5, "V10": -31}
    assert w.history_pins == ["V2"]
    assert w.event_ts_ms == 1_744_804_453_995
    assert await pending(ctx) == 0
    # The keys the template lacks are counted for `status`.
    unmapped = await ctx.redis.hgetall(ctx.keys.unmapped("button"))
    assert unmapped == {b"singlePressEventCounter": b"1", b"thermistorProperlyConnected": b"1"}


async def test_duplicates_are_dropped(ctx: Context, fixture_path: FixturePath) -> None:
    u = button_uplink(fixture_path)
    await add(ctx, u, u)  # the same event twice in one batch
    await run(ctx)
    await add(ctx, u)  # and again later
    await run(ctx)
    assert len(await writes(ctx)) == 1
    assert await pending(ctx) == 0


async def test_crash_after_marking_does_not_lose_the_entry(ctx: Context,
                                                           fixture_path: FixturePath) -> None:
    # A worker read the entry and marked its event seen (in its memory), then died before
    # committing: the entry is pending under its name and nothing is in the blocks. The next
    # owner takes it over at once (no claim_idle_ms) and writes it.
    await add(ctx, button_uplink(fixture_path))
    stream = ctx.keys.stream("uplinks")
    await ctx.redis.xgroup_create(stream, GROUP_TRANSFORM, id="0", mkstream=True)
    await ctx.redis.xreadgroup(GROUP_TRANSFORM, "dead-owner", {stream: ">"}, count=10)
    await run(ctx)
    assert len(await writes(ctx)) == 1
    assert await pending(ctx) == 0
    assert await owner(ctx, "as:up:1") is not None


async def test_unknown_device_is_dead_lettered(ctx: Context, fixture_path: FixturePath) -> None:
    await add(ctx, button_uplink(fixture_path, device="stranger", event_id="as:up:2"))
    await run(ctx)
    assert await writes(ctx) == []
    [d] = await dead(ctx)
    assert d.reason == "unknown_device" and "stranger" in d.detail and d.stage == "transform"
    assert events.decode_uplink(d.raw).device == "stranger"  # the original, for replay
    assert await pending(ctx) == 0
    # Its de-duplication mark is gone, so a replay after registering the device goes through.
    assert await owner(ctx, "as:up:2") is None
    await Registry(ctx.redis, ctx.keys).register("tts:app:stranger", token="T", template="button")
    await ctx.redis.xadd(ctx.keys.stream("uplinks"), {events.FIELD: d.raw})
    await run(ctx)
    [w] = await writes(ctx)
    assert w.device_key == "tts:app:stranger"


async def test_type_mismatch_is_a_partial_dead_letter(ctx: Context,
                                                      fixture_path: FixturePath) -> None:
    u = button_uplink(fixture_path)
    bad: dict[str, Value] = {**u.values, "pressEvent": "twice", "sensorTemperature": [1.0, 2.0]}
    await add(ctx, button_uplink(fixture_path, values=bad))
    await run(ctx)
    [w] = await writes(ctx)
    assert w.pins == {"V0": 3.3, "V10": -31}
    [d] = await dead(ctx)
    assert d.reason == "type_mismatch"
    assert "'pressEvent' → V1" in d.detail and "'sensorTemperature' → V2" in d.detail
    assert events.decode_uplink(d.raw).values == bad
    assert await pending(ctx) == 0


async def test_registry_change_reaches_a_running_stage(ctx: Context,
                                                       fixture_path: FixturePath) -> None:
    import asyncio

    stage = TransformStage(ctx, until_idle=True)
    await stage.startup()
    await add(ctx, button_uplink(fixture_path, event_id="e1"))
    await stage.main_loop(asyncio.Event())
    assert stage.registry.cached(f"tts:app:{DEVICE}") is not None
    # Another process re-registers the device with a new token...
    other = Registry(ctx.redis, ctx.keys)
    await other.register(f"tts:app:{DEVICE}", token="TOKEN-B", template="button")
    await add(ctx, button_uplink(fixture_path, event_id="e2"))
    await stage.main_loop(asyncio.Event())
    # ...then marks it broken (as egress does on "Invalid token.").
    await other.mark_broken(f"tts:app:{DEVICE}", "invalid_token", "Invalid token.")
    await add(ctx, button_uplink(fixture_path, event_id="e3"))
    await stage.main_loop(asyncio.Event())
    await stage.shutdown()
    assert [w.token for w in await writes(ctx)] == ["TOKEN-A", "TOKEN-B"]
    [d] = await dead(ctx)
    assert d.reason == "device_broken" and "invalid_token" in d.detail


async def test_particle_blueprint_token_needs_no_registry(ctx: Context) -> None:
    u = Uplink(event_id="p1", source="particle", integration="prod", device="blynk-abc",
               event_ts_ms=1715597740306, received_ts_ms=1715597740400,
               values={"v14": 123, "unknown": 1}, token="BLUEPRINT-TOKEN")
    await add(ctx, u)
    await run(ctx)
    [w] = await writes(ctx)
    assert w.token == "BLUEPRINT-TOKEN" and w.server == "http://127.0.0.1:1"
    assert w.pins == {"V14": 123, "V6": "2024-05-13T10:55:40.306Z"}


async def test_firmware_joins_and_garbage(ctx: Context, fixture_path: FixturePath) -> None:
    await add(
        ctx,
        button_uplink(fixture_path, event_id="f1",
                      values={"Blynk Firmware Version": "ttn-1.0.0", "pressEvent": 1}),
        button_uplink(fixture_path, event_id="j1", kind="join", values={}, radio=None),
    )
    await ctx.redis.xadd(ctx.keys.stream("uplinks"), {events.FIELD: b"\x01not msgpack"})
    await run(ctx)
    [w] = await writes(ctx)
    assert w.pins == {"V1": 1, "V10": -31}
    row = await ctx.redis.hgetall(ctx.keys.device("tts", "app", DEVICE))
    assert row[b"firmware"] == b"ttn-1.0.0"
    [d] = await dead(ctx)
    assert d.reason == "undecodable"
    assert await pending(ctx) == 0


async def test_template_rules_choose_by_device_meta(redis: Redis, keys: Keys,
                                                    prefix: str) -> None:
    # One TTS application, two templates: a device whose model is "other" uses the blueprint.
    c = make_config(prefix)
    c.tts[0].template_rules.append(config_mod.TemplateRule(template="blueprint",
                                                           field="model_id", equals="other"))
    ctx = Context(config=c, redis=redis, keys=keys, consumer="t1", writer=StreamWriter(redis))
    reg = Registry(redis, keys)
    await reg.register("tts:app:x", token="T", template="")  # row without a template
    u = Uplink(event_id="r1", source="tts", integration="app", device="x", event_ts_ms=1,
               received_ts_ms=2, values={"millis": 5, "pressEvent": 2},
               device_meta={"model_id": "other"})
    await add(ctx, u)
    await run(ctx)
    [w] = await writes(ctx)
    assert w.pins == {"V14": 5}
    await ctx.writer.close()


async def test_commit_does_nothing_unless_the_version_and_the_lease_hold(redis: Redis,
                                                                        keys: Keys) -> None:
    stream, out = keys.stream("uplinks"), keys.stream("writes")
    await redis.xgroup_create(stream, GROUP_TRANSFORM, id="0", mkstream=True)
    await StreamWriter(redis).add_many([(stream, b"1"), (stream, b"2")])
    reader = StreamReader(redis, keys, [stream], GROUP_TRANSFORM, "t1", stage="transform")
    entries = await reader.read(block=False)
    commit = Commit(redis, keys, GROUP_TRANSFORM)
    version = int(await redis.get(keys.registry_version()) or 0)
    lease = keys.transform_lease(0)
    await redis.set(lease, "t1 abc")
    block_key = dedup.block_key(keys, stream, 60, 7)
    records = [(dedup.digest("e1"), dedup.mark_of(entries[0])),
               (dedup.digest("e2"), dedup.mark_of(entries[1]))]
    blk = dedup.block(records)
    outputs = [(out, b"a"), (out, b"b")]

    async def nothing_done() -> None:
        assert await redis.exists(out, block_key) == 0
        assert (await redis.xpending(stream, GROUP_TRANSFORM))["pending"] == 2

    # Another worker changed the registry meanwhile: nothing is written, marked or acked.
    assert await commit.run(version + 1, stream, lease, "t1 abc", block_key, blk, 60_000, outputs,
                            entries) == VERSION_MOVED
    await nothing_done()
    # The lease is another ownership's (this one lost it): nothing either.
    assert await commit.run(version, stream, lease, "t1 old", block_key, blk, 60_000, outputs,
                            entries) == FENCED
    await nothing_done()
    assert await commit.run(None, stream, lease, "t1 old", block_key, blk, 60_000, outputs,
                            entries) == FENCED
    await nothing_done()
    # Held: the outputs, the acks and the block, created with its expiry, then appended to.
    assert await commit.run(version, stream, lease, "t1 abc", block_key, blk, 60_000, outputs,
                            entries) == 1
    assert [f[events.FIELD] for _, f in await redis.xrange(out)] == [b"a", b"b"]
    assert (await redis.xpending(stream, GROUP_TRANSFORM))["pending"] == 0
    assert await redis.get(block_key) == blk
    assert 0 < await redis.pttl(block_key) <= 60_000
    await redis.persist(block_key)
    assert await commit.run(None, stream, lease, "t1 abc", block_key, blk[:16], 60_000, [], []) == 1
    assert await redis.get(block_key) == blk + blk[:16]
    assert await redis.pttl(block_key) == -1  # the expiry is set when the block is created


class _Touching(Commit):
    """A ``Commit`` whose transaction, right after reading the keys it ``WATCH``es, lets a
    test change one from another connection (``touch``: on the tries listed)."""

    def __init__(self, redis: Redis, keys: Keys, touch: Callable[[], Any],
                 tries: set[int]) -> None:
        super().__init__(redis, keys, GROUP_TRANSFORM)
        self.touch, self.tries, self.reads = touch, tries, 0

    async def _held(self, conn: Any, watch: Any) -> list[Any]:
        held = await super()._held(conn, watch)
        self.reads += 1
        if self.reads in self.tries:
            await self.touch()
        return held


async def test_a_lease_or_registry_changed_between_the_commits_check_and_its_exec_does_nothing(
        redis: Redis, keys: Keys) -> None:
    """On one Redis the commit checks the lease and the registry version under ``WATCH`` and
    writes in ``MULTI``: a change of either after the check aborts the ``EXEC`` (nothing
    written, marked or acked) and the retry refuses; a renewal (same token) commits on retry."""
    if keys.cluster:
        pytest.skip("the cluster layout commits by script (workers/transform/scripts.py)")
    stream, out = keys.stream("uplinks"), keys.stream("writes")
    await redis.xgroup_create(stream, GROUP_TRANSFORM, id="0", mkstream=True)
    await StreamWriter(redis).add_many([(stream, b"1"), (stream, b"2")])
    reader = StreamReader(redis, keys, [stream], GROUP_TRANSFORM, "t1", stage="transform")
    entries = await reader.read(block=False)
    version_key = keys.registry_version_for(stream)
    version = int(await redis.get(version_key) or 0)
    lease = keys.transform_lease(0)
    await redis.set(lease, "t1 abc")
    block_key = dedup.block_key(keys, stream, 60, 7)
    blk = dedup.block([(dedup.digest("e1"), dedup.mark_of(entries[0]))])
    outputs = [(out, b"a"), (out, b"b")]

    async def nothing_done() -> None:
        assert await redis.exists(out, block_key) == 0
        assert (await redis.xpending(stream, GROUP_TRANSFORM))["pending"] == 2

    async def taken() -> None:
        await redis.set(lease, "t2 new")

    commit = _Touching(redis, keys, taken, {1})
    assert await commit.run(version, stream, lease, "t1 abc", block_key, blk, 60_000, outputs,
                            entries) == FENCED
    assert commit.reads == 2  # checked, aborted, checked again
    await nothing_done()

    await redis.set(lease, "t1 abc")
    commit = _Touching(redis, keys, lambda: redis.incr(version_key), {1})
    assert await commit.run(version, stream, lease, "t1 abc", block_key, blk, 60_000, outputs,
                            entries) == VERSION_MOVED
    assert commit.reads == 2
    await nothing_done()

    commit = _Touching(redis, keys, lambda: redis.pexpire(lease, 60_000), {1})
    assert await commit.run(version + 1, stream, lease, "t1 abc", block_key, blk, 60_000,
                            outputs, entries) == 1
    assert commit.reads == 2
    assert [f[events.FIELD] for _, f in await redis.xrange(out)] == [b"a", b"b"]
    assert (await redis.xpending(stream, GROUP_TRANSFORM))["pending"] == 0
    assert await redis.get(block_key) == blk
    assert 0 < await redis.pttl(block_key) <= 60_000


async def test_duplicate_of_an_unknown_device_uplink_is_acked_not_dead_lettered(
        ctx: Context, fixture_path: FixturePath) -> None:
    u = button_uplink(fixture_path, device="stranger", event_id="as:up:9")
    stream = ctx.keys.stream("uplinks")
    someone_else = dedup.mark(stream, "1-1")
    # A previous owner committed the event (its block), then gave the partition up.
    step = int(time.time() * 1000) // dedup.step_ms(WINDOW)
    await ctx.redis.append(dedup.block_key(ctx.keys, stream, WINDOW, step),
                           dedup.block([(dedup.digest("as:up:9"), someone_else)]))
    await add(ctx, u)
    await run(ctx)
    assert await dead(ctx) == [] and await writes(ctx) == []
    assert await pending(ctx) == 0
    assert await owner(ctx, "as:up:9") == someone_else


async def test_order_within_a_device_holds_across_batches_read_ahead(
        redis: Redis, keys: Keys, prefix: str, fixture_path: FixturePath) -> None:
    # batch 50 over 300 uplinks: every batch is handled while the next one is read; a garbage
    # entry sends one batch down the slow path in the middle.
    rows = "".join(f"  - {{source: tts, integration: app, device: d{i}, token: T{i}, "
                   "template: button}\n" for i in range(3))
    cfg = make_config(prefix, devices=rows)
    c = Context(config=cfg, redis=redis, keys=keys, consumer="t1", writer=StreamWriter(redis))
    ups = [button_uplink(fixture_path, device=f"d{i % 3}", event_id=f"as:up:{i:04d}",
                         event_ts_ms=1_000 + i) for i in range(300)]
    await add(c, *ups[:120])
    await c.writer.add(keys.stream("uplinks"), b"\xc1garbage")
    await add(c, *ups[120:])
    await run(c)
    got = await writes(c)
    assert len(got) == 300 and len(await dead(c)) == 1
    for d in range(3):
        ids = [w.event_id for w in got if w.device_key == f"tts:app:d{d}"]
        assert ids == [u.event_id for u in ups if u.device == f"d{d}"]
    assert await pending(c) == 0
    await c.writer.close()


async def test_a_batch_prepared_ahead_is_redone_if_the_registry_moved_meanwhile(
        ctx: Context, fixture_path: FixturePath) -> None:
    import asyncio

    stage = TransformStage(ctx, until_idle=True)
    stage.keep_partitions = True  # still owned after the pass: its batches are prepared here
    await stage.startup()
    await add(ctx, button_uplink(fixture_path, event_id="e1"))
    await stage.main_loop(asyncio.Event())
    # The next batch is read and prepared (with TOKEN-A) while another process re-registers
    # the device; only then is the prepared job run: it must write the new token.
    await add(ctx, button_uplink(fixture_path, event_id="e2"))
    entries = await stage.reader.read(block=False)
    job = await stage.prepare(entries)
    assert job is not None
    await Registry(ctx.redis, ctx.keys).register(f"tts:app:{DEVICE}", token="TOKEN-B",
                                                 template="button")
    await job()
    # And a batch prepared when nothing moved is committed as prepared.
    await add(ctx, button_uplink(fixture_path, event_id="e3"))
    entries = await stage.reader.read(block=False)
    job = await stage.prepare(entries)
    assert job is not None
    await job()
    await stage.shutdown()
    assert [w.token for w in await writes(ctx)] == ["TOKEN-A", "TOKEN-B", "TOKEN-B"]
    assert await pending(ctx) == 0


async def test_unmapped_keys_are_bounded_per_template_and_expire(
        ctx: Context, fixture_path: FixturePath) -> None:
    # Issue 10, item 5: a sender controls the keys; 500 new ones per message must not grow a
    # permanent hash. Every occurrence is still counted: the counts add up.
    from pipeline.unmapped import OTHER

    cap = ctx.config.transform.unmapped_max_keys
    junk = {f"junk{i:03d}": i for i in range(500)}
    await add(ctx, button_uplink(fixture_path, event_id="e1", values=junk),
               button_uplink(fixture_path, event_id="e2",
                             values={"x" * 5000: 1, "junk000": 2, "batteryVoltage": 3.0}))
    await run(ctx)
    h = await ctx.redis.hgetall(ctx.keys.unmapped("button"))
    assert len(h) <= cap + 1 and OTHER.encode() in h
    assert sum(int(v) for v in h.values()) == 502
    assert int(h[b"junk000"]) == 2
    assert all(len(k) <= 200 for k in h)
    ttl = await ctx.redis.ttl(ctx.keys.unmapped("button"))
    assert 0 < ttl <= ctx.config.transform.unmapped_ttl_s
