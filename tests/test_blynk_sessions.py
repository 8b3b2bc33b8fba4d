"""blynk-sessions end to end: real Redis, the Blynk emulator's device MQTT API, the stage in
process and as `blynk-bridge blynk-sessions` child processes (killed with SIGKILL for failover).

Devices become live by a BlynkWrite on the writes stream (what transform hands egress), as in
the running bridge; commands are read back from the downlinks stream (the downlink stage's
input, tested on its own in tests/test_downlink*.py).

On one Redis and on the local Redis Cluster (``cluster_too``; three bridge partitions there:
the writes and downlinks streams, echo records and last-sent times of each in its slot),
but for the tests that cut or stall the one Redis's connection through a proxy."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY

from emulators.blynk import BlynkEmulator, DatastreamSpec, DeviceSpec, EmulatorSpec, TemplateSpec
from pipeline import config as config_mod
from pipeline import events
from pipeline.blynk.client import token_hash
from pipeline.context import Context
from pipeline.keys import DOWNLINKS, WRITES, Keys
from pipeline.lease import owner_of
from pipeline.registry import Registry
from pipeline.streams import Redis, now_ms
from tests import rig
from tests.conftest import MQTT_HOST, MQTT_PORT, REDIS_URL
from tests.tcp_proxy import CutProxy
from tests.test_downlink import Devices
from tests.wait import wait_until, within
from workers.blynk_sessions import SessionsStage
from workers.downlink import DownlinkStage

pytestmark = pytest.mark.cluster_too

ROOT = Path(__file__).resolve().parent.parent
#: Bridge partitions (``redis.partitions``) of the cluster runs.
CLUSTER_PARTITIONS = 3
#: Why the proxy tests run on one Redis only.
ONE_REDIS_PROXY = "cuts one Redis's connection through a proxy (a cluster has a node per slot)"


def tok(name: str) -> str:
    return (name.replace("-", "") + "x" * 32)[:32]


FRA = [f"fra-{i}" for i in range(6)]
NY = "ny-0"
BAD = "bad-0"  # registered in the bridge, unknown to Blynk


def emulator() -> BlynkEmulator:
    tmpl = TemplateSpec(id="TMPL01", name="Valve", datastreams=[
        DatastreamSpec(id=1, pin="V1", name="Switch", type="integer", min=0, max=1),
        DatastreamSpec(id=2, pin="V2", name="Temperature", type="double"),
    ])
    devices = [DeviceSpec(name=d, token=tok(d), template="TMPL01", id=i + 1, region="fra1")
               for i, d in enumerate(FRA)]
    devices.append(DeviceSpec(name=NY, token=tok(NY), template="TMPL01", id=50, region="ny3"))
    return BlynkEmulator.from_spec(EmulatorSpec(regions={"fra1": 0, "ny3": 0}, templates=[tmpl],
                                                devices=devices))


def config_text(prefix: str, emu: BlynkEmulator, urls: dict[str, str], tts: str = "",
                redis_url: str = REDIS_URL, redis_partitions: int = 1, **sessions: Any) -> str:
    mq = {r: f"mqtt://{h}:{p}" for r, (h, p) in emu.mqtt.addresses.items()}
    opts = {"partitions": 8, "lease_ttl_ms": 1000, "scan_interval_s": 0.1,
            "connect_rate": 1000, "connect_burst": 100, "max_backoff_s": 2} | sessions
    extra = "\n".join(f"  {k}: {v}" for k, v in opts.items())
    return f"""
redis: {{url: "{redis_url}", prefix: "{prefix}", partitions: {redis_partitions}}}
blynk:
  servers: {{fra1: "{urls['fra1']}", ny3: "{urls['ny3']}"}}
  default_server: fra1
