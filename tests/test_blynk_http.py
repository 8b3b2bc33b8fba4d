"""The lean HTTP/1.1 client against real sockets: scripted raw servers and an aiohttp app."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from aiohttp import web

from pipeline.blynk.http import ConnectError, ConnectionLost, HttpClient, ProtocolError
from tests.conftest import closed_port, serve_app
from tests.wait import within

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, int], Awaitable[None]]


@asynccontextmanager
async def raw_server(handler: Handler,
                     ssl_ctx: ssl.SSLContext | None = None) -> AsyncIterator[tuple[str, list[int]]]:
    """A TCP server calling ``handler(reader, writer, connection_number)``; yields base URL and
    a list that counts requests per connection."""
    per_conn: list[int] = []

    async def on_conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        per_conn.append(0)
        try:
            await handler(reader, writer, len(per_conn) - 1)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(on_conn, "127.0.0.1", 0, ssl=ssl_ctx)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"{'https' if ssl_ctx else 'http'}://127.0.0.1:{port}", per_conn
    finally:
        server.close()
        await server.wait_closed()


async def read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            await reader.readexactly(int(line.split(b":")[1]))
    return head


def scripted(*answers: bytes, close_after: bool = False) -> Handler:
    """Answer the requests of every connection with ``answers`` in turn."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        for answer in answers:
            await read_request(reader)
            for part in answer.split(b"|"):  # "|" marks a separate write
                writer.write(part)
                await writer.drain()
        if not close_after:
            await reader.read()

    return handler


async def test_keep_alive_content_length_and_chunked_split_across_writes() -> None:
    answers = (
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.1 400 Bad Request\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel|lo\r\n"
        b"6;ext=1\r\n world\r\n0\r\nX-Trailer: 1\r\n\r\n",
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n",
        b"HTTP/1.1 429 Too Many|\r\nRetry-After: 7\r\ncontent-length: 0\r\n\r\n",
    )
    async with raw_server(scripted(*answers)) as (url, conns):
        client = HttpClient(limit=4, timeout_s=5)
        try:
            r1 = await client.request(url, "/a?x=1")
            r2 = await client.request(url, "/b")
            r3 = await client.request(url, "/c")
            r4 = await client.request(url, "/d")
        finally:
            await client.close()
    assert (r1.status, r1.body) == (200, b"ok")
    assert (r2.status, r2.text()) == (400, "hello world")
    assert (r3.status, r3.body) == (204, b"")
    assert (r4.status, r4.headers["retry-after"]) == (429, "7")
    assert len(conns) == 1  # one keep-alive connection for all four


async def test_connection_close_and_body_until_eof_are_not_reused() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_request(reader)
        if n == 0:
            writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 1\r\n\r\na")
        else:
            writer.write(b"HTTP/1.1 200 OK\r\n\r\nuntil the end")
        await writer.drain()

    async with raw_server(handler) as (url, conns):
        client = HttpClient(timeout_s=5)
        try:
            r1 = await client.request(url, "/")
            r2 = await client.request(url, "/")
            r3 = await client.request(url, "/")
        finally:
            await client.close()
    assert (r1.body, r2.body, r3.body) == (b"a", b"until the end", b"until the end")
    assert len(conns) == 3


async def test_a_get_on_a_connection_closed_while_idle_is_retried_once_a_post_is_not() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        await read_request(reader)  # the next request on this connection: closed unanswered
        writer.transport.abort()

    async with raw_server(handler) as (url, conns):
        client = HttpClient(timeout_s=5)
        try:
            assert (await client.request(url, "/")).body == b"ok"
            assert (await client.request(url, "/")).body == b"ok"  # retried on a new connection
            assert len(conns) == 2
            with pytest.raises(ConnectionLost):
                await client.request(url, "/", method="POST", body=b"[]")
        finally:
            await client.close()


