"""The lean device-session client (pipeline/blynk/device_mqtt.py) and its framing
(pipeline/mqtt_frames.py) against a real broker: Mosquitto on 127.0.0.1:1883, so the framing is
checked by something other than itself (the Blynk emulator's endpoint is checked with paho)."""

from __future__ import annotations

import asyncio
import secrets

from pipeline import mqtt_frames as f
from pipeline.blynk.device_mqtt import Keepalive, Session, mcu_info, open_session
from tests.wait import wait_until


class Recorder:
    def __init__(self) -> None:
        self.ready: list[Session] = []
        self.messages: list[tuple[str, bytes]] = []
        self.closed: list[str] = []

    def session_ready(self, s: Session) -> None:
        self.ready.append(s)

    def session_message(self, s: Session, topic: str, payload: bytes) -> None:
        self.messages.append((topic, payload))

    def session_closed(self, s: Session, reason: str) -> None:
        self.closed.append(reason)


async def test_two_sessions_exchange_messages_through_mosquitto() -> None:
    name = f"Switch {secrets.token_hex(4)}"
    rx, tx = Recorder(), Recorder()
    a = Session("a", "token-a", rx, info=mcu_info("TMPL1", "1.2.3"))
    b = Session("b", "token-b", tx)
    await open_session(a, "127.0.0.1", 1883)
    await open_session(b, "127.0.0.1", 1883)
    await wait_until(lambda: rx.ready and tx.ready, what="both sessions subscribed")
    big = secrets.token_bytes(300)  # two-byte remaining length
    assert b.publish(f"downlink/ds/{name}", b"1")
    assert b.publish(f"downlink/ds/{name}", big)
    mine = lambda: [m for m in rx.messages if m[0] == f"downlink/ds/{name}"]  # noqa: E731
    await wait_until(lambda: len(mine()) == 2, what="both messages")
    assert mine() == [(f"downlink/ds/{name}", b"1"), (f"downlink/ds/{name}", big)]
    a.close("done")
    b.close("done")
    await wait_until(lambda: len(rx.closed) == 1 and len(tx.closed) == 1, what="closed once")
    assert rx.closed == ["done"]


async def test_keepalive_pings_are_answered() -> None:
    rec = Recorder()
    s = Session("k", "token-k", rec, keepalive_s=1)
    await open_session(s, "127.0.0.1", 1883)
    await wait_until(lambda: rec.ready, what="subscribed")
    ka = Keepalive(1)
    ka.add(s)
    before = s.last_rx
    ka.tick()
    await wait_until(lambda: s.last_rx > before, what="PINGRESP")
    assert s.state == "ready"
    s.close()
    await wait_until(lambda: rec.closed, what="closed")


def test_reader_splits_packets_fed_byte_by_byte() -> None:
    wire = (f.connack(0) + f.publish("downlink/ds/x", b"y" * 200, qos=1, packet_id=7)
            + f.PINGRESP_BYTES)
    r = f.Reader()
    got = [p for i in range(len(wire)) for p in r.feed(wire[i:i + 1])]
    assert [k for k, _, _ in got] == [f.CONNACK, f.PUBLISH, f.PINGRESP]
    assert f.parse_publish(got[1][1], got[1][2]) == ("downlink/ds/x", b"y" * 200, 1, 7)


def test_reader_refuses_oversized_packets() -> None:
    r = f.Reader(max_packet=100)
    try:
        list(r.feed(f.publish("t", b"x" * 200)))
    except f.FrameError:
        return
    raise AssertionError("no FrameError")


class ScriptedPeer(asyncio.Protocol):
    """A broker that answers a client's packets with fixed bytes: what a broken or hostile
    server sends (the session's state machine under test, not the framing)."""

    def __init__(self, on_connect: bytes, on_subscribe: bytes = b"") -> None:
        self.on_connect = on_connect
        self.on_subscribe = on_subscribe
        self.reader = f.Reader()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        for kind, _, _ in self.reader.feed(data):
            if kind == f.CONNECT:
                self.transport.write(self.on_connect)
            elif kind == f.SUBSCRIBE and self.on_subscribe:
                self.transport.write(self.on_subscribe)


async def _against(peer: ScriptedPeer) -> Recorder:
    server = await asyncio.get_running_loop().create_server(lambda: peer, "127.0.0.1", 0)
    try:
        rec = Recorder()
        s = Session("s", "token-s", rec)
        await open_session(s, "127.0.0.1", server.sockets[0].getsockname()[1])
        await wait_until(lambda: rec.closed, what="the session closed")
        return rec
    finally:
        server.close()


async def test_nothing_is_taken_from_a_server_after_it_refused_the_token() -> None:
    rec = await _against(ScriptedPeer(f.connack(f.BAD_CREDENTIALS)
                                      + f.publish("downlink/ds/Switch", b"1")))
    assert rec.closed == ["bad_credentials"]
    assert rec.messages == []


async def test_a_refused_subscription_closes_the_session() -> None:
    """SUBACK 0x80: the session would look online and never receive a command."""
    rec = await _against(ScriptedPeer(f.connack(0), f.suback(1, [0x80])))
    assert rec.ready == []
    assert rec.closed == ["subscribe_refused"]


async def test_a_peer_that_stops_answering_pings_is_closed() -> None:
    """CONNACK and SUBACK, then silence (a half-open connection, a hung broker): the keepalive
    wheel pings it and, with nothing back for 1.5 × keepalive, closes it."""
    peer = ScriptedPeer(f.connack(0), f.suback(1, [0]))
    server = await asyncio.get_running_loop().create_server(lambda: peer, "127.0.0.1", 0)
    try:
        rec = Recorder()
        s = Session("s", "token-s", rec, keepalive_s=1)
        await open_session(s, "127.0.0.1", server.sockets[0].getsockname()[1])
        await wait_until(lambda: rec.ready, what="subscribed")
        ka = Keepalive(1)
        ka.add(s)
        ka.tick(now=s.last_rx + 1.0)  # due: a PINGREQ, never answered
        assert not rec.closed
        ka.tick(now=s.last_rx + 1.6)  # 1.5 × keepalive of silence
        await wait_until(lambda: rec.closed, what="closed")
        assert rec.closed == ["keepalive_timeout"]
        assert len(ka) == 1
        ka.tick(now=s.last_rx + 3.0)
        assert len(ka) == 0  # the closed session left the wheel
    finally:
        server.close()


async def test_a_topic_that_is_not_utf8_closes_the_session_and_delivers_nothing() -> None:
    bad = f._packet(f.PUBLISH << 4, f._str(b"downlink/ds/\xff") + b"1")
    rec = await _against(ScriptedPeer(f.connack(0), f.suback(1, [0]) + bad))
    assert rec.closed == ["protocol_error: string is not UTF-8"]
    assert rec.messages == []
