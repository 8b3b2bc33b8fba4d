"""The emulated Blynk device MQTT API (``docs/reference/blynk-api.md`` section 8), per region.

One asyncio server per region (:meth:`DeviceMqtt.serve`), MQTT 3.1.1, no TLS (the emulator's
HTTP side has none either). What a device sees:

* CONNECT with username ``device`` and password = a device token; anything else, or an unknown
  token: CONNACK 0x04 and the connection closed (``bad_credentials``);
* a token of another region: CONNACK 0, then ``downlink/redirect`` with that region's
  ``host:port``, then the connection closed (``redirects``);
* one client per token: a second CONNECT with the same token disconnects the older client
  (``kicked``) — Blynk refuses two; which one it drops is UNCONFIRMED;
* every datastream change from the app (``/_admin/devices/{id}/app-write``) or the platform API
  → ``downlink/ds/<Datastream Name>`` with the value as text (a location's two numbers separated
  by NUL); the device's own writes only when ``settings.mqtt_echo_device_writes`` (UNCONFIRMED);
* from the device: ``ds/<Name>`` (plain-text value), ``batch_ds`` (JSON object name → value),
  ``get/ds/all`` and ``get/ds`` (answered on ``downlink/ds/*``), ``info/mcu`` (kept per device,
  :attr:`DeviceMqtt.mcu`); QoS 1 publishes are PUBACKed; PINGREQ → PINGRESP; a client silent
  for 1.5 × its keepalive is disconnected.

Everything is counted in :attr:`DeviceMqtt.stats`; :attr:`DeviceMqtt.connects` keeps
``(monotonic time, token, outcome)`` of recent CONNECTs so tests can see reconnect pacing.
:meth:`DeviceMqtt.drop_all` closes every session (a Blynk restart).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter, deque
from typing import TYPE_CHECKING, Any, cast

import msgspec

from emulators.blynk.model import Datastream, Device, Mismatch, Value, format_value
from pipeline import mqtt_frames as f

if TYPE_CHECKING:
    from emulators.blynk.server import BlynkEmulator

_json = msgspec.json.Decoder()


def wire_value(v: Value) -> bytes:
    """A value as ``downlink/ds`` carries it: text; a location's items separated by NUL."""
    if isinstance(v, list):
        return "\0".join(format_value(x) for x in v).encode()
    return format_value(v).encode()


class _Conn(asyncio.Protocol):
    """One device connection to one region's endpoint."""

    def __init__(self, mqtt: DeviceMqtt, region: str) -> None:
        self.mqtt = mqtt
        self.region = region
        self.transport: asyncio.Transport | None = None
        self.reader = f.Reader(max_packet=2 * 1024 * 1024)
        self.device: Device | None = None
        self.subscribed = False
        self.keepalive_s = 0
        self.last_rx = time.monotonic()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.mqtt.conns.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.mqtt.conns.discard(self)
        d = self.device
        if d is not None and self.mqtt.sessions.get(d.token) is self:
            del self.mqtt.sessions[d.token]

    def data_received(self, data: bytes) -> None:
        self.last_rx = time.monotonic()
        try:
            for kind, flags, body in self.reader.feed(data):
                self.packet(kind, flags, body)
        except f.FrameError:
            self.mqtt.stats["protocol_errors"] += 1
            self.close()

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def packet(self, kind: int, flags: int, body: bytes) -> None:
        if self.device is None:
            if kind != f.CONNECT:
                self.close()
                return
            self.connect(f.Connect(body))
            return
        if kind == f.PUBLISH:
            topic, payload, qos, pid = f.parse_publish(flags, body)
            if qos:
                self.write(f.puback(pid))
            self.mqtt.on_publish(self.device, topic, payload, self)
        elif kind == f.SUBSCRIBE:
            pid, topics = f.parse_subscribe(body)
            self.subscribed = True
            self.write(f.suback(pid, [min(q, 1) for _, q in topics]))
        elif kind == f.UNSUBSCRIBE:
            self.write(f.unsuback(f.packet_id(body)))
        elif kind == f.PINGREQ:
            self.write(f.PINGRESP_BYTES)
        elif kind == f.DISCONNECT:
            self.close()

    def connect(self, c: f.Connect) -> None:
        mqtt = self.mqtt
        d = mqtt.emu.model.by_token.get(c.password or "") if c.username == "device" else None
        now = time.monotonic()
        if d is None:
            mqtt.stats["bad_credentials"] += 1
            mqtt.connects.append((now, c.password or "", "bad_credentials"))
            self.write(f.connack(f.BAD_CREDENTIALS))
            self.close()
            return
        self.keepalive_s = c.keepalive_s
        self.write(f.connack(f.ACCEPTED))
        if d.region != self.region and d.region in mqtt.addresses:
            host, port = mqtt.addresses[d.region]
            mqtt.stats["redirects"] += 1
            mqtt.connects.append((now, d.token, "redirect"))
            self.write(f.publish("downlink/redirect", f"{host}:{port}".encode()))
            self.close()
            return
        old = mqtt.sessions.get(d.token)
        if old is not None:
            mqtt.stats["kicked"] += 1
            old.device = None  # its connection_lost must not unregister the newcomer
            old.close()
        self.device = d
        mqtt.sessions[d.token] = self
        mqtt.stats["connects"] += 1
        mqtt.connects.append((now, d.token, "accepted"))


