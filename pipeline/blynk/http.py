"""A lean HTTP/1.1 client for Blynk's device API: keep-alive pools on ``asyncio.Protocol``.

Why not aiohttp here: egress sends one small ``GET`` per device per flush, thousands per second,
and aiohttp spent ~0.3 ms of CPU on each (tracing hooks, cookie jar, redirect and URL
machinery, a timer object per phase, a stream reader per response). This client writes each
request as one pre-built ``bytes`` and parses the answer in one callback, which is all the
device API needs; the answer is framed by llhttp, not by hand. The platform API (OAuth, JSON
bodies, few calls) stays on aiohttp.

Contract of :meth:`HttpClient.request`:

* Returns a :class:`Response` for every complete HTTP answer, whatever its status. Redirects are
  not followed (the caller decides).
* Raises :class:`TimeoutError` when no complete answer came within ``timeout_s`` (waiting for a
  pool slot and connecting included; noticed within ``timeout_s / 20``, at most 0.1 s, late);
  the connection is then closed.
* Raises :class:`ConnectError` when no connection could be opened, :class:`ConnectionLost` when
  the connection closed before the answer was complete, :class:`ProtocolError` for an answer
  that is not HTTP/1.x. All are :class:`HttpError`.
* A ``GET`` on a reused keep-alive connection that died before any byte of the answer (the
  server closed an idle connection just as we wrote) is retried once on a new connection.
* At most ``limit`` connections are open at once (all hosts together); idle connections are
  reused newest first and closed after ``keepalive_s`` unused. Answers are framed by llhttp
  (``httptools``, the parser Node.js and uvicorn use): ``Content-Length``, chunked encoding, or
  the end of the connection (which is then not reused); ``Connection: close`` and HTTP/1.0 are
  honoured; 1xx interim answers are skipped. Whatever llhttp refuses (a bad status line, an
  invalid ``Content-Length`` or chunk size, two differing lengths, bytes after an answer nobody
  asked for) is :class:`ProtocolError` and the connection is closed. No compression is asked
  for, so none is decoded.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast
from urllib.parse import urlsplit

import httptools

#: Largest answer accepted (Blynk's device API answers are tiny; ``get`` of many pins is small).
MAX_BODY = 8 * 1024 * 1024
_MAX_HEAD = 64 * 1024


class HttpError(Exception):
    """The request failed below HTTP (see the module docstring)."""


class ConnectError(HttpError):
    pass


class ConnectionLost(HttpError):
    def __init__(self, message: str, *, got_bytes: bool = False) -> None:
        super().__init__(message)
        self.got_bytes = got_bytes


class ProtocolError(HttpError):
    pass


@dataclass(slots=True)
class Response:
    status: int
    #: Header names lower case; a repeated header keeps its last value.
    headers: dict[str, str]
    body: bytes

    def text(self) -> str:
        return self.body.decode("utf-8", "replace")


@dataclass(frozen=True, slots=True)
class Origin:
    """Where requests go: ``scheme://host:port`` parsed once."""

    key: str
    host: str
    port: int
    tls: bool
    #: ``Host`` header line and fixed headers, ready to send.
    head_tail: bytes

    @classmethod
    def parse(cls, base_url: str) -> Origin:
        u = urlsplit(base_url)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise ValueError(f"not an http(s) base URL: {base_url!r}")
        tls = u.scheme == "https"
        port = u.port or (443 if tls else 80)
        host = u.hostname
        default = port == (443 if tls else 80)
        host_hdr = (f"[{host}]" if ":" in host else host) + ("" if default else f":{port}")
        tail = f" HTTP/1.1\r\nHost: {host_hdr}\r\nUser-Agent: blynk-bridge\r\n".encode("ascii")
        return cls(f"{u.scheme}://{host_hdr}", host, port, tls, tail)


