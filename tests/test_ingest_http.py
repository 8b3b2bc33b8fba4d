"""ingest-http over real HTTP with the real Redis: every fixture in, Uplinks read back."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gc
import json
import logging
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client import REGISTRY
from redis.asyncio.cluster import RedisCluster

from emulators.particle import ParticleFleet, _js_text, deliver, load_webhook, make_event
from pipeline import config as config_mod
from pipeline.context import Context
from pipeline.errors import InvalidInput
from pipeline.events import Uplink, decode_dead, decode_uplink
from pipeline.keys import GROUP_TRANSFORM, Keys
from pipeline.metrics_http import MetricsServer
from pipeline.particle import parse_webhook
from pipeline.status import State, StatusBoard
from pipeline.streams import Redis, StreamWriter
from pipeline.tts import parse_message
from tests.conftest import REDIS_URL, free_port
from tests.test_particle_parse import FIXTURES, INVALID, RECEIVED, TOKEN
from tests.wait import wait_until, within
from workers.ingest_http import GC_THRESHOLD0, IngestHttp, build

pytestmark = pytest.mark.cluster_too

HEADER_SECRET = "hdr-secret-Zq81x0"
BASIC_PASSWORD = "basic-pass-Pk55"
TTS_KEY = "NNSXS.TTS-KEY-7c1e"
FORM = "application/x-www-form-urlencoded"
JSON = "application/json"

CONFIG = """
redis: {{url: "{url}", prefix: "{prefix}"}}
ingest_http: {{max_body_bytes: 4096, backlog_high_water: {high_water}, port: {port}}}
particle:
  - {{name: tempmon, auth: none}}
  - {{name: hdr, auth: {{header: X-Particle-Secret, secret: "{header_secret}"}}}}
  - {{name: basic, auth: {{username: particle, password: "{basic_password}"}}}}
  - {{name: fresh, auth: {{header: X-Particle-Secret, secret: "{header_secret}"}}}}
tts:
  - name: tts-app
    app_id: my-app
    webhook_auth: {{header: X-Downlink-Apikey, secret: "{tts_key}"}}
  - {{name: mqtt-only, app_id: other}}
"""


def make_config(prefix: str, *, high_water: int = 1_000_000, port: int = 0) -> config_mod.Config:
    text = CONFIG.format(url=REDIS_URL, prefix=prefix, high_water=high_water,
                         port=port or free_port(), header_secret=HEADER_SECRET,
                         basic_password=BASIC_PASSWORD, tts_key=TTS_KEY)
    return config_mod.parse(text, "yaml", "test.yaml", env={})


def make_stage(redis: Redis, prefix: str, **kw: Any) -> IngestHttp:
    cfg = make_config(prefix, **kw)
    # The cluster key layout on a cluster client (the `cluster_too` runs).
    keys = Keys(prefix, cluster=isinstance(redis, RedisCluster))
    ctx = Context(config=cfg, redis=redis, keys=keys, consumer="test",
                  writer=StreamWriter(redis))
    return build(ctx)


@pytest.fixture
async def stage(redis: Redis, prefix: str) -> IngestHttp:
    return make_stage(redis, prefix)


@contextlib.asynccontextmanager
async def serving(stage: IngestHttp) -> AsyncIterator[str]:
    """The stage's own server, as the CLI runs it, on an unused port; yields its base URL."""
    base = await stage.serve("127.0.0.1", 0)
    try:
        yield base
    finally:
        await stage.shutdown()


@pytest.fixture
async def url(stage: IngestHttp) -> AsyncIterator[str]:
    async with serving(stage) as base:
        yield base


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def stored(redis: Redis, keys: Keys, entry_id: str) -> Uplink:
    rows = await redis.xrange(keys.stream("uplinks"), min=entry_id, max=entry_id)
    assert len(rows) == 1, f"entry {entry_id} not in the stream"
    return decode_uplink(rows[0][1][b"d"])


async def post(http: aiohttp.ClientSession, url: str, body: bytes, ct: str | None = JSON,
               **headers: str) -> tuple[int, dict[str, Any] | None, aiohttp.ClientResponse]:
    hdrs = dict(headers)
    if ct is not None:
        hdrs["Content-Type"] = ct
    async with http.post(url, data=body, headers=hdrs) as resp:
        payload = await resp.json() if resp.content_type == JSON else None
        return resp.status, payload, resp