blynk_sessions:
  servers: {{fra1: "{mq['fra1']}", ny3: "{mq['ny3']}"}}
{extra}
templates:
  - name: valve
    id: TMPL01
    downlinks: mqtt
    datastreams:
      - {{name: Switch, pin: V1, type: integer, min: 0, max: 1}}
      - {{name: Temperature, pin: V2, type: double}}
    downlink: {{pins: [V1]}}
{tts}
"""


class World:
    def __init__(self, prefix: str, emu: BlynkEmulator, urls: dict[str, str],
                 redis: Redis, redis_url: str = REDIS_URL) -> None:
        self.prefix = prefix
        self.emu = emu
        self.urls = urls
        self.redis = redis
        self.redis_url = redis_url
        self.cluster = redis_url.startswith("redis+cluster://")
        self.partitions = CLUSTER_PARTITIONS if self.cluster else 1
        self.keys = Keys(prefix, self.partitions, cluster=self.cluster)

    def config_text(self, tts: str = "", redis_url: str | None = None,
                    **sessions: Any) -> str:
        return config_text(self.prefix, self.emu, self.urls, tts, redis_url or self.redis_url,
                           self.partitions, **sessions)

    def config(self, tts: str = "", redis_url: str | None = None,
               **sessions: Any) -> config_mod.Config:
        return config_mod.parse(self.config_text(tts, redis_url, **sessions),
                                "yaml", "sessions.yaml", env={})

    async def register(self, names: list[str]) -> None:
        reg = Registry(self.redis, self.keys)
        for n in names:
            await reg.register(f"tts:kit:{n}", token=tok(n), template="valve", server="fra1")

    async def uplink(self, names: list[str]) -> None:
        """One BlynkWrite per device, as transform writes them for egress; all in one
        transaction, so the stage's watcher reads them in one batch."""
        now = now_ms()
        async with self.redis.pipeline(transaction=True) as pipe:
            for n in names:
                w = events.BlynkWrite(token=tok(n), server=self.urls["fra1"],
                                      device_key=f"tts:kit:{n}", pins={"V2": 20.5},
                                      event_ts_ms=now, received_ts_ms=now,
                                      event_id=f"e:{n}:{now}")
                pipe.xadd(self.keys.stream(WRITES), {events.FIELD: events.encode(w)})
            await pipe.execute()

    async def move_token(self, name: str, to: str) -> None:
        """Device ``name`` gets ``to``'s token (re-registered, as provisioning does) and then
        one BlynkWrite with it, as transform writes the next uplink."""
        key = f"tts:kit:{name}"
        await Registry(self.redis, self.keys).register(key, token=tok(to), template="valve",
                                                       server="fra1")
        now = now_ms()
        w = events.BlynkWrite(token=tok(to), server=self.urls["fra1"], device_key=key,
                              pins={"V2": 21.5}, event_ts_ms=now, received_ts_ms=now,
                              event_id=f"e:moved:{now}")
        await self.redis.xadd(self.keys.stream(WRITES), {events.FIELD: events.encode(w)})

    async def commands(self) -> list[events.Downlink]:
        """Every command on the downlinks stream (all partitions), oldest first per device."""
        entries = [e for s in self.keys.streams(DOWNLINKS) for e in await self.redis.xrange(s)]
        return [events.decode_downlink(f[events.FIELD]) for _, f in entries]

    def online(self, names: list[str]) -> bool:
        s = self.emu.mqtt.sessions
        return all(tok(n) in s and s[tok(n)].subscribed for n in names)


@pytest.fixture
async def world(prefix: str, redis: Redis, backend: str, request: pytest.FixtureRequest
                ) -> AsyncIterator[World]:
    url = request.getfixturevalue("cluster_url") if backend == "cluster" else REDIS_URL
    emu = emulator()
    async with emu.serve({"fra1": 0, "ny3": 0}, mqtt=True) as urls:
        yield World(prefix, emu, urls, redis, url)


@contextlib.asynccontextmanager
async def stage(world: World, tts: str = "", redis_url: str | None = None,
                **sessions: Any) -> AsyncIterator[SessionsStage]:
    async with running(world.config(tts, redis_url, **sessions)) as st:
        yield st


@contextlib.asynccontextmanager
async def running(cfg: config_mod.Config) -> AsyncIterator[SessionsStage]:
    """A sessions stage on ``cfg``, its main loop running until the block ends."""
    ctx = Context.create(cfg)
    st = SessionsStage(ctx)
    await st.startup()
    stop = asyncio.Event()
    task = asyncio.create_task(st.main_loop(stop))
    try:
        yield st
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
        await st.shutdown()
        await ctx.close()


async def test_a_write_after_startup_is_seen_however_late_the_watch_starts_reading(
        world: World) -> None:
    """The watch reads the writes streams from where they stood when ``startup`` returned, not
    from wherever they are when its first read goes out: on a busy machine that read came
    after the first uplinks, and their devices stayed without a session."""
    await world.register([FRA[0]])
    ctx = Context.create(world.config(partitions=1))
    st = SessionsStage(ctx)
    await st.startup()
    await world.uplink([FRA[0]])  # before the main loop (and its watch) has run at all
    stop = asyncio.Event()
    task = asyncio.create_task(st.main_loop(stop))
    try:
        await wait_until(lambda: world.online([FRA[0]]), what="the session of that device")
    finally:
        stop.set()
        await within(task)
        await st.shutdown()
        await ctx.close()


