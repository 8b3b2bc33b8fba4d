"""ingest-mqtt against the real Mosquitto and the real Redis: fixtures end to end, dead letters,
one owner per application across replicas, failover on kill -9 (with a warm standby: no uplink
lost; with a cold one: the gap), statuses across broker restarts and bad credentials. Plus the
Redis lease and the standby buffer it relies on.

The tests that touch the stage's Redis keys are ``cluster_too``: they run on one Redis and on the
local Redis Cluster, there with three partitions (``redis_config`` / the ``redis_yaml`` fixture),
so one run's uplinks land on several masters."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import msgspec
import pytest
from prometheus_client import REGISTRY

from emulators.tts import Fleet, Mosquitto, make_uplink
from pipeline import config, ids, mqtt
from pipeline.config import Config, IngestMqttConfig, RedisConfig, TtsApplication
from pipeline.context import Context
from pipeline.events import Uplink, decode_dead, decode_uplink
from pipeline.keys import UPLINKS, Keys
from pipeline.lease import Lease, hold
from pipeline.redact import Secret
from pipeline.status import State, StatusBoard
from pipeline.streams import Redis, StreamWriter
from tests.conftest import MQTT_HOST, MQTT_PORT, closed_port
from tests.tcp_proxy import CutProxy
from tests.test_tts_parse import FIXTURE_UPLINKS
from tests.test_tts_parse import NOW as TABLE_NOW
from tests.wait import wait_until, within
from workers.ingest_mqtt import IngestMqtt, StandbyBuffer

ROOT = Path(__file__).resolve().parent.parent


def make_app(name: str = "lab", **kw: Any) -> TtsApplication:
    fields: dict[str, Any] = {"host": MQTT_HOST, "port": MQTT_PORT, "insecure": True}
    fields.update(kw)
    return TtsApplication(name=name, app_id=f"app-{uuid.uuid4().hex[:8]}", **fields)


@pytest.fixture
def redis_config(redis_yaml: str) -> RedisConfig:
    """The ``redis:`` section of this test's backend (one Redis, or the cluster with three
    partitions: the uplinks of different devices then land on different masters)."""
    return config.parse(f"redis: {redis_yaml}\n", "yaml", "test.yaml", env={}).redis


def make_ctx(redis: Redis, rc: RedisConfig, apps: list[TtsApplication],
             consumer: str = "c1", **ingest: Any) -> Context:
    cfg = Config(redis=rc, tts=apps, ingest_mqtt=IngestMqttConfig(**ingest))
    return Context(config=cfg, redis=redis, keys=rc.keys(), consumer=consumer,
                   writer=StreamWriter(redis))


@asynccontextmanager
async def running(stage: IngestMqtt) -> AsyncIterator[asyncio.Event]:
    stop = asyncio.Event()
    await stage.startup()
    task = asyncio.create_task(stage.main_loop(stop))
    try:
        yield stop
    finally:
        stop.set()
        await within(task)
        await stage.shutdown()


async def publish(topic_bytes: list[tuple[str, bytes]], port: int = MQTT_PORT,
                  username: str | None = None, password: str | None = None) -> None:
    settings = mqtt.Settings(MQTT_HOST, port, username=username, password=password)
    async with mqtt.Session(settings) as session:
        for topic, body in topic_bytes:
            await session.publish(topic, body)


async def uplinks(redis: Redis, keys: Keys) -> list[Uplink]:
    """Every uplink in the stream, partition by partition (in order within each)."""
    out = []
    for stream in keys.streams(UPLINKS):
        out += [decode_uplink(fields[b"d"]) for _, fields in await redis.xrange(stream)]
    return out


async def stream_len(redis: Redis, key: str) -> int:
    return int(await redis.xlen(key))


async def uplinks_len(redis: Redis, keys: Keys) -> int:
    """Entries in every partition of the uplinks stream."""
    return sum([await stream_len(redis, s) for s in keys.streams(UPLINKS)])


# --- fixtures end to end -------------------------------------------------------------------------


@pytest.mark.cluster_too
async def test_every_fixture_through_the_broker(redis: Redis, redis_config: RedisConfig,
                                                fixture_path: Callable[[str], Path]) -> None:
    app = make_app(raw_payload_key="raw")
    ctx = make_ctx(redis, redis_config, [app])
    stage = IngestMqtt(ctx)
    user = app.username
    messages: list[tuple[str, bytes]] = []
    for name in sorted(FIXTURE_UPLINKS):
        suffix = "join" if "join" in name else "up"
        body = fixture_path(f"tts/{name}").read_bytes()
        device = json.loads(body)["end_device_ids"]["device_id"]
        messages.append((f"v3/{user}/devices/{device}/{suffix}", body))
    for name, suffix in [("tts-down-ack-01.json", "down/ack"), ("tts-down-failed-01.json",
                          "down/failed"), ("tts-down-queued-01.json", "down/queued")]:
        messages.append((f"v3/{user}/devices/dev1/{suffix}",
                         fixture_path(f"tts/{name}").read_bytes()))
    messages.append((f"v3/{user}/devices/dev1/up",
                     fixture_path("tts/tts-uplink-10-invalid.json").read_bytes()))
    async with running(stage):
        await within(stage.subscribed["lab"].wait())
        await publish(messages)
        await wait_until(lambda: _lens(redis, ctx.keys, len(FIXTURE_UPLINKS), 1),
                         what="every fixture in Redis")
    got = {u.event_id: u for u in await uplinks(redis, ctx.keys)}
    assert len(got) == len(FIXTURE_UPLINKS)
    if ctx.keys.cluster:  # the fixtures' devices are in all three partitions
        assert await _nodes_holding_uplinks(redis, ctx.keys) >= 2
    for name, expected in FIXTURE_UPLINKS.items():
        up = got[expected.event_id]
        # The table was built with a fixed ingest time; here it is the real receipt time.
        want = msgspec.structs.replace(
            expected,
            received_ts_ms=up.received_ts_ms,
            event_ts_ms=up.received_ts_ms if expected.event_ts_ms == TABLE_NOW
            else expected.event_ts_ms,
        )
        assert up == want, name
    (_, fields), = await redis.xrange(ctx.keys.dead)
    dead = decode_dead(fields[b"d"])
    assert (dead.reason, dead.stage, dead.entry_id) == ("invalid_json", "ingest-mqtt", "")
    assert dead.stream == f"v3/{user}/devices/dev1/up"
    assert dead.raw == fixture_path("tts/tts-uplink-10-invalid.json").read_bytes()


async def _nodes_holding_uplinks(redis: Redis, keys: Keys) -> int:
    """How many cluster masters hold uplinks of this test."""
    nodes = set()
    for stream in keys.streams(UPLINKS):
        if await stream_len(redis, stream):
            nodes.add(redis.get_node_from_key(stream).name)  # type: ignore[attr-defined]
    return len(nodes)


async def _lens(redis: Redis, keys: Keys, ups: int, dead: int) -> bool:
    return (await uplinks_len(redis, keys) >= ups
            and await stream_len(redis, keys.dead) >= dead)


@pytest.mark.cluster_too
async def test_malformed_payloads_are_dead_lettered_and_the_worker_keeps_running(
    redis: Redis, redis_config: RedisConfig, fixture_path: Callable[[str], Path]
) -> None:
    app = make_app()  # no raw_payload_key: an uplink without decoded_payload is refused
    ctx = make_ctx(redis, redis_config, [app], max_payload_bytes=10_000)
    stage = IngestMqtt(ctx)
    topic = f"v3/{app.username}/devices/d1/up"
    bad = [b"not json", b"[1,2]", b'{"end_device_ids":{"device_id":"d1"},"uplink_message":'
           b'{"f_cnt":"seven"}}', b"{" + b" " * 20_000 + b"}",
           fixture_path("tts/tts-uplink-01.json").read_bytes()]
    good = fixture_path("tts/tts-uplink-02.json").read_bytes()
    async with running(stage):
        await within(stage.subscribed["lab"].wait())
        await publish([(topic, b) for b in bad] + [(topic, good)])
        await wait_until(lambda: _lens(redis, ctx.keys, 1, len(bad)), what="dead letters")
        assert stage.subscribed["lab"].is_set()  # still reading
    reasons = [decode_dead(f[b"d"]) for _, f in await redis.xrange(ctx.keys.dead)]
    assert [d.reason for d in reasons] == ["invalid_json", "wrong_shape", "wrong_shape",
                                           "too_large", "no_decoded_payload"]
    assert "uplink_message.f_cnt" in reasons[2].detail
    assert len(reasons[3].raw) == 8 * 1024  # truncated to a bound
    (up,) = await uplinks(redis, ctx.keys)
    assert up.device == "eui-70b3d52dd600035a"


@pytest.mark.cluster_too
async def test_an_event_time_from_the_future_becomes_the_arrival_time_and_is_counted(
    redis: Redis, redis_config: RedisConfig
) -> None:
    """A forged or broken clock (received_at in 9999) must not make the device's genuine values
    stale in egress; an odd device id is dead-lettered naming the field."""
    app = make_app()
    ctx = make_ctx(redis, redis_config, [app])
    stage = IngestMqtt(ctx)
    future = make_uplink(app.app_id, app.tenant, "d1", 1, {"t": 1})
    future["received_at"] = "9999-12-31T23:59:59Z"
    odd = make_uplink(app.app_id, app.tenant, "d1", 2, {"t": 2})
    odd["end_device_ids"]["device_id"] = "d1\r\nX-Injected: 1"
    before = _sample("bb_event_time_clamped_total", source="tts", integration="lab")
    async with running(stage):
        await within(stage.subscribed["lab"].wait())
        await publish([(f"v3/{app.username}/devices/d1/up", json.dumps(m).encode())
                       for m in (odd, future)])
        await wait_until(lambda: _lens(redis, ctx.keys, 1, 1), what="the uplink and dead letter")
    (up,) = await uplinks(redis, ctx.keys)
    assert (up.event_ts_ms, up.event_ts_clamped) == (up.received_ts_ms, True)
    assert _sample("bb_event_time_clamped_total", source="tts", integration="lab") == before + 1
    (dead,) = [decode_dead(f[b"d"]) for _, f in await redis.xrange(ctx.keys.dead)]
    assert dead.reason == "invalid_field" and "end_device_ids.device_id" in dead.detail


@pytest.mark.cluster_too
async def test_a_value_that_cannot_be_stored_is_dead_lettered_and_intake_goes_on(
    redis: Redis, redis_config: RedisConfig
) -> None:
    """Found by bench/fuzz.py: an f_cnt past 64 bits made encoding raise in the receive path,
    which ended the application's session silently; it is a dead letter, the next uplink lands."""
    app = make_app()
    ctx = make_ctx(redis, redis_config, [app])
    stage = IngestMqtt(ctx)
    huge = make_uplink(app.app_id, app.tenant, "d1", 1, {"t": 1})
    huge["uplink_message"]["f_cnt"] = 1180591620717411303424
    fine = make_uplink(app.app_id, app.tenant, "d1", 2, {"t": 2})
    async with running(stage):
        await within(stage.subscribed["lab"].wait())
        await publish([(f"v3/{app.username}/devices/d1/up", json.dumps(m).encode())
                       for m in (huge, fine)])
        await wait_until(lambda: _lens(redis, ctx.keys, 1, 1), what="the uplink and dead letter")
    (up,) = await uplinks(redis, ctx.keys)
    assert up.values == {"t": 2}
    (dead,) = [decode_dead(f[b"d"]) for _, f in await redis.xrange(ctx.keys.dead)]
    assert dead.reason == "unencodable"


