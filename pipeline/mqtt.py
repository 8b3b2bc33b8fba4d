"""MQTT client edge: the only module that imports aiomqtt (its v3 changes the API).

A :class:`Session` is an async context manager around one connection::

    async with mqtt.Session(settings) as session:
        await session.subscribe(["v3/app@ttn/devices/+/up"])
        async for topic, payload in session.messages():
            ...

Errors are ours, never aiomqtt's:

* :class:`AuthError` — the broker refused the CONNECT (bad username or password, not
  authorized): retrying with the same credentials will not help.
* :class:`Unreachable` — no connection could be made (DNS, refused, timeout, TLS handshake).
* :class:`ConnectionLost` — the connection was up and broke (broker restart, network).
* :class:`MqttError` — the base of all three (also: a refused subscription, a failed publish).

Reconnection is the caller's loop (``while True: try: async with Session… except MqttError:
sleep(backoff)``), so the caller decides about statuses and backoff.

Messages are read on a fast path that uses aiomqtt's and paho's internals (see
:meth:`Session._install_fast_path`), written for aiomqtt 2.5 and paho-mqtt 2.1–2.2 (pinned in
``pyproject.toml``). Every connect first checks that those internals are there, by name and
shape (:func:`fast_path_missing`); when one is not, the session uses aiomqtt's public message
iterator instead, logs a warning and sets ``bb_mqtt_fast_path`` to 0.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import importlib.metadata
import logging
import socket
import ssl
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

import aiomqtt
from aiomqtt.exceptions import MqttConnectError
from paho.mqtt.reasoncodes import ReasonCode

from pipeline import metrics

log = logging.getLogger("pipeline.mqtt")

# CONNACK return codes of MQTT 3.1.1 (paho reports them as ReasonCode or int).
_CONNACK_BAD_CREDENTIALS = 4
_CONNACK_NOT_AUTHORIZED = 5
# The same refusals as MQTT 5 reason codes (paho maps 3.1.1 codes onto these names).
_AUTH_REASONS = {
    "Bad user name or password", "Not authorized", "Banned", "Bad authentication method"
}


class MqttError(Exception):
    """Any MQTT failure; ``detail`` is safe to log (no secrets)."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class AuthError(MqttError):
    """CONNACK refused: bad username or password, or not authorized."""


class Unreachable(MqttError):
    """No connection could be established (DNS, TCP, TLS or a CONNACK timeout)."""


class ConnectionLost(MqttError):
    """An established connection broke."""


@dataclass(frozen=True, slots=True)
class Settings:
    """How to reach one broker. ``tls`` uses the system CAs unless ``ca_file`` is given."""

    host: str
    port: int
    username: str | None = None
    password: str | None = None
    tls: bool = False
    ca_file: str | None = None
    client_id: str | None = None
    keepalive: int = 60
    #: Seconds to wait for CONNACK, SUBACK and publish completion.
    timeout_s: float = 10.0
    #: Disable Nagle: messages go out at once (load generators, downlinks).
    tcp_nodelay: bool = True


def _tls_context(settings: Settings) -> ssl.SSLContext | None:
    if not settings.tls:
        return None
    return ssl.create_default_context(cafile=settings.ca_file)


def _connect_error(exc: aiomqtt.MqttError) -> MqttError:
    rc = getattr(exc, "rc", None)
    if isinstance(exc, MqttConnectError):
        refused = (
            isinstance(rc, ReasonCode) and (str(rc) in _AUTH_REASONS
                                            or rc.value in (0x86, 0x87, 0x8A, 0x8C))
        ) or rc in (_CONNACK_BAD_CREDENTIALS, _CONNACK_NOT_AUTHORIZED)
        if refused:
            return AuthError(f"broker refused the credentials: {exc}")
        return Unreachable(f"broker refused the connection: {exc}")
    return Unreachable(f"cannot connect: {exc}")