async def test_sessions_forward_app_changes_follow_redirects_and_survive_bad_tokens(
        world: World) -> None:
    await world.register([FRA[0], NY, BAD])
    async with stage(world) as st:
        await wait_until(lambda: len(st.owned) == 8, what="all partitions owned")
        await world.uplink([FRA[0], NY, BAD])
        await wait_until(lambda: world.online([FRA[0], NY]), what="sessions open")
        # NY's row says fra1: Blynk redirected it, the bridge followed and remembered ny3.
        assert world.emu.mqtt.stats["redirects"] == 1
        region = await world.redis.get(world.keys.region(token_hash(tok(NY))))
        assert region == world.urls["ny3"].encode()
        await wait_until(lambda: world.emu.mqtt.stats["bad_credentials"] >= 1, what="CONNACK 4")
        assert tok(BAD) not in world.emu.mqtt.sessions
        # info/mcu names the template.
        assert world.emu.mqtt.mcu[1]["tmpl"] == "TMPL01"

        world.emu.app_write(1, "V2", 30)  # not a command pin: never forwarded
        world.emu.app_write(1, "V1", 1)
        world.emu.app_write(50, "V1", 1)
        cmds = await wait_until(
            lambda: _when(world.commands(), lambda c: len(c) >= 2), what="two commands")
        got = sorted((c.token, c.pin, c.value, c.origin) for c in cmds)
        assert got == sorted([(tok(FRA[0]), "V1", "1", "mqtt"), (tok(NY), "V1", "1", "mqtt")])
        assert world.emu.mqtt.stats["kicked"] == 0


async def _when(coro: Any, pred: Any) -> Any:
    value = await coro
    return value if pred(value) else None


def _spawn(world: World, tmp_path: Path, name: str) -> subprocess.Popen[bytes]:
    cfg = tmp_path / f"{name}.yaml"
    cfg.write_text(world.config_text())
    return subprocess.Popen(
        [sys.executable, "-m", "blynk_bridge", "--log-format", "text", "blynk-sessions",
         "-c", str(cfg)], cwd=ROOT, stdout=subprocess.DEVNULL,
        stderr=open(tmp_path / f"{name}.log", "wb"))


async def test_two_replicas_split_devices_and_a_killed_one_loses_no_app_change(
        world: World, tmp_path: Path) -> None:
    await world.register(FRA)
    a = _spawn(world, tmp_path, "a")
    b = _spawn(world, tmp_path, "b")
    try:
        owners = world.keys.lease("sessions", "")

        async def holders() -> set[str | None]:  # the replicas' names (values are tokens)
            values = [await world.redis.get(owners + str(p)) for p in range(8)]
            return {None if v is None else owner_of(v) for v in values}

        # Each replica holds its fair share (4 of 8) once both heartbeats are in.
        await wait_until(lambda: _when(holders(), lambda h: len(h) == 2 and None not in h),
                         what="partitions split over both replicas")
        await world.uplink(FRA)
        await wait_until(lambda: world.online(FRA), what="every device online")
        # A value per device before the failover, delivered live by whichever replica owns it.
        for i in range(len(FRA)):
            world.emu.app_write(i + 1, "V1", 0)
        await wait_until(lambda: _when(world.commands(), lambda c: len(c) >= len(FRA)),
                         what="every baseline command")
        a.send_signal(signal.SIGKILL)
        a.wait(30)
        # Changed in the app while A's devices have no session (or still the dead one's).
        for i in range(len(FRA)):
            world.emu.app_write(i + 1, "V1", 1)

        def all_on(cmds: list[events.Downlink]) -> bool:
            return {c.token for c in cmds if c.value == "1"} == {tok(n) for n in FRA}

        await wait_until(lambda: _when(world.commands(), all_on), timeout_s=60,
                         what="every change delivered after the failover")
        await wait_until(lambda: world.online(FRA), what="B holds every session")
        assert world.emu.mqtt.stats["kicked"] == 0, "two sessions for one token"
    finally:
        for p in (a, b):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                p.wait(30)
    logs = (tmp_path / "a.log").read_text() + (tmp_path / "b.log").read_text()
    assert logs, "the replicas logged nothing: the check below would prove nothing"
    leaked = [n for n in FRA if tok(n) in logs]
    assert not leaked, f"tokens of {leaked} in the logs"