# --- one owner per application -------------------------------------------------------------------


@pytest.mark.cluster_too
@pytest.mark.parametrize("replicas", [2, 3])
async def test_replicas_put_each_message_on_the_stream_once(
    redis: Redis, redis_config: RedisConfig, replicas: int
) -> None:
    app = make_app()
    stages = [IngestMqtt(make_ctx(redis, redis_config, [app], consumer=f"r{i}"),
                         lease_ttl_ms=1000) for i in range(replicas)]
    async with _all_running(stages):
        await wait_until(lambda: _owner_count(stages, 1), what="one owner")
        fleet = Fleet(MQTT_HOST, MQTT_PORT, app.app_id, app.tenant, devices=4,
                      rate_per_s=float("inf"), device_prefix="rep")
        assert await fleet.run(count=40) == 40
        keys = stages[0]._keys
        await wait_until(lambda: _has_uplinks(redis, keys, 40), what="40 uplinks")
        # A marker published last: once it is in, anything a second subscriber appended for the
        # 40 would be too (each replica appends in arrival order).
        await Fleet(MQTT_HOST, MQTT_PORT, app.app_id, app.tenant, devices=1, rate_per_s=1e9,
                    device_prefix="marker").run(count=1)
        await wait_until(lambda: _has_uplinks(redis, keys, 41), what="the marker")
        marker_stream = keys.stream_for(UPLINKS, "tts", "marker0000")
        (_, last), = await redis.xrevrange(marker_stream, count=1)
        assert decode_uplink(last[b"d"]).device == "marker0000"
        ups = await uplinks(redis, keys)
        assert len(ups) == 41 and len({u.event_id for u in ups}) == 41
        assert await _owner_count(stages, 1)
        # The owner steps down: a standby takes over and the application keeps flowing.
        owner = next(s for s in stages if s.subscribed["lab"].is_set())
        owner_stop = _stops[id(owner)]
        owner_stop.set()
        rest = [s for s in stages if s is not owner]
        await wait_until(lambda: _owner_count(rest, 1), what="a standby taking over")
        await Fleet(MQTT_HOST, MQTT_PORT, app.app_id, app.tenant, devices=1, rate_per_s=1e9,
                    device_prefix="after").run(count=1)
        await wait_until(lambda: _has_uplinks(redis, keys, 42), what="after")


