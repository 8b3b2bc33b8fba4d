"""ingest-http against hostile peers, over real sockets: slow heads and bodies, too many
connections, bad credentials, malformed requests, a backlog that is large in bytes.

Deadlines here are the stage's own (set small); the test only waits "within a generous
deadline" for what must happen, never measures a duration.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import msgspec
import pytest

from pipeline.context import Context
from pipeline.keys import Keys
from pipeline.status import State, StatusBoard
from pipeline.streams import Redis, StreamWriter
from tests.test_ingest_http import HEADER_SECRET, counter, make_config, post, serving
from tests.wait import wait_until, within
from workers.ingest_http import IngestHttp, build

GOOD = {"X-Particle-Secret": HEADER_SECRET}
BODY = b'{"coreid":"d1","v":1}'


def guarded_stage(redis: Redis, prefix: str, **ingest: Any) -> IngestHttp:
    cfg = make_config(prefix)
    cfg = msgspec.structs.replace(
        cfg, ingest_http=msgspec.structs.replace(cfg.ingest_http, **ingest))
    ctx = Context(config=cfg, redis=redis, keys=Keys(prefix), consumer="test",
                  writer=StreamWriter(redis))
    return build(ctx)


@contextlib.asynccontextmanager
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    # A fresh connection per request: each webhook is a new connection from the same peer.
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s:
        yield s


async def closed_by_server(reader: asyncio.StreamReader) -> bytes:
    """Everything the server sent until it closed the connection (fails if it keeps it open)."""
    try:
        return await within(reader.read(), "the server to close the connection")
    except ConnectionResetError:
        return b""


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


async def test_slow_heads_are_closed_and_webhooks_still_pass(redis: Redis, prefix: str) -> None:
    stage = guarded_stage(redis, prefix, header_timeout_s=0.5, max_connections_per_peer=40)
    before = counter("bb_rejected_total", source="-", reason="header_timeout")
    async with serving(stage) as url:
        port = _port(url)
        slow: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        for i in range(30):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            if i % 2:  # half send part of a head, half send nothing at all
                writer.write(b"POST /particle/hdr HTTP/1.1\r\nHost: x\r\n")
                await writer.drain()
            slow.append((reader, writer))

        async def trickle(writer: asyncio.StreamWriter) -> None:
            # The slowloris way: a header line now and then keeps the head unfinished.
            with contextlib.suppress(ConnectionError):
                writer.write(b"POST /particle/hdr HTTP/1.1\r\n")
                while not writer.is_closing():
                    writer.write(b"X-Pad: 1\r\n")
                    await writer.drain()
                    await asyncio.sleep(0.05)

        t_reader, t_writer = await asyncio.open_connection("127.0.0.1", port)
        trickler = asyncio.create_task(trickle(t_writer))
        # While they are open, a genuine webhook gets through.
        async with session() as http:
            assert (await post(http, f"{url}/particle/hdr", BODY, **GOOD))[0] == 200
        for reader, _ in [*slow, (t_reader, t_writer)]:
            assert await closed_by_server(reader) == b""
        trickler.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await trickler
        for _, writer in [*slow, (t_reader, t_writer)]:
            writer.close()
        assert counter("bb_rejected_total", source="-", reason="header_timeout") - before >= 31
        await wait_until(lambda: _true(not stage.guard.open))  # every slot given back


async def test_a_stalled_head_after_a_finished_request_is_closed(redis: Redis,
                                                                prefix: str) -> None:
    # The head deadline restarts at the first byte of the next request on a kept-alive
    # connection (one timer per connection re-arms itself; none is set per request).
    stage = guarded_stage(redis, prefix, header_timeout_s=0.5)
    before = counter("bb_rejected_total", source="-", reason="header_timeout")
    async with serving(stage) as url:
        reader, writer = await asyncio.open_connection("127.0.0.1", _port(url))
        request = (b"POST /particle/hdr HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                   b"\r\nX-Particle-Secret: " + HEADER_SECRET.encode() + b"\r\nContent-Length: "
                   + str(len(BODY)).encode() + b"\r\n\r\n" + BODY)
        for _ in range(3):  # finished requests on the same connection: all answered
            writer.write(request)
            head = await within(reader.readuntil(b"\r\n\r\n"), "an answer")
            assert head.startswith(b"HTTP/1.1 200")
            length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
            await reader.readexactly(length)
        writer.write(b"POST /particle/hdr HTTP/1.1\r\nHost: x\r\n")  # and a head that stalls
        await writer.drain()
        assert await closed_by_server(reader) == b""
        writer.close()
    assert counter("bb_rejected_total", source="-", reason="header_timeout") - before == 1


async def _true(value: bool) -> bool:
    return value


async def test_the_per_peer_cap_refuses_one_more(redis: Redis, prefix: str) -> None:
    stage = guarded_stage(redis, prefix, header_timeout_s=60.0, max_connections_per_peer=5)
    before = counter("bb_rejected_total", source="-", reason="too_many_connections")
    async with serving(stage) as url:
        port = _port(url)
        held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(5)]
        for reader, writer in held:  # each one answered once: admitted, now idle keep-alive
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            head = await within(reader.readuntil(b"\r\n\r\n"), "an answer")
            assert head.split(b" ", 2)[1] == b"200"
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        assert await closed_by_server(reader) == b""  # closed at once, nothing answered
        writer.close()
        assert counter("bb_rejected_total", source="-", reason="too_many_connections") > before
        # One of the five goes away: a webhook gets its slot.
        held.pop()[1].close()
        async with session() as http:
            assert await wait_until(lambda: _webhook_status(http, url)) == 200
        for _, w in held:
            w.close()


async def _webhook_status(http: aiohttp.ClientSession, url: str) -> int | None:
    try:
        return (await post(http, f"{url}/particle/hdr", BODY, **GOOD))[0]
    except aiohttp.ClientConnectionError:
        return None  # the server has not seen the closed connection go yet


SLOW_BODY_HEAD = (b"POST /particle/hdr HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                  b"\r\nX-Particle-Secret: " + HEADER_SECRET.encode() +
                  b"\r\nContent-Length: 1000\r\n\r\n{\"coreid\":")


async def test_a_slow_body_gets_408_and_the_connection_closed(redis: Redis, prefix: str) -> None:
    stage = guarded_stage(redis, prefix, body_timeout_s=0.5, lingering_s=0.2)
    async with serving(stage) as url:
        reader, writer = await asyncio.open_connection("127.0.0.1", _port(url))
        writer.write(SLOW_BODY_HEAD)
        await writer.drain()
        answer = await closed_by_server(reader)
        writer.close()
    assert answer.split(b" ", 2)[1] == b"408", answer[:200]
    assert b'"body_timeout"' in answer


async def test_a_peer_still_trickling_its_body_after_the_408_is_cut_off(
    redis: Redis, prefix: str
) -> None:
    # After the 408 the server drains the unread body for `lingering_s` (so the client reads
    # the answer, not a reset), then closes even though the peer keeps sending.
    stage = guarded_stage(redis, prefix, body_timeout_s=0.5, lingering_s=0.2)
    async with serving(stage) as url:
        reader, writer = await asyncio.open_connection("127.0.0.1", _port(url))
        writer.write(SLOW_BODY_HEAD)
        await writer.drain()
        head = await within(reader.readuntil(b"\r\n\r\n"), "the 408")
        assert head.split(b" ", 2)[1] == b"408", head

        async def trickle() -> None:
            with contextlib.suppress(ConnectionError):
                while not writer.is_closing():
                    writer.write(b" ")
                    await writer.drain()
                    await asyncio.sleep(0.02)

        trickler = asyncio.create_task(trickle())
        await closed_by_server(reader)
        trickler.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await trickler
        writer.close()


async def test_bad_credentials_never_change_an_integration_status(
    redis: Redis, prefix: str, keys: Keys,
) -> None:
    stage = guarded_stage(redis, prefix)
    board = StatusBoard(redis, keys)
    before = counter("bb_rejected_total", source="particle", reason="unauthorized")
    async with serving(stage) as url, session() as http:
        assert (await post(http, f"{url}/particle/hdr", BODY, **GOOD))[0] == 200
        await wait_until(lambda: _has_state(board, "hdr", State.CONNECTED))
        for _ in range(10):
            bad = {"X-Particle-Secret": "guess"}
            assert (await post(http, f"{url}/particle/hdr", BODY, **bad))[0] == 401
        await stage.status.drain()  # any status write the refusals caused has landed
        status = await board.get("particle", "hdr")
        assert status is not None and status.state is State.CONNECTED
    assert counter("bb_rejected_total", source="particle", reason="unauthorized") - before == 10


async def _has_state(board: StatusBoard, name: str, state: State) -> bool:
    s = await board.get("particle", name)
    return s is not None and s.state is state


async def test_401s_are_rate_limited_per_peer_and_logged_once(
    redis: Redis, prefix: str, caplog: pytest.LogCaptureFixture,
) -> None:
    stage = guarded_stage(redis, prefix, auth_failures_per_minute=3)
    caplog.set_level(logging.WARNING, logger="blynk_bridge.ingest_http")
    bad = {"X-Particle-Secret": "guess"}
    async with serving(stage) as url, session() as http:
        for _ in range(3):
            assert (await post(http, f"{url}/particle/hdr", BODY, **bad))[0] == 401
        for _ in range(5):
            status, payload, resp = await post(http, f"{url}/particle/hdr", BODY, **bad)
            assert status == 429 and int(resp.headers["Retry-After"]) >= 1
            assert payload is not None
            assert payload["error"]["reason"] == "too_many_auth_failures"
        # The peer's genuine webhooks still pass: credentials are checked first.
        assert (await post(http, f"{url}/particle/hdr", BODY, **GOOD))[0] == 200
    refusals = [r for r in caplog.records if "refused a request" in r.getMessage()]
    assert len(refusals) == 1, [r.getMessage() for r in refusals]


async def test_a_malformed_request_echoes_no_credentials(
    redis: Redis, prefix: str, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    stage = guarded_stage(redis, prefix)
    secret = b"SeCrEtBasicCreds0123456789"
    async with serving(stage) as url:
        reader, writer = await asyncio.open_connection("127.0.0.1", _port(url))
        writer.write(b"POST /particle/basic HTTP/1.1\r\nHost: x\r\nAuthorization: Basic " + secret
                     + b"\x01\x02\r\nContent-Length: 2\r\n\r\n{}")
        await writer.drain()
        answer = await closed_by_server(reader)
        writer.close()
    assert answer.split(b" ", 2)[1] == b"400", answer[:200]
    assert secret[:8] not in answer
    assert secret[:8].decode() not in caplog.text
    assert b'"malformed_request"' in answer


async def test_a_backlog_large_in_bytes_gets_503(redis: Redis, prefix: str, keys: Keys) -> None:
    stage = guarded_stage(redis, prefix, backlog_high_water_bytes=64 * 1024)
    for _ in range(20):  # ~80 KB waiting in the uplinks stream, far below the entry mark
        await redis.xadd(keys.stream("uplinks"), {"d": b"x" * 4000})
    await stage.backlog.refresh()
    assert stage.backlog.total == 20 and stage.backlog.bytes > 64 * 1024
    async with serving(stage) as url, session() as http:
        status, payload, resp = await post(http, f"{url}/particle/hdr", BODY, **GOOD)
    assert status == 503 and "Retry-After" in resp.headers
    assert payload is not None and payload["error"]["reason"] == "backlog"
    assert "bytes" in payload["error"]["message"]