async def test_reconnects_after_a_blynk_restart_are_paced(world: World) -> None:
    await world.register(FRA)
    async with stage(world, connect_rate=4, connect_burst=1) as st:
        await wait_until(lambda: len(st.owned) == 8, what="all partitions owned")
        await world.uplink(FRA)
        await wait_until(lambda: world.online(FRA), what="every device online")
        before = len(world.emu.mqtt.connects)
        assert world.emu.mqtt.drop_all() == len(FRA)

        def reconnects() -> list[float]:
            return sorted(t for t, _, outcome in list(world.emu.mqtt.connects)[before:]
                          if outcome == "accepted")

        await wait_until(lambda: len(reconnects()) >= len(FRA), what="every device back")
        times = reconnects()
        assert len(times) == len(FRA)
        # 4 per second, burst 1: six reconnects cannot all come within one second. A lower
        # bound only, so a slow machine cannot fail it.
        assert times[-1] - times[0] >= (len(FRA) - 1) / 4 * 0.9


async def test_commands_reach_tts_and_echoes_of_the_bridges_writes_do_not(
        world: World) -> None:
    """App write → session → downlink stage → TTS ``down/push``; a value the bridge itself
    wrote (recorded by egress before writing) that Blynk echoes on the session is dropped."""
    app = f"sess-{secrets.token_hex(4)}"
    tts = (f"tts:\n  - {{name: kit, app_id: {app}, host: {MQTT_HOST}, port: {MQTT_PORT}, "
           "insecure: true, api_key: NNSXS.X, template: valve}")
    world.emu.settings.mqtt_echo_device_writes = True
    await world.register([FRA[0]])
    cfg = world.config(tts)
    devices = Devices(app)
    ready = asyncio.Event()

    def pushes() -> list[dict[str, Any]]:
        return [body["downlinks"][0]["decoded_payload"] for _, body in devices.got]

    down_ctx = Context.create(cfg)
    down = DownlinkStage(down_ctx)
    await down.startup()
    stop = asyncio.Event()
    tasks = [asyncio.create_task(devices.run(ready)),
             asyncio.create_task(down.main_loop(stop))]
    try:
        await ready.wait()
        async with stage(world, tts) as st:
            await wait_until(lambda: len(st.owned) == 8, what="all partitions owned")
            await world.uplink([FRA[0]])
            await wait_until(lambda: world.online([FRA[0]]), what="session open")
            # The bridge writes Switch=1 for the device (egress records it first) ...
            await rig.record_echoes(world.redis, world.keys,
                                    [(tok(FRA[0]), f"tts:kit:{FRA[0]}", {"V1": 1})],
                                    now_ms(), cfg.echo.window_ms)
            dev = world.emu.model.devices[1]
            ds = dev.template.by_pin["V1"]
            world.emu.model.write(dev, ds, 1, world.emu.now_ms())  # ... Blynk echoes it
            # ... and then a user sets Switch=0 in the app.
            world.emu.app_write(1, "V1", 0)
            await wait_until(lambda: devices.got, what="a down/push")
            await wait_until(lambda: _when(world.commands(), lambda c: len(c) >= 2),
                             what="both on the downlinks stream")
            # Order on the stream: the echo, then the command; only the command went down.
            await wait_until(lambda: pushes() and pushes()[-1]["value"] == 0,
                             what="command pushed")
            assert [p["value"] for p in pushes()] == [0]
            assert [p["pin"] for p in pushes()] == ["v1"]
    finally:
        stop.set()
        await asyncio.wait_for(tasks[1], 30)
        tasks[0].cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await tasks[0]
        await down.shutdown()
        await down_ctx.close()


async def test_a_lost_lease_closes_its_sessions_before_anyone_else_may_open_them(
        world: World) -> None:
    """Another owner in a partition's lease (what a takeover after a stall looks like): the
    replica stops its sessions of that partition at the next renewal, and no other."""
    from pipeline.blynk_sessions import partition_of

    await world.register(FRA)
    async with stage(world) as st:
        await wait_until(lambda: len(st.owned) == 8, what="all partitions owned")
        await world.uplink(FRA)
        await wait_until(lambda: world.online(FRA), what="every device online")
        victim = partition_of(tok(FRA[0]), 8)
        lost = [n for n in FRA if partition_of(tok(n), 8) == victim]
        kept = [n for n in FRA if n not in lost]
        await world.redis.set(world.keys.lease("sessions", str(victim)), "another-replica",
                              px=60_000)
        await wait_until(lambda: all(tok(n) not in world.emu.mqtt.sessions for n in lost),
                         what="the lost partition's sessions closed")
        assert victim not in st.owned
        assert world.online(kept)
        assert world.emu.mqtt.stats["kicked"] == 0


