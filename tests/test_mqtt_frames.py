"""MQTT 3.1.1 framing (pipeline/mqtt_frames.py) against a hostile or broken peer, fuzzed with
hypothesis, and against paho (an independent implementation) as the oracle in both directions:
paho's encoder → our Reader, our encoder → paho's decoder, over a real TCP connection.

Contract checked: whatever bytes arrive, in whatever chunks, the Reader and the body parsers
either give packets or raise ``FrameError`` (the caller closes the connection) — never another
exception, never a buffer beyond the packet limit."""

from __future__ import annotations

import contextlib
import itertools
import socket
import struct
import time
from collections.abc import Iterator

import paho.mqtt.client as paho
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from paho.mqtt.enums import CallbackAPIVersion

from pipeline import mqtt_frames as f

_LIMIT = 4096


def _packets(reader: f.Reader, chunks: list[bytes]) -> list[tuple[int, int, bytes]]:
    return [p for c in chunks for p in reader.feed(c)]


def _chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    edges = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(edges)]


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.binary(max_size=600), cuts=st.lists(st.integers(0, 600), max_size=8))
def test_reader_gives_packets_or_frame_error_and_chunking_changes_nothing(
        data: bytes, cuts: list[int]) -> None:
    whole = f.Reader(max_packet=_LIMIT)
    try:
        want: list[tuple[int, int, bytes]] | None = _packets(whole, [data])
    except f.FrameError:
        want = None
    pieces = f.Reader(max_packet=_LIMIT)
    try:
        got: list[tuple[int, int, bytes]] | None = _packets(pieces, _chunked(data, cuts))
    except f.FrameError:
        got = None
    assert got == want  # None: both refused the bytes
    if want is not None:
        assert len(pieces._buf) <= _LIMIT + 5  # one unfinished packet at most


@settings(max_examples=400)
@given(kind=st.integers(0, 15), flags=st.integers(0, 15), body=st.binary(max_size=300))
def test_body_parsers_raise_only_frame_error(kind: int, flags: int, body: bytes) -> None:
    for parse in (lambda: f.parse_publish(flags, body), lambda: f.Connect(body),
                  lambda: f.parse_subscribe(body), lambda: f.packet_id(body)):
        with contextlib.suppress(f.FrameError):
            parse()


@pytest.mark.parametrize("will", [b"", b"\x00\x01t", b"\x00\x01t\x00"])
def test_connect_with_a_truncated_will_is_a_frame_error(will: bytes) -> None:
    body = f._str("MQTT") + bytes((4, 0x04)) + struct.pack("!H", 45) + f._str("id") + will
    with pytest.raises(f.FrameError):
        f.Connect(body)


def test_remaining_length_over_four_bytes_and_huge_lengths_are_refused() -> None:
    with pytest.raises(f.FrameError, match="malformed"):
        list(f.Reader(max_packet=1 << 30).feed(b"\x30\xff\xff\xff\xff\x01"))
    # 268,435,455 bytes announced: refused from the header, nothing buffered for it.
    r = f.Reader()
    with pytest.raises(f.FrameError, match="over"):
        list(r.feed(b"\x30\xff\xff\xff\x7f" + b"x" * 10))


# paho as the oracle ---------------------------------------------------------------------------

_topics = st.text(
    st.characters(blacklist_characters="+#\x00", blacklist_categories=("Cs",)),
    min_size=1, max_size=200).filter(lambda t: len(t.encode()) <= 1000)


class _Link:
    """A paho client connected over TCP to a bare socket this test drives byte by byte."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id="oracle",
                                  protocol=paho.MQTTv311)
        self.client.max_inflight_messages_set(0)
        self.received: list[paho.MQTTMessage] = []
        self.client.on_message = lambda c, u, m: self.received.append(m)
        self.client.connect("127.0.0.1", self.listener.getsockname()[1], keepalive=60)
        self.peer, _ = self.listener.accept()
        self.peer.settimeout(30)
        self.reader = f.Reader(max_packet=1 << 22)
        kind, _, _ = self.next_packet()
        assert kind == f.CONNECT
        self.peer.sendall(f.connack(0))
        self.pump(lambda: self.client.is_connected())

    def next_packet(self) -> tuple[int, int, bytes]:
        pending: Iterator[tuple[int, int, bytes]] = iter(())
        while True:
            for p in pending:
                return p
            data = self.peer.recv(1 << 20)
            assert data, "paho closed the connection"
            pending = iter(list(self.reader.feed(data)))

    def pump(self, done: object) -> None:
        deadline = time.monotonic() + 30
        while not done() and time.monotonic() < deadline:  # type: ignore[operator]
            self.client.loop(timeout=0.5)
        assert done(), "paho did not get there"  # type: ignore[operator]

    def close(self) -> None:
        self.client.disconnect()
        self.peer.close()
        self.listener.close()


@pytest.fixture(scope="module")
def link() -> Iterator[_Link]:
    lk = _Link()
    yield lk
    lk.close()


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(topic=_topics, payload=st.binary(max_size=70_000), qos=st.integers(0, 1))
def test_paho_publishes_read_back_by_our_reader(link: _Link, topic: str, payload: bytes,
                                                qos: int) -> None:
    info = link.client.publish(topic, payload, qos=qos)
    link.client.loop_write()
    kind, flags, body = link.next_packet()
    assert kind == f.PUBLISH
    got_topic, got_payload, got_qos, pid = f.parse_publish(flags, body)
    assert (got_topic, got_payload, got_qos) == (topic, payload, qos)
    if qos:
        assert pid == info.mid
        link.peer.sendall(f.puback(pid))


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(topic=_topics, payload=st.binary(max_size=70_000), qos=st.integers(0, 1),
       pid=st.integers(1, 0xFFFF))
def test_our_publishes_read_back_by_paho(link: _Link, topic: str, payload: bytes, qos: int,
                                         pid: int) -> None:
    before = len(link.received)
    link.peer.sendall(f.publish(topic, payload, qos=qos, packet_id=pid))
    link.pump(lambda: len(link.received) > before)
    m = link.received[-1]
    assert (m.topic, m.payload, m.qos) == (topic, payload, qos)
    if qos:
        kind, _, body = link.next_packet()
        assert (kind, f.packet_id(body)) == (f.PUBACK, pid)
