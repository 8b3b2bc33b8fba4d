"""The Things Stack stand-in: a fleet publishing TTS v3 MQTT messages, a downlink answerer, and
a private Mosquitto that enforces TTS-style logins.

* :func:`make_uplink` / :func:`make_join` build messages in the exact TTS v3 JSON shape
  (``tests/fixtures/tts``): zero values omitted (the first uplink has no ``f_cnt``), frequency as
  a string, 9-digit fractional times, Packet Broker gateways without EUI, simulated uplinks with
  the ``0001-01-01`` NS time and the fake ``test`` gateway.
* :class:`Fleet` publishes uplinks of N devices at a given rate and remembers what it sent.
* :class:`DownlinkAnswerer` takes ``down/push`` / ``down/replace`` (MQTT, and the webhook
  downlink API over HTTP: :meth:`DownlinkAnswerer.http_app`), records them, and answers on the
  broker ``down/queued`` → ``down/sent`` → ``down/ack`` (confirmed downlinks), or ``down/failed``
  / ``down/nack`` (payload too long, or :class:`DownlinkFaults`), in the fixtures' shapes — and,
  with ``outcome_webhook``, posts the same messages to a webhook as TTS does.
* :class:`SimulatedDevices` apply what they receive (Blynk's ``{"name","pin","ts","value"}``,
  any JSON object, or an integer on a known ``f_port``) and report it in their next uplinks.
* :class:`Mosquitto` runs a private broker on a free port, optionally with a password file and
  ACL so only ``{app}@{tenant}`` + API key may read ``v3/{app}@{tenant}/#``.

``blynk-bridge emulate tts --help`` runs them from the command line.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import logging
import math
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, NamedTuple

import aiohttp
from aiohttp import web

from pipeline import mqtt

log = logging.getLogger("blynk_bridge.emulators.tts")

_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


def ulid(rng: random.Random | None = None, ts_ms: int | None = None) -> str:
    """A ULID as TTS uses in correlation ids (48-bit time, 80 random bits, Crockford base32)."""
    ts = int(time.time() * 1000) if ts_ms is None else ts_ms
    bits = (ts << 80) | (rng or random).getrandbits(80)
    return "".join(_CROCKFORD[(bits >> (5 * i)) & 31] for i in range(25, -1, -1))


def rfc3339(ts_ns: int) -> str:
    """``2025-04-16T11:54:13.995136483Z``: nanoseconds, as TTS writes them."""
    sec, ns = divmod(ts_ns, 1_000_000_000)
    return datetime.fromtimestamp(sec, UTC).strftime("%Y-%m-%dT%H:%M:%S") + f".{ns:09d}Z"


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _gateway(rng: random.Random, index: int, packet_broker: bool, ts_ns: int) -> dict[str, Any]:
    rssi = rng.randint(-120, -30)
    snr = round(rng.uniform(-15, 12), 2)
    if packet_broker:
        return {
            "gateway_ids": {"gateway_id": "packetbroker"},
            "packet_broker": {
                "message_id": ulid(rng),
                "forwarder_net_id": "000013",
                "forwarder_tenant_id": "ttn",
                "forwarder_cluster_id": "eu1.cloud.thethings.network",
                "forwarder_gateway_eui": f"B827EBFFFE{rng.getrandbits(24):06X}",
                "forwarder_gateway_id": f"gw-pb-{index}",
                "home_network_net_id": "000013",
                "home_network_tenant_id": "ttn",
                "home_network_cluster_id": "eu1.cloud.thethings.network",
                "hops": [{"received_at": rfc3339(ts_ns), "sender_address": "52.169.73.251",
                          "receiver_name": "router-dataplane-57d9d9bddd-bqm2t",
                          "receiver_agent": "pbdataplane/1.5.2 go/1.16.2 linux/amd64"}],
            },
            "rssi": rssi,
            "channel_rssi": rssi,
            "snr": snr,
            "uplink_token": _b64(rng.randbytes(24)),
        }
    gw: dict[str, Any] = {
        "gateway_ids": {"gateway_id": f"gw-{index}", "eui": f"58A0CBFFFE80{index:04X}"},
        "timestamp": rng.getrandbits(32),
        "rssi": rssi,
        "channel_rssi": rssi,
        "snr": snr,
        "uplink_token": _b64(rng.randbytes(32)),
        "received_at": rfc3339(ts_ns - 40_000_000),
    }
    if index % 3 == 0:
        gw["time"] = rfc3339(ts_ns - 300_000_000)  # a GPS gateway
    elif index % 3 == 1:
        gw["time"] = "1970-01-10T16:12:13.942530Z"  # the garbage some gateways report
    return gw


def make_uplink(
    app_id: str,
    tenant: str,
    device_id: str,
    f_cnt: int,
    decoded: Mapping[str, Any] | None,
    *,
    gateways: int = 1,
    packet_broker: int = 0,
    received_at: int | None = None,
    f_port: int = 1,
    simulated: bool = False,
    frm_payload: bytes | None = None,
    rng: random.Random | None = None,
) -> dict[str, Any]:
    """One ``…/up`` message as TTS v3 publishes it.

    ``received_at`` is nanoseconds since the epoch (default now); ``decoded=None`` leaves out
    ``decoded_payload`` (no formatter, or it failed); ``packet_broker`` of the ``gateways`` are
    Packet Broker entries; zero ``f_cnt``/``f_port`` are omitted as TTS does.
    """
    rng = rng or random.Random()
    ts_ns = time.time_ns() if received_at is None else received_at
    payload = frm_payload if frm_payload is not None else (
        json.dumps(decoded, separators=(",", ":")).encode() if decoded is not None else b"\x01"
    )
    up: dict[str, Any] = {"session_key_id": _b64(rng.randbytes(16))}
    if f_port:
        up["f_port"] = f_port
    if f_cnt:
        up["f_cnt"] = f_cnt
    up["frm_payload"] = _b64(payload)
    if decoded is not None:
        up["decoded_payload"] = dict(decoded)
    sf = rng.choice((7, 7, 7, 8, 9, 10, 12))
    if simulated:
        up["rx_metadata"] = [{"gateway_ids": {"gateway_id": "test"}, "rssi": 42,
                              "channel_rssi": 42, "snr": 4.2}]
        up["settings"] = {"data_rate": {"lora": {"bandwidth": 125000, "spreading_factor": sf}}}
        up["received_at"] = "0001-01-01T00:00:00Z"
    else:
        up["rx_metadata"] = [
            _gateway(rng, i, i >= gateways - packet_broker, ts_ns) for i in range(gateways)
        ]
        up["settings"] = {
            "data_rate": {"lora": {"bandwidth": 125000, "spreading_factor": sf,
                                   "coding_rate": "4/5"}},
            "frequency": str(rng.choice((868100000, 868300000, 868500000, 867100000))),
            "timestamp": rng.getrandbits(32),
        }
        up["received_at"] = rfc3339(ts_ns - 30_000_000)
        up["consumed_airtime"] = f"{0.041216 * 2 ** (sf - 7):.6f}s"
        up["network_ids"] = {"net_id": "000013", "ns_id": "EC656E0000000181",
                             "tenant_id": tenant, "cluster_id": "eu1",
                             "cluster_address": "eu1.cloud.thethings.network"}
    as_up = ulid(rng, ts_ns // 1_000_000)
    correlation_ids = [f"as:up:{as_up}"]
    if simulated:
        correlation_ids.append(f"rpc:/ttn.lorawan.v3.AppAs/SimulateUplink:{ulid(rng)}")
    else:
        correlation_ids += [f"gs:conn:{ulid(rng)}", f"gs:up:host:{ulid(rng)}",
                            f"gs:uplink:{ulid(rng)}", f"ns:uplink:{ulid(rng)}",
                            f"rpc:/ttn.lorawan.v3.GsNs/HandleUplink:{ulid(rng)}",
                            f"rpc:/ttn.lorawan.v3.NsAs/HandleUplink:{ulid(rng)}"]
    msg: dict[str, Any] = {
        "end_device_ids": _device_ids(app_id, device_id),
        "correlation_ids": correlation_ids,
        "received_at": rfc3339(ts_ns),
        "uplink_message": up,
    }
    if simulated:
        msg["simulated"] = True
    return msg


def make_join(app_id: str, tenant: str, device_id: str, *, received_at: int | None = None,
              rng: random.Random | None = None) -> dict[str, Any]:
    """One ``…/join`` message (join-accept) as TTS v3 publishes it."""
    rng = rng or random.Random()
    ts_ns = time.time_ns() if received_at is None else received_at
    return {
        "end_device_ids": _device_ids(app_id, device_id),
        "correlation_ids": [f"as:up:{ulid(rng, ts_ns // 1_000_000)}", f"gs:conn:{ulid(rng)}",
                            f"gs:uplink:{ulid(rng)}", f"ns:uplink:{ulid(rng)}"],
        "received_at": rfc3339(ts_ns),
        "join_accept": {"session_key_id": _b64(rng.randbytes(16)),
                        "received_at": rfc3339(ts_ns - 200_000_000)},
    }


def _device_ids(app_id: str, device_id: str) -> dict[str, Any]:
    h = zlib.crc32(f"{app_id}/{device_id}".encode()) * 0x10001  # stable across processes
    return {
        "device_id": device_id,
        "application_ids": {"application_id": app_id},
        "dev_eui": f"70B3D57ED{h & 0xFFFFFFF:07X}",
        "join_eui": "0000000000000000",
        "dev_addr": f"260B{(h >> 28) & 0xFFFF:04X}",
    }


def default_decoded(device_index: int, f_cnt: int) -> dict[str, Any]:
    """Plausible sensor values that change with every uplink."""
    phase = (device_index * 7 + f_cnt) / 10
    return {
        "temperature": round(21 + 4 * math.sin(phase), 2),
        "humidity": round(55 + 10 * math.cos(phase), 1),
        "battery": 100 - (f_cnt % 100),
        "door_open": f_cnt % 2 == 1,
    }


Decoded = Callable[[int, int], dict[str, Any]]


@dataclass
class Fleet:
    """N devices publishing uplinks at ``rate_per_s`` (all devices together), round robin.

    ``sent[device_id]`` lists the decoded payloads published, in order (``None`` for an uplink
    sent without one); ``published`` counts every message (joins included). ``state`` is the
    devices' downlink-applied state: give it to a :class:`DownlinkAnswerer` (``devices=``) and
    each value a device applied is in its later uplinks' ``decoded_payload``.
    """

    host: str
    port: int
    app_id: str
    tenant: str
    devices: int
    rate_per_s: float
    username: str | None = None
    password: str | None = None
    decoded: Decoded = default_decoded
    join_first: bool = False
    max_gateways: int = 3
    packet_broker_ratio: float = 0.0
    missing_decoded_ratio: float = 0.0
    simulated_ratio: float = 0.0
    device_prefix: str = "dev"
    seed: int | None = None
    record: bool = True
    sent: dict[str, list[dict[str, Any] | None]] = field(default_factory=dict)
    published: int = 0
    state: SimulatedDevices = field(default_factory=lambda: SimulatedDevices())

    def __post_init__(self) -> None:
        self.state.register(self.device_id(i) for i in range(self.devices))

    @property
    def user(self) -> str:
        return f"{self.app_id}@{self.tenant}" if self.tenant else self.app_id

    def device_id(self, index: int) -> str:
        return f"{self.device_prefix}{index:04d}"

    def topic(self, device_id: str, suffix: str = "up") -> str:
        return f"v3/{self.user}/devices/{device_id}/{suffix}"

    async def run(self, count: int | None = None, duration_s: float | None = None,
                  stop: asyncio.Event | None = None) -> int:
        """Publish until ``count`` uplinks, ``duration_s`` seconds or ``stop`` is set (or
        cancellation); returns how many uplinks were published by this call.

        ``stop`` is checked between two messages, also inside a catch-up burst, and wakes the
        pacing wait: a fleet far behind its rate (a busy machine) stops at once, not after
        publishing what it owes."""
        stop = stop or asyncio.Event()
        rng = random.Random(self.seed)
        settings = mqtt.Settings(self.host, self.port, username=self.username,
                                 password=self.password, tcp_nodelay=True,
                                 client_id=f"tts-fleet-{secrets.token_hex(4)}")
        f_cnts = [0] * self.devices
        done = 0
        async with mqtt.Session(settings) as session:
            if self.join_first:
                for i in range(self.devices):
                    join = make_join(self.app_id, self.tenant, self.device_id(i), rng=rng)
                    await session.publish(self.topic(self.device_id(i), "join"),
                                          json.dumps(join).encode())
                    self.published += 1
            start = time.monotonic()
            while (count is None or done < count) and not stop.is_set():
                elapsed = time.monotonic() - start
                if duration_s is not None and elapsed >= duration_s:
                    break
                due = (int(elapsed * self.rate_per_s) + 1 if math.isfinite(self.rate_per_s)
                       else done + 1000)
                if count is not None:
                    due = min(due, count)
                if due <= done:
                    # Wait until the next message is due (pacing), or until told to stop.
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(),
                                               (done + 1) / self.rate_per_s - elapsed)
                    continue
                while done < due and not stop.is_set():
                    index = done % self.devices
                    await self._publish_one(session, rng, index, f_cnts[index])
                    f_cnts[index] += 1
                    done += 1
        return done

    async def _publish_one(self, session: mqtt.Session, rng: random.Random, index: int,
                           f_cnt: int) -> None:
        device = self.device_id(index)
        decoded: dict[str, Any] | None = self.decoded(index, f_cnt)
        if self.missing_decoded_ratio and rng.random() < self.missing_decoded_ratio:
            decoded = None
        elif decoded is not None and device in self.state.state:
            decoded = {**decoded, **self.state.report(device)}
        simulated = bool(self.simulated_ratio) and rng.random() < self.simulated_ratio
        gateways = rng.randint(1, max(1, self.max_gateways))
        pb = sum(rng.random() < self.packet_broker_ratio for _ in range(gateways))
        msg = make_uplink(self.app_id, self.tenant, device, f_cnt, decoded, gateways=gateways,
                          packet_broker=pb, simulated=simulated, rng=rng)
        await session.publish(self.topic(device), json.dumps(msg).encode())
        self.published += 1
        if self.record:
            self.sent.setdefault(device, []).append(decoded)


# --- downlinks -----------------------------------------------------------------------------------

#: The one documented ``down/failed`` error (fixture ``tts-down-failed-01``).
TOO_LONG_ERROR: dict[str, Any] = {"namespace": "pkg/networkserver",
                                  "name": "application_downlink_too_long",
                                  "message_format": "application downlink payload is too long",
                                  "code": 3}
#: The largest application payload of EU868 at DR5 (SF7): a well-placed device.
DEFAULT_MAX_PAYLOAD = 222
Fault = Literal["failed", "nack"]


@dataclass
class DownlinkFaults:
    """Which downlinks go wrong: a device named in ``per_device`` always (``failed`` or
    ``nack``); any other one ``failed`` with probability ``failed_rate``, else ``nack`` with
    ``nack_rate``. A ``nack`` only exists for a confirmed downlink: an unconfirmed one the device
    misses is sent and nothing more is heard (TTS cannot know)."""

    per_device: dict[str, Fault] = field(default_factory=dict)
    failed_rate: float = 0.0
    nack_rate: float = 0.0
    seed: int | None = None

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)

    def pick(self, device: str) -> Fault | None:
        fault = self.per_device.get(device)
        if fault is not None:
            return fault
        roll = self._rng.random() if self.failed_rate or self.nack_rate else 1.0
        if roll < self.failed_rate:
            return "failed"
        if roll < self.failed_rate + self.nack_rate:
            return "nack"
        return None


def applied_values(downlink: Mapping[str, Any], *, report_key: Literal["name", "pin"] = "name",
                   port_keys: Mapping[int, str] | None = None) -> dict[str, Any]:
    """What a simulated device takes from one downlink, as ``{key: value}`` for its uplinks.

    * Blynk's TTS downlink ``{"name":"speed","pin":"v2","ts":…,"value":3}`` (reference 4.1) →
      ``{"speed": 3}`` (``report_key="pin"``: ``{"v2": 3}``; no name: the pin);
    * any other JSON object (``{"led": 1}``, ChirpStack's ``{"label": value}``) → itself;
    * read from ``decoded_payload``, else from ``frm_payload`` when it holds a JSON object, else
      ``frm_payload`` on an ``f_port`` of ``port_keys`` is a big-endian signed integer for that
      key. Anything else → ``{}`` (nothing applied).
    """
    decoded = downlink.get("decoded_payload")
    raw = b""
    frm = downlink.get("frm_payload")
    if isinstance(frm, str):
        try:
            raw = base64.b64decode(frm, validate=True)
        except ValueError:
            raw = b""
    if not isinstance(decoded, dict) and raw[:1] == b"{":
        try:
            decoded = json.loads(raw)
        except ValueError:
            decoded = None
    if isinstance(decoded, dict):
        if "value" in decoded and ("name" in decoded or "pin" in decoded):
            name, pin = decoded.get("name"), decoded.get("pin")
            key = name if report_key == "name" and isinstance(name, str) and name else pin
            return {str(key): decoded["value"]}
        return dict(decoded)
    key = (port_keys or {}).get(downlink.get("f_port", 0))
    if key is not None and raw:
        return {key: int.from_bytes(raw, "big", signed=True)}
    return {}


@dataclass
class SimulatedDevices:
    """End devices that apply the downlinks they receive and report the result.

    ``state[device]`` holds every value applied so far (:func:`applied_values`); a
    :class:`Fleet` sharing this object puts it into each of the device's later uplinks'
    ``decoded_payload`` (over the sensor values), as firmware reporting its settings would. Only
    ``register``-ed devices exist: the downlink API answers 404 for others.
    """

    report_key: Literal["name", "pin"] = "name"
    port_keys: dict[int, str] = field(default_factory=dict)
    #: Report what a device applied in its next uplink only (firmware confirming a change once),
    #: not in every later one: each report is a datastream write in Blynk, and Blynk fires its
    #: webhooks (10 a minute) for every one.
    report_once: bool = False
    ids: set[str] = field(default_factory=set)
    state: dict[str, dict[str, Any]] = field(default_factory=dict)

    def register(self, ids: Iterable[str]) -> None:
        self.ids.update(ids)

    def exists(self, device: str) -> bool:
        return device in self.ids

    def apply(self, device: str, downlink: Mapping[str, Any]) -> dict[str, Any]:
        values = applied_values(downlink, report_key=self.report_key, port_keys=self.port_keys)
        if values:
            self.state.setdefault(device, {}).update(values)
        return values

    def report(self, device: str) -> dict[str, Any]:
        if self.report_once:
            return self.state.pop(device, {})
        return dict(self.state.get(device, ()))


class Received(NamedTuple):
    """One downlink the emulator took, and what became of it."""

    device: str
    downlink: dict[str, Any]
    #: ``push`` or ``replace``.
    operation: str
    #: ``mqtt`` or ``http`` (the webhook downlink API).
    via: str
    #: The last event published: ``ack``, ``nack``, ``failed``, or ``sent`` (an unconfirmed
    #: downlink: TTS publishes no ack for it).
    outcome: str
    correlation_ids: list[str]
    #: What the simulated device applied (``{}``: nothing, or no simulated devices).
    applied: dict[str, Any]


class DownlinkRejected(ValueError):
    """A downlink request TTS would refuse; ``status``/``body`` are the HTTP answer."""

    def __init__(self, status: int, code: int, namespace: str, name: str, message: str) -> None:
        super().__init__(f"{name}: {message}")
        self.status = status
        self.body = tts_error(code, namespace, name, message)


def tts_error(code: int, namespace: str, name: str, message: str) -> dict[str, Any]:
    """A TTS HTTP API error body (gRPC gateway: ``code``, ``message``, ``details``)."""
    return {"code": code, "message": f"error:{namespace}:{name} ({message})",
            "details": [{"@type": "type.googleapis.com/ttn.lorawan.v3.ErrorDetails",
                         "namespace": namespace, "name": name, "message_format": message,
                         "correlation_id": secrets.token_hex(16), "code": code}]}


def parse_downlinks(payload: bytes) -> list[dict[str, Any]]:
    """The ``downlinks`` of a ``down/push|replace`` body; raises :class:`DownlinkRejected`
    (400, TTS's ``invalid argument`` code 3; the error name is an assumption)."""
    try:
        body = json.loads(payload)
        downlinks = body["downlinks"] if isinstance(body, dict) else None
    except (ValueError, KeyError):
        downlinks = None
    if not isinstance(downlinks, list) or not all(isinstance(d, dict) for d in downlinks):
        raise DownlinkRejected(400, 3, "pkg/applicationserver/io/web", "invalid_body",
                               "invalid body")
    for dl in downlinks:
        f_port = dl.get("f_port", 0)
        if not isinstance(f_port, int) or not 0 <= f_port <= 233:
            raise DownlinkRejected(400, 3, "pkg/ttnpb", "validation",
                                   "invalid `f_port`: value must be inside range [1, 233]")
    return downlinks


def _encoded(dl: Mapping[str, Any]) -> bytes:
    """The downlink's bytes: ``frm_payload``, else the stand-in encoder's compact JSON of
    ``decoded_payload`` (a real application runs its ``encodeDownlink`` formatter)."""
    frm = dl.get("frm_payload")
    if isinstance(frm, str):
        try:
            return base64.b64decode(frm)
        except ValueError:
            return b""
    if "decoded_payload" in dl:
        return json.dumps(dl["decoded_payload"], separators=(",", ":")).encode()
    return b""


@dataclass
class DownlinkAnswerer:
    """The TTS Application Server's downlink side, on the real broker and over HTTP.

    Takes ``down/push`` / ``down/replace`` on MQTT, and the webhook downlink API
    (:meth:`http_app`: ``POST /api/v3/as/applications/{app}/webhooks/{id}/devices/{dev}/
    down/push|replace`` with ``Authorization: Bearer <key in api_keys>``; 200 with an empty body,
    as lorawan-stack-docs#1209 reports). Each downlink gets, on the broker, in the fixtures'
    shapes (``tts-down-queued-01``, ``-ack-01/02``, ``-failed-01``):

    * ``down/queued``; then ``down/failed`` (``application_downlink_too_long``) when its bytes
      are over ``max_payload_bytes``, or when :attr:`faults` say so (``fault_error``);
    * else ``down/sent``, the simulated device applies it (:class:`SimulatedDevices`), and a
      confirmed downlink gets ``down/ack`` (or ``down/nack`` by fault). An unconfirmed one ends at
      ``down/sent`` — TTS acks confirmed downlinks only — unless ``ack_unconfirmed``.

    Correlation ids: the downlink's own first, then ``as:downlink:<ULID>`` (fixture ack-01).
    ``decoded_payload`` without ``frm_payload`` is encoded by a stand-in encoder (compact JSON).
    A body that is not downlink JSON, or an unknown device (with ``devices`` given), is only
    counted and logged on MQTT (TTS tells an MQTT client nothing) and answered 400/404 over
    HTTP. ``received`` keeps every downlink taken (:class:`Received`).
    """

    host: str
    port: int
    app_id: str
    tenant: str
    username: str | None = None
    password: str | None = None
    max_payload_bytes: int = DEFAULT_MAX_PAYLOAD
    ack_unconfirmed: bool = False
    faults: DownlinkFaults = field(default_factory=DownlinkFaults)
    fault_error: dict[str, Any] = field(default_factory=lambda: dict(TOO_LONG_ERROR))
    devices: SimulatedDevices | None = None
    #: API keys the HTTP downlink API accepts.
    api_keys: set[str] = field(default_factory=lambda: {"NNSXS.EMULATOR"})
    #: Webhook ids the HTTP downlink API knows; None: any.
    webhook_ids: set[str] | None = None
    #: Also POST every outcome message to this URL, with these headers: a TTS webhook with its
    #: downlink message types enabled (for applications that take webhooks, not MQTT).
    outcome_webhook: str | None = None
    outcome_headers: dict[str, str] = field(default_factory=dict)
    received: list[Received] = field(default_factory=list)
    invalid: int = 0
    unknown_device: int = 0
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)

    def __post_init__(self) -> None:
        self._session: mqtt.Session | None = None
        self._f_cnt: dict[str, int] = {}
        self._session_keys: dict[str, str] = {}
        self._http: aiohttp.ClientSession | None = None

    @property
    def user(self) -> str:
        return f"{self.app_id}@{self.tenant}" if self.tenant else self.app_id

    async def run(self) -> None:
        """Serve until cancelled."""
        settings = mqtt.Settings(self.host, self.port, username=self.username,
                                 password=self.password,
                                 client_id=f"tts-downlinks-{secrets.token_hex(4)}")
        async with mqtt.Session(settings) as session:
            await session.subscribe(mqtt.app_topics(self.user, ("down/push", "down/replace")))
            self._session = session
            self.ready.set()
            try:
                async for topic, payload in session.messages():
                    parts = topic.split("/")
                    try:
                        await self.take(parts[3], parts[5], "mqtt", payload)
                    except DownlinkRejected as exc:
                        log.warning("downlink on %s refused: %s", topic, exc)
            finally:
                self._session = None
                self.ready.clear()
                if self._http is not None:
                    await self._http.close()
                    self._http = None

    async def take(self, device: str, operation: str, via: str,
                   payload: bytes) -> list[Received]:
        """Check, record and answer one ``down/push|replace`` body; raises
        :class:`DownlinkRejected` (and counts it) when TTS would refuse it."""
        try:
            downlinks = parse_downlinks(payload)
            if self.devices is not None and not self.devices.exists(device):
                raise DownlinkRejected(404, 5, "pkg/registry", "device_not_found",
                                       "device not found")
        except DownlinkRejected as exc:
            if exc.status == 404:
                self.unknown_device += 1
            else:
                self.invalid += 1
            raise
        session = self._session
        if session is None:
            raise DownlinkRejected(503, 14, "pkg/applicationserver", "unavailable",
                                   "the emulator's broker connection is down")
        out = [await self._answer(session, device, operation, via, dl) for dl in downlinks]
        async with self.changed:
            self.changed.notify_all()
        return out

    async def wait_for(self, n: int, timeout_s: float = 10.0) -> list[Received]:
        """Wait until at least ``n`` downlinks were answered; raises ``TimeoutError``."""
        async with asyncio.timeout(timeout_s), self.changed:
            await self.changed.wait_for(lambda: len(self.received) >= n)
        return list(self.received)

    def counts(self) -> dict[str, int]:
        out = dict(Counter(r.outcome for r in self.received))
        out.update(received=len(self.received), invalid=self.invalid,
                   unknown_device=self.unknown_device)
        return out

    async def _publish(self, session: mqtt.Session, device: str, kind: str,
                       cids: list[str], body: dict[str, Any]) -> None:
        msg = {"end_device_ids": _device_ids(self.app_id, device), "correlation_ids": cids,
               "received_at": rfc3339(time.time_ns()), f"downlink_{kind}": body}
        data = json.dumps(msg).encode()
        await session.publish(f"v3/{self.user}/devices/{device}/down/{kind}", data)
        if self.outcome_webhook is not None:
            await self._post_outcome(data)

    async def _post_outcome(self, data: bytes) -> None:
        if self._http is None:
            self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
        try:
            async with self._http.post(self.outcome_webhook or "", data=data, headers={
                    "Content-Type": "application/json", **self.outcome_headers}) as resp:
                if resp.status >= 300:
                    log.warning("outcome webhook answered %d", resp.status)
        except (aiohttp.ClientError, TimeoutError) as exc:
            log.warning("outcome webhook failed: %s", type(exc).__name__)

    async def _answer(self, session: mqtt.Session, device: str, operation: str, via: str,
                      dl: dict[str, Any]) -> Received:
        own = [c for c in dl.get("correlation_ids", []) if isinstance(c, str)]
        cids = [*own, f"as:downlink:{ulid()}"]
        data = _encoded(dl)
        item: dict[str, Any] = {}  # ApplicationDownlink's field order, zero values omitted
        if dl.get("f_port"):
            item["f_port"] = dl["f_port"]
        item["frm_payload"] = _b64(data)
        if "decoded_payload" in dl:
            item["decoded_payload"] = dl["decoded_payload"]
        confirmed = dl.get("confirmed") is True
        if confirmed:
            item["confirmed"] = True
        item["priority"] = dl.get("priority") or "LOWEST"
        item["correlation_ids"] = cids
        await self._publish(session, device, "queued", cids, item)
        fault = self.faults.pick(device)
        error: dict[str, Any] | None = None
        if len(data) > self.max_payload_bytes:
            error = TOO_LONG_ERROR
        elif fault == "failed":
            error = self.fault_error
        if error is not None:
            # the fixture's key order: correlation_id before code
            err = {k: v for k, v in error.items() if k != "code"}
            err["correlation_id"] = secrets.token_hex(16)
            err["code"] = error.get("code", 2)
            failed = {"downlink": item, "error": err}
            await self._publish(session, device, "failed", cids, failed)
            return self._record(device, dl, operation, via, "failed", cids, {})
        f_cnt = self._f_cnt[device] = self._f_cnt.get(device, 0) + 1
        key = self._session_keys.setdefault(device, _b64(os.urandom(16)))
        sent = {"session_key_id": key, **{k: v for k, v in item.items() if k == "f_port"},
                "f_cnt": f_cnt, **{k: v for k, v in item.items() if k != "f_port"}}
        await self._publish(session, device, "sent", cids, sent)
        if fault == "nack":  # the device did not get it
            if confirmed:
                await self._publish(session, device, "nack", cids, sent)
                return self._record(device, dl, operation, via, "nack", cids, {})
            return self._record(device, dl, operation, via, "sent", cids, {})
        applied = self.devices.apply(device, dl) if self.devices is not None else {}
        if confirmed or self.ack_unconfirmed:
            await self._publish(session, device, "ack", cids, sent)
            return self._record(device, dl, operation, via, "ack", cids, applied)
        return self._record(device, dl, operation, via, "sent", cids, applied)

    def _record(self, device: str, dl: dict[str, Any], operation: str, via: str, outcome: str,
                cids: list[str], applied: dict[str, Any]) -> Received:
        got = Received(device, dl, operation, via, outcome, cids, applied)
        self.received.append(got)
        return got

    # the webhook downlink API ----------------------------------------------------------------
    def http_app(self) -> web.Application:
        """The webhook downlink API plus ``GET /_admin/downlinks`` (what was taken, counts,
        device state) and ``POST /_admin/faults`` (``{"per_device":{dev:"failed"|"nack"},
        "failed_rate":…, "nack_rate":…}``)."""
        app = web.Application(client_max_size=64 * 1024)
        base = "/api/v3/as/applications/{app}/webhooks/{webhook}/devices/{device}/down/"
        app.router.add_post(base + "{operation:push|replace}", self._http_downlink)
        app.router.add_get("/_admin/downlinks", self._admin_downlinks)
        app.router.add_post("/_admin/faults", self._admin_faults)
        return app

    async def _http_downlink(self, request: web.Request) -> web.Response:
        info = request.match_info
        try:
            self._authorize(request.headers.get("Authorization", ""), info["app"],
                            info["webhook"])
            await self.take(info["device"], info["operation"], "http", await request.read())
        except DownlinkRejected as exc:
            return web.json_response(exc.body, status=exc.status)
        return web.Response(status=200)

    def _authorize(self, header: str, app_id: str, webhook: str) -> None:
        """Bearer key → 401; another application → 403; an unknown webhook → 404 (the error
        bodies are assumptions in TTS's error shape)."""
        key = header[7:].strip() if header[:7].lower() == "bearer " else ""
        if key not in self.api_keys:
            raise DownlinkRejected(401, 16, "pkg/auth", "unauthenticated", "unauthenticated")
        if app_id != self.app_id:
            raise DownlinkRejected(403, 7, "pkg/auth/rights", "no_application_rights",
                                   "no rights for application")
        if self.webhook_ids is not None and webhook not in self.webhook_ids:
            raise DownlinkRejected(404, 5, "pkg/applicationserver/io/web", "webhook_not_found",
                                   "webhook not found")

    async def _admin_downlinks(self, request: web.Request) -> web.Response:
        return web.json_response({
            "counts": self.counts(),
            "received": [r._asdict() for r in self.received],
            "state": self.devices.state if self.devices is not None else {},
        })

    async def _admin_faults(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
            faults = DownlinkFaults(per_device=dict(body.get("per_device", {})),
                                    failed_rate=float(body.get("failed_rate", 0.0)),
                                    nack_rate=float(body.get("nack_rate", 0.0)))
        except (ValueError, TypeError, AttributeError) as exc:
            return web.json_response({"error": str(exc)}, status=400)
        if any(v not in ("failed", "nack") for v in faults.per_device.values()):
            return web.json_response({"error": "per_device values: failed or nack"}, status=400)
        self.faults = faults
        return web.json_response({"per_device": faults.per_device,
                                  "failed_rate": faults.failed_rate,
                                  "nack_rate": faults.nack_rate})


# --- a private broker ----------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Mosquitto:
    """A private ``mosquitto`` on 127.0.0.1 and a free port.

    ``users`` (username → password) turns on authentication: each user may read and write
    ``v3/{username}/#`` only, as a TTS application API key may; ``admin`` (always created when
    users are given) may use every topic — the fleet publishes with it. ``bench=True`` sets
    ``max_queued_messages 0`` and ``set_tcp_nodelay true`` (DESIGN.md, Benchmarks).
    :meth:`stop` and :meth:`start` keep the port, so a test can restart the broker.
    """

    def __init__(self, *, users: Mapping[str, str] | None = None, port: int | None = None,
                 bench: bool = False) -> None:
        self.binary = shutil.which("mosquitto") or (
            "/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None
        )
        if self.binary is None:
            raise RuntimeError("mosquitto is not installed (apt-get install mosquitto)")
        self.host = "127.0.0.1"
        self.port = port or _free_port()
        self.users = dict(users or {})
        self.admin = ("tts-emulator", secrets.token_hex(12)) if self.users else None
        self.bench = bench
        self._dir = Path(tempfile.mkdtemp(prefix="bb-mosquitto-"))
        self._proc: subprocess.Popen[bytes] | None = None
        self._write_config()

    def _write_config(self) -> None:
        lines = [f"listener {self.port} 127.0.0.1", "persistence false", "log_dest stderr",
                 "log_type error", "log_type warning"]
        if os.geteuid() == 0:
            # Started as root, mosquitto drops to user "mosquitto", who cannot read our
            # private temporary directory; stay the user who started it.
            lines.append("user root")
        if self.bench:
            lines += ["max_queued_messages 0", "set_tcp_nodelay true"]
        if self.users:
            passwd = shutil.which("mosquitto_passwd")
            if passwd is None:
                raise RuntimeError("mosquitto_passwd is not installed (apt-get install mosquitto)")
            pw_file = self._dir / "passwd"
            pw_file.write_text("")
            pw_file.chmod(0o600)
            assert self.admin is not None
            for user, password in [*self.users.items(), self.admin]:
                subprocess.run([passwd, "-b", str(pw_file), user, password], check=True,
                               capture_output=True)
            acl = [f"user {self.admin[0]}", "topic readwrite #", ""]
            for user in self.users:
                acl += [f"user {user}", f"topic readwrite v3/{user}/#", ""]
            acl_file = self._dir / "acl"
            acl_file.write_text("\n".join(acl))
            acl_file.chmod(0o600)
            lines += ["allow_anonymous false", f"password_file {pw_file}", f"acl_file {acl_file}"]
        else:
            lines.append("allow_anonymous true")
        (self._dir / "mosquitto.conf").write_text("\n".join(lines) + "\n")

    @property
    def admin_credentials(self) -> tuple[str | None, str | None]:
        return self.admin if self.admin else (None, None)

    def start(self, timeout_s: float = 10.0) -> Mosquitto:
        """Start the broker and return once it accepts connections."""
        if self._proc is not None and self._proc.poll() is None:
            return self
        log_file = (self._dir / "mosquitto.log").open("ab")
        self._proc = subprocess.Popen([self.binary or "mosquitto", "-c",
                                       str(self._dir / "mosquitto.conf")],
                                      stdout=log_file, stderr=log_file)
        log_file.close()
        deadline = time.monotonic() + timeout_s
        while True:  # bounded poll of a real condition: the port accepts connections
            if self._proc.poll() is not None:
                raise RuntimeError(f"mosquitto exited: {self.log()[-2000:]}")
            try:
                socket.create_connection((self.host, self.port), timeout=0.2).close()
                return self
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"mosquitto not listening on {self.port}") from None
                time.sleep(0.02)

    def stop(self) -> None:
        """Stop the broker (SIGTERM, then SIGKILL); connected clients see the connection drop."""
        if self._proc is None:
            return
        if self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)
            try:
                self._proc.wait(5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(5)
        self._proc = None

    def log(self) -> str:
        path = self._dir / "mosquitto.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> Mosquitto:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


# --- command line --------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="blynk-bridge emulate tts",
        description="A simulated TTS application: a device fleet publishing uplinks over MQTT, "
        "and downlink answers.",
    )
    p.add_argument("--host", default="127.0.0.1", help="MQTT broker host")
    p.add_argument("--port", type=int, default=1883, help="MQTT broker port")
    p.add_argument("--app", default="demo-app", help="TTS application id")
    p.add_argument("--tenant", default="ttn", help="TTS tenant id ('' for Open Source)")
    p.add_argument("--username", help="broker username (default: anonymous)")
    p.add_argument("--password", help="broker password")
    p.add_argument("--devices", type=int, default=10)
    p.add_argument("--rate", type=float, default=5.0, help="uplinks per second, whole fleet")
    p.add_argument("--count", type=int, help="stop after this many uplinks")
    p.add_argument("--duration", type=float, help="stop after this many seconds")
    p.add_argument("--join", action="store_true", help="publish a join per device first")
    p.add_argument("--packet-broker", type=float, default=0.2,
                   help="share of gateway entries relayed by Packet Broker")
    p.add_argument("--missing-decoded", type=float, default=0.0,
                   help="share of uplinks without decoded_payload")
    p.add_argument("--simulated", type=float, default=0.0, help="share of simulated uplinks")
    p.add_argument("--no-downlinks", action="store_true", help="do not answer down/push")
    p.add_argument("--serve-broker", type=int, metavar="PORT",
                   help="start a private mosquitto on PORT that only lets {app}@{tenant} with "
                   "--api-key in (prints the admin login the fleet uses)")
    p.add_argument("--api-key", help="API key for --serve-broker and the HTTP downlink API "
                   "(default NNSXS.EMULATOR)")
    p.add_argument("--http-port", type=int, metavar="PORT",
                   help="serve the webhook downlink API (POST /api/v3/as/applications/{app}/"
                   "webhooks/{id}/devices/{dev}/down/push) and /_admin/downlinks on PORT")
    p.add_argument("--max-payload", type=int, default=DEFAULT_MAX_PAYLOAD,
                   help="downlink bytes over this fail (application_downlink_too_long)")
    p.add_argument("--fail-rate", type=float, default=0.0, help="share of downlinks failed")
    p.add_argument("--nack-rate", type=float, default=0.0,
                   help="share of confirmed downlinks nacked")
    p.add_argument("--ack-unconfirmed", action="store_true",
                   help="also publish down/ack for unconfirmed downlinks (TTS does not)")
    return p


