"""The emulator's HTTP front: simple keep-alive GETs answered here, everything else by aiohttp.

aiohttp spends about as much CPU on a ``batch/update`` as the emulator's own logic does (its
request and response objects, URL parsing, header preparation, a task per request). The front
is an ``asyncio.Protocol`` per connection that parses HTTP/1.1 requests with llhttp
(``httptools``, the parser aiohttp's own C parser and uvicorn build on) and answers a request
only when it is the simple case:

* a ``GET <path>?<query>`` of HTTP/1.1 that llhttp parsed as one complete request without a
  body, whose path is one the :data:`Answer` callback knows, exactly one ``Host`` header, no
  header twice, none of ``Content-Length``, ``Transfer-Encoding``, ``Expect``, ``Upgrade``
  (…), no ``Connection`` but ``keep-alive`` (HTTP/1.1's default, which Node.js sends on every
  request), only plain ASCII in the head and an origin-form target without a fragment, a head
  shorter than aiohttp's line limits; several such requests in one read (pipelining) and a
  head split over several reads are fine;
* and the callback agrees (it returns None, before any side effect, when it would rather not:
  fault injection on, an unknown path).

Anything else hands the connection to aiohttp **for good**: the ``RequestHandler`` that
``web.Server`` would have created gets the transport and every byte not answered yet, so it
sees exactly the stream it would have seen from the start. To know where each answered request
ends, llhttp is fed one head at a time (up to the next blank line): a simple request has no
body, so it ends exactly there. A head llhttp refuses is handed over at once (aiohttp answers
its 400 as early as it would have); an incomplete one that llhttp accepts so far is waited
for. Answers already written stay in order because the front writes synchronously, before the
hand-over.

What the front writes is byte for byte what aiohttp writes for the same :class:`Reply`
(``tests/test_blynk_front.py`` compares both on the wire): the status line with Python's reason
phrase, the reply's headers in order, ``Content-Length``, aiohttp's ``Date`` and ``Server``, no
``Connection`` header (HTTP/1.1 keep-alive), and the same 500 answer if the callback raises.
Like aiohttp's handler it sets ``TCP_NODELAY`` and ``SO_KEEPALIVE``, closes a connection idle
for ``keepalive_timeout``, stops reading while the transport's write buffer is full, and closes
its connections when the server shuts down.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import Any, NamedTuple, cast

import httptools
import yarl
from aiohttp import web
from aiohttp.helpers import rfc822_formatted_time
from aiohttp.http import SERVER_SOFTWARE
from aiohttp.log import server_logger
from aiohttp.tcp_helpers import tcp_keepalive, tcp_nodelay
from aiohttp.web_protocol import RequestHandler


class Reply(NamedTuple):
    """An HTTP answer as plain data: what the front writes, or :meth:`response` for aiohttp.

    ``headers`` come in wire order and include ``Content-Type`` whenever ``body`` is not empty
    (``Content-Length``, ``Date`` and ``Server`` are added when written).
    """

    status: int
    body: bytes
    headers: tuple[tuple[str, str], ...]

    def response(self) -> web.Response:
        return web.Response(status=self.status, body=self.body, headers=self.headers)


#: (path, query string, raw target) → the reply, or None to leave this request, and the
#: connection from then on, to aiohttp. None must be decided before any side effect. Never awaits.
Answer = Callable[[str, str, str], "Reply | None"]


def _pairs_via_url(query_string: str) -> list[tuple[str, str]]:  # pragma: no cover - old yarl
    return list(yarl.URL.build(query_string=query_string, encoded=True).query.items())


#: The query string decoded into pairs exactly as aiohttp's ``request.query`` decodes it: yarl's
#: own function (``+``, ``%2C``, invalid escapes and all), or ``URL.query`` before yarl had it.
query_pairs: Callable[[str], list[tuple[str, str]]] = getattr(yarl, "query_to_pairs",
                                                             _pairs_via_url)

#: An origin-form target with only plain ASCII (no fragment, no absolute form): anything else
#: is aiohttp's to accept or refuse (yarl decodes such targets in ways the callback does not).
_TARGET_BYTES = (b"-._~!$&'()*+,;=:@/?%" + bytes(range(ord("0"), ord("9") + 1))
                 + bytes(range(ord("A"), ord("Z") + 1)) + bytes(range(ord("a"), ord("z") + 1)))
#: Headers that change how aiohttp reads the request or keeps the connection.
_SPECIAL = frozenset({b"content-length", b"transfer-encoding",
                      b"proxy-connection", b"keep-alive", b"expect", b"upgrade",
                      b"content-encoding", b"sec-websocket-key1"})
#: What :meth:`_Heads.next` says besides the end of a simple head.
WAIT = -1
HAND_OVER = -2
_REASONS = {s.value: s.phrase for s in HTTPStatus}
#: Longest head the front reads; longer ones are rare and aiohttp's (its limits apply).
_MAX_HEAD = 8192
_CACHED_REPLIES = 64


class FrontServer(web.Server):
    """``web.Server`` whose connections start on the front (:class:`_Connection`).

    With ``answer=None`` it is plain ``web.Server``. ``answered`` counts requests the front
    wrote, ``handed_over`` connections given to aiohttp.
    """

    def __init__(self, handler: Callable[[web.BaseRequest], Awaitable[web.StreamResponse]], *,
                 answer: Answer | None, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self.answer = answer
        self.answered = 0
        self.handed_over = 0
        self.fast: set[_Connection] = set()
        # The limits aiohttp's handler applies, read off one (never connected).
        probe = self.aiohttp_handler()
        self.keepalive_timeout = probe.keepalive_timeout
        self.max_headers = probe.max_headers
        self.max_head = min(_MAX_HEAD, probe.max_line_size, probe.max_field_size)
        if probe.debug or probe.access_logger is not None:
            self.answer = None  # aiohttp's debug pages and access log are aiohttp's
        self._date = ""
        self._tail = b""
        self._whole: dict[Reply, bytes] = {}

    def aiohttp_handler(self) -> RequestHandler:
        """The protocol aiohttp would have given a new connection."""
        return super().__call__()

    def __call__(self) -> RequestHandler:
        if self.answer is None:
            return self.aiohttp_handler()
        # A plain asyncio.Protocol; the loop only needs a protocol factory.
        return cast(RequestHandler, _Connection(self, self.answer))

    def pre_shutdown(self) -> None:
        super().pre_shutdown()
        for conn in list(self.fast):
            conn.close()

    def render(self, reply: Reply) -> bytes:
        """The reply as aiohttp writes it to an HTTP/1.1 keep-alive request."""
        date = rfc822_formatted_time()
        if date != self._date:
            self._date = date
            self._tail = f"Date: {date}\r\nServer: {SERVER_SOFTWARE}\r\n\r\n".encode()
            self._whole.clear()
        whole = self._whole.get(reply)
        if whole is None:
            status, body, headers = reply
            head = [f"HTTP/1.1 {status} {_REASONS.get(status, '')}\r\n"]
            head += [f"{name}: {value}\r\n" for name, value in headers]
            head.append(f"Content-Length: {len(body)}\r\n")
            whole = "".join(head).encode() + self._tail + body
            if len(self._whole) < _CACHED_REPLIES:
                self._whole[reply] = whole
        return whole

    def crash(self, accept: str, remote: str | None, exc: Exception) -> bytes:
        """What aiohttp's ``handle_error`` answers (and logs) when the handler raised
        (``accept``: the request's ``Accept`` header)."""
        server_logger.exception("Error handling request from %s", remote, exc_info=exc)
        s = HTTPStatus.INTERNAL_SERVER_ERROR
        title = f"{s.value} {s.phrase}"
        if "text/html" in accept:
            text = (f"<html><head><title>{title}</title></head><body>\n<h1>{title}</h1>"
                    f"\n{s.description}\n</body></html>\n")
            ctype = "text/html"
        else:
            text, ctype = f"{title}\n\n{s.description}", "text/plain"
        body = text.encode()
        return (f"HTTP/1.1 500 {s.phrase}\r\nContent-Type: {ctype}; charset=utf-8\r\n"
                f"Content-Length: {len(body)}\r\nDate: {rfc822_formatted_time()}\r\n"
                f"Server: {SERVER_SOFTWARE}\r\nConnection: close\r\n\r\n").encode() + body


class _Heads:
    """llhttp over one connection's bytes, fed one request head at a time (see the module
    docstring); also the parser's callback object, collecting what decides "simple"."""

    __slots__ = ("_max_head", "_max_headers", "_parser", "accept", "complete", "names", "simple",
                 "url")

    def __init__(self, max_head: int, max_headers: int) -> None:
        self._max_head = max_head
        self._max_headers = max_headers
        self._parser = httptools.HttpRequestParser(self)
        self.names: set[bytes] = set()
        self.reset()

    def reset(self) -> None:
        """Forget the request just answered (llhttp itself starts over on its own)."""
        self.url = b""
        self.names.clear()
        self.accept = ""
        self.simple = True
        self.complete = 0

    # llhttp callbacks
    def on_url(self, url: bytes) -> None:
        self.url += url  # (in pieces when the target is split over reads)

    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        names = self.names
        if (name in names or name in _SPECIAL or len(names) >= self._max_headers
                or (name == b"connection" and value.strip(b" \t").lower() != b"keep-alive")):
            self.simple = False
        names.add(name)
        if name == b"accept":
            self.accept = value.decode("latin-1")

    def on_message_complete(self) -> None:
        self.complete += 1

    def next(self, data: bytes, pos: int, fed: int) -> tuple[int, int]:
        """Read the head that starts at ``data[pos]`` (llhttp has been fed ``data[:fed]``).

        Returns (what, fed): ``what`` is the end of the head when it is a complete simple
        request (its bytes are ``data[pos:what]``), :data:`WAIT` when the head is incomplete
        and may still be simple, :data:`HAND_OVER` otherwise.
        """
        end = data.find(b"\r\n\r\n", max(pos, fed - 3))
        stop = len(data) if end < 0 else end + 4
        if stop - pos > self._max_head:
            return HAND_OVER, fed
        whole = stop == len(data) and pos == 0
        if stop > fed:
            try:
                self._parser.feed_data(data if whole and fed == 0 else memoryview(data)[fed:stop])
            except (httptools.HttpParserError, httptools.HttpParserUpgrade):
                return HAND_OVER, stop
        if end < 0:
            return WAIT, stop
        # llhttp (strict) ends a request without a body only at a blank line, so a request that
        # completed here ends exactly at ``stop``: two would need two blank lines.
        p = self._parser
        if (self.complete == 1 and self.simple and b"host" in self.names
                and p.get_method() == b"GET" and p.get_http_version() == "1.1"
                and self.url[:1] == b"/" and not self.url.translate(None, _TARGET_BYTES)
                and (data if whole else data[pos:stop]).isascii()):
            return stop, stop
        return HAND_OVER, stop


class _Connection(asyncio.Protocol):
    """One connection while the front serves it (see the module docstring)."""

    __slots__ = ("_answer", "_buf", "_front", "_head", "_heads", "_idle", "_loop", "_next_close",
                 "_paused", "transport")

    def __init__(self, front: FrontServer, answer: Answer) -> None:
        self._front = front
        self._answer = answer
        self._loop = asyncio.get_running_loop()
        self._buf = b""  # bytes read while writing was paused, not parsed yet
        self._head = b""  # the start of an incomplete head, already fed to llhttp
        self._heads = _Heads(front.max_head, front.max_headers)
        self._paused = False
        self._idle: asyncio.TimerHandle | None = None
        self._next_close = 0.0
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        t = cast(asyncio.Transport, transport)
        self.transport = t
        tcp_nodelay(t, True)
        tcp_keepalive(t)
        self._front.fast.add(self)
        timeout = self._front.keepalive_timeout
        if timeout > 0:
            self._next_close = self._loop.time() + timeout
            self._idle = self._loop.call_at(self._next_close, self._check_idle)

    def connection_lost(self, exc: BaseException | None) -> None:
        self._forget()

    def pause_writing(self) -> None:
        self._paused = True
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        self._paused = False
        if self.transport is not None:
            self.transport.resume_reading()
            data, self._buf = self._buf, b""
            if data:
                self._serve(data)

    def data_received(self, data: bytes) -> None:
        if self._buf:
            data = self._buf + data
            self._buf = b""
        if self._paused:
            self._buf = data
        else:
            self._serve(data)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
        self._forget()

    def _forget(self) -> None:
        self.transport = None
        self._front.fast.discard(self)
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None

    def _check_idle(self) -> None:
        """Close the connection once idle for ``keepalive_timeout`` (aiohttp's rule)."""
        self._idle = None
        if self.transport is None:
            return
        now = self._loop.time()
        if self._paused:  # still writing answers: aiohttp's handler is busy then, not idle
            self._next_close = now + self._front.keepalive_timeout
        if now < self._next_close:
            self._idle = self._loop.call_at(self._next_close, self._check_idle)
        else:
            self.close()

    def _serve(self, data: bytes) -> None:
        """Answer every complete simple request in ``data``; keep or hand over the rest."""
        front = self._front
        answer = self._answer
        heads = self._heads
        fed = len(self._head)
        if fed:
            data = self._head + data
            self._head = b""
        out: list[bytes] = []
        pos = 0
        size = len(data)
        what = HAND_OVER
        while pos < size:
            what, fed = heads.next(data, pos, fed)
            if what < 0:
                break
            target = heads.url.decode("ascii")
            path, _, query = target.partition("?")
            try:
                reply = answer(path, query, target)
            except Exception as exc:  # aiohttp's answer to a handler error, then it closes
                assert self.transport is not None
                front.answered += len(out)
                remote = self.transport.get_extra_info("peername")
                out.append(front.crash(heads.accept,
                                       remote[0] if isinstance(remote, tuple) else remote, exc))
                self.transport.write(b"".join(out))
                self.close()
                return
            if reply is None:
                what = HAND_OVER
                break
            out.append(front.render(reply))
            heads.reset()
            pos = what
        if out:
            assert self.transport is not None
            self.transport.write(out[0] if len(out) == 1 else b"".join(out))
            front.answered += len(out)
            self._next_close = self._loop.time() + front.keepalive_timeout
        if pos < size:
            rest = data[pos:] if pos else data
            if what == WAIT:
                self._head = rest
            else:
                self._hand_over(rest)

    def _hand_over(self, data: bytes) -> None:
        """Give the connection and ``data`` (not answered yet) to aiohttp's handler for good."""
        transport = self.transport
        assert transport is not None
        front = self._front
        paused = self._paused
        self._forget()
        front.handed_over += 1
        handler = front.aiohttp_handler()
        transport.set_protocol(handler)
        handler.connection_made(transport)
        if paused:
            handler.pause_writing()
            transport.resume_reading()  # aiohttp waits for the drain in its writer instead
        if data:
            handler.data_received(data)