async def test_limit_timeout_connect_and_protocol_errors() -> None:
    gate = asyncio.Event()

    async def slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        while True:
            await read_request(reader)
            await gate.wait()
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
            await writer.drain()

    async with raw_server(slow) as (url, conns):
        client = HttpClient(limit=1, timeout_s=5)
        try:
            pending = [asyncio.create_task(client.request(url, "/")) for _ in range(3)]
            gate.set()
            answers = await asyncio.gather(*pending)
        finally:
            await client.close()
        assert [a.status for a in answers] == [200, 200, 200] and len(conns) == 1
        gate.clear()
        client = HttpClient(timeout_s=0.2)
        try:
            with pytest.raises(TimeoutError):
                await client.request(url, "/")
        finally:
            await client.close()
    client = HttpClient(timeout_s=2)
    with pytest.raises(ConnectError), closed_port() as port:
        await client.request(f"http://127.0.0.1:{port}", "/")
    async with raw_server(scripted(b"SSH-2.0-nope\r\n\r\n")) as (url, _):
        with pytest.raises(ProtocolError):
            await client.request(url, "/")
    await client.close()


async def test_against_aiohttp_server_with_post_body() -> None:
    async def echo(request: web.Request) -> web.Response:
        body = await request.read()
        return web.Response(text=f"{request.method} {request.path_qs} {body.decode()}",
                            headers={"X-Host": request.host})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", echo)
    async with serve_app(app) as url:
        client = HttpClient(timeout_s=5)
        try:
            r = await client.request(url, "/p?a=1&b=%20", method="POST", body=b"[[1,2]]")
            big = await client.request(url, "/x" + "y" * 5000)
        finally:
            await client.close()
    assert r.text() == "POST /p?a=1&b=%20 [[1,2]]"
    assert r.headers["x-host"] == url.split("//")[1]
    assert big.status == 200 and len(big.body) > 5000


