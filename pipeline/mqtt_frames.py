"""MQTT 3.1.1 packet framing (pure): the packets a Blynk device session needs, both directions.

Used by the lean device-session client (:mod:`pipeline.blynk.device_mqtt`) and the Blynk
emulator's device MQTT endpoint. Because one framing on both ends could agree with itself and
still be wrong, the client is tested against Mosquitto and the emulator against paho
(``tests/test_blynk_sessions*.py``).

Encoders return ``bytes`` ready for ``transport.write``. :class:`Reader` is incremental: feed it
whatever the socket gave, iterate the complete packets; a packet over ``max_packet`` bytes or a
malformed length raises :class:`FrameError` (the caller closes the connection).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

CONNECT, CONNACK, PUBLISH, PUBACK = 1, 2, 3, 4
SUBSCRIBE, SUBACK, UNSUBSCRIBE, UNSUBACK = 8, 9, 10, 11
PINGREQ, PINGRESP, DISCONNECT = 12, 13, 14

#: CONNACK return codes (MQTT 3.1.1 §3.2.2.3).
ACCEPTED = 0
BAD_CREDENTIALS = 4
NOT_AUTHORIZED = 5

PINGREQ_BYTES = b"\xc0\x00"
PINGRESP_BYTES = b"\xd0\x00"
DISCONNECT_BYTES = b"\xe0\x00"


class FrameError(ValueError):
    """Bytes that are not MQTT 3.1.1 (or a packet larger than allowed)."""


def _length(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | 0x80 if n else byte)
        if not n:
            return bytes(out)


def _str(text: str | bytes) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    if len(raw) > 0xFFFF:
        raise FrameError("string over 65535 bytes")
    return struct.pack("!H", len(raw)) + raw


def _packet(first: int, body: bytes) -> bytes:
    return bytes((first,)) + _length(len(body)) + body


def connect(client_id: str, *, username: str | None = None, password: str | None = None,
            keepalive_s: int = 45, clean: bool = True) -> bytes:
    flags = (0x02 if clean else 0) | (0x80 if username is not None else 0) | (
        0x40 if password is not None else 0)
    body = _str("MQTT") + bytes((4, flags)) + struct.pack("!H", keepalive_s) + _str(client_id)
    if username is not None:
        body += _str(username)
    if password is not None:
        body += _str(password)
    return _packet(CONNECT << 4, body)


def connack(code: int, session_present: bool = False) -> bytes:
    return bytes((CONNACK << 4, 2, 1 if session_present else 0, code))


def publish(topic: str, payload: bytes, *, qos: int = 0, packet_id: int = 0,
            retain: bool = False) -> bytes:
    body = _str(topic)
    if qos:
        body += struct.pack("!H", packet_id)
    return _packet((PUBLISH << 4) | (qos << 1) | (1 if retain else 0), body + payload)


def puback(packet_id: int) -> bytes:
    return bytes((PUBACK << 4, 2)) + struct.pack("!H", packet_id)


def subscribe(packet_id: int, topics: list[tuple[str, int]]) -> bytes:
    body = struct.pack("!H", packet_id) + b"".join(_str(t) + bytes((q,)) for t, q in topics)
    return _packet((SUBSCRIBE << 4) | 0x02, body)


def suback(packet_id: int, codes: list[int]) -> bytes:
    return _packet(SUBACK << 4, struct.pack("!H", packet_id) + bytes(codes))


def unsuback(packet_id: int) -> bytes:
    return bytes((UNSUBACK << 4, 2)) + struct.pack("!H", packet_id)


# decoding -------------------------------------------------------------------------------------


class Reader:
    """Incremental packet splitter: :meth:`feed` bytes, get ``(type, flags, body)`` tuples."""

    __slots__ = ("_buf", "max_packet")

    def __init__(self, max_packet: int = 65_536) -> None:
        self._buf = b""
        self.max_packet = max_packet

    def feed(self, data: bytes) -> Iterator[tuple[int, int, bytes]]:
        buf = self._buf + data if self._buf else data
        pos = 0
        end = len(buf)
        try:
            while end - pos >= 2:
                first = buf[pos]
                n = 0
                shift = 0
                i = pos + 1
                while True:
                    if i >= end:
                        return
                    byte = buf[i]
                    n |= (byte & 0x7F) << shift
                    i += 1
                    if not byte & 0x80:
                        break
                    shift += 7
                    if shift > 21:
                        raise FrameError("malformed remaining length")
                if n > self.max_packet:
                    raise FrameError(f"packet of {n} bytes is over {self.max_packet}")
                if end - i < n:
                    return
                pos = i + n
                yield first >> 4, first & 0x0F, buf[i:pos]
        finally:
            self._buf = buf[pos:]


def split_string(body: bytes, at: int = 0) -> tuple[str, int]:
    """A length-prefixed UTF-8 string at ``at`` → (text, offset after it)."""
    if len(body) < at + 2:
        raise FrameError("truncated string")
    (n,) = struct.unpack_from("!H", body, at)
    end = at + 2 + n
    if len(body) < end:
        raise FrameError("truncated string")
    try:
        return body[at + 2:end].decode(), end
    except UnicodeDecodeError:
        raise FrameError("string is not UTF-8") from None


def parse_publish(flags: int, body: bytes) -> tuple[str, bytes, int, int]:
    """A PUBLISH body → (topic, payload, qos, packet id; 0 for QoS 0)."""
    topic, at = split_string(body)
    qos = (flags >> 1) & 0x03
    packet_id = 0
    if qos:
        if len(body) < at + 2:
            raise FrameError("truncated packet id")
        (packet_id,) = struct.unpack_from("!H", body, at)
        at += 2
    return topic, body[at:], qos, packet_id


def packet_id(body: bytes) -> int:
    if len(body) < 2:
        raise FrameError("truncated packet id")
    return int(struct.unpack_from("!H", body)[0])


class Connect:
    """A parsed CONNECT (what a server needs of it)."""

    __slots__ = ("clean", "client_id", "keepalive_s", "level", "password", "username")

    def __init__(self, body: bytes) -> None:
        name, at = split_string(body)
        if name not in ("MQTT", "MQIsdp") or len(body) < at + 4:
            raise FrameError("not an MQTT CONNECT")
        self.level = body[at]
        flags = body[at + 1]
        (self.keepalive_s,) = struct.unpack_from("!H", body, at + 2)
        self.clean = bool(flags & 0x02)
        self.client_id, at = split_string(body, at + 4)
        if flags & 0x04:  # will topic and message: read past them
            _, at = split_string(body, at)
            if len(body) < at + 2:
                raise FrameError("truncated will message")
            (n,) = struct.unpack_from("!H", body, at)
            at += 2 + n
            if len(body) < at:
                raise FrameError("truncated will message")
        self.username: str | None = None
        self.password: str | None = None
        if flags & 0x80:
            self.username, at = split_string(body, at)
        if flags & 0x40:
            self.password, at = split_string(body, at)


def parse_subscribe(body: bytes) -> tuple[int, list[tuple[str, int]]]:
    pid = packet_id(body)
    at = 2
    topics = []
    while at < len(body):
        topic, at = split_string(body, at)
        if at >= len(body):
            raise FrameError("subscription without QoS")
        topics.append((topic, body[at] & 0x03))
        at += 1
    if not topics:
        raise FrameError("SUBSCRIBE with no topic")
    return pid, topics
