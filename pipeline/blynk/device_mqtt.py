"""A lean Blynk device MQTT session: many sessions on one event loop, no task per session.

Blynk's device MQTT API (``docs/reference/blynk-api.md`` section 8) is one MQTT 3.1.1 session
per device token. A bridge holding a session for each device of a fleet cannot afford a client
object with its own tasks, buffers and threads per device (aiomqtt/paho: see BENCHMARKS.md,
``bench/sessions.py``), so a :class:`Session` is one ``asyncio.Protocol`` with slots: the
transport, an incremental frame reader and a few numbers. Keepalives for all sessions come from
one :class:`Keepalive` ticker that visits 1/keepalive of the sessions per second.

Life of a session (callbacks into a :class:`Handler`, all on the loop, none may block):

* ``connection_made`` sends CONNECT (client id ``""``, username ``device``, password = token);
* CONNACK 0 → SUBSCRIBE ``downlink/#``; CONNACK ≠ 0 → closed with reason ``bad_credentials``
  (0x04/0x05) or ``refused:<code>``;
* SUBACK → ``info/mcu`` is published, then :meth:`Handler.session_ready` (the handler asks
  ``get/ds/all``); a refused SUBACK (0x80) → closed with reason ``subscribe_refused``;
* every PUBLISH → :meth:`Handler.session_message` (QoS 1 is PUBACKed first);
* the connection ending for any reason → :meth:`Handler.session_closed` exactly once.

Nothing here retries or reconnects: the owner of the sessions decides (and paces) that.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from typing import Protocol, cast

import msgspec

from pipeline import mqtt_frames as f
from pipeline.lifecycle import wait_event

log = logging.getLogger("blynk_bridge.device_mqtt")

_SUBSCRIBE = f.subscribe(1, [("downlink/#", 0)])


class Handler(Protocol):
    def session_ready(self, session: Session) -> None: ...

    def session_message(self, session: Session, topic: str, payload: bytes) -> None: ...

    def session_closed(self, session: Session, reason: str) -> None: ...


class Session(asyncio.Protocol):
    """One device's MQTT session (see the module doc for its life)."""

    __slots__ = ("_reader", "handler", "info", "keepalive_s", "key", "last_rx", "ready_at",
                 "reason", "state", "token", "transport")

    def __init__(self, key: str, token: str, handler: Handler, *, keepalive_s: int = 45,
                 info: bytes = b"") -> None:
        self.key = key
        self.token = token
        self.handler = handler
        self.keepalive_s = keepalive_s
        #: The ``info/mcu`` payload sent once subscribed (empty: none).
        self.info = info
        self.transport: asyncio.Transport | None = None
        self._reader = f.Reader()
        #: ``connecting`` → ``connected`` (CONNACK 0) → ``ready`` (SUBACK) → ``closed``.
        self.state = "connecting"
        self.reason = ""
        self.last_rx = time.monotonic()
        #: When it became ``ready`` (monotonic; 0: never) — how long a session lasted.
        self.ready_at = 0.0

    # asyncio.Protocol --------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not registered as asyncio.Transport subclasses
        self.transport = cast(asyncio.Transport, transport)
        if self.reason:  # closed by its owner while connecting: never say CONNECT
            self.transport.close()
            return
        self.transport.write(f.connect("", username="device", password=self.token,
                                  keepalive_s=self.keepalive_s))

    def data_received(self, data: bytes) -> None:
        self.last_rx = time.monotonic()
        try:
            for kind, flags, body in self._reader.feed(data):
                self._packet(kind, flags, body)
                if self.reason:  # closing (refused, redirected...): nothing after counts
                    break
        except f.FrameError as exc:
            self.close(f"protocol_error: {exc}")

    def connection_lost(self, exc: Exception | None) -> None:
        if self.state == "closed":
            return
        if not self.reason:
            self.reason = "connection_lost" if exc is None else f"connection_lost: {exc}"
        self.state = "closed"
        self.transport = None
        self.handler.session_closed(self, self.reason)

    # packets ---------------------------------------------------------------------------------
    def _packet(self, kind: int, flags: int, body: bytes) -> None:
        if kind == f.PUBLISH:
            if self.state == "connecting":
                self.close("protocol_error: PUBLISH before CONNACK")
                return
            topic, payload, qos, pid = f.parse_publish(flags, body)
            if qos and self.transport is not None:
                self.transport.write(f.puback(pid))
            self.handler.session_message(self, topic, payload)
        elif kind == f.CONNACK:
            code = body[1] if len(body) >= 2 else 255
            if code != f.ACCEPTED:
                self.close("bad_credentials" if code in (f.BAD_CREDENTIALS, f.NOT_AUTHORIZED)
                           else f"refused:{code}")
                return
            self.state = "connected"
            self._write(_SUBSCRIBE)
        elif kind == f.SUBACK and self.state == "connected":
            if len(body) < 3 or body[2] & 0x80:  # refused: online in Blynk, deaf to commands
                self.close("subscribe_refused")
                return
            self.state = "ready"
            self.ready_at = time.monotonic()
            if self.info:
                self._write(f.publish("info/mcu", self.info))
            self.handler.session_ready(self)
        # PINGRESP, PUBACK, UNSUBACK: last_rx is all they are for

    def _write(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(data)

    # the owner's side ------------------------------------------------------------------------
    def publish(self, topic: str, payload: bytes) -> bool:
        """Publish at QoS 0; False when the session is not ready."""
        if self.state != "ready" or self.transport is None:
            return False
        self.transport.write(f.publish(topic, payload))
        return True

    def ping(self) -> None:
        self._write(f.PINGREQ_BYTES)

    def close(self, reason: str = "closed") -> None:
        """Say DISCONNECT and close; :meth:`Handler.session_closed` follows (once)."""
        if not self.reason:
            self.reason = reason
        t = self.transport
        if t is not None and not t.is_closing():
            with contextlib.suppress(Exception):  # a broken socket: close anyway
                t.write(f.DISCONNECT_BYTES)
            t.close()


def mcu_info(template_id: str, firmware: str | None = None) -> bytes:
    """The ``info/mcu`` payload: template id, and the firmware version when known."""
    info: dict[str, object] = {"tmpl": template_id, "type": template_id, "rxbuff": 1024}
    if firmware:
        info["ver"] = firmware
    return msgspec.json.encode(info)


async def open_session(session: Session, host: str, port: int, *,
                       tls: ssl.SSLContext | None = None, timeout_s: float = 10.0) -> None:
    """Open the TCP (TLS) connection of ``session``; the MQTT handshake goes on from its
    callbacks. Raises ``OSError``/``TimeoutError`` when the connection cannot be made (no
    callback is called then)."""
    loop = asyncio.get_running_loop()
    await asyncio.wait_for(
        loop.create_connection(lambda: session, host, port, ssl=tls,
                               server_hostname=host if tls else None),
        timeout_s)


class Keepalive:
    """PINGREQs for many sessions from one task: each second, one slice of a wheel of
    ``keepalive_s`` slots is visited; a session silent for 1.5 × keepalive is closed
    (``keepalive_timeout``), as a broker would."""

    def __init__(self, keepalive_s: int = 45) -> None:
        self.keepalive_s = max(1, keepalive_s)
        self._wheel: list[set[Session]] = [set() for _ in range(self.keepalive_s)]
        self._slot = 0
        self._next = 0

    def add(self, session: Session) -> None:
        self._wheel[self._next].add(session)
        self._next = (self._next + 1) % self.keepalive_s

    def discard(self, session: Session) -> None:
        for slot in self._wheel:
            if session in slot:
                slot.discard(session)
                return

    def __len__(self) -> int:
        return sum(len(s) for s in self._wheel)

    def tick(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        slot = self._wheel[self._slot]
        self._slot = (self._slot + 1) % self.keepalive_s
        dead_after = self.keepalive_s * 1.5
        for s in list(slot):
            if s.state == "closed":
                slot.discard(s)
            elif now - s.last_rx > dead_after:
                s.close("keepalive_timeout")
            elif s.state == "ready":
                s.ping()

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            self.tick()
            await wait_event(stop, 1.0)