class DeviceMqtt:
    """The device MQTT endpoints of one emulator (one listener per region)."""

    def __init__(self, emu: BlynkEmulator) -> None:
        self.emu = emu
        #: Token → the device's current connection.
        self.sessions: dict[str, _Conn] = {}
        self.conns: set[_Conn] = set()
        #: Region → (host, port) once serving.
        self.addresses: dict[str, tuple[str, int]] = {}
        #: Device id → its last ``info/mcu`` object.
        self.mcu: dict[int, Any] = {}
        self.stats: Counter[str] = Counter()
        self.connects: deque[tuple[float, str, str]] = deque(maxlen=100_000)
        self._servers: list[asyncio.AbstractServer] = []
        self._sweeper: asyncio.Task[None] | None = None
        emu.model.listeners.append(self.on_update)

    # serving ---------------------------------------------------------------------------------
    async def serve(self, ports: dict[str, int], host: str, advertise: str) -> None:
        loop = asyncio.get_running_loop()
        for region, port in ports.items():
            server = await loop.create_server(lambda r=region: _Conn(self, r),  # type: ignore[misc]
                                              host, port, reuse_address=True)
            self._servers.append(server)
            real = server.sockets[0].getsockname()[1]
            self.addresses[region] = (advertise, real)
        self._sweeper = asyncio.create_task(self._sweep(), name="blynk-mqtt-keepalive")

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        for s in self._servers:
            s.close()
        self.drop_all()
        for s in self._servers:
            await s.wait_closed()
        self._servers = []

    async def _sweep(self) -> None:
        """Disconnect clients silent for 1.5 × their keepalive, as a broker does."""
        while True:
            await asyncio.sleep(1.0)
            now = time.monotonic()
            for c in list(self.conns):
                if c.keepalive_s and now - c.last_rx > 1.5 * c.keepalive_s:
                    self.stats["keepalive_timeouts"] += 1
                    c.close()

    def drop_all(self) -> int:
        """Close every connection (a Blynk restart); returns how many."""
        conns = list(self.conns)
        for c in conns:
            c.close()
        return len(conns)

    def url(self, region: str) -> str:
        host, port = self.addresses[region]
        return f"mqtt://{host}:{port}"

    # cloud → device --------------------------------------------------------------------------
    def on_update(self, device: Device, ds: Datastream, value: Value, ts_ms: int) -> None:
        if device.last_write_origin == "device" and not self.emu.settings.mqtt_echo_device_writes:
            return
        conn = self.sessions.get(device.token)
        if conn is not None and conn.subscribed:
            conn.write(f.publish(f"downlink/ds/{ds.name}", wire_value(value)))
            self.stats["downlinks"] += 1

    def _send_values(self, conn: _Conn, device: Device, names: list[str] | None) -> None:
        for ds in device.template.datastreams:
            if names is not None and ds.name not in names:
                continue
            v = device.value(ds.pin)
            if v is not None:
                conn.write(f.publish(f"downlink/ds/{ds.name}", wire_value(v)))
                self.stats["downlinks"] += 1

    # device → cloud --------------------------------------------------------------------------
    def on_publish(self, device: Device, topic: str, payload: bytes, conn: _Conn) -> None:
        self.stats[f"publish:{topic.split('/')[0] if not topic.startswith('get/') else topic}"] += 1
        emu = self.emu
        now = emu.now_ms()
        try:
            if topic == "get/ds/all":
                self._send_values(conn, device, None)
            elif topic == "get/ds":
                self._send_values(conn, device, [n.strip() for n in payload.decode().split(",")])
            elif topic == "info/mcu":
                self.mcu[device.id] = _json.decode(payload)
            elif topic == "batch_ds":
                obj = _json.decode(payload)
                if not isinstance(obj, dict):
                    raise Mismatch("batch_ds must be a JSON object")
                by_name = {d.name: d for d in device.template.datastreams}
                values = []
                for name, raw in obj.items():
                    ds = by_name.get(name)
                    if ds is None:
                        raise Mismatch(f"no datastream {name!r}")
                    values.append((ds, ds.coerce_json(raw,
                                                      string_max=emu.settings.string_max_bytes)))
                emu.model.write_current(device, values, now)
            elif topic.startswith("ds/") and topic.count("/") == 1:
                name = topic[3:]
                ds = next((d for d in device.template.datastreams if d.name == name), None)
                if ds is None:
                    raise Mismatch(f"no datastream {name!r}")
                emu.model.write(device, ds, ds.coerce_text(
                    payload.decode().replace("\0", ","),
                    string_max=emu.settings.string_max_bytes), now)
            else:
                self.stats["ignored"] += 1
        except (Mismatch, UnicodeDecodeError, msgspec.DecodeError):
            # Blynk reports such errors in the device's log, not on the connection.
            self.stats["rejected"] += 1