def counter(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


# --- every fixture through the endpoint ----------------------------------------------------------


@pytest.mark.parametrize(("name", "ct", "query", "expected"), FIXTURES,
                         ids=[f[0] for f in FIXTURES])
async def test_particle_fixture_over_http(
    name: str, ct: str, query: dict[str, str], expected: dict[str, Any],
    url: str, http: aiohttp.ClientSession, redis: Redis, keys: Keys,
    stage: IngestHttp, fixture_path: Callable[[str], Path],
) -> None:
    body = fixture_path(f"particle/{name}").read_bytes()
    async with http.post(f"{url}/particle/tempmon", data=body, params=query,
                         headers={"Content-Type": ct}) as resp:
        assert resp.status == 200, await resp.text()
        assert await resp.read() == b""  # a body would become a hook-response event
        entry_id = resp.headers["X-Entry-Id"]
        event_id = resp.headers["X-Event-Id"]
    up = await stored(redis, keys, entry_id)
    assert up.event_id == event_id
    # Field by field: what Redis holds is what the pure parser makes at the same receive time.
    product = stage.particle["tempmon"][0]
    assert up == parse_webhook(body, ct, product, received_ts_ms=up.received_ts_ms, query=query)
    for field, want in expected.items():
        if field == "values_include":
            assert {k: up.values[k] for k in want} == want
        elif field == "event_ts_ms" and want == RECEIVED:
            assert up.event_ts_ms == up.received_ts_ms
        else:
            assert getattr(up, field) == want, field


@pytest.mark.parametrize(("name", "ct", "reason", "field"), INVALID, ids=[i[0] for i in INVALID])
async def test_invalid_particle_fixture_gets_a_clear_400(
    name: str, ct: str, reason: str, field: str, url: str, http: aiohttp.ClientSession,
    redis: Redis, keys: Keys, fixture_path: Callable[[str], Path],
) -> None:
    before = counter("bb_rejected_total", source="particle", reason=reason)
    status, err, _ = await post(http, f"{url}/particle/tempmon",
                                fixture_path(f"particle/{name}").read_bytes(), ct)
    assert status == 400
    assert err is not None
    assert err["error"]["reason"] == reason
    assert err["error"]["field"] == field
    assert err["error"]["message"]
    assert counter("bb_rejected_total", source="particle", reason=reason) == before + 1
    assert await redis.xlen(keys.stream("uplinks")) == 0


def _tts_fixtures() -> list[str]:
    folder = Path(__file__).resolve().parent / "fixtures" / "tts"
    return sorted(p.name for p in folder.iterdir()
                  if not p.name.endswith(".src.txt") and not p.name.startswith("tts-storage"))


@pytest.mark.parametrize("name", _tts_fixtures())
async def test_tts_fixture_over_http(name: str, url: str, http: aiohttp.ClientSession,
                                     redis: Redis, keys: Keys, stage: IngestHttp,
                                     fixture_path: Callable[[str], Path]) -> None:
    """Uplinks/joins → 200 and stored as the parser makes them; downlink outcomes → 202, not
    stored; no decoded payload → 202 and a dead letter; malformed → 400 naming the problem."""
    body = fixture_path(f"tts/{name}").read_bytes()
    app = stage.tts["tts-app"][0]
    status, err, resp = await post(http, f"{url}/tts/tts-app", body,
                                   **{"X-Downlink-Apikey": TTS_KEY})
    try:
        expected = parse_message(body, app, received_ts_ms=0)
    except InvalidInput as exc:
        if exc.reason == "no_decoded_payload":
            assert status == 202
            rows = await redis.xrange(keys.dead)
            assert len(rows) == 1
            dead = decode_dead(rows[0][1][b"d"])
            assert (dead.reason, dead.raw, dead.stage) == (exc.reason, body, "ingest-http")
        else:
            assert status == 400
            assert err is not None
            assert (err["error"]["reason"], err["error"]["field"]) == (exc.reason, exc.field)
        assert await redis.xlen(keys.stream("uplinks")) == 0
        return
    if expected is None:
        assert status == 202
        assert await redis.xlen(keys.stream("uplinks")) == 0
        return
    assert status == 200
    up = await stored(redis, keys, resp.headers["X-Entry-Id"])
    assert up == parse_message(body, app, received_ts_ms=up.received_ts_ms)
    assert (up.source, up.integration, up.kind) == ("tts", "tts-app", expected.kind)
    assert up.device == expected.device and up.values == expected.values


async def test_tts_webhooks_need_webhook_auth_configured(url: str,
                                                         http: aiohttp.ClientSession) -> None:
    status, err, _ = await post(http, f"{url}/tts/mqtt-only", b"{}")
    assert status == 404 and err is not None
    assert err["error"]["reason"] == "unknown_integration"


# --- the emulator sends, exactly as Particle does ------------------------------------------------


async def test_blynk_blueprint_webhook_pointed_at_the_bridge(
    url: str, redis: Redis, keys: Keys, fixture_path: Callable[[str], Path],
) -> None:
    hook = load_webhook(fixture_path("particle/particle-webhook-template-blynk.json").read_bytes(),
                        url=f"{url}/particle/tempmon")
    data = {"t": TOKEN, "v14": 123456, "v15": 3.14159, "v16": 1, "v17": 0}
    event = make_event("e00fce68aaaabbbbccccdddd", "blynk_https_get", data,
                       published_at="2024-05-13T10:55:40.306Z")
    async with aiohttp.ClientSession() as session:
        done = await deliver(session, hook, event, retry_delays_s=())
    assert done.ok and done.statuses == [200]
    rows = await redis.xrange(keys.stream("uplinks"))
    up = decode_uplink(rows[0][1][b"d"])
    assert up.token == TOKEN
    assert up.values == {"V6": "2024-05-13T10:55:40.306Z", "V14": "123456", "V15": "3.14159",
                         "V16": "1", "V17": "0"}
    assert up.device.startswith("blynk-") and TOKEN not in up.device


@pytest.mark.parametrize("fmt", ["form", "json", "product", "custom", "body"])
async def test_fleet_formats_arrive_with_their_values(
    fmt: str, url: str, redis: Redis, keys: Keys,
) -> None:
    fleet = ParticleFleet(f"{url}/particle/hdr", 3, 1000.0, fmt=fmt, product_id=30301,
                          auth={"X-Particle-Secret": HEADER_SECRET}, retry_delays_s=())
    stats = await fleet.run(count=6)
    assert (stats.sent, stats.delivered, stats.dropped) == (6, 6, 0)
    ups = [decode_uplink(f[b"d"]) for _, f in await redis.xrange(keys.stream("uplinks"))]

    def sent_values(data: str) -> dict[str, Any]:
        decoded = json.loads(data)
        # a json template spreads the data's fields as strings; the others unpack the data
        return {k: _js_text(v) for k, v in decoded.items()} if fmt == "custom" else decoded

    sent = sorted((d.event.device_id, sorted(sent_values(d.event.data).items()))
                  for d in fleet.deliveries)
    got = sorted((u.device, sorted(u.values.items())) for u in ups)
    assert got == sent
    assert sorted(Counter(u.device for u in ups).values()) == [2, 2, 2]
    for up in ups:
        assert (up.integration, up.source, up.kind) == ("hdr", "particle", "uplink")
        assert up.device_meta["event"] == "sensor"
        if fmt == "product":
            assert up.device_meta == {"event": "sensor", "userid": "5e6ad98d764c6d00014be177",
                                      "fw_version": "3", "public": "false",
                                      "product_id": "30301"}
        if fmt in ("product", "body"):  # the template sends PARTICLE_EVENT_ID
            assert up.event_id.startswith(f"particle:hdr:{up.device}:")


async def test_fleet_retries_when_the_bridge_refuses(redis: Redis, prefix: str,
                                                     keys: Keys) -> None:
    """Particle retries refused deliveries (here: backlog 503); once taken, the retry lands."""
    stage = make_stage(redis, prefix, high_water=0)
    stream = keys.stream("uplinks")
    await redis.xgroup_create(stream, GROUP_TRANSFORM, id="0", mkstream=True)
    await redis.xadd(stream, {b"d": b"x"})
    before = counter("bb_rejected_total", source="particle", reason="backlog")
    async with serving(stage) as base:
        await wait_until(lambda: _is(stage.backlog.refresh(), 1), what="a backlog of 1")
        fleet = ParticleFleet(f"{base}/particle/tempmon", 1, 100.0, retry_delays_s=(0.05,) * 100)
        run = asyncio.create_task(fleet.run(count=1))

        async def refused_once() -> bool:
            return counter("bb_rejected_total", source="particle", reason="backlog") > before

        await wait_until(refused_once, what="a backlog refusal")
        stage.cfg.backlog_high_water = 10
        stats = await run
    assert stats.delivered == 1 and stats.retries >= 1
    assert stats.statuses[503] >= 1 and stats.statuses[200] == 1
    assert await redis.xlen(stream) == 2


async def _is(aw: Any, want: Any) -> bool:
    return bool(await aw == want)


# --- refusals ------------------------------------------------------------------------------------


async def test_header_auth(url: str, http: aiohttp.ClientSession, redis: Redis, keys: Keys,
                           caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    body = b'{"coreid":"d1","v":1}'
    wrong = "not-the-secret-" + HEADER_SECRET[::-1]
    status, err, _ = await post(http, f"{url}/particle/hdr", body,
                                **{"X-Particle-Secret": wrong})
    assert status == 401 and err is not None
    assert err["error"] == {"reason": "unauthorized", "field": "X-Particle-Secret",
                            "message": "header X-Particle-Secret does not match"}
    status, err, _ = await post(http, f"{url}/particle/hdr", body)
    assert status == 401 and err is not None and "missing" in err["error"]["message"]
    assert await redis.xlen(keys.stream("uplinks")) == 0
    status, _, _ = await post(http, f"{url}/particle/hdr", body,
                              **{"X-Particle-Secret": HEADER_SECRET})
    assert status == 200
    assert "refused a request" in caplog.text
    assert HEADER_SECRET not in caplog.text and wrong not in caplog.text
    assert HEADER_SECRET[-4:] not in caplog.text


async def test_basic_auth(url: str, http: aiohttp.ClientSession,
                          caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    body = b'{"coreid":"d1","v":1}'

    def basic(user: str, password: str) -> str:
        return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()

    for header in (basic("particle", "wrong-" + BASIC_PASSWORD), basic("other", BASIC_PASSWORD),
                   "Basic !!!", "Bearer x"):
        status, err, resp = await post(http, f"{url}/particle/basic", body,
                                       Authorization=header)
        assert status == 401, header
        assert err is not None and err["error"]["field"] == "Authorization"
        assert resp.headers["WWW-Authenticate"].startswith("Basic")
    status, _, _ = await post(http, f"{url}/particle/basic", body,
                              Authorization=basic("particle", BASIC_PASSWORD))
    assert status == 200
    assert BASIC_PASSWORD not in caplog.text
    assert base64.b64encode(f"particle:{BASIC_PASSWORD}".encode()).decode() not in caplog.text


async def test_tts_header_auth(url: str, http: aiohttp.ClientSession,
                               fixture_path: Callable[[str], Path]) -> None:
    body = fixture_path("tts/tts-join-01.json").read_bytes()
    status, _, _ = await post(http, f"{url}/tts/tts-app", body, **{"X-Downlink-Apikey": "nope"})
    assert status == 401
    status, _, _ = await post(http, f"{url}/tts/tts-app", body, **{"X-Downlink-Apikey": TTS_KEY})
    assert status == 200


async def test_too_large_wrong_type_unknown(url: str, http: aiohttp.ClientSession,
                                            redis: Redis, keys: Keys) -> None:
    big = b'{"coreid":"d","v":"' + b"x" * 5000 + b'"}'
    before = counter("bb_rejected_total", source="particle", reason="too_large")
    status, err, _ = await post(http, f"{url}/particle/tempmon", big)
    assert status == 413 and err is not None and err["error"]["reason"] == "too_large"

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: caught while reading
        for i in range(0, len(big), 1000):
            yield big[i:i + 1000]

    async with http.post(f"{url}/particle/tempmon", data=chunks(),
                         headers={"Content-Type": JSON}) as resp:
        assert resp.status == 413
    assert counter("bb_rejected_total", source="particle", reason="too_large") == before + 2

    status, err, _ = await post(http, f"{url}/particle/tempmon", b"<a/>", "application/xml")
    assert status == 415 and err is not None
    assert err["error"]["field"] == "Content-Type"
    status, err, _ = await post(http, f"{url}/tts/tts-app", b"a=1", FORM,
                                **{"X-Downlink-Apikey": TTS_KEY})
    assert status == 415

    status, err, _ = await post(http, f"{url}/particle/nope", b"{}")
    assert status == 404 and err is not None
    assert err["error"] == {"reason": "unknown_integration", "field": "integration",
                            "message": "no Particle integration named 'nope'"}
    status, err, _ = await post(http, f"{url}/elsewhere", b"{}")
    assert status == 404 and err is not None and err["error"]["reason"] == "not_found"
    async with http.delete(f"{url}/particle/tempmon") as resp:
        assert resp.status == 405
    assert await redis.xlen(keys.stream("uplinks")) == 0


async def test_backlog_past_high_water_gives_503_with_retry_after(
    redis: Redis, prefix: str, keys: Keys, http: aiohttp.ClientSession,
) -> None:
    stage = make_stage(redis, prefix, high_water=3)
    stage.backlog.interval_s = 0.05
    stream = keys.stream("uplinks")
    await redis.xgroup_create(stream, GROUP_TRANSFORM, id="0", mkstream=True)
    async with serving(stage) as base:
        body = b'{"coreid":"d","v":1}'
        for _ in range(4):
            status, _, _ = await post(http, f"{base}/particle/tempmon", body)
            assert status == 200  # the cached lag is read once a second, never per request

        async def refused() -> Any:
            status, err, resp = await post(http, f"{base}/particle/tempmon", body)
            return (status, err, resp) if status == 503 else None

        status, err, resp = await wait_until(refused, what="a 503")
        assert resp.headers["Retry-After"].isdigit()
        assert err is not None and err["error"]["reason"] == "backlog"
        length = await redis.xlen(stream)
        # transform catches up: input is taken again
        entries = await redis.xreadgroup(GROUP_TRANSFORM, "c", {stream: ">"}, count=100)
        await redis.xack(stream, GROUP_TRANSFORM, *[i for i, _ in entries[0][1]])

        async def accepted() -> bool:
            status, _, _ = await post(http, f"{base}/particle/tempmon", body)
            return status == 200

        await wait_until(accepted, what="a 200 again")
        assert await redis.xlen(stream) == length + 1


async def test_redis_down_gives_503_not_500(prefix: str, http: aiohttp.ClientSession) -> None:
    from pipeline.streams import connect

    dead = connect("redis://127.0.0.1:1/0", socket_connect_timeout=0.2)
    stage = make_stage(dead, prefix)
    async with serving(stage) as base:
        status, err, resp = await post(http, f"{base}/particle/tempmon", b'{"coreid":"d"}')
        assert status == 503 and err is not None and err["error"]["reason"] == "redis_unavailable"
        assert "Retry-After" in resp.headers
        async with http.get(f"{base}/readyz") as r:
            assert r.status == 503
        async with http.get(f"{base}/healthz") as r:
            assert r.status == 200
    await dead.aclose()


# --- status, probes, metrics ---------------------------------------------------------------------


async def test_integration_status_connected_then_broken_then_connected(
    url: str, http: aiohttp.ClientSession, redis: Redis, keys: Keys,
) -> None:
    board = StatusBoard(redis, keys)
    body = b'{"coreid":"d1","v":1}'
    good = {"X-Particle-Secret": HEADER_SECRET}
    assert (await post(http, f"{url}/particle/hdr", body, **good))[0] == 200

    async def state(name: str) -> State | None:
        s = await board.get("particle", name)
        return s.state if s else None

    await wait_until(lambda: _is(state("hdr"), State.CONNECTED), what="Connected")
    for _ in range(3):
        assert (await post(http, f"{url}/particle/hdr", b"{", **good))[0] == 400
    await wait_until(lambda: _is(state("hdr"), State.BROKEN), what="Broken")
    broken = await board.get("particle", "hdr")
    assert broken is not None and broken.error_kind == "protocol"
    assert broken.last_error is not None and "400" in broken.last_error
    assert HEADER_SECRET not in broken.last_error
    assert (await post(http, f"{url}/particle/hdr", body, **good))[0] == 200
    await wait_until(lambda: _is(state("hdr"), State.CONNECTED), what="Connected")

    # failures before any success: Not Connected; bad bodies are a protocol error
    for _ in range(3):
        assert (await post(http, f"{url}/particle/fresh", b"{", **good))[0] == 400
    await wait_until(lambda: _is(state("fresh"), State.NOT_CONNECTED), what="Not Connected")
    fresh = await board.get("particle", "fresh")
    assert fresh is not None and fresh.error_kind == "protocol"

    board_states = {(i.kind, i.name): i.state for i in await board.all()}
    assert board_states[("particle", "hdr")] is State.CONNECTED
    assert board_states[("particle", "fresh")] is State.NOT_CONNECTED


async def test_probes_and_metrics(url: str, http: aiohttp.ClientSession, stage: IngestHttp,
                                  redis: Redis, keys: Keys) -> None:
    """The webhook port answers the probes that reveal nothing; /status and /metrics (integration
    errors, Blynk URLs, replica names) are on the metrics port only."""
    async with http.get(f"{url}/healthz") as resp:
        assert resp.status == 200
    async with http.get(f"{url}/readyz") as resp:
        assert resp.status == 200 and (await resp.json())["ready"] is True
    for path in ("/status", "/metrics"):
        async with http.get(f"{url}{path}") as resp:
            assert resp.status == 404, path
    assert (await post(http, f"{url}/particle/tempmon", b'{"coreid":"d","v":1}'))[0] == 200

    server = MetricsServer(redis, StatusBoard(redis, keys), [stage])
    metrics_url = await server.start("127.0.0.1", 0)
    try:
        async with http.get(f"{metrics_url}/metrics") as resp:
            assert resp.status == 200
            text = await resp.text()
        assert 'bb_ingested_total{integration="tempmon",kind="uplink",source="particle"}' in text
        await wait_until(lambda: _is(_state(redis, keys, "tempmon"), State.CONNECTED),
                         what="Connected")
        async with http.get(f"{metrics_url}/status") as resp:
            assert resp.status == 200
            page = await resp.json()
        states = {(i["kind"], i["name"]): i["state"] for i in page["integrations"]}
        assert states[("particle", "tempmon")] == "Connected"
        assert page["uplinks"]["group"] == GROUP_TRANSFORM
        assert page["uplinks"]["high_water"] == 1_000_000
        for path in ("/healthz", "/readyz"):
            async with http.get(f"{metrics_url}{path}") as resp:
                assert resp.status == 200, path
    finally:
        await server.close()


async def _state(redis: Redis, keys: Keys, name: str) -> State | None:
    s = await StatusBoard(redis, keys).get("particle", name)
    return s.state if s else None


# --- graceful stop -------------------------------------------------------------------------------


class GatedAppender(StreamWriter):
    """The stage's real appender, held at a gate: a request stays in flight until it opens."""

    def __init__(self, redis: Redis) -> None:
        super().__init__(redis)
        self.entered = asyncio.Event()
        self.gate = asyncio.Event()

    async def add(self, stream: str, data: bytes) -> str:
        self.entered.set()
        await self.gate.wait()
        return await super().add(stream, data)


async def test_graceful_stop_finishes_in_flight_requests(redis: Redis, prefix: str,
                                                         keys: Keys) -> None:
    port = free_port()
    stage = make_stage(redis, prefix, port=port)
    stage.cfg.host = "127.0.0.1"
    writer = stage.appender = GatedAppender(redis)
    threshold = gc.get_threshold()
    await stage.startup()
    assert gc.get_threshold()[0] >= GC_THRESHOLD0  # serving: young collections less often
    stop = asyncio.Event()
    loop_task = asyncio.create_task(stage.main_loop(stop))
    body = b'{"coreid":"d","v":1}'
    reader, conn = await asyncio.open_connection("127.0.0.1", port)
    conn.write(b"POST /particle/tempmon HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
               b"\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    await conn.drain()
    await within(writer.entered.wait())
    stop.set()

    async def refusing() -> bool:
        try:
            _, w = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            return True
        w.close()
        return False

    # no new connections while the old request finishes
    await wait_until(refusing, what="the listener closed")
    assert not loop_task.done() and stage.in_flight == 1
    writer.gate.set()
    head = await within(reader.readuntil(b"\r\n\r\n"))
    assert head.startswith(b"HTTP/1.1 200")
    conn.close()
    await within(loop_task)
    await stage.shutdown()
    assert await redis.xlen(keys.stream("uplinks")) == 1
    assert gc.get_threshold() == threshold  # restored at stop


async def _answer(reader: asyncio.StreamReader) -> tuple[bytes, dict[str, str]]:
    """Status line and headers of one answer with an empty body (read off a raw connection)."""
    head = await within(reader.readuntil(b"\r\n\r\n"))
    status, *lines = head[:-4].split(b"\r\n")
    fields = dict(line.decode().split(": ", 1) for line in lines)
    return status, fields


async def test_accepted_answer_on_raw_connections(url: str, redis: Redis, keys: Keys) -> None:
    """The 200 of a stored webhook, as bytes on the wire: keep-alive HTTP/1.1 answers carry
    the ids, an empty body and aiohttp's usual headers, and the connection serves the next
    request; HTTP/1.0 and ``Connection: close`` requests get 200 and a closed connection."""
    host, port = url.removeprefix("http://").split(":")

    def request(version: bytes, i: int, extra: bytes = b"") -> bytes:
        body = b'{"coreid":"e00fce68aa","data":"%d","event":"t"}' % i
        return (b"POST /particle/tempmon " + version + b"\r\nHost: x\r\n" + extra
                + b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body)
                + body)

    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        for i in range(3):  # one keep-alive connection, one request after the other
            writer.write(request(b"HTTP/1.1", i))
            status, fields = await _answer(reader)
            assert status == b"HTTP/1.1 200 OK"
            assert set(fields) == {"X-Entry-Id", "X-Event-Id", "Content-Length", "Date",
                                   "Server"}
            assert fields["Content-Length"] == "0"
            assert fields["Date"].endswith(" GMT") and "aiohttp" in fields["Server"]
            up = await stored(redis, keys, fields["X-Entry-Id"])
            assert (up.event_id, up.values) == (fields["X-Event-Id"], {"t": str(i)})
    finally:
        writer.close()
    for version, extra in ((b"HTTP/1.0", b""), (b"HTTP/1.1", b"Connection: close\r\n")):
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            writer.write(request(version, 9, extra))
            status, fields = await _answer(reader)
            assert status.split(b" ", 1)[1] == b"200 OK", version
            await stored(redis, keys, fields["X-Entry-Id"])
            assert await within(reader.read()) == b""  # closed by the server
        finally:
            writer.close()


async def test_routing_without_a_router(url: str, http: aiohttp.ClientSession) -> None:
    """The dict dispatch answers as aiohttp's router did: 404 for no route, 405 with Allow."""
    for path in ("/particle/", "/particle/tempmon/extra", "/tts/", "/", "/healthz/x"):
        status, err, _ = await post(http, f"{url}{path}", b"{}")
        assert status == 404 and err is not None, path
        assert err["error"]["reason"] == "not_found"
    async with http.patch(f"{url}/particle/tempmon") as resp:
        assert resp.status == 405 and resp.headers["Allow"] == "GET, POST, PUT"
    async with http.get(f"{url}/tts/tts-app") as resp:
        assert resp.status == 405 and resp.headers["Allow"] == "POST"
    async with http.post(f"{url}/healthz") as resp:
        assert resp.status == 405
    async with http.head(f"{url}/healthz") as resp:
        assert resp.status == 200


# --- hostile and odd input (issue 10), end to end ------------------------------------------------


async def test_the_url_names_the_device_and_future_times_are_clamped_and_counted(
    url: str, http: aiohttp.ClientSession, redis: Redis, keys: Keys
) -> None:
    """The README's custom template: ?coreid={{{PARTICLE_DEVICE_ID}}} in the URL, the device's
    JSON as the body. A body naming another device, or dated 9999, changes neither."""
    before = counter("bb_event_time_clamped_total", source="particle", integration="tempmon")
    body = b'{"coreid":"e00fce68000000000000beef","published_at":"9999-12-31T23:59:59Z","t":1}'
    async with http.post(f"{url}/particle/tempmon", data=body,
                         params={"coreid": "e00fce68ece1d3d21a73dcc9"},
                         headers={"Content-Type": JSON}) as resp:
        assert resp.status == 200, await resp.text()
        up = await stored(redis, keys, resp.headers["X-Entry-Id"])
    assert up.device == "e00fce68ece1d3d21a73dcc9"
    assert (up.event_ts_ms, up.event_ts_clamped) == (up.received_ts_ms, True)
    assert counter("bb_event_time_clamped_total", source="particle",
                   integration="tempmon") == before + 1


@pytest.mark.parametrize("device", ["d\r\nX-Evil: 1", "d" * 65, "d\u202e"])  # under 4 KB
async def test_odd_device_ids_get_a_400_naming_the_field(
    device: str, url: str, http: aiohttp.ClientSession, redis: Redis, keys: Keys
) -> None:
    body = json.dumps({"event": "e", "data": "1", "device_id": device}).encode()
    status, err, _ = await post(http, f"{url}/particle/tempmon", body)
    assert status == 400 and err is not None
    assert (err["error"]["reason"], err["error"]["field"]) == ("invalid_field", "device_id")
    assert await redis.xlen(keys.stream("uplinks")) == 0


async def test_a_tts_event_export_is_taken_as_its_uplink(
    url: str, http: aiohttp.ClientSession, redis: Redis, keys: Keys,
    fixture_path: Callable[[str], Path],
) -> None:
    up = json.loads(fixture_path("tts/tts-uplink-02.json").read_bytes())
    export = {"name": "as.up.data.forward", "time": "2025-01-01T00:00:00Z",
              "identifiers": [{"device_ids": up["end_device_ids"]}],
              "data": {"@type": "type.googleapis.com/ttn.lorawan.v3.ApplicationUp", **up},
              "correlation_ids": up["correlation_ids"], "unique_id": "01JEXPORT"}
    status, err, resp = await post(http, f"{url}/tts/tts-app", json.dumps(export).encode(),
                                   **{"X-Downlink-Apikey": TTS_KEY})
    assert status == 200, err
    got = await stored(redis, keys, resp.headers["X-Entry-Id"])
    assert got.device == up["end_device_ids"]["device_id"] and got.values


async def test_double_brace_templates_arrive_unescaped(url: str, redis: Redis,
                                                       keys: Keys) -> None:
    """The Console's JSON template of Particle's InfluxData tutorial uses ``{{var}}``, which
    HTML-escapes what it inserts; the event data (JSON) must still unpack, text read as sent."""
    hook = load_webhook(json.dumps({
        "event": "env", "url": f"{url}/particle/tempmon", "requestType": "POST",
        "noDefaults": True,
        "query": {"coreid": "{{{PARTICLE_DEVICE_ID}}}"},
        "json": {"name": "{{PARTICLE_EVENT_NAME}}", "data": "{{PARTICLE_EVENT_VALUE}}",
                 "published_at": "{{PARTICLE_PUBLISHED_AT}}", "note": "{{note}}"},
    }))
    data = {"t": 19, "note": "<b> & \"q\" 's'"}
    event = make_event("e00fce68aaaabbbbccccdddd", "env", data,
                       published_at="2024-05-13T10:55:40.306Z")
    async with aiohttp.ClientSession() as session:
        done = await deliver(session, hook, event, retry_delays_s=())
    assert done.ok and done.statuses == [200]
    (row,) = await redis.xrange(keys.stream("uplinks"))
    up = decode_uplink(row[1][b"d"])
    assert up.values == {"t": 19, "note": "<b> & \"q\" 's'"}
    assert up.device == "e00fce68aaaabbbbccccdddd"