def _events(event: str) -> float:
    return REGISTRY.get_sample_value("bb_blynk_session_events_total", {"event": event}) or 0.0


async def test_commands_queued_while_redis_is_cut_off_stay_bounded_and_the_latest_goes_out(
        world: World) -> None:
    """The stage's path to Redis fails (a proxy cut; the leases outlive it): app changes keep
    arriving on the sessions. The queue keeps only the latest value per device and pin once it
    reaches ``forward_queue_max``; every change is forwarded, superseded or unchanged (counted),
    and once Redis is back each device's latest value is on the downlinks stream."""
    if world.cluster:
        pytest.skip(ONE_REDIS_PROXY)
    names = FRA[:3]
    await world.register(names)
    host, port = REDIS_URL.split("//")[1].split("/")[0].split(":")
    async with CutProxy(host, int(port)) as proxy, stage(
            world, redis_url=f"redis://{host}:{proxy.port}/0", lease_ttl_ms=120_000,
            forward_queue_max=4) as st:
        await wait_until(lambda: len(st.owned) == 8, what="all partitions owned")
        await world.uplink(names)
        await wait_until(lambda: world.online(names), what="sessions open")
        forwarded = _events("forwarded")
        for i in range(len(names)):
            world.emu.app_write(i + 1, "V1", 0)
        # Counted after the stream write: wait for the count, not only the entries.
        await wait_until(lambda: _events("forwarded") == forwarded + len(names),
                         what="the baseline commands")
        before = {e: _events(e) for e in ("superseded", "forwarded", "unchanged")}
        await proxy.cut()
        values = [1, 0, 1, 0, 1]
        for v in values:
            for i in range(len(names)):
                world.emu.app_write(i + 1, "V1", v)
        sent = len(values) * len(names)
        peak = [0]

        def all_arrived() -> bool:
            peak[0] = max(peak[0], len(st._pending))
            return _events("superseded") - before["superseded"] + len(st._pending) == sent

        await wait_until(all_arrived, timeout_s=60, what="every change queued or superseded")
        assert _events("superseded") > before["superseded"]
        # Bounded: at most sessions × command pins after a compaction, which runs when the
        # queue reaches max(forward_queue_max, twice what the last one kept).
        assert peak[0] < max(4, 2 * len(names))
        await proxy.restore()

        def settled() -> bool:
            return sum(_events(e) - before[e] for e in before) == sent

        await wait_until(settled, timeout_s=60, what="every change accounted for")
        cmds = await world.commands()
        last = {c.token: c.value for c in cmds}
        assert last == {tok(n): "1" for n in names}


async def test_an_offline_device_is_closed_and_reopened_by_its_next_uplink(world: World) -> None:
    """Expiry and the changes stream: no full re-read of the live set is needed to see a device
    go offline (its deadline passes) or come back (a new member of the live set)."""
    await world.register([FRA[0], FRA[1]])
    async with stage(world, offline_min_s=2) as st:
        await wait_until(lambda: len(st.owned) == 8, what="all partitions owned")
        cursors = dict(st._cursor)
        await world.uplink([FRA[0]])
        await wait_until(lambda: world.online([FRA[0]]), what="session open")
        assert st._cursor != cursors, "opened from the changes stream, not a full read"
        offline = _events("offline")
        await wait_until(lambda: tok(FRA[0]) not in world.emu.mqtt.sessions, timeout_s=60,
                         what="the session closed after offline_min_s")
        assert _events("offline") == offline + 1
        assert FRA[0] not in {k.split(":")[-1] for k in st.sessions}
        await world.uplink([FRA[0], FRA[1]])
        await wait_until(lambda: world.online([FRA[0], FRA[1]]), what="both open again")