class _Conn(asyncio.Protocol):
    """One connection: one request at a time; llhttp frames the answer as bytes arrive."""

    __slots__ = ("_body", "_head_bytes", "_head_done", "_headers", "_parser", "_status",
                 "_until_eof", "closed", "deadline", "got_bytes", "idle_since", "origin", "pool",
                 "transport", "waiter")

    def __init__(self, pool: HttpClient, origin: Origin) -> None:
        self.pool = pool
        self.origin = origin
        self.transport: asyncio.Transport | None = None
        self.waiter: asyncio.Future[Response] | None = None
        self.closed = False
        self.got_bytes = False
        self.idle_since = 0.0
        self.deadline = 0.0  # loop time by which the answer must be complete
        # One parser for the connection's life: llhttp starts over after each complete answer.
        self._parser = httptools.HttpResponseParser(self)
        self._reset()

    def _reset(self) -> None:
        self._head_done = False
        self._head_bytes = 0
        self._status = 0
        self._headers: dict[str, str] = {}
        self._until_eof = False
        self._body = bytearray()

    # asyncio.Protocol ------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        if self.waiter is None or self.waiter.done():
            self._abort()  # bytes nobody asked for: the connection is not in a known state
            return
        self.got_bytes = True
        try:
            self._parser.feed_data(data)
            if not self._head_done:
                self._head_bytes += len(data)
                if self._head_bytes > _MAX_HEAD:
                    raise ProtocolError(f"answer head from {self.origin.key} too large")
        except ProtocolError as exc:
            self._fail(exc)
            self._abort()
        except httptools.HttpParserCallbackError as exc:  # one of ours, raised in a callback
            cause = exc.__context__
            self._fail(cause if isinstance(cause, ProtocolError) else ProtocolError(str(exc)))
            self._abort()
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
            self._fail(ProtocolError(f"not a valid HTTP/1.x answer from {self.origin.key}: "
                                     f"{type(exc).__name__}: {exc}"))
            self._abort()

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool._lost(self)
        w = self.waiter
        if w is None or w.done():
            return
        if self._head_done and self._until_eof:  # framed by the end of the connection
            self._done(bytes(self._body))
            return
        detail = f"connection to {self.origin.key} closed before the answer was complete"
        if exc is not None:
            detail += f" ({type(exc).__name__})"
        w.set_exception(ConnectionLost(detail, got_bytes=self.got_bytes))

    # llhttp callbacks (httptools calls them from feed_data) ----------------------------------
    def on_message_begin(self) -> None:
        if self.waiter is None:  # a second answer to one request: out of step with the server
            raise ProtocolError(f"more than one answer from {self.origin.key}")

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if status < 200:  # a 1xx interim answer: the real one follows
            return
        headers = self._headers
        length = headers.get("content-length")
        if length is not None and int(length) > MAX_BODY:  # llhttp checked it is a number
            raise ProtocolError(f"answer body from {self.origin.key} too large")
        self._status = status
        self._head_done = True
        # llhttp reads such a body until the connection ends (it has no call for that end)
        self._until_eof = (length is None and status not in (204, 304) and not headers.get(
            "transfer-encoding", "").lower().rstrip().endswith("chunked"))

    def on_body(self, body: bytes) -> None:
        self._body += body
        if len(self._body) > MAX_BODY:
            raise ProtocolError(f"answer body from {self.origin.key} too large")

    def on_message_complete(self) -> None:
        if not self._head_done:  # the end of a 1xx answer
            self._headers = {}
            return
        if not self._parser.should_keep_alive():
            self._abort()  # Connection: close, HTTP/1.0: not reused (the answer is complete)
        self._done(bytes(self._body))

    # requests --------------------------------------------------------------------------------
    def send(self, data: bytes, fut: asyncio.Future[Response]) -> None:
        assert self.transport is not None
        self.waiter = fut
        self.got_bytes = False
        self._reset()
        self.transport.write(data)

    def _abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    def _fail(self, exc: Exception) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(exc)

    def _done(self, body: bytes) -> None:
        w = self.waiter
        self.waiter = None
        if w is not None and not w.done():
            w.set_result(Response(self._status, self._headers, body))