async def _amain(args: argparse.Namespace) -> int:
    broker: Mosquitto | None = None
    host, port, username, password = args.host, args.port, args.username, args.password
    if args.serve_broker:
        user = f"{args.app}@{args.tenant}" if args.tenant else args.app
        broker = Mosquitto(users={user: args.api_key or "NNSXS.EMULATOR"},
                           port=args.serve_broker).start()
        host, port = broker.host, broker.port
        username, password = broker.admin_credentials
        print(f"broker on {host}:{port}: bridge logs in as {user}", flush=True)
    fleet = Fleet(host, port, args.app, args.tenant, args.devices, args.rate, username=username,
                  password=password, join_first=args.join,
                  packet_broker_ratio=args.packet_broker,
                  missing_decoded_ratio=args.missing_decoded, simulated_ratio=args.simulated,
                  record=False)
    answerer = None if args.no_downlinks else DownlinkAnswerer(
        host, port, args.app, args.tenant, username=username, password=password,
        max_payload_bytes=args.max_payload, ack_unconfirmed=args.ack_unconfirmed,
        faults=DownlinkFaults(failed_rate=args.fail_rate, nack_rate=args.nack_rate),
        devices=fleet.state, api_keys={args.api_key or "NNSXS.EMULATOR"})
    runner: web.AppRunner | None = None
    try:
        if answerer is not None and args.http_port is not None:
            runner = web.AppRunner(answerer.http_app())
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", args.http_port).start()
            print(f"TTS downlink API on http://127.0.0.1:{args.http_port}", flush=True)
        async with asyncio.TaskGroup() as tg:
            if answerer is not None:
                serving = tg.create_task(answerer.run())
            sent = await fleet.run(count=args.count, duration_s=args.duration)
            print(f"published {sent} uplinks from {args.devices} devices", flush=True)
            if answerer is not None:
                serving.cancel()
    finally:
        if runner is not None:
            await runner.cleanup()
        if broker is not None:
            broker.close()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return asyncio.run(_amain(args))
    except KeyboardInterrupt:
        return 130
    except mqtt.MqttError as exc:
        print(f"tts emulator: {exc.detail}")
        return 1
