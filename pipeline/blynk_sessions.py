"""Pure rules of the blynk-sessions stage (``workers/blynk_sessions.py``): where a device's
Blynk MQTT session goes, which redirects are followed, what becomes a command, offline
deadlines and reconnect backoff (ownership shares: :func:`pipeline.lease.fair_share`). No
sockets, no Redis, no clock reads.

* **Addresses.** A Blynk server (a ``blynk.servers`` base URL) has a device MQTT address:
  ``blynk_sessions.servers`` when configured, else ``mqtts://<host>:8883`` for https and
  ``mqtt://<host>:1883`` for http (Blynk's ports, section 8 of the reference).
* **Redirects** (``downlink/redirect`` = ``host:port``) are followed only to a configured
  session server or to ``<region>.blynk.cloud`` on a TLS port (never elsewhere: the token is the
  password; the host must be one DNS label there, as egress requires of regions), and never
  from a TLS session to a plain-MQTT one. The
  region is remembered as the HTTPS base URL the device API client uses, so egress and every
  replica learn it too.
* **Commands.** ``downlink/ds/<Name>`` of a template's ``downlink.pins`` becomes a
  :class:`~pipeline.events.Downlink` (the webhook receiver's contract): the name resolved to the
  pin through the template, the value as text (a NUL between a location's numbers becomes a
  comma, as the webhooks send it), Blynk's time unknown so the arrival time stands in.
  Other datastreams (sensor values the device itself reports) are not commands.
* **Catch-up.** A session asks ``get/ds/all`` on every (re)connect. Answers carry no time, so a
  value is forwarded only when it differs from the last one known for that pin
  (:func:`is_new`). Known is the last value that came down *or that the device reported
  itself* (its uplinks, which the bridge writes to Blynk and Blynk need not echo): a command
  setting back a value the device changed locally is new. Not forwarded: the value Blynk holds
  set again with no change in between (a webhook would deliver it; the device has it).
"""

from __future__ import annotations

import random
import re
import zlib
from collections.abc import Mapping
from typing import NamedTuple
from urllib.parse import urlsplit

from pipeline.blynk_webhook import VALUE_MAX_BYTES, event_id
from pipeline.config import BlynkConfig, BlynkSessionsConfig, TemplateConfig
from pipeline.echo import canonical
from pipeline.events import Downlink

#: ``Downlink.origin`` of commands that came over a device session.
ORIGIN = "mqtt"
#: A Blynk region host: one DNS label before ``.blynk.cloud`` (the rule the device API client
#: applies to remembered regions, ``pipeline.blynk.client``), so a redirect names a host that
#: can be connected to and that egress accepts too.
BLYNK_HOST = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.blynk\.cloud")