async def test_more_changes_than_the_stream_keeps_make_the_owner_read_the_whole_live_set(
        world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """A full page of changes may mean entries were trimmed before the owner read them: it
    reads the partition's whole live set instead, so no live device is left without a
    session. (The six writes come in one batch: six change entries, pages of two.)"""
    import workers.blynk_sessions as stage_mod

    monkeypatch.setattr(stage_mod, "_CHANGES_MAX", 2)
    await world.register(FRA)
    async with stage(world, partitions=1) as st:
        await wait_until(lambda: st.owned == {0}, what="the partition owned")
        resyncs = _events("scan_resync")
        await world.uplink(FRA)
        await wait_until(lambda: world.online(FRA), what="every device online")
        assert _events("scan_resync") > resyncs
        assert len(await world.redis.xrange(world.keys.sessions_changes(0))) <= len(FRA)


class StallProxy:
    """A TCP proxy to the real Redis whose ``stall()`` holds every byte in both directions
    (connections stay open, calls hang: a network partition without resets, or a frozen Redis
    as one replica sees it) until ``resume()``."""

    def __init__(self) -> None:
        self.flowing = asyncio.Event()
        self.flowing.set()
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []

    async def __aenter__(self) -> StallProxy:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.flowing.set()
        assert self._server is not None
        self._server.close()
        for w in self._writers:
            w.close()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def stall(self) -> None:
        self.flowing.clear()

    def resume(self) -> None:
        self.flowing.set()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        host, port = REDIS_URL.split("//")[1].split("/")[0].split(":")
        up_reader, up_writer = await asyncio.open_connection(host, int(port))
        self._writers += [writer, up_writer]

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(ConnectionError):
                while data := await src.read(65536):
                    await self.flowing.wait()
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))


async def test_a_replica_cut_off_from_redis_closes_its_sessions_before_its_leases_pass_on(
        world: World) -> None:
    """Replica A's Redis calls hang (no error, no reply): its leases expire in Redis and
    replica B takes them. A must have closed its sessions by then, although it is still
    waiting for its renewal: Blynk never sees two clients for one token."""
    if world.cluster:
        pytest.skip(ONE_REDIS_PROXY)
    await world.register(FRA)
    async with StallProxy() as proxy, running(world.config(redis_url=proxy.url,
                                                       lease_ttl_ms=2000)) as a:
        try:
            await wait_until(lambda: len(a.owned) == 8, what="A owns every partition")
            await world.uplink(FRA)
            await wait_until(lambda: world.online(FRA), what="A's sessions open")
            proxy.stall()
            async with stage(world, lease_ttl_ms=2000) as b:
                await wait_until(lambda: len(b.owned) == 8, what="B took every partition")
                await wait_until(lambda: world.online(FRA), what="B's sessions open")
                assert not a.sessions
                assert world.emu.mqtt.stats["kicked"] == 0, "two sessions for one token"
                proxy.resume()
        finally:
            proxy.resume()  # before the stage stops: its last Redis calls must be answered


async def test_a_connect_whose_partition_is_dropped_meanwhile_never_says_connect(
        world: World) -> None:
    """The partition is dropped while a connect is on its way (here: looking up the token's
    region in Redis): no CONNECT with that token may reach Blynk afterwards, since the new
    owner may already hold the session."""
    from pipeline.blynk_sessions import partition_of
    from workers.blynk_sessions import LiveDevice

    ctx = Context.create(world.config())
    st = SessionsStage(ctx)
    try:
        key = f"tts:kit:{FRA[0]}"
        live = LiveDevice(tok(FRA[0]), world.urls["fra1"], "valve")
        st.wanted[key] = live
        assert await st.leases[partition_of(live.token, 8)].acquire()
        await st._opening.acquire()
        connecting = asyncio.create_task(st._connect(key, live))
        await asyncio.sleep(0)  # the connect now waits for Redis (the region lookup)
        st._forget(key)  # what dropping its partition does
        await connecting
        await wait_until(lambda: key not in st.sessions or st.sessions[key].state == "closed",
                         what="the connect settled")
        await wait_until(lambda: not world.emu.mqtt.conns, what="no connection left at Blynk")
        assert [c for c in world.emu.mqtt.connects if c[1] == live.token] == []
    finally:
        for s in list(st.sessions.values()):
            s.close()
        await ctx.close()


async def test_an_address_that_cannot_be_connected_to_is_retried_not_stuck(
        world: World) -> None:
    """A server address the resolver refuses outright (a DNS label over 63 bytes: ValueError,
    not OSError) is a failed connect like any other: retried with backoff, the device not left
    with a dead session that blocks every reopen."""
    await world.register([FRA[0]])
    bad = "mqtt://" + "a" * 64 + ".example:1883"
    text = world.config_text().replace(
        world.emu.mqtt.url("fra1"), bad)
    async with running(config_mod.parse(text, "yaml", "bad.yaml", env={})) as st:
        await wait_until(lambda: len(st.owned) == 8, what="all partitions owned")
        await world.uplink([FRA[0]])
        key = f"tts:kit:{FRA[0]}"
        await wait_until(lambda: st.attempts.get(key, 0) >= 2, what="connect retried")
        assert key not in st.sessions