async def test_tls(self_signed: tuple[Path, Path]) -> None:
    cert, key = self_signed
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)
    client_ctx = ssl.create_default_context(cafile=str(cert))
    async with raw_server(scripted(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\ntls"),
                          server_ctx) as (url, _):
        client = HttpClient(timeout_s=5, ssl_context=client_ctx)
        try:
            assert (await client.request(url, "/")).body == b"tls"
        finally:
            await client.close()
        untrusting = HttpClient(timeout_s=5)
        with pytest.raises(ConnectError):
            await untrusting.request(url, "/")
        await untrusting.close()


def test_under_uvloop() -> None:
    """The bridge runs on uvloop, whose transports are not ``asyncio.Transport`` subclasses."""
    uvloop = pytest.importorskip("uvloop")

    async def main() -> tuple[int, int]:
        async with raw_server(scripted(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
                                       b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                              ) as (url, conns):
            client = HttpClient(timeout_s=5)
            try:
                for _ in range(2):
                    assert (await client.request(url, "/")).body == b"ok"
            finally:
                await client.close()
            return len(conns), 2

    assert uvloop.run(main()) == (1, 2)


async def test_send_nowait_uses_an_idle_connection_and_reports_by_callback() -> None:
    gate = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_request(reader)  # 1: answered
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        await read_request(reader)  # 2: answered once the gate opens
        await gate.wait()
        writer.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: 1\r\n\r\nx")
        await writer.drain()
        await read_request(reader)  # 3: never answered (the client times out)
        await reader.read()

    async with raw_server(handler) as (url, conns):
        client = HttpClient(timeout_s=0.3)
        got: list[object] = []
        answered = asyncio.Event()

        def on_done(resp: object) -> None:
            got.append(resp)
            answered.set()

        try:
            assert client.send_nowait(url, "/a", on_done) is False  # no idle connection yet
            assert got == []
            assert (await client.request(url, "/a")).body == b"ok"
            assert client.send_nowait(url, "/b", on_done) is True
            assert client.send_nowait(url, "/c", on_done) is False  # the one connection is busy
            gate.set()
            await within(answered.wait())
            (resp,) = got
            assert getattr(resp, "status", None) == 404 and getattr(resp, "body", None) == b"x"
            answered.clear()
            assert client.send_nowait(url, "/d", on_done) is True  # released: idle again
            await within(answered.wait())
            assert isinstance(got[1], TimeoutError)  # the sweep expired it
            assert len(conns) == 1
        finally:
            await client.close()


async def test_send_nowait_reports_a_connection_closed_while_idle() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        await read_request(reader)
        writer.transport.abort()

    async with raw_server(handler) as (url, _):
        client = HttpClient(timeout_s=5)
        got: list[BaseException] = []
        done = asyncio.Event()

        def on_done(resp: object) -> None:
            assert isinstance(resp, BaseException)
            got.append(resp)
            done.set()

        try:
            await client.request(url, "/")
            assert client.send_nowait(url, "/", on_done) is True
            await within(done.wait())
            # not retried here: the caller learns the connection died before any answer byte
            assert isinstance(got[0], ConnectionLost) and not got[0].got_bytes
            assert client.send_nowait(url, "/", on_done) is False  # the dead one is gone
        finally:
            await client.close()


# --- framing (llhttp) -------------------------------------------------------------------------


def bytewise(answer: bytes) -> bytes:
    """``answer`` marked to be written one byte per write (see :func:`scripted`)."""
    return b"|".join(answer[i:i + 1] for i in range(len(answer)))


async def test_chunked_bodies_and_heads_split_at_every_byte() -> None:
    answers = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-A: 1\r\n\r\n"
        b"3;name=value\r\nabc\r\n1\r\nd\r\n0\r\nX-Trailer: t\r\n\r\n",
        b"HTTP/1.1 100 Continue\r\nX-Interim: 1\r\n\r\n"
        b"HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\nContent-Length: 12\r\n"
        b"\r\n{\"error\":1}\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
    )
    async with raw_server(scripted(*map(bytewise, answers))) as (url, conns):
        client = HttpClient(timeout_s=5)
        try:
            r1, r2, r3 = [await client.request(url, f"/{n}") for n in range(3)]
        finally:
            await client.close()
    assert (r1.status, r1.body, r1.headers["x-a"]) == (200, b"abcd", "1")
    assert (r2.status, r2.body, r2.headers["content-type"]) == (
        400, b'{"error":1}\n', "application/json")
    assert "x-interim" not in r2.headers  # the 1xx answer's headers are not the answer's
    assert r3.body == b"ok"  # (no decoding is asked for; the bytes as sent)
    assert len(conns) == 1


async def test_a_second_answer_to_one_request_is_not_taken_for_the_next() -> None:
    """A server out of step (two answers to one request) must not shift every later answer
    by one: the first is the answer, the connection is dropped, the next request starts over."""
    first = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfirst"
    chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n0\r\n\r\n"
    stray = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nstray"
    for answer in (first + stray, chunked + stray, first + b"|" + stray):
        async with raw_server(scripted(answer)) as (url, conns):
            client = HttpClient(timeout_s=5)
            try:
                bodies = [(await client.request(url, "/")).body for _ in range(2)]
            finally:
                await client.close()
        assert bodies == [b"first", b"first"], answer
        assert len(conns) == 2, answer


#: Answers llhttp refuses; the hand-written parser took each for a valid one (or waited).
MALFORMED = {
    "length with an underscore": b"HTTP/1.1 200 OK\r\nContent-Length: 1_0\r\n\r\n0123456789",
    "length with a sign": b"HTTP/1.1 200 OK\r\nContent-Length: +2\r\n\r\nok",
    "two different lengths": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n"
                             b"\r\nok!",
    "length and chunked": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n"
                          b"Content-Length: 5\r\n\r\n2\r\nok\r\n0\r\n\r\n",
    "chunk size 0x2": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                      b"0x2\r\nok\r\n0\r\n\r\n",
    "chunk without its CRLF": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                              b"2\r\nokXX0\r\n\r\n",
    "four-digit status": b"HTTP/1.1 2000 OK\r\nContent-Length: 0\r\n\r\n",
    "space before a colon": b"HTTP/1.1 200 OK\r\nContent-Length : 2\r\n\r\nok",
    "folded header": b"HTTP/1.1 200 OK\r\nX: a\r\n b\r\nContent-Length: 2\r\n\r\nok",
    "bare LF line ends": b"HTTP/1.1 200 OK\nContent-Length: 2\n\nok",
    "HTTP/2 status line": b"HTTP/2 200\r\ncontent-length: 2\r\n\r\nok",
}


@pytest.mark.parametrize("answer", MALFORMED.values(), ids=MALFORMED.keys())
async def test_a_malformed_answer_is_a_protocol_error(answer: bytes) -> None:
    async with raw_server(scripted(answer)) as (url, _):
        client = HttpClient(timeout_s=5)
        try:
            with pytest.raises(ProtocolError):
                await client.request(url, "/")
        finally:
            await client.close()