class Session:
    """One MQTT connection; enter it to connect, leave it to disconnect."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        options: list[tuple[int, int, int]] = []
        if settings.tcp_nodelay:
            options.append((socket.IPPROTO_TCP, socket.TCP_NODELAY, 1))
        self._client = aiomqtt.Client(
            settings.host,
            settings.port,
            username=settings.username,
            password=settings.password,
            identifier=settings.client_id,
            keepalive=settings.keepalive,
            timeout=settings.timeout_s,
            tls_context=_tls_context(settings),
            socket_options=options,
        )
        self._fast: collections.deque[tuple[str, bytes]] | None = None
        self._waiter: asyncio.Future[None] | None = None
        #: Whether this connection reads on the fast path (set on connect).
        self.fast_path = False

    async def __aenter__(self) -> Self:
        """Connect; raises :class:`AuthError` or :class:`Unreachable`."""
        try:
            await self._client.__aenter__()
        except aiomqtt.MqttError as exc:
            raise _connect_error(exc) from None
        except ssl.SSLError as exc:
            raise Unreachable(f"TLS handshake failed: {exc}") from None
        self._install_fast_path(self._client)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # The connection is gone either way; the caller already knows why it left.
        with contextlib.suppress(aiomqtt.MqttError):
            await self._client.__aexit__(exc_type, exc, tb)

    async def subscribe(self, topics: Sequence[str], qos: int = 0) -> None:
        """Subscribe to every topic in one SUBSCRIBE; raises :class:`MqttError` when the broker
        refuses one (SUBACK 0x80) or does not answer."""
        try:
            granted = await self._client.subscribe([(t, qos) for t in topics])
        except aiomqtt.MqttError as exc:
            raise ConnectionLost(f"subscribe failed: {exc}") from None
        refused = [t for t, g in zip(topics, granted, strict=False) if _code(g) >= 0x80]
        if refused:
            raise AuthError(f"subscription refused for {', '.join(refused)}")

    async def messages(self) -> AsyncIterator[tuple[str, bytes]]:
        """Yield ``(topic, payload)`` as they arrive; blocks until the next message.

        Ends only by raising :class:`ConnectionLost` when the connection breaks (or by the
        caller's cancellation). Only one iteration may run at a time per session.
        """
        if self._fast is None:
            async for item in self._slow_messages():
                yield item
            return
        buffer, loop = self._fast, asyncio.get_running_loop()
        disconnected: asyncio.Future[None] = self._client._disconnected
        while True:
            while buffer:
                yield buffer.popleft()
            if disconnected.done():
                raise ConnectionLost(f"connection lost: {_cause(disconnected)}")
            self._waiter = loop.create_future()
            await self._waiter

    async def _slow_messages(self) -> AsyncIterator[tuple[str, bytes]]:
        """The public aiomqtt iterator (one task and one ``asyncio.wait`` per message)."""
        try:
            async for message in self._client.messages:
                payload = message.payload
                yield message.topic.value, payload if isinstance(payload, bytes) else (
                    str(payload).encode() if payload is not None else b""
                )
        except aiomqtt.MqttError as exc:
            raise ConnectionLost(f"connection lost: {exc}") from None

    def _install_fast_path(self, client: Any) -> None:
        """Take messages straight from paho's ``on_message`` into a deque.

        aiomqtt's iterator costs a task, an ``asyncio.wait`` and a ``Message`` object per
        message: more CPU than our whole parse (bench/ingest_mqtt.py). This uses aiomqtt's
        ``_client`` (the paho client) and ``_disconnected`` (a future), and paho's ``_sock``,
        ``_in_packet`` and ``_protocol``; :func:`fast_path_missing` checks them first, and the
        public iterator is used when one is not as expected.
        """
        missing = fast_path_missing(client)
        if missing is not None:
            self.fast_path = False
            metrics.MQTT_FAST_PATH.set(0)
            log.warning("MQTT fast path off, reading with aiomqtt's message iterator instead: "
                        "%s (aiomqtt %s, paho-mqtt %s)", missing, _version("aiomqtt"),
                        _version("paho-mqtt"))
            return
        self.fast_path = True
        metrics.MQTT_FAST_PATH.set(1)
        paho = client._client
        disconnected: asyncio.Future[None] = client._disconnected
        buffer: collections.deque[tuple[str, bytes]] = collections.deque()

        def wake() -> None:
            waiter = self._waiter
            if waiter is not None and not waiter.done():
                waiter.set_result(None)

        def on_message(client: object, userdata: object, message: Any) -> None:
            buffer.append((message.topic, message.payload))
            wake()

        def deliver(messages: list[tuple[str, bytes]]) -> None:
            buffer.extend(messages)
            wake()

        paho.on_message = on_message
        disconnected.add_done_callback(lambda _: wake())
        self._fast = buffer
        # QoS 0 PUBLISHes straight from the socket (MQTT 3.1.x framing only, and only between
        # packets: nothing may be half read by paho when the socket is swapped).
        if paho._protocol in (3, 4) and paho._in_packet.get("command") == 0:
            paho._sock = _PublishTap(paho._sock, deliver)

    def pending(self) -> int:
        """Messages received and not yet taken by :meth:`messages`."""
        return len(self._fast) if self._fast is not None else len(self._client.messages)

    async def publish(
        self, topic: str, payload: bytes, *, qos: int = 0, retain: bool = False
    ) -> None:
        """Publish; returns once sent (QoS 0) or acknowledged (QoS 1/2)."""
        try:
            await self._client.publish(topic, payload, qos=qos, retain=retain)
        except aiomqtt.MqttError as exc:
            raise ConnectionLost(f"publish to {topic} failed: {exc}") from None


def fast_path_missing(client: object) -> str | None:
    """What the fast path needs and ``client`` (a connected ``aiomqtt.Client``) lacks, or None.

    Checked by name and shape, not by version: aiomqtt's ``_client`` (a paho client whose class
    has a settable ``on_message`` property, with ``_sock`` having ``recv``/``send``/``fileno``,
    ``_in_packet`` a dict with a ``command`` key, ``_protocol`` an int) and ``_disconnected``
    (an ``asyncio.Future``).
    """
    if not isinstance(getattr(client, "_disconnected", None), asyncio.Future):
        return "aiomqtt.Client._disconnected is not an asyncio.Future"
    paho = getattr(client, "_client", None)
    if paho is None:
        return "aiomqtt.Client._client (the paho client) is missing"
    prop = getattr(type(paho), "on_message", None)
    if not isinstance(prop, property) or prop.fset is None:
        return "paho Client.on_message is not a settable property"
    sock = getattr(paho, "_sock", None)
    if not all(callable(getattr(sock, name, None)) for name in ("recv", "send", "fileno")):
        return "paho Client._sock is not a connected socket"
    in_packet = getattr(paho, "_in_packet", None)
    if not isinstance(in_packet, dict) or "command" not in in_packet:
        return "paho Client._in_packet is not a dict with a 'command'"
    if not isinstance(getattr(paho, "_protocol", None), int):
        return "paho Client._protocol is not an int"
    return None


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "?"


#: Bytes read from the socket per ``recv``: a whole burst of messages in one system call.
_RECV_BYTES = 256 * 1024


class _PublishTap:
    """paho's socket, with QoS 0 PUBLISH packets taken out of the byte stream on the way.

    paho reads a packet with three or four ``recv`` calls (command byte, each length byte, the
    rest) and spends more Python per message on ``MQTTMessage``, topic matching and callback
    locks than our whole TTS parse. This reads everything available in one ``recv``, hands
    each complete QoS 0 PUBLISH (``(topic, payload)``) to ``deliver`` at once, and serves paho
    only the other packets (CONNACK, SUBACK, PINGRESP, QoS 1/2 PUBLISH...), byte-exact and in
    order, so paho's protocol state (keepalive, acks) works as before. When it has nothing for
    paho it raises ``BlockingIOError``, which paho reads as "no data yet". ``pending()`` counts
    bytes kept for paho (aiomqtt's reader loops while it is positive, as for TLS sockets).
    """

    def __init__(self, sock: Any, deliver: Callable[[list[tuple[str, bytes]]], None]) -> None:
        self._sock = sock
        self._deliver = deliver
        self._partial = b""
        self._for_paho = bytearray()
        self._eof = False

    def recv(self, bufsize: int) -> bytes:
        if not self._for_paho:
            if self._eof:
                return b""
            data = self._sock.recv(_RECV_BYTES)  # BlockingIOError / OSError go to paho
            if not data:
                self._eof = True
                return b""
            messages, other, self._partial = split_packets(
                self._partial + data if self._partial else data)
            if messages:
                self._deliver(messages)
            if not other:
                raise BlockingIOError
            self._for_paho += other
        out = bytes(self._for_paho[:bufsize])
        del self._for_paho[:bufsize]
        return out

    def send(self, data: bytes) -> int:
        return int(self._sock.send(data))

    def pending(self) -> int:
        inner = getattr(self._sock, "pending", None)
        return len(self._for_paho) + (inner() if inner is not None else 0)

    def __getattr__(self, name: str) -> Any:  # fileno, close, setblocking...
        return getattr(self._sock, name)


def split_packets(data: bytes) -> tuple[list[tuple[str, bytes]], bytes, bytes]:
    """Split an MQTT 3.1.x byte stream (server to client) into the ``(topic, payload)`` of its
    complete QoS 0 PUBLISH packets, the bytes of every other complete packet (in order), and
    the trailing incomplete packet. A malformed length goes to the second part untouched, with
    everything after it, for paho to refuse."""
    messages: list[tuple[str, bytes]] = []
    other: list[bytes] = []
    pos, n = 0, len(data)
    while pos < n:
        first = data[pos]
        i, length, shift = pos + 1, 0, 0
        while True:
            if i >= n:
                return messages, b"".join(other), data[pos:]
            byte = data[i]
            i += 1
            length |= (byte & 0x7F) << shift
            if byte < 0x80:
                break
            shift += 7
            if shift > 21:  # more than 4 length bytes
                other.append(data[pos:])
                return messages, b"".join(other), b""
        end = i + length
        if end > n:
            return messages, b"".join(other), data[pos:]
        if first & 0xF6 == 0x30 and length >= 2:  # PUBLISH, QoS 0 (DUP/RETAIN either way)
            topic_end = i + 2 + ((data[i] << 8) | data[i + 1])
            if topic_end <= end:
                messages.append((data[i + 2 : topic_end].decode(errors="replace"),
                                 data[topic_end:end]))
                pos = end
                continue
        other.append(data[pos:end])
        pos = end
    return messages, b"".join(other), b""


def _cause(disconnected: asyncio.Future[None]) -> str:
    exc = disconnected.exception() if not disconnected.cancelled() else None
    return str(exc) if exc is not None else "disconnected"


def _code(granted: object) -> int:
    if isinstance(granted, ReasonCode):
        return int(granted.value)
    return granted if isinstance(granted, int) else 0x80


def app_topics(username: str, suffixes: Iterable[str]) -> list[str]:
    """``v3/{username}/devices/+/{suffix}`` for each suffix."""
    return [f"v3/{username}/devices/+/{s}" for s in suffixes]