async def test_a_device_given_another_token_moves_its_session_to_it(world: World) -> None:
    """A device re-registered with another Blynk token (re-provisioned, handed to another
    owner): its session moves to the new token promptly — the old token's session closes, so
    the old Blynk device's app changes stop arriving as this device's commands — and the new
    session stays up (the old token's partition going quiet must not close it)."""
    from pipeline.blynk_sessions import partition_of

    assert partition_of(tok(FRA[0]), 8) != partition_of(tok(FRA[1]), 8)
    await world.register([FRA[0]])
    key = f"tts:kit:{FRA[0]}"
    async with stage(world) as st:
        await wait_until(lambda: len(st.owned) == 8, what="all partitions owned")
        await world.uplink([FRA[0]])
        await wait_until(lambda: world.online([FRA[0]]), what="session of the first token")
        await world.move_token(FRA[0], FRA[1])
        await wait_until(lambda: world.online([FRA[1]]) and not world.online([FRA[0]]),
                         what="the session moved to the new token")
        # The old token's live entry left its partition at once (the watcher removed it, with
        # a change entry its owner read); that leaves the new session alone.
        p_old = partition_of(tok(FRA[0]), 8)
        assert await world.redis.zscore(world.keys.sessions_live(p_old), key) is None
        assert await world.redis.hget(world.keys.sessions_devices(p_old), key) is None
        await wait_until(lambda: key not in st.by_partition[p_old], what="old partition scanned")
        assert st.sessions[key].token == tok(FRA[1]) and st.sessions[key].state == "ready"
        world.emu.app_write(1, "V1", 1)  # the old Blynk device: not this device's command
        world.emu.app_write(2, "V1", 1)  # the new one: a command
        cmds = await wait_until(lambda: _when(world.commands(), lambda c: c), what="command")
        assert {(c.token, c.pin) for c in cmds} == {(tok(FRA[1]), "V1")}
        assert world.online([FRA[1]])


async def test_a_token_used_elsewhere_too_backs_off_instead_of_flapping(world: World) -> None:
    """Someone else connects with a device's token (the device itself running Blynk firmware,
    or a leaked token) and reconnects whenever kicked: Blynk keeps one client per token, so
    the two keep kicking each other. The bridge's backoff must grow across those kicks — a
    session that did not last must not reset it — or one token costs a reconnect, a TLS
    handshake and a get/ds/all every second or so, forever, out of the fleet's connect rate."""
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    await world.register([FRA[0]])
    key = f"tts:kit:{FRA[0]}"
    other = paho.Client(CallbackAPIVersion.VERSION2, client_id="", protocol=paho.MQTTv311)
    other.username_pw_set("device", tok(FRA[0]))
    other.reconnect_delay_set(0.2, 0.2)  # type: ignore[arg-type]  # paho sleeps floats
    # A small backoff base: the kicks come quickly, and the attempts grow just the same.
    async with stage(world, max_backoff_s=60, backoff_base_s=0.1) as st:
        await wait_until(lambda: len(st.owned) == 8, what="all partitions owned")
        await world.uplink([FRA[0]])
        await wait_until(lambda: world.online([FRA[0]]), what="session open")
        host, port = world.emu.mqtt.addresses["fra1"]
        other.connect_async(host, port, keepalive=45)
        other.loop_start()
        try:
            await wait_until(lambda: st.attempts.get(key, 0) >= 4, timeout_s=60,
                             what="the bridge's backoff growing over the kicks")
        finally:
            other.disconnect()
            other.loop_stop()


async def test_a_redirect_loop_backs_off(world: World) -> None:
    """Blynk redirecting a device back where it came from (a misconfigured region): the first
    redirect is followed at once, the ones after it wait a growing backoff — not a reconnect
    loop as fast as the fleet's connect rate allows."""
    await world.register([NY])
    key = f"tts:kit:{NY}"
    world.emu.mqtt.addresses["ny3"] = world.emu.mqtt.addresses["fra1"]
    async with stage(world, max_backoff_s=60) as st:
        await wait_until(lambda: len(st.owned) == 8, what="all partitions owned")
        await world.uplink([NY])
        await wait_until(lambda: st.attempts.get(key, 0) >= 3, what="backoff over redirects")
        assert world.emu.mqtt.stats["redirects"] < 20


