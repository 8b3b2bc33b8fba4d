"""The Things Stack stand-in: a fleet publishing TTS v3 MQTT messages, a downlink answerer, and
a private Mosquitto that enforces TTS-style logins.

* :func:`make_uplink` / :func:`make_join` build messages in the exact TTS v3 JSON shape
  (``tests/fixtures/tts``): zero values omitted (the first uplink has no ``f_cnt``), frequency as
  a string, 9-digit fractional times, Packet Broker gateways without EUI, simulated uplinks with
  the ``0001-01-01`` NS time and the fake ``test`` gateway.
* :class:`Fleet` publishes uplinks of N devices at a given rate and remembers what it sent.
* :class:`DownlinkAnswerer` answers ``down/push`` / ``down/replace`` with ``down/queued`` then
  ``down/ack``, or ``down/failed`` (``application_downlink_too_long``) for a payload over the
  limit, in the fixtures' shapes.
* :class:`Mosquitto` runs a private broker on a free port, optionally with a password file and
  ACL so only ``{app}@{tenant}`` + API key may read ``v3/{app}@{tenant}/#``.

``blynk-bridge emulate tts --help`` runs them from the command line.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

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
    sent without one); ``published`` counts every message (joins included).
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

    @property
    def user(self) -> str:
        return f"{self.app_id}@{self.tenant}" if self.tenant else self.app_id

    def device_id(self, index: int) -> str:
        return f"{self.device_prefix}{index:04d}"

    def topic(self, device_id: str, suffix: str = "up") -> str:
        return f"v3/{self.user}/devices/{device_id}/{suffix}"

    async def run(self, count: int | None = None, duration_s: float | None = None) -> int:
        """Publish until ``count`` uplinks or ``duration_s`` seconds (or cancellation);
        returns how many uplinks were published by this call."""
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
            while count is None or done < count:
                elapsed = time.monotonic() - start
                if duration_s is not None and elapsed >= duration_s:
                    break
                due = (int(elapsed * self.rate_per_s) + 1 if math.isfinite(self.rate_per_s)
                       else done + 1000)
                if count is not None:
                    due = min(due, count)
                if due <= done:
                    # Sleep until the next message is due: pacing, not synchronization.
                    await asyncio.sleep((done + 1) / self.rate_per_s - elapsed)
                    continue
                while done < due:
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


@dataclass
class DownlinkAnswerer:
    """Answers ``down/push`` and ``down/replace`` as the TTS Application Server would.

    Every accepted downlink gets ``down/queued`` then ``down/ack``; one whose payload is longer
    than ``max_payload_bytes`` (``frm_payload``, else the JSON of ``decoded_payload``) gets
    ``down/failed`` with ``application_downlink_too_long``. Bodies that are not valid downlink
    JSON are only logged (TTS tells the client nothing either) and counted in ``invalid``.
    ``received`` keeps ``(device_id, downlink)`` of every downlink seen.
    """

    host: str
    port: int
    app_id: str
    tenant: str
    username: str | None = None
    password: str | None = None
    max_payload_bytes: int = 51
    received: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    invalid: int = 0
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)

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
            self.ready.set()
            f_cnt = 0
            async for topic, payload in session.messages():
                device = topic.split("/")[3]
                try:
                    body = json.loads(payload)
                    downlinks = body["downlinks"]
                    if not isinstance(downlinks, list):
                        raise TypeError("downlinks is not a list")
                except (ValueError, KeyError, TypeError) as exc:
                    self.invalid += 1
                    log.warning("invalid downlink on %s: %s", topic, exc)
                    continue
                for dl in downlinks:
                    f_cnt += 1
                    await self._answer(session, device, dl if isinstance(dl, dict) else {}, f_cnt)
                async with self.changed:
                    self.changed.notify_all()

    async def _answer(self, session: mqtt.Session, device: str, dl: dict[str, Any],
                      f_cnt: int) -> None:
        self.received.append((device, dl))
        cid = f"as:downlink:{ulid()}"
        cids = [cid, *[c for c in dl.get("correlation_ids", []) if isinstance(c, str)]]
        ids = _device_ids(self.app_id, device)
        base: dict[str, Any] = {
            k: dl[k] for k in ("f_port", "frm_payload", "decoded_payload", "confirmed") if k in dl
        }
        queued = {**base, "priority": dl.get("priority", "LOWEST"), "correlation_ids": cids}
        topic = f"v3/{self.user}/devices/{device}"
        await session.publish(f"{topic}/down/queued", json.dumps(
            {"end_device_ids": ids, "correlation_ids": cids, "received_at": rfc3339(time.time_ns()),
             "downlink_queued": queued}).encode())
        if _payload_len(dl) > self.max_payload_bytes:
            failed = {
                "downlink": queued,
                "error": {"namespace": "pkg/networkserver",
                          "name": "application_downlink_too_long",
                          "message_format": "application downlink payload is too long",
                          "correlation_id": secrets.token_hex(16), "code": 3},
            }
            await session.publish(f"{topic}/down/failed", json.dumps(
                {"end_device_ids": ids, "correlation_ids": cids,
                 "received_at": rfc3339(time.time_ns()), "downlink_failed": failed}).encode())
            return
        ack = {"session_key_id": _b64(os.urandom(16)), **base, "f_cnt": f_cnt,
               "priority": queued["priority"], "correlation_ids": cids}
        await session.publish(f"{topic}/down/ack", json.dumps(
            {"end_device_ids": ids, "correlation_ids": cids, "received_at": rfc3339(time.time_ns()),
             "downlink_ack": ack}).encode())


def _payload_len(dl: dict[str, Any]) -> int:
    frm = dl.get("frm_payload")
    if isinstance(frm, str):
        try:
            return len(base64.b64decode(frm))
        except ValueError:
            return 0
    if "decoded_payload" in dl:
        return len(json.dumps(dl["decoded_payload"], separators=(",", ":")))
    return 0


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
    p.add_argument("--api-key", help="API key for --serve-broker")
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
        host, port, args.app, args.tenant, username=username, password=password)
    try:
        async with asyncio.TaskGroup() as tg:
            if answerer is not None:
                serving = tg.create_task(answerer.run())
            sent = await fleet.run(count=args.count, duration_s=args.duration)
            print(f"published {sent} uplinks from {args.devices} devices", flush=True)
            if answerer is not None:
                serving.cancel()
    finally:
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