class HttpClient:
    """Keep-alive connection pools per origin (see the module docstring)."""

    def __init__(self, *, limit: int = 100, timeout_s: float = 10.0, keepalive_s: float = 30.0,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        if limit < 1:
            raise ValueError("limit must be >= 1")
        self.limit = limit
        self.timeout_s = timeout_s
        self.keepalive_s = keepalive_s
        self._ssl = ssl_context
        self._origins: dict[str, Origin] = {}
        self._idle: dict[str, list[_Conn]] = {}
        self._open = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        #: Connections with a request in flight; one periodic check expires the overdue ones
        #: (a timer per request cost more than the request's parsing).
        self._busy: set[_Conn] = set()
        self._sweeper: asyncio.TimerHandle | None = None
        self._sweep_loop: asyncio.AbstractEventLoop | None = None
        self._tick = max(0.005, min(0.1, timeout_s / 20))

    def origin(self, base_url: str) -> Origin:
        """``base_url`` parsed (cached). Raises ``ValueError`` for a non-http(s) URL."""
        o = self._origins.get(base_url)
        if o is None:
            o = self._origins[base_url] = Origin.parse(base_url)
        return o

    @staticmethod
    def build(origin: Origin, target: str, method: str = "GET", body: bytes | None = None,
              content_type: str = "application/json") -> bytes:
        """The bytes of one request (``target`` = path and query, already percent-encoded)."""
        head = method.encode("ascii") + b" " + target.encode("ascii") + origin.head_tail
        if body is None:
            return head + b"\r\n"
        return (head + b"Content-Type: " + content_type.encode("ascii")
                + b"\r\nContent-Length: " + str(len(body)).encode("ascii") + b"\r\n\r\n" + body)

    async def request(self, base_url: str, target: str, *, method: str = "GET",
                      body: bytes | None = None) -> Response:
        """Send one request and return its answer (see the module docstring)."""
        origin = self.origin(base_url)
        data = self.build(origin, target, method, body)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        conn = self._take_idle(origin)
        reused = conn is not None
        if conn is None:
            conn = await self._connect(origin, deadline)
        try:
            return await self._exchange(loop, conn, data, deadline)
        except ConnectionLost as exc:
            if not (reused and method == "GET" and not exc.got_bytes):
                raise
        # the server closed the idle connection as we wrote: once more, on a new connection
        conn = await self._connect(origin, deadline)
        return await self._exchange(loop, conn, data, deadline)

    def send_nowait(self, base_url: str, target: str,
                    on_done: Callable[[Response | BaseException], None]) -> bool:
        """:meth:`request` of a ``GET`` without a coroutine, if a connection is ready for it.

        When an idle keep-alive connection to ``base_url`` is available, sends on it and
        returns ``True``; ``on_done`` is later called once, from the event loop, with the
        :class:`Response` or the exception :meth:`request` would have raised (a connection
        that died before any byte of the answer is *not* retried here: ``on_done`` gets the
        :class:`ConnectionLost`). Returns ``False``, having done nothing, when no idle
        connection is available: use :meth:`request`, which waits for a slot or connects.

        For callers sending thousands of requests a second: no task, no coroutine chain.
        """
        origin = self.origin(base_url)
        conn = self._take_idle(origin)
        if conn is None:
            return False
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Response] = loop.create_future()
        self._watch(loop, conn, loop.time() + self.timeout_s)

        def done(f: asyncio.Future[Response]) -> None:
            self._busy.discard(conn)
            exc = asyncio.CancelledError() if f.cancelled() else f.exception()
            if exc is not None:
                conn._abort()  # as _exchange: a failed exchange leaves no reusable state
            self._release(conn)
            on_done(f.result() if exc is None else exc)

        fut.add_done_callback(done)
        conn.send(self.build(origin, target), fut)
        return True

    def _watch(self, loop: asyncio.AbstractEventLoop, conn: _Conn, deadline: float) -> None:
        """Put ``conn`` under the periodic deadline check (see :meth:`_sweep`)."""
        conn.deadline = deadline
        self._busy.add(conn)
        if self._sweeper is None or self._sweep_loop is not loop:  # (a client outliving a loop)
            self._sweep_loop = loop
            self._sweeper = loop.call_later(self._tick, self._sweep, loop)

    async def _exchange(self, loop: asyncio.AbstractEventLoop, conn: _Conn, data: bytes,
                        deadline: float) -> Response:
        fut: asyncio.Future[Response] = loop.create_future()
        busy = self._busy
        self._watch(loop, conn, deadline)
        try:
            conn.send(data, fut)
            resp = await fut
        except BaseException:
            conn._abort()
            self._release(conn)
            raise
        finally:
            busy.discard(conn)
        self._release(conn)
        return resp

    def _sweep(self, loop: asyncio.AbstractEventLoop) -> None:
        """Expire the requests past their deadline (at most one tick late)."""
        if loop is not self._sweep_loop:
            return
        self._sweeper = None
        now = loop.time()
        for conn in [c for c in self._busy if c.deadline <= now]:
            self._busy.discard(conn)
            if conn.waiter is not None and not conn.waiter.done():
                conn.waiter.set_exception(TimeoutError())
            conn._abort()
        if self._busy:
            self._sweeper = loop.call_later(self._tick, self._sweep, loop)

    async def close(self) -> None:
        """Close the idle connections; waiters for a slot get :class:`ConnectError`.

        The client stays usable (new connections are opened on demand).
        """
        for conns in self._idle.values():
            for c in conns:
                c._abort()
        self._idle.clear()
        while self._waiters:
            w = self._waiters.popleft()
            if not w.done():
                w.set_exception(ConnectError("client closed"))

    # pool ------------------------------------------------------------------------------------
    def _take_idle(self, origin: Origin) -> _Conn | None:
        idle = self._idle.get(origin.key)
        if not idle:
            return None
        now = time.monotonic()
        while idle:
            conn = idle.pop()
            if conn.closed:
                continue
            if now - conn.idle_since > self.keepalive_s:
                conn._abort()  # stale; the older ones below it are staler
                for old in idle:
                    old._abort()
                idle.clear()
                return None
            return conn
        return None

    async def _connect(self, origin: Origin, deadline: float) -> _Conn:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout_at(deadline):
                while self._open >= self.limit:
                    if not self._evict_idle():
                        w: asyncio.Future[None] = loop.create_future()
                        self._waiters.append(w)
                        try:
                            await w
                        finally:
                            if not w.done():
                                w.cancel()
                        conn = self._take_idle(origin)
                        if conn is not None:
                            return conn
                self._open += 1
                made: list[_Conn] = []

                def factory() -> _Conn:
                    made.append(_Conn(self, origin))
                    return made[-1]

                try:
                    _, proto = await loop.create_connection(
                        factory, origin.host, origin.port,
                        ssl=self._ssl_context() if origin.tls else None,
                        server_hostname=origin.host if origin.tls else None)
                except BaseException:
                    for c in made:  # a late connection_lost must not free the slot twice
                        c.pool = _DETACHED
                    self._open -= 1
                    self._wake()
                    raise
        except TimeoutError:
            raise
        except OSError as exc:
            raise ConnectError(f"cannot connect to {origin.key}: "
                               f"{type(exc).__name__}: {exc.strerror or exc}") from None
        return proto

    def _ssl_context(self) -> ssl.SSLContext:
        if self._ssl is None:
            self._ssl = ssl.create_default_context()
        return self._ssl

    def _evict_idle(self) -> bool:
        """At the limit: close the longest-idle connection of any origin to make room."""
        oldest: _Conn | None = None
        for conns in self._idle.values():
            for c in conns:
                if oldest is None or c.idle_since < oldest.idle_since:
                    oldest = c
        if oldest is None:
            return False
        self._idle[oldest.origin.key].remove(oldest)
        self._lost(oldest)
        oldest._abort()
        return True

    def _release(self, conn: _Conn) -> None:
        """A request finished on ``conn``: back to the idle list, or gone."""
        if conn.closed or conn.waiter is not None:
            conn.closed = True
            if conn.transport is not None:
                conn.transport.abort()
            return  # connection_lost does the accounting
        conn.idle_since = time.monotonic()
        self._idle.setdefault(conn.origin.key, []).append(conn)
        self._wake()

    def _lost(self, conn: _Conn) -> None:
        """``conn`` closed (by either side) or was evicted: forget it, free its slot (once)."""
        idle = self._idle.get(conn.origin.key)
        if idle and conn in idle:
            idle.remove(conn)
        conn.pool = _DETACHED
        self._open -= 1
        self._wake()

    def _wake(self) -> None:
        while self._waiters:
            w = self._waiters.popleft()
            if not w.done():
                w.set_result(None)
                return


class _Detached(HttpClient):
    """Owner of connections evicted from a pool: their close is already accounted for."""

    def _lost(self, conn: _Conn) -> None:
        return


_DETACHED = _Detached()