async def test_the_same_command_again_after_the_device_changed_the_pin_is_delivered(
        world: World) -> None:
    """Switch=1 from the app; the device then reports Switch=0 itself (its own button: an
    uplink the bridge writes to Blynk, which Blynk need not echo on the session); the user sets
    Switch=1 again. That second 1 is a real command — a webhook would deliver it — so the
    catch-up rule ("forward only values that differ from the last known") must know the
    device's own value, not only the last command."""
    from pipeline.blynk_index import token_ref

    await world.register([FRA[0]])
    token = tok(FRA[0])
    async with stage(world) as st:
        await wait_until(lambda: len(st.owned) == 8, what="all partitions owned")
        await world.uplink([FRA[0]])
        await wait_until(lambda: world.online([FRA[0]]), what="session open")
        world.emu.app_write(1, "V1", 1)
        await wait_until(lambda: _when(world.commands(), lambda c: len(c) == 1), what="first")
        now = now_ms()
        w = events.BlynkWrite(token=token, server=world.urls["fra1"],
                              device_key=f"tts:kit:{FRA[0]}", pins={"V1": 0},
                              event_ts_ms=now, received_ts_ms=now, event_id=f"e:off:{now}")
        await world.redis.xadd(world.keys.stream(WRITES), {events.FIELD: events.encode(w)})
        dev = world.emu.model.devices[1]
        world.emu.model.write(dev, dev.template.by_pin["V1"], 0, world.emu.now_ms())
        known = world.keys.sessions_known(token_ref(token))
        await wait_until(lambda: _when(world.redis.hget(known, "V1"), lambda v: v == b"0"),
                         what="the device's own value known to the sessions stage")
        world.emu.app_write(1, "V1", 1)
        cmds = await wait_until(lambda: _when(world.commands(), lambda c: len(c) == 2),
                                what="the second command")
        assert [c.value for c in cmds] == ["1", "1"]


async def test_a_stale_record_under_a_devices_old_token_does_not_strand_it(world: World) -> None:
    """A live record left under a device's old token (written before a restart, so no watcher
    remembers to remove it) competes with the current one; once it expires, the device must
    get its current token's session back, not stay without one while it is live."""
    from pipeline.blynk_sessions import partition_of
    from workers.blynk_sessions import LiveDevice, _live_enc

    key = f"tts:kit:{FRA[0]}"
    old, new = tok(FRA[0]), tok(FRA[1])
    p_old, p_new = partition_of(old, 8), partition_of(new, 8)

    async with stage(world) as st:

        async def put(p: int, token: str, deadline_ms: int) -> None:
            """What a watcher records (the changes stream too), with no watcher's memory."""
            rec = LiveDevice(token, world.urls["fra1"], "valve")
            await st._record_live({p: [key, deadline_ms, _live_enc.encode(rec)]})

        await wait_until(lambda: len(st.owned) == 8, what="all partitions owned")
        await put(p_new, new, now_ms() + 600_000)
        await wait_until(lambda: world.online([FRA[1]]), what="the current token's session")
        await put(p_old, old, now_ms() + 600_000)
        await wait_until(lambda: key in st.by_partition[p_old], what="the stale record seen")
        await put(p_old, old, now_ms() - 1)  # it expires
        await wait_until(lambda: world.online([FRA[1]]) and not world.online([FRA[0]]),
                         what="the current token's session back")


async def test_a_new_token_in_the_same_partition_moves_the_session_too(world: World) -> None:
    """Both tokens in one partition: the live set already holds the device, so recording it
    again alone would write no change entry and the owner (reading only changes) would keep
    the old token's session until its next full read. The move removes the old record first,
    so the new one is a change the owner reads at its next scan."""
    await world.register([FRA[0]])
    key = f"tts:kit:{FRA[0]}"
    async with stage(world, partitions=1) as st:
        await wait_until(lambda: st.owned == {0}, what="the partition owned")
        await world.uplink([FRA[0]])
        await wait_until(lambda: world.online([FRA[0]]), what="session of the first token")
        resyncs = _events("scan_resync")
        await world.move_token(FRA[0], FRA[1])
        await wait_until(lambda: world.online([FRA[1]]) and not world.online([FRA[0]]),
                         what="the session moved to the new token")
        assert st.sessions[key].token == tok(FRA[1])
        assert _events("scan_resync") == resyncs