class Address(NamedTuple):
    host: str
    port: int
    tls: bool

    def __str__(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"


def parse_address(url: str) -> Address:
    """``mqtts://host:port`` / ``mqtt://host:port`` → :class:`Address`."""
    u = urlsplit(url)
    if u.scheme not in ("mqtt", "mqtts") or not u.hostname:
        raise ValueError(f"not an mqtt[s]://host:port address: {url!r}")
    tls = u.scheme == "mqtts"
    return Address(u.hostname, u.port or (8883 if tls else 1883), tls)


def derived_address(base_url: str) -> Address | None:
    """A Blynk HTTPS base URL → its MQTT address by Blynk's ports; None if not http(s)."""
    u = urlsplit(base_url)
    if u.scheme not in ("http", "https") or not u.hostname:
        return None
    tls = u.scheme == "https"
    return Address(u.hostname, 8883 if tls else 1883, tls)


class Servers:
    """Blynk servers ↔ device MQTT addresses, and the redirect rule."""

    def __init__(self, blynk: BlynkConfig, sessions: BlynkSessionsConfig) -> None:
        #: Base URL → address; address (host, port) → base URL.
        self.by_base: dict[str, Address] = {}
        self.by_address: dict[tuple[str, int], str] = {}
        for name, base in blynk.servers.items():
            base = base.rstrip("/")
            url = sessions.servers.get(name)
            addr = parse_address(url) if url else derived_address(base)
            if addr is None:
                continue
            self.by_base[base] = addr
            self.by_address[(addr.host, addr.port)] = base
        self.default_base = blynk.servers[blynk.default_server].rstrip("/")

    def address(self, base_url: str | None) -> Address | None:
        """The MQTT address of a server (configured, or derived from a ``*.blynk.cloud`` URL)."""
        base = (base_url or self.default_base).rstrip("/")
        addr = self.by_base.get(base)
        if addr is not None:
            return addr
        derived = derived_address(base)
        if derived is not None and BLYNK_HOST.fullmatch(derived.host) and derived.tls:
            return derived
        return None

    def redirect(self, payload: bytes, *, tls: bool) -> tuple[Address, str] | None:
        """``downlink/redirect``'s ``host:port`` → (address, HTTPS base URL to remember), or
        None when it points anywhere but a configured server or ``<region>.blynk.cloud``, or
        (``tls``: the session that got it is TLS) to a plain-MQTT server: no downgrade."""
        try:
            text = payload.decode("ascii").strip()
        except UnicodeDecodeError:
            return None
        host, sep, port_text = text.rpartition(":")
        if not sep or not port_text.isdigit() or not host or len(text) > 300:
            return None
        port = int(port_text)
        host = host.lower()
        base = self.by_address.get((host, port))
        if base is not None:
            addr = self.by_base[base]
            return (addr, base) if addr.tls or not tls else None
        if BLYNK_HOST.fullmatch(host) and port in (8883, 443, 9443):
            # Only TLS ports: the token must not go anywhere in clear text.
            return Address(host, port, True), f"https://{host}"
        return None


def command_pins(template: TemplateConfig) -> dict[str, str]:
    """Datastream name → pin (``V2``) of the template's command pins (``downlink.pins``)."""
    if template.downlink is None:
        return {}
    wanted = {p.upper() for p in template.downlink.pins}
    return {ds.name: ds.pin.upper() for ds in template.datastreams if ds.pin.upper() in wanted}


def command(token: str, pins: Mapping[str, str], topic: str, payload: bytes,
            now_ms: int) -> Downlink | None:
    """A ``downlink/ds/<Name>`` message → the command it carries; None when ``Name`` is not a
    command pin. Raises ``ValueError`` for a value that is not UTF-8 or is over Blynk's
    1,024 bytes (the stage counts it)."""
    if not topic.startswith("downlink/ds/"):
        return None
    pin = pins.get(topic[12:])
    if pin is None:
        return None
    if len(payload) > VALUE_MAX_BYTES:
        raise ValueError(f"value of {len(payload)} bytes is over {VALUE_MAX_BYTES}")
    value = payload.decode("utf-8").replace("\0", ",")
    return Downlink(event_id=event_id(None, token, pin, now_ms, value), origin=ORIGIN, pin=pin,
                    value=value, ts_ms=now_ms, received_ts_ms=now_ms, token=token)


def is_new(value: str, last_known: str | None) -> bool:
    """Forward a value unless it is the last one known for its pin (see the module doc)."""
    return last_known is None or canonical(value) != last_known


def partition_of(token: str, partitions: int) -> int:
    """The ownership partition of a Blynk token (the unit Blynk allows one session for)."""
    return zlib.crc32(token.encode()) % partitions


def offline_deadline_ms(now_ms: int, previous_ms: int | None, min_s: int) -> int:
    """When the session of a device that sent an uplink at ``now_ms`` closes: 3 × its observed
    uplink interval, at least ``min_s``."""
    gap = now_ms - previous_ms if previous_ms is not None and previous_ms < now_ms else 0
    return now_ms + max(min_s * 1000, 3 * gap)


def backoff_s(attempt: int, cap_s: float, rng: random.Random | None = None,
              base_s: float = 1.0) -> float:
    """Full-jitter backoff before reconnect ``attempt`` (0 = first): uniform(0, min(cap,
    base × 2^n)) so that sessions dropped together (a Blynk restart) come back spread out."""
    r = rng or random
    return r.uniform(0.0, min(cap_s, base_s * 2.0 ** min(attempt, 16)))