_stops: dict[int, asyncio.Event] = {}


@asynccontextmanager
async def _all_running(stages: list[IngestMqtt]) -> AsyncIterator[None]:
    tasks = []
    for s in stages:
        stop = asyncio.Event()
        _stops[id(s)] = stop
        tasks.append(asyncio.create_task(s.main_loop(stop)))
    try:
        yield
    finally:
        for s in stages:
            _stops.pop(id(s)).set()
        await within(asyncio.gather(*tasks))


async def _owner_count(stages: list[IngestMqtt], n: int) -> bool:
    return sum(s.subscribed["lab"].is_set() for s in stages) == n


async def _has_uplinks(redis: Redis, keys: Keys, n: int) -> bool:
    return await uplinks_len(redis, keys) >= n


async def _owner_subprocess(app: TtsApplication, redis_yaml: str, tmp_path: Path,
                            ingest_mqtt: str) -> asyncio.subprocess.Process:
    """``blynk-bridge ingest-mqtt`` in its own process (so it can be killed -9)."""
    config = tmp_path / "bridge.yaml"
    config.write_text(
        f"redis: {redis_yaml}\n"
        f"ingest_mqtt: {{{ingest_mqtt}}}\n"
        f"tts:\n  - {{name: lab, app_id: {app.app_id}, host: {MQTT_HOST}, port: {MQTT_PORT},"
        " insecure: true}\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with (tmp_path / "owner.log").open("wb") as log:
        return await asyncio.create_subprocess_exec(
            sys.executable, "-m", "blynk_bridge", "--log-format", "text", "ingest-mqtt", "-c",
            str(config), cwd=ROOT, env=env, stdout=asyncio.subprocess.DEVNULL, stderr=log)


async def _wait_owned_by(board: StatusBoard, proc: asyncio.subprocess.Process) -> None:
    async def subprocess_owns() -> bool:
        status = await board.get("tts", "lab")
        return (status is not None and status.state is State.CONNECTED
                and status.owner is not None and status.owner.endswith(f"-{proc.pid}"))

    await wait_until(subprocess_owns, what="the subprocess owning the app")


@pytest.mark.cluster_too
async def test_kill_9_of_the_owner_hands_over_within_the_lease_time(
    redis: Redis, redis_yaml: str, redis_config: RedisConfig, tmp_path: Path
) -> None:
    app = make_app()
    proc = await _owner_subprocess(app, redis_yaml, tmp_path,
                                   "lease_ttl_ms: 1500, max_backoff_s: 1")
    keys = redis_config.keys()
    board = StatusBoard(redis, keys)
    try:
        await _wait_owned_by(board, proc)
        standby = IngestMqtt(make_ctx(redis, redis_config, [app], consumer="standby"),
                             lease_ttl_ms=1500, max_backoff_s=1)
        async with running(standby):
            assert not standby.subscribed["lab"].is_set()
            proc.send_signal(signal.SIGKILL)
            await within(proc.wait())
            # Bounded by the lease: ttl (1.5 s) + one acquisition interval + connecting.
            await within(standby.subscribed["lab"].wait())
            status = await board.get("tts", "lab")
            assert status is not None and status.owner == "standby"
            await Fleet(MQTT_HOST, MQTT_PORT, app.app_id, app.tenant, devices=1,
                        rate_per_s=1e9).run(count=3)
            await wait_until(lambda: _has_uplinks(redis, keys, 3),
                             what="uplinks through the standby")
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


# --- warm standby: no uplink lost in a failover ---------------------------------------------------


class NumberedUplinks:
    """Publishes uniquely numbered uplinks (one ``as:up:`` id each) until stopped; ``ids`` lists
    the event ids of those published so far, in order. They alternate between two devices, which
    are in different partitions (on different masters) of the cluster layout."""

    DEVICES = ("seq0", "seq1")

    def __init__(self, app: TtsApplication) -> None:
        self.app = app
        self.ids: list[str] = []
        self._stop = asyncio.Event()
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        settings = mqtt.Settings(MQTT_HOST, MQTT_PORT, client_id=f"seq-{uuid.uuid4().hex[:8]}")
        async with mqtt.Session(settings) as session:
            while not self._stop.is_set():
                n = len(self.ids)
                device = self.DEVICES[n % len(self.DEVICES)]
                msg = make_uplink(self.app.app_id, self.app.tenant, device, n + 1, {"n": n})
                await session.publish(f"v3/{self.app.username}/devices/{device}/up",
                                      json.dumps(msg).encode())
                self.ids.append(ids.event_id("tts", self.app.name, msg["correlation_ids"][0]))
                await asyncio.sleep(0.002)  # the pace of the load, not a synchronization

    async def more(self, n: int) -> None:
        """Wait until ``n`` more uplinks than now are published."""
        target = len(self.ids) + n

        async def published() -> bool:
            return len(self.ids) >= target

        await wait_until(published, what=f"{n} more uplinks published")

    async def stop(self) -> list[str]:
        self._stop.set()
        await within(self._task)
        return self.ids

    def last_per_stream(self, keys: Keys) -> dict[str, str]:
        """Each stream (partition) published to → the event id of the last uplink for it."""
        last = {}
        for n, event_id in enumerate(self.ids):
            device = self.DEVICES[n % len(self.DEVICES)]
            last[keys.stream_for(UPLINKS, "tts", device)] = event_id
        return last


async def _last_ones_in(redis: Redis, last: dict[str, str]) -> bool:
    """Every stream of ``last`` ends with its entry (an appender keeps the order per stream)."""
    for stream, event_id in last.items():
        rows = await redis.xrevrange(stream, count=1)
        if not rows or decode_uplink(rows[0][1][b"d"]).event_id != event_id:
            return False
    return True


def _sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


@pytest.mark.cluster_too
@pytest.mark.parametrize("warm", [True, False], ids=["warm", "cold"])
async def test_kill_9_mid_stream_loses_nothing_with_a_warm_standby(
    redis: Redis, redis_yaml: str, redis_config: RedisConfig, tmp_path: Path, warm: bool
) -> None:
    app = make_app()
    setting = f"lease_ttl_ms: 1000, max_backoff_s: 1, warm_standby: {str(warm).lower()}"
    proc = await _owner_subprocess(app, redis_yaml, tmp_path, setting)
    keys = redis_config.keys()
    board = StatusBoard(redis, keys)
    replayed_before = _sample("bb_mqtt_replayed_total", integration="lab")
    try:
        await _wait_owned_by(board, proc)
        standby = IngestMqtt(make_ctx(redis, redis_config, [app], consumer="standby"),
                             lease_ttl_ms=1000, max_backoff_s=1, warm_standby=warm)
        async with running(standby):
            if warm:
                await within(standby.connected["lab"].wait())
                # Standing by: subscribed, reporting itself, but not the integration's owner.
                assert _sample("bb_mqtt_standby", integration="lab") == 1
                await _wait_owned_by(board, proc)
            publisher = NumberedUplinks(app)
            await wait_until(lambda: _has_uplinks(redis, keys, 50), what="the owner appending")
            proc.send_signal(signal.SIGKILL)
            await within(proc.wait())
            await within(standby.subscribed["lab"].wait())
            await publisher.more(50)
            published = await publisher.stop()
            last = publisher.last_per_stream(keys)
            if keys.cluster:
                assert len({redis.get_node_from_key(s).name  # type: ignore[attr-defined]
                            for s in last}) == 2  # two masters
            # The standby appends in the order it received: the last one published to each
            # stream comes last in it.
            await wait_until(lambda: _last_ones_in(redis, last), what="the last uplinks published")
        got = {u.event_id for u in await uplinks(redis, keys)}
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert len(set(published)) == len(published) > 100
    assert got <= set(published)
    replayed = _sample("bb_mqtt_replayed_total", integration="lab") - replayed_before
    if warm:
        assert got == set(published)
        assert replayed > 0
    else:
        # Published while nobody was subscribed: gone for good (this is what warm prevents).
        assert set(published) - got
        assert replayed == 0


@pytest.mark.cluster_too
async def test_a_standby_appends_nothing_and_its_trouble_is_not_the_integrations(
    redis: Redis, redis_config: RedisConfig
) -> None:
    app = make_app()
    owner = IngestMqtt(make_ctx(redis, redis_config, [app], consumer="r1"), lease_ttl_ms=1000)
    stop = asyncio.Event()
    owner_task = asyncio.create_task(owner.main_loop(stop))
    try:
        await within(owner.subscribed["lab"].wait())
        with closed_port() as closed:
            broken = IngestMqtt(
                make_ctx(redis, redis_config, [app], consumer="r2"), lease_ttl_ms=1000,
                max_backoff_s=0.2,
                settings_for=lambda a, c: mqtt.Settings(MQTT_HOST, closed, client_id=c))
            warm = IngestMqtt(make_ctx(redis, redis_config, [app], consumer="r3"),
                              lease_ttl_ms=1000)
            failures = _sample("bb_mqtt_connects_total", integration="lab", outcome="unreachable")
            async with running(broken), running(warm):
                await wait_until(
                    lambda: _gt(_sample("bb_mqtt_connects_total", integration="lab",
                                        outcome="unreachable"), failures + 1),
                    what="the standby failing to connect, twice")
                await within(warm.connected["lab"].wait())
                status = await StatusBoard(redis, owner._keys).get("tts", "lab")
                assert status is not None and status.state is State.CONNECTED
                assert status.owner == "r1"
                await Fleet(MQTT_HOST, MQTT_PORT, app.app_id, app.tenant, devices=2,
                            rate_per_s=1e9).run(count=20)
                await wait_until(lambda: _has_uplinks(redis, owner._keys, 20),
                                 what="20 uplinks")

                async def warm_kept_them() -> bool:
                    return len(warm._feeds["lab"].buffer) == 20

                await wait_until(warm_kept_them, what="the warm standby keeping the 20")
                # Kept, not appended: once the owner's 20 are in, a standby's would be too.
                assert await uplinks_len(redis, owner._keys) == 20
                assert not warm.subscribed["lab"].is_set() and not broken.subscribed["lab"].is_set()
    finally:
        stop.set()
        await within(owner_task)


async def _gt(value: float, than: float) -> bool:
    return value > than


@pytest.mark.cluster_too
async def test_graceful_handover_to_a_warm_standby_loses_nothing(
    redis: Redis, redis_config: RedisConfig
) -> None:
    app = make_app()
    first = IngestMqtt(make_ctx(redis, redis_config, [app], consumer="r1"), lease_ttl_ms=1000)
    second = IngestMqtt(make_ctx(redis, redis_config, [app], consumer="r2"), lease_ttl_ms=1000)
    keys = first._keys
    first_stop = asyncio.Event()
    first_task = asyncio.create_task(first.main_loop(first_stop))
    await within(first.subscribed["lab"].wait())
    async with running(second):
        await within(second.connected["lab"].wait())
        publisher = NumberedUplinks(app)
        await wait_until(lambda: _has_uplinks(redis, keys, 30), what="appending")
        first_stop.set()  # SIGTERM: stop reading, write what was read, release the lease
        await within(first_task)
        await within(second.subscribed["lab"].wait())
        await publisher.more(30)
        published = await publisher.stop()

        async def all_in() -> bool:
            return {u.event_id for u in await uplinks(redis, keys)} >= set(published)

        await wait_until(all_in, what="every published uplink")
    assert not second.subscribed["lab"].is_set()  # stopped: released


@pytest.mark.cluster_too
async def test_an_owner_cut_off_from_the_broker_hands_over_to_a_connected_standby(
    redis: Redis, redis_config: RedisConfig
) -> None:
    app = make_app()
    keys = redis_config.keys()
    board = StatusBoard(redis, keys)
    handovers = _sample("bb_mqtt_handovers_total", integration="lab")
    async with CutProxy(MQTT_HOST, MQTT_PORT) as proxy:
        owner = IngestMqtt(
            make_ctx(redis, redis_config, [app], consumer="r1"), lease_ttl_ms=1000,
            max_backoff_s=0.2,
            settings_for=lambda a, c: mqtt.Settings(MQTT_HOST, proxy.port, client_id=c))
        standby = IngestMqtt(make_ctx(redis, redis_config, [app], consumer="r2"),
                             lease_ttl_ms=1000)
        async with running(owner):
            await within(owner.subscribed["lab"].wait())
            async with running(standby):
                await within(standby.connected["lab"].wait())
                publisher = NumberedUplinks(app)
                await wait_until(lambda: _has_uplinks(redis, keys, 30),
                                 what="the owner appending")
                await proxy.cut()  # the owner's path to the broker is gone; Redis is fine
                await within(standby.subscribed["lab"].wait())
                await publisher.more(50)
                published = await publisher.stop()

                async def all_in() -> bool:
                    return {u.event_id for u in await uplinks(redis, keys)} >= set(published)

                await wait_until(all_in, what="every published uplink")
                status = await board.get("tts", "lab")
                assert status is not None and status.owner == "r2"
                assert status.state is State.CONNECTED
                assert not owner.subscribed["lab"].is_set()
                # cut off, it does not take the application back from the connected standby
                assert await Lease(redis, keys.lease("tts", "lab"), "x").holder() == "r2"
                await proxy.restore()  # back: the old owner is now a warm standby
                await within(owner.connected["lab"].wait())
                assert await Lease(redis, keys.lease("tts", "lab"), "x").holder() == "r2"
                assert not owner.subscribed["lab"].is_set()
    assert _sample("bb_mqtt_handovers_total", integration="lab") == handovers + 1
    got = [u.event_id for u in await uplinks(redis, keys)]
    assert set(got) == set(published)  # nothing lost across the handover


# --- the standby buffer (pure) --------------------------------------------------------------------


def test_standby_buffer_keeps_the_window_oldest_first() -> None:
    buf = StandbyBuffer(window_s=1.5, max_messages=100, max_bytes=10_000)
    for t in (0.0, 1.0, 2.0):
        assert buf.add(t, int(t * 1000), "t", b"x") == 0
    assert len(buf) == 2  # 0.0 is older than 2.0 - 1.5
    buf.add(10.0, 10_000, "t", b"y", expire=False)  # draining a replay: nothing ages out
    assert len(buf) == 3
    assert buf.take(2) == [(1000, "t", b"x"), (2000, "t", b"x")]
    assert buf.take(5) == [(10_000, "t", b"y")] and buf.take(5) == []
    assert buf.bytes == 0
    buf.add(20.0, 1, "t", b"z")
    buf.expire(30.0)
    assert len(buf) == 0 and buf.bytes == 0


def test_standby_buffer_bounds_count_and_bytes_and_says_what_it_let_go() -> None:
    buf = StandbyBuffer(window_s=60, max_messages=3, max_bytes=100)
    assert [buf.add(0, i, "t", bytes(10)) for i in range(4)] == [0, 0, 0, 1]
    assert [m[0] for m in buf.take(10)] == [1, 2, 3]
    assert buf.add(0, 7, "t", bytes(60)) == 0
    assert buf.add(0, 8, "t", bytes(60)) == 1  # 122 bytes > 100: the oldest goes
    assert buf.bytes == 61 and [m[0] for m in buf.take(10)] == [8]
    assert buf.add(0, 9, "t", bytes(200)) == 1  # larger than the whole buffer: not kept
    assert len(buf) == 0 and buf.bytes == 0


# --- statuses ------------------------------------------------------------------------------------


async def test_broker_restart_shows_connected_broken_connected(
    redis: Redis, redis_config: RedisConfig
) -> None:
    broker = Mosquitto().start()
    try:
        app = make_app(port=broker.port)
        ctx = make_ctx(redis, redis_config, [app])
        stage = IngestMqtt(ctx, max_backoff_s=0.5)
        board = StatusBoard(redis, ctx.keys)
        seen: list[State] = []

        async def state_is(state: State) -> bool:
            status = await board.get("tts", "lab")
            if status is not None and (not seen or seen[-1] is not status.state):
                seen.append(status.state)
            return status is not None and status.state is state

        async with running(stage):
            await wait_until(lambda: state_is(State.CONNECTED), what="Connected")
            broker.stop()
            await wait_until(lambda: state_is(State.BROKEN), what="Broken")
            broken = await board.get("tts", "lab")
            assert broken is not None and broken.error_kind == "unreachable"
            assert broken.last_error and broken.since_ms > 0
            broker.start()
            await wait_until(lambda: state_is(State.CONNECTED), what="Connected again")
            await within(stage.subscribed["lab"].wait())
            await Fleet(MQTT_HOST, broker.port, app.app_id, app.tenant, devices=1,
                        rate_per_s=1e9).run(count=2)
            await wait_until(lambda: _has_uplinks(redis, ctx.keys, 2),
                             what="uplinks after the restart")
        assert seen == [State.CONNECTED, State.BROKEN, State.CONNECTED]
    finally:
        broker.close()


async def test_wrong_password_is_not_connected_with_a_credentials_error(
    redis: Redis, redis_config: RedisConfig
) -> None:
    app = make_app(tenant="acme")
    with Mosquitto(users={app.username: "NNSXS.RIGHT"}) as broker, closed_port() as refusing:
        wrong = msgspec.structs.replace(app, port=broker.port, api_key=Secret("NNSXS.WRONG"))
        ctx = make_ctx(redis, redis_config, [wrong])
        board = StatusBoard(redis, ctx.keys)
        async with running(IngestMqtt(ctx, max_backoff_s=0.5)):
            async def refused() -> bool:
                s = await board.get("tts", "lab")
                return s is not None and s.error_kind == "credentials"

            await wait_until(refused, what="a credentials error")
        status = await board.get("tts", "lab")
        assert status is not None and status.state is State.NOT_CONNECTED
        assert "NNSXS.WRONG" not in (status.last_error or "")

        # The right key connects and reads; an unreachable server is told apart.
        right = msgspec.structs.replace(wrong, name="lab2", api_key=Secret("NNSXS.RIGHT"))
        gone = msgspec.structs.replace(wrong, name="lab3", port=refusing)
        ctx2 = make_ctx(redis, redis_config, [right, gone])
        stage = IngestMqtt(ctx2, max_backoff_s=0.5)
        async with running(stage):
            await within(stage.subscribed["lab2"].wait())
            user, password = broker.admin_credentials
            await Fleet(MQTT_HOST, broker.port, app.app_id, app.tenant, devices=1,
                        rate_per_s=1e9, username=user, password=password).run(count=2)
            await wait_until(lambda: _has_uplinks(redis, ctx2.keys, 2),
                             what="uplinks with the right key")

            async def unreachable() -> bool:
                s = await board.get("tts", "lab3")
                return s is not None and s.error_kind == "unreachable"

            await wait_until(unreachable, what="an unreachable error")
        lab3 = await board.get("tts", "lab3")
        assert lab3 is not None and lab3.state is State.NOT_CONNECTED


# --- the lease -----------------------------------------------------------------------------------


@pytest.mark.cluster_too
async def test_lease_is_exclusive_renewable_and_released_only_by_its_owner(
    redis: Redis, keys: Keys
) -> None:
    key = keys.lease("tts", "x")
    a, b = Lease(redis, key, "a", 1000), Lease(redis, key, "b", 1000)
    assert await a.acquire() and a.valid()
    assert not await b.acquire()
    assert await a.renew()
    assert not await b.renew() and not b.valid()
    assert not await b.release()
    assert await a.holder() == "a"
    assert await a.release() and not a.valid()
    assert await b.acquire()
    assert await b.holder() == "b"


@pytest.mark.cluster_too
async def test_hold_stops_the_work_at_once_when_the_lease_is_taken(
    redis: Redis, keys: Keys
) -> None:
    key = keys.lease("tts", "y")
    lease = Lease(redis, key, "me", 400)
    started, cancelled = asyncio.Event(), asyncio.Event()

    async def work() -> None:
        started.set()
        try:
            await asyncio.Event().wait()
        finally:
            cancelled.set()

    stop = asyncio.Event()
    holder = asyncio.create_task(hold(lease, work, stop))
    await within(started.wait())
    await redis.set(key, "thief", px=60_000)  # someone else holds it now
    await within(cancelled.wait())
    assert await lease.holder() == "thief"  # and our release did not delete theirs
    stop.set()
    await within(holder)


async def test_a_holder_cancelled_while_its_work_winds_down_ends_cancelled(
    redis: Redis, keys: Keys
) -> None:
    # On stop, hold() cancels the work and waits for it; a cancel of the holder itself (a stop
    # past its grace) landing meanwhile must end the holder, not be swallowed by the reap. The
    # lease is then left to expire rather than released under work that may still run.
    key = keys.lease("tts", "z")
    lease = Lease(redis, key, "me", 60_000)
    started, winding, wound = asyncio.Event(), asyncio.Event(), asyncio.Event()

    async def work() -> None:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            winding.set()
            await wound.wait()
            raise

    stop = asyncio.Event()
    holder = asyncio.create_task(hold(lease, work, stop))
    try:
        await within(started.wait())
        stop.set()
        await within(winding.wait())
        holder.cancel()
        await asyncio.wait({holder}, timeout=10)
        assert holder.cancelled(), "the holder's own cancel was swallowed by the reap"
        assert await lease.holder() == "me"  # not released: its ttl frees it
    finally:
        wound.set()
        await asyncio.wait({holder}, timeout=10)
        await redis.delete(key)


def _packet(first: int, body: bytes) -> bytes:
    length, n = bytearray(), len(body)
    while True:
        byte, n = n & 0x7F, n >> 7
        length.append(byte | (0x80 if n else 0))
        if not n:
            return bytes([first]) + bytes(length) + body


def _publish(topic: str, payload: bytes, first: int = 0x30) -> bytes:
    t = topic.encode()
    pid = b"\x00\x07" if first & 0x06 else b""
    return _packet(first, len(t).to_bytes(2, "big") + t + pid + payload)


def test_split_packets_takes_qos0_publishes_and_keeps_the_rest_for_paho() -> None:
    big = bytes(range(256)) * 80  # a 20 KB payload: three length bytes
    suback = _packet(0x90, b"\x00\x01\x00")
    pingresp = _packet(0xD0, b"")
    qos1 = _publish("v3/a/devices/d/up", b"q1", first=0x32)
    stream = (suback + _publish("v3/a/devices/d/up", b"{}") + qos1
              + _publish("t", big, first=0x31) + pingresp + _publish("t/2", b""))
    msgs, other, rest = mqtt.split_packets(stream)
    assert msgs == [("v3/a/devices/d/up", b"{}"), ("t", big), ("t/2", b"")]
    assert other == suback + qos1 + pingresp and rest == b""
    # Cut anywhere: the complete packets come out, the rest waits for more bytes, and feeding
    # the rest with the remainder gives the same result.
    for cut in range(len(stream)):
        m1, o1, r1 = mqtt.split_packets(stream[:cut])
        m2, o2, r2 = mqtt.split_packets(r1 + stream[cut:])
        assert m1 + m2 == msgs and o1 + o2 == other and r2 == b""
    # A malformed length (5 bytes) goes to paho untouched, with what follows.
    bad = b"\x30\xff\xff\xff\xff\x01" + b"x" * 10
    assert mqtt.split_packets(pingresp + bad) == ([], pingresp + bad, b"")


async def test_insecure_warns_at_startup_that_the_api_key_travels_in_clear(
    redis: Redis, redis_config: RedisConfig, caplog: pytest.LogCaptureFixture,
) -> None:
    apps = [make_app("plain"), make_app("tls", insecure=False, port=8883)]
    stage = IngestMqtt(make_ctx(redis, redis_config, apps))
    caplog.set_level(logging.WARNING, logger="blynk_bridge.ingest_mqtt")
    await stage.startup()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert "plain" in warnings[0] and "clear text" in warnings[0]
    assert f"{MQTT_HOST}:{MQTT_PORT}" in warnings[0]


# --- appending: at once at low rates ---------------------------------------------------------


@pytest.mark.cluster_too
async def test_a_lone_uplink_is_appended_without_waiting_for_the_linger(
    redis: Redis, redis_config: RedisConfig
) -> None:
    """Below ``linger_above_per_s`` an append goes at once: with an hour's ``linger_ms`` each
    uplink still reaches the stream while the next is not yet published."""
    app = make_app()
    ctx = make_ctx(redis, redis_config, [app], linger_ms=3_600_000)
    stage = IngestMqtt(ctx)
    async with running(stage):
        await asyncio.wait_for(stage.subscribed["lab"].wait(), 10)
        for n in (1, 2):  # two devices: two partitions (masters) on the cluster
            device = f"d{n}"
            body = json.dumps(make_uplink(app.app_id, app.tenant, device, n, {"t": n})).encode()
            await publish([(f"v3/{app.username}/devices/{device}/up", body)])
            await wait_until(lambda n=n: _lens(redis, ctx.keys, n, 0),  # type: ignore[misc]
                             what=f"uplink {n} in the stream")
    assert [u.values for u in await uplinks(redis, ctx.keys)] == [{"t": 1}, {"t": 2}]
