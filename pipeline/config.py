"""Typed configuration: one YAML or TOML file, validated at start-up.

This is the only module that reads ``os.environ``. Loading does, in order:

1. YAML (``.yaml``/``.yml``) or TOML (``.toml``) parsing (:mod:`pipeline.config_source`: a
   key written twice and an empty file are errors; the position of every key is kept);
2. ``${NAME}`` / ``${NAME:-default}`` substitution inside parsed string values — never into the
   file's text, so a value holding ``#``, quotes or ``, key: value`` stays one value. A value
   that is one reference and lands on a number, boolean or null field is read as one
   (``port: "${PORT}"``); anywhere a string goes it stays a string. An unset variable without a
   default is an error naming the variable, the key path that uses it and the file
   (:func:`substitute_all`; the Blynk emulator's file uses the same rule);
3. ``*_file`` keys: ``api_key_file: /run/secrets/tts`` reads that file into ``api_key``;
   keys that moved (:data:`MOVED`) are moved to their new place, with a warning;
4. validation with msgspec: unknown keys (with the closest known one), wrong types and numbers
   out of their range (``Annotated`` bounds below) are errors that name the key path and the
   file; then cross-field checks (:func:`check`), among them: every inbound integration has
   auth (or says ``auth: none``), and no inbound secret is one published with the demo.

Every error is a :class:`ConfigError` whose problems name the key path and, for YAML, the line
and column the file holds it on (or its nearest enclosing key: a default, a missing key). The
``#:`` comment above a field is its description in ``blynk-bridge config schema|default``
(:mod:`pipeline.config_schema`).
"""

from __future__ import annotations

import difflib
import logging
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin

import msgspec
import msgspec.inspect as mi

from pipeline import config_source
from pipeline.batching import DEFAULT_LINGER_ABOVE_PER_S
from pipeline.errors import ConfigError, ConfigProblem
from pipeline.keys import Keys
from pipeline.redact import Secret

log = logging.getLogger("blynk_bridge.config")

DatastreamType = Literal["integer", "double", "string", "enum", "location"]
#: Seconds an event time may lie past its arrival before it counts as a wrong clock and becomes
#: the arrival time (pipeline.eventtime.clamp_future).
ClockSkew = Annotated[float, msgspec.Meta(ge=0)]

# Ranges of numeric settings, checked at load with a message naming the key, its line and the
# range. Counts, sizes, limits and times that must pass are at least 1 (0 would stop a stage or
# make Redis refuse the command, e.g. ``EX 0``); a 0 that means "off"/"at once" is documented
# at its field.
AtLeast1 = Annotated[int, msgspec.Meta(ge=1)]
AtLeast0 = Annotated[int, msgspec.Meta(ge=0)]
#: Seconds that must pass (timeouts, intervals, backoff caps).
Positive = Annotated[float, msgspec.Meta(gt=0)]
NonNegative = Annotated[float, msgspec.Meta(ge=0)]
Port = Annotated[int, msgspec.Meta(ge=1, le=65535)]
#: A port to listen on: 0 lets the system pick a free one (tests, one-off runs).
ListenPort = Annotated[int, msgspec.Meta(ge=0, le=65535)]
#: LoRaWAN application port of a downlink (the range the bridge has always accepted).
FPort = Annotated[int, msgspec.Meta(ge=1, le=233)]


class _Base(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, omit_defaults=True):
    pass


class RedisConfig(_Base):
    #: Redis URL, e.g. ``redis://:password@host:6379/0`` (``rediss://`` for TLS).
    url: str = "redis://127.0.0.1:6379/0"
    #: Prefix of every key blynk-bridge writes (streams, registry, leases, statuses).
    prefix: str = "bb:"
    #: Number of partitions of each stream (1 = unpartitioned).
    partitions: AtLeast1 = 1
    #: Talk to a Redis Cluster (redis-py's ``RedisCluster``); implied by a
    #: ``redis+cluster://host:port,...`` URL. Keys then carry their partition's hash tag
    #: (:mod:`pipeline.keys`); give at least as many ``partitions`` as the cluster has masters.
    cluster: bool = False

    @property
    def is_cluster(self) -> bool:
        """Cluster mode: ``cluster: true`` or a ``redis+cluster://`` URL."""
        return self.cluster or self.url.startswith("redis+cluster://")

    def keys(self) -> Keys:
        """The key names of this deployment (layout, prefix, partitions)."""
        return Keys(self.prefix, self.partitions, cluster=self.is_cluster)


class StreamsConfig(_Base):
    #: Deliveries of one entry before it is dead-lettered (``max_deliveries`` in DESIGN.md).
    max_deliveries: AtLeast1 = 5
    #: Pending entries idle this long are taken over from dead consumers (XAUTOCLAIM).
    claim_idle_ms: AtLeast1 = 30_000
    #: How long one blocking read waits for new entries.
    block_ms: AtLeast1 = 2_000
    #: Entries read per batch.
    batch: AtLeast1 = 500
    #: Reads go at once (a batch holds what arrived while the previous one was handled), so
    #: at low load no entry waits for a timer. While more than ``linger_above_per_s`` entries
    #: per second are read, a read after a small batch waits until ``linger_ms`` after it, so
    #: batches fill at high rates (fewer round trips and less CPU per entry; adds at most
    #: ``linger_ms`` of latency). ``linger_ms: 0`` = never wait; ``linger_above_per_s: 0`` =
    #: wait after every small batch (the behaviour before issue 15). Used by transform.
    linger_ms: AtLeast0 = 10
    linger_above_per_s: NonNegative = DEFAULT_LINGER_ABOVE_PER_S
    #: Consumer name; default ``<hostname>-<pid>``.
    consumer: str | None = None


class PlatformConfig(_Base):
    """Blynk Platform API (OAuth2 client credentials) used to create devices."""

    #: Base URL of the Platform API, e.g. ``https://fra1.blynk.cloud``.
    url: str
    client_id: str
    client_secret: Secret
    #: Organization (and owner) the created devices belong to; default: the OAuth2 client's own.
    org_id: int | None = None
    owner_id: int | None = None


class BlynkConfig(_Base):
    #: Region name → base URL, e.g. ``{fra1: "https://fra1.blynk.cloud"}``.
    servers: dict[str, str] = msgspec.field(
        default_factory=lambda: {"default": "https://blynk.cloud"}
    )
    #: The ``servers`` region used for devices that name none.
    default_server: str = "default"
    #: Total timeout of one request to Blynk.
    timeout_s: Positive = 10.0
    #: Connections to Blynk kept open per process.
    max_connections: AtLeast1 = 100
    #: The Platform API, needed to create devices and pull datastreams.
    platform: PlatformConfig | None = None


class DatastreamConfig(_Base):
    #: Datastream name as in Blynk (decoded keys with this name map onto it).
    name: str
    #: Virtual pin, ``V0``..``V255``.
    pin: str
    #: Blynk data type; values are converted to it.
    type: DatastreamType = "double"
    #: Values outside ``min``..``max`` are clamped, as Blynk does.
    min: float | None = None
    max: float | None = None
    #: Enum: the value → label options; values outside fall back to ``fallback``.
    options: dict[str, int] | None = None
    fallback: int | None = None
    #: Keep every point in Blynk's history: values superseded before egress wrote them, and
    #: backlog older than ``egress.live_window_s``, go to the timestamped upload at their true
    #: times (else superseded values are only counted: ``bb_superseded_values_total``).
    history: bool = False
    id: int | None = None


class KeyMapping(_Base):
    """How one decoded key lands on a datastream."""

    #: Datastream name or pin (``V3``).
    to: str
    #: Written value = ``value * scale + offset`` (an integer datastream then rounds).
    scale: float | None = None
    offset: float | None = None


class ParticleFunction(_Base):
    """A pin whose changes call a Particle function (downlinks)."""

    function: str
    #: The ``arg`` sent; ``{name}``, ``{pin}``, ``{value}`` and ``{ts}`` are replaced.
    arg: str = "{name}={value}"
    #: Write the function's ``return_value`` to this datastream (``V5``).
    return_pin: str | None = None


class EncodeRule(_Base):
    """Pack a downlink value into ``frm_payload`` bytes for devices with no downlink formatter
    in TTS: ``uint8``/``int16``/``float32``, big or little endian, sent on ``f_port``."""

    pin: str
    type: Literal["uint8", "int8", "uint16", "int16", "uint32", "int32", "float32"] = "uint8"
    endian: Literal["big", "little"] = "big"
    f_port: FPort | None = None


class TemplateDownlink(_Base):
    """How a template's datastream changes reach its devices (see ``workers/downlink.py``)."""

    #: Particle: pin → function to call.
    particle: dict[str, ParticleFunction] = msgspec.field(default_factory=dict)
    #: TTS: pins sent as ``frm_payload`` bytes instead of ``decoded_payload``.
    encode: list[EncodeRule] = msgspec.field(default_factory=list)
    #: A datastream that receives each command's outcome: 1 delivered, 0 failed.
    outcome_pin: str | None = None
    #: ``downlinks: mqtt``: the pins whose changes a device session forwards as commands (the
    #: session receives every datastream, sensor values included).
    pins: list[str] = msgspec.field(default_factory=list)


class TemplateConfig(_Base):
    #: Name the integrations, rules and devices refer to.
    name: str
    #: Blynk template id (``TMPL…``), needed for auto-provisioning and datastream pulls.
    id: str | None = None
    #: The template's datastreams (virtual pins).
    datastreams: list[DatastreamConfig] = msgspec.field(default_factory=list)
    #: Decoded key → datastream name/pin, or a full mapping with scale/offset.
    mapping: dict[str, str | KeyMapping] = msgspec.field(default_factory=dict)
    #: Pull datastreams from the Blynk Platform API instead of (or on top of) ``datastreams``.
    pull: bool = False
    #: How datastream changes in Blynk go down to the devices.
    downlink: TemplateDownlink | None = None
    #: How datastream changes made in Blynk reach the bridge: ``webhook`` (Blynk webhooks →
    #: ``POST /blynk/{name}``) or ``mqtt`` (the blynk-sessions stage holds each device's Blynk
    #: MQTT session; needs ``downlink.pins``).
    downlinks: Literal["webhook", "mqtt"] = "webhook"


class HttpAuth(_Base):
    """Shared-secret header or HTTP basic auth for an inbound integration."""

    header: str | None = None
    secret: Secret | None = None
    username: str | None = None
    password: Secret | None = None


class TemplateRule(_Base):
    """Choose a template by a ``device_meta`` field (first match wins)."""

    template: str
    field: str
    equals: str


class TtsApplication(_Base):
    #: Integration name: the webhook path ``/tts/{name}``, metrics label, and part of event ids.
    name: str
    #: The TTS application id.
    app_id: str
    #: TTS tenant (``ttn`` on The Things Network); the MQTT username is ``app_id@tenant``.
    tenant: str = "ttn"
    #: TTS MQTT host.
    host: str = "eu1.cloud.thethings.network"
    #: MQTT port; default 8883 (TLS), 1883 with ``insecure``.
    port: Port | None = None
    #: Plain MQTT: sends the API key in clear text.
    insecure: bool = False
    #: TTS application API key (MQTT password; HTTP downlinks).
    api_key: Secret | None = None
    #: CA bundle for the TLS connection; default: the system's.
    ca_file: str | None = None
    #: Template of this application's devices (or ``template_rules``).
    template: str | None = None
    template_rules: list[TemplateRule] = msgspec.field(default_factory=list)
    #: Create devices unknown to Blynk from the template.
    provision: bool = False
    #: Auto-provisioning limits (:mod:`pipeline.provision`): devices created per second
    #: across replicas, how many at once, and how many in all for this integration.
    provision_rate: Annotated[float, msgspec.Meta(gt=0)] = 1.0
    provision_burst: Annotated[int, msgspec.Meta(ge=1)] = 10
    provision_max: Annotated[int, msgspec.Meta(ge=0)] = 1000
    #: Map raw payloads when no ``decoded_payload`` came (else dead-letter ``no_decoded_payload``).
    raw_payload_key: str | None = None
    #: Inbound TTS webhooks for this application (``POST /tts/{name}``); unset: no webhooks,
    #: ``none``: webhooks from anyone.
    webhook_auth: HttpAuth | NoAuth | None = None
    #: LoRaWAN port of decoded-payload downlinks.
    downlink_f_port: FPort = 1
    #: Drop uplinks simulated in the TTS console (counted).
    skip_simulated: bool = False
    max_clock_skew_s: ClockSkew = 300.0
    #: ``push`` appends to the device's downlink queue, ``replace`` replaces it.
    downlink_queue: Literal["push", "replace"] = "push"
    #: ``mqtt`` publishes downlinks on the application's MQTT connection; ``http`` posts them
    #: to ``{api_url}/api/v3/as/applications/{app}/webhooks/{downlink_webhook_id}/…``.
    downlink_via: Literal["mqtt", "http"] = "mqtt"
    api_url: str | None = None
    downlink_webhook_id: str | None = None

    @property
    def username(self) -> str:
        return f"{self.app_id}@{self.tenant}" if self.tenant else self.app_id

    @property
    def effective_port(self) -> int:
        return self.port if self.port is not None else (1883 if self.insecure else 8883)


#: ``auth: none``: an inbound integration open to anyone, written out on purpose.
NoAuth = Literal["none"]

#: Secrets published with blynk-bridge's demo (examples, emulators): refused for inbound auth,
#: where they would let anyone who read the repository post data.
DEMO_SECRETS = frozenset({"demo-webhook-secret", "demo-secret", "demo-blynk-secret"})


class ParticleProduct(_Base):
    #: Integration name: the webhook path ``/particle/{name}``, metrics label, and part of event
    #: ids.
    name: str
    #: Template of this product's devices (or ``template_rules``).
    template: str | None = None
    template_rules: list[TemplateRule] = msgspec.field(default_factory=list)
    #: Create devices unknown to Blynk from the template.
    provision: bool = False
    #: As for :class:`TtsApplication`.
    provision_rate: Annotated[float, msgspec.Meta(gt=0)] = 1.0
    provision_burst: Annotated[int, msgspec.Meta(ge=1)] = 10
    provision_max: Annotated[int, msgspec.Meta(ge=0)] = 1000
    #: Required: a shared-secret header, HTTP basic, or ``none`` (anyone may post).
    auth: HttpAuth | NoAuth | None = None
    #: Particle Cloud API for downlinks (function calls).
    api_url: str = "https://api.particle.io"
    #: Particle API token for function calls (downlinks).
    access_token: Secret | None = None
    #: Particle product id, recorded in each uplink's ``device_meta``.
    product_id: str | None = None
    #: ``any``: the device id of the webhook URL's query when it has one, else the body's;
    #: ``query``: only the query's, and a body naming another device is refused.
    device_id_from: Literal["any", "query"] = "any"
    #: Undo the HTML escaping of Particle's ``{{var}}`` (double-brace) template variables.
    html_unescape: bool = True
    max_clock_skew_s: ClockSkew = 300.0


class DeviceEntry(_Base):
    """A static device table row: source device → Blynk token."""

    source: Literal["particle", "tts"]
    integration: str
    #: Device id in its cloud (Particle device id, TTS ``device_id``).
    device: str
    #: The Blynk device's auth token.
    token: Secret
    template: str
    #: A ``blynk.servers`` region; default ``blynk.default_server``.
    server: str | None = None


class BlynkWebhook(_Base):
    """A Blynk webhook posting datastream changes to ``POST /blynk/{name}`` (downlinks)."""

    name: str
    auth: HttpAuth | None = None


class DownlinkConfig(_Base):
    """The downlink stage (``workers/downlink.py``)."""

    #: A command older than this (by its Blynk time) is dead-lettered, never sent late.
    ttl_s: AtLeast1 = 600
    #: Cap of the retry backoff of an offline device.
    max_backoff_s: Positive = 30.0
    #: Timeout of one Particle or TTS HTTP call.
    timeout_s: Positive = 35.0
    #: How long a command's correlation is kept for matching TTS outcomes.
    outcome_ttl_s: AtLeast1 = 3_600
    #: Registry rows kept in memory (LRU) to resolve Blynk devices.
    cache_size: AtLeast1 = 100_000


class EchoConfig(_Base):
    """Echo records (``pipeline/echo.py``): egress writes one per value it sends to Blynk, the
    downlink stage consumes it; a section of its own because both stages must agree on it."""

    #: A webhook repeating a value the bridge itself wrote to that pin this recently is an
    #: echo of the uplink, not a command.
    window_ms: AtLeast0 = 60_000


class IngestHttpConfig(_Base):
    #: Address the webhook server listens on.
    host: str = "0.0.0.0"
    #: Port of the webhook server (0: any free port).
    port: ListenPort = 8080
    #: Larger request bodies are refused with 413.
    max_body_bytes: AtLeast1 = 64 * 1024
    #: Refuse input with 503 + Retry-After when the uplinks stream lag passes this (entries; 0:
    #: whenever transform is behind at all)…
    backlog_high_water: AtLeast0 = 1_000_000
    #: …or when the uplinks streams hold more than this many bytes in Redis (``MEMORY USAGE``).
    backlog_high_water_bytes: AtLeast1 = 1 << 30
    #: A connection whose request head (request line and headers) has not fully arrived this
    #: long after it opened, or after the first byte of a next request, is closed.
    header_timeout_s: Positive = 10.0
    #: A request body not fully read this long after its head arrived: 408, connection closed.
    body_timeout_s: Positive = 30.0
    #: An idle keep-alive connection is closed after this long.
    keepalive_timeout_s: Positive = 75.0
    #: After an answer that left part of a request body unread (a 408 for a body too slow, a
    #: 413), the rest is read and dropped for at most this long before the connection closes,
    #: so the client reads the answer rather than a reset (0: close at once). aiohttp's own
    #: default, 10 s, kept a slow peer's connection open that long after its 408.
    lingering_s: NonNegative = 2.0
    #: Open connections from one peer address; more are closed at once. Behind a reverse proxy
    #: every connection comes from the proxy: raise it, or 0 for no cap.
    max_connections_per_peer: AtLeast0 = 128
    #: Requests with bad credentials answered 401 per peer address and minute; past it 429
    #: (credentials are still checked first: a peer's good requests always pass).
    auth_failures_per_minute: AtLeast1 = 30
    #: On stop: requests in flight get this long to finish before connections are closed.
    shutdown_timeout_s: NonNegative = 10.0
    #: Consecutive refused webhooks (bad auth or body) that mark a Particle integration Broken.
    broken_after_failures: AtLeast1 = 3


class IngestMqttConfig(_Base):
    """The ingest-mqtt stage: one owner per TTS application through a Redis lease."""

    #: Lease time: a standby takes an application over this long after its owner died.
    lease_ttl_ms: AtLeast1 = 5_000
    #: Entries appended per pipelined ``XADD`` round trip.
    batch: AtLeast1 = 1_000
    #: Appends go at once (a batch holds what arrived during the previous append), so at low
    #: load a message waits for no timer. While more than ``linger_above_per_s`` messages per
    #: second arrive, a batch waits ``linger_ms`` after its first message to fill (fewer round
    #: trips and less CPU per message at high rates; adds up to ``linger_ms`` of latency).
    #: ``linger_ms: 0`` = never wait; ``linger_above_per_s: 0`` = always wait (the behaviour
    #: before issue 15).
    linger_ms: NonNegative = 5.0
    linger_above_per_s: NonNegative = DEFAULT_LINGER_ABOVE_PER_S
    #: Decoded messages waiting for Redis; past it new ones are dropped and counted.
    queue_max: AtLeast1 = 100_000
    #: Payloads above this are dead-lettered as ``too_large``.
    max_payload_bytes: AtLeast1 = 256 * 1024
    #: Cap of the reconnect backoff.
    max_backoff_s: Positive = 30.0
    #: Standbys subscribe too and keep the last ``lease_ttl_ms`` (+ the acquisition interval
    #: + ``standby_margin_ms``) of raw messages in memory, appended when they take over: no
    #: uplink is lost in a failover (duplicates are removed downstream by event_id).
    warm_standby: bool = True
    standby_margin_ms: AtLeast0 = 2_000
    #: An owner whose broker connection has been down this long hands the application to a
    #: warm standby that is connected (if one is); the standby replays what it kept, so the
    #: handover loses nothing — while an owner that waits out a blip itself loses what TTS
    #: published during it (QoS 0). Hence 0: hand over at once; raise it to trade that for
    #: fewer handovers (each replays the standby's buffer; duplicates are dropped by event_id).
    #: A replica that is not connected never takes an application from a connected one.
    handover_after_ms: AtLeast0 = 0
    #: Bounds of a standby's buffer; past them the oldest messages go first (counted).
    standby_max_messages: AtLeast1 = 100_000
    standby_max_bytes: AtLeast1 = 128 * 1024 * 1024


class BlynkSessionsConfig(_Base):
    """The blynk-sessions stage (``workers/blynk_sessions.py``): a Blynk device MQTT session for
    every live device of a ``downlinks: mqtt`` template, split over replicas by partition."""

    #: ``blynk.servers`` name → the region's device MQTT address, ``mqtts://host:8883`` or
    #: ``mqtt://host:1883``. Servers not listed: ``mqtts://<host of its https URL>:8883``.
    servers: dict[str, str] = msgspec.field(default_factory=dict)
    #: Devices are hashed onto this many partitions; each is owned by one replica at a time
    #: through a Redis lease (at most ceil(partitions / live replicas) per replica).
    partitions: AtLeast1 = 64
    #: A dead replica's sessions are reopened by the others this long after its last renewal.
    lease_ttl_ms: AtLeast1 = 10_000
    #: MQTT keepalive (Blynk recommends 45 s).
    keepalive_s: AtLeast1 = 45
    #: Session opens per second across all replicas (GCRA in Redis) and the burst allowed, so
    #: a Blynk restart does not bring every session back at once.
    connect_rate: Positive = 100.0
    #: Session opens allowed at once before ``connect_rate`` applies.
    connect_burst: AtLeast1 = 20
    #: Cap of a device's jittered reconnect backoff.
    max_backoff_s: Positive = 60.0
    #: Bound of the first reconnect's backoff; each one after it doubles the bound.
    backoff_base_s: Positive = 1.0
    #: A session closes this long after its device's last uplink; at least
    #: ``offline_min_s``, else 3 × the device's observed uplink interval.
    offline_min_s: AtLeast1 = 600
    #: How often an owner compares the sessions it holds with the live devices.
    scan_interval_s: Positive = 1.0
    #: Registry rows kept in memory (LRU) to open sessions.
    cache_size: AtLeast1 = 100_000
    #: Commands from sessions waiting for the downlinks stream (Redis slow or down) before
    #: the queue keeps only the latest value per device and pin (counted ``superseded``).
    forward_queue_max: AtLeast1 = 10_000


class TransformConfig(_Base):
    #: An event id seen again within this long is dropped as a duplicate. At most a day:
    #: retries come within minutes, and a partition's blocks (:mod:`pipeline.dedup`: one
    #: string per window/64 step) must stay far below Redis's 512 MB per string.
    dedup_window_s: Annotated[int, msgspec.Meta(ge=1, le=86_400)] = 3600
    #: Events the de-duplication window keeps in one process's memory at most (~150 bytes
    #: each, :mod:`pipeline.dedup`): past it the oldest are forgotten early (counted in
    #: ``bb_dedup_evicted_total``; a duplicate older than that passes as a new event).
    dedup_max_events: AtLeast1 = 2_000_000
    #: Lease of transform's ownership of an uplinks partition (``redis.partitions`` is
    #: transform's unit of parallelism): a dead owner's partitions are taken over this long
    #: after its last renewal (renewed every ttl/4).
    lease_ttl_ms: AtLeast1 = 5_000
    #: Registry rows kept in memory per process (LRU).
    cache_size: AtLeast1 = 100_000
    #: Cap of the backoff after a failed batch (Redis unreachable…).
    max_backoff_s: Positive = 30.0
    #: How often templates with ``pull: true`` re-read their datastreams from Blynk.
    template_refresh_s: Positive = 300.0
    #: How long an uplink waits for another worker that is creating its device.
    provision_wait_s: Positive = 20.0
    #: Distinct unmapped keys remembered per template (``keys.unmapped``); more are counted
    #: under one field (:data:`pipeline.unmapped.OTHER`).
    unmapped_max_keys: AtLeast1 = 200
    #: The unmapped-keys hash of a template expires this long after its last update.
    unmapped_ttl_s: AtLeast1 = 7 * 86400


class EgressConfig(_Base):
    #: A flush happens when this many entries are held…
    flush_count: AtLeast1 = 500
    #: …or they hold this many bytes…
    flush_bytes: AtLeast1 = 512 * 1024
    #: …or, when > 0, the oldest has waited this long: values wait for more of the same device
    #: (fewer Blynk messages, more latency). 0 (default): a device's value is written at once
    #: when no write of the device is under way and its rate limit allows; only what arrives
    #: meanwhile is coalesced.
    flush_age_ms: AtLeast0 = 0
    #: Requests per second to Blynk per device, across replicas.
    per_device_rps: Positive = 50.0
    #: Requests to Blynk in flight at once per process.
    max_in_flight: AtLeast1 = 64
    #: Entries older than this are backlog: written through the timestamped upload.
    live_window_s: NonNegative = 60.0
    #: Cap of the retry backoff after 5xx, timeouts or 429.
    max_backoff_s: Positive = 30.0
    #: On stop, how long to wait for device writes under way (after sending what is ready);
    #: what Blynk has not confirmed by then stays pending in Redis and is delivered again.
    stop_timeout_s: Positive = 10.0
    #: A device marked broken (Blynk refused the token stored for it) is set back to ok this
    #: long after, so its next uplink tries the token again (fixed in Blynk meanwhile?); 0 =
    #: only ``blynk-bridge devices unbreak`` does.
    broken_retry_s: NonNegative = 3600.0
    #: Each writes partition (``redis.partitions``) has one egress owner through a lease of
    #: this ttl (ms): a crashed owner's partitions move to another replica within it. 0
    #: (default): 3 × ``blynk.timeout_s``, at least 5 s. An owner sends a request only while
    #: its lease is certainly held for longer than the Blynk request timeout, so the ttl must
    #: be at least 2 × ``blynk.timeout_s`` (below that an owner could rarely send at all).
    lease_ttl_ms: AtLeast0 = 0

    def partition_lease_ms(self, blynk_timeout_s: float) -> int:
        """The partition lease ttl in force (``lease_ttl_ms``, or derived from the Blynk
        request timeout)."""
        if self.lease_ttl_ms:
            return self.lease_ttl_ms
        return max(5_000, int(3 * blynk_timeout_s * 1000))


class MetricsConfig(_Base):
    """The metrics port: ``/metrics``, ``/status``, ``/healthz``, ``/readyz``, and on the
    monitor the status page (reads need no auth: keep it off the internet; the page's replay
    needs ``monitor.admin_token``)."""

    #: Address the metrics port listens on.
    host: str = "0.0.0.0"
    #: Port of ``/metrics``, ``/status``, ``/healthz`` (unset: no metrics server; 0: any free
    #: port).
    port: ListenPort | None = None


class MonitorConfig(_Base):
    """The monitor stage: backlog gauges, trimming, removal of dead consumers."""

    #: Seconds between two samples (and trims).
    interval_s: Positive = 5.0
    #: Trim streams below what every group acknowledged (``XTRIM MINID``).
    trim: bool = True
    #: Dead letters older than this are trimmed from the dead stream.
    dead_retention_s: AtLeast1 = 7 * 86_400
    #: At most this many dead letters are kept (the oldest go first, counted and logged), so a
    #: sender that makes every message fail cannot grow Redis without bound: each letter keeps
    #: at most ``DEAD_RAW_MAX`` (8 KiB) of its raw input.
    dead_max_len: AtLeast1 = 100_000
    #: Consumers idle this long with nothing pending are removed (``XGROUP DELCONSUMER``).
    consumer_idle_s: Positive = 3600.0
    #: Bearer token of the status page's actions (replaying dead letters, ``POST`` on the
    #: metrics port, header ``Authorization: Bearer …``). Unset: the page is read-only.
    #: ``admin_token_file`` reads it from a mounted secret.
    admin_token: Secret | None = None
    #: Host names the status page answers to besides IP addresses, ``localhost`` and names of
    #: one label (a compose service such as ``monitor``): a Kubernetes service's DNS name, a
    #: reverse proxy's name. A request naming any other host is refused (421), so a web site
    #: cannot point its own name at this port and read the page (DNS rebinding).
    allowed_hosts: list[str] = msgspec.field(default_factory=list)


class Config(_Base):
    redis: RedisConfig = msgspec.field(default_factory=RedisConfig)
    streams: StreamsConfig = msgspec.field(default_factory=StreamsConfig)
    blynk: BlynkConfig = msgspec.field(default_factory=BlynkConfig)
    templates: list[TemplateConfig] = msgspec.field(default_factory=list)
    tts: list[TtsApplication] = msgspec.field(default_factory=list)
    particle: list[ParticleProduct] = msgspec.field(default_factory=list)
    devices: list[DeviceEntry] = msgspec.field(default_factory=list)
    blynk_webhooks: list[BlynkWebhook] = msgspec.field(default_factory=list)
    downlink: DownlinkConfig = msgspec.field(default_factory=DownlinkConfig)
    echo: EchoConfig = msgspec.field(default_factory=EchoConfig)
    ingest_http: IngestHttpConfig = msgspec.field(default_factory=IngestHttpConfig)
    ingest_mqtt: IngestMqttConfig = msgspec.field(default_factory=IngestMqttConfig)
    transform: TransformConfig = msgspec.field(default_factory=TransformConfig)
    egress: EgressConfig = msgspec.field(default_factory=EgressConfig)
    metrics: MetricsConfig = msgspec.field(default_factory=MetricsConfig)
    monitor: MonitorConfig = msgspec.field(default_factory=MonitorConfig)
    blynk_sessions: BlynkSessionsConfig = msgspec.field(default_factory=BlynkSessionsConfig)

    def template(self, name: str) -> TemplateConfig:
        for t in self.templates:
            if t.name == name:
                return t
        raise KeyError(name)


#: A DNS name (labels of letters, digits, ``-`` and ``_``; a final dot allowed).
_HOST_NAME = re.compile(r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*\.?$")
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_ONE_VAR = re.compile(r"\$\{[A-Za-z_][A-Za-z0-9_]*(?::-[^}]*)?\}")


def substitute_env(text: str, env: Mapping[str, str], origin: str, where: str = "") -> str:
    """Replace ``${NAME}`` and ``${NAME:-default}`` in one value; ``$${`` is a literal ``${``.
    ``where`` (a key path) names the key in the error for an unset variable."""

    def repl(m: re.Match[str]) -> str:
        name, default = m.group(1), m.group(2)
        if name in env:
            return env[name]
        if default is not None:
            return default
        used = f" (used by `{where}`)" if where else ""
        raise ConfigError.of(origin, ConfigProblem(
            f"environment variable not set: ${{{name}}}{used}", key=where or None))

    return _VAR.sub(repl, text.replace("$${", "\0")).replace("\0", "${")


def substitute_all(data: Any, env: Mapping[str, str] | None, origin: str,
                   typ: mi.Type | None = None) -> Any:
    """:func:`_substitute` over a whole parsed file (``env`` None: the process's environment);
    every unset variable is named in one :class:`ConfigError`, one problem per use (each with
    the key that uses it). Without ``typ`` (another file format than the bridge's, e.g. the
    Blynk emulator's) every substituted value stays a string."""
    unset: list[ConfigProblem] = []
    out = _substitute(data, typ, os.environ if env is None else env, origin, "", unset)
    if unset:
        raise ConfigError.of(origin, *unset)
    return out


def _substitute(node: Any, typ: mi.Type | None, env: Mapping[str, str], origin: str,
                where: str, unset: list[ConfigProblem]) -> Any:
    """Substitute inside every string value of ``node``, which should be of type ``typ`` (None:
    not in the schema, e.g. a ``*_file`` key or an unknown key msgspec will name); unset
    variables are appended to ``unset``."""
    if isinstance(node, str):
        if "${" not in node:
            return node
        try:
            value = substitute_env(node, env, origin, where)
        except ConfigError:
            unset.extend(
                ConfigProblem(f"environment variable not set: ${{{m.group(1)}}} "
                              f"(used by `{where}`)", key=where)
                for m in _VAR.finditer(node) if m.group(1) not in env and m.group(2) is None)
            return node
        whole = _ONE_VAR.fullmatch(node) is not None
        return _scalar(value, typ) if whole and typ is not None else value
    if isinstance(node, list):
        item = _pick(typ, (mi.ListType, mi.SetType, mi.VarTupleType))
        item_type = getattr(item, "item_type", None)
        return [_substitute(v, item_type, env, origin, f"{where}[{i}]", unset)
                for i, v in enumerate(node)]
    if isinstance(node, dict):
        struct = _pick(typ, (mi.StructType,))
        fields: dict[str, mi.Type] = (
            {f.encode_name: f.type for f in struct.fields}
            if isinstance(struct, mi.StructType) else {}
        )
        mapping = _pick(typ, (mi.DictType,))
        values = mapping.value_type if isinstance(mapping, mi.DictType) else None
        return {k: _substitute(v, fields.get(k, values) if isinstance(k, str) else None, env,
                               origin, f"{where}.{k}" if where else str(k), unset)
                for k, v in node.items()}
    return node


def _pick(typ: mi.Type | None, kinds: tuple[type, ...]) -> mi.Type | None:
    options = typ.types if isinstance(typ, mi.UnionType) else (typ,)
    return next((t for t in options if isinstance(t, kinds)), None)


_STRING_TYPES = (mi.StrType, mi.CustomType, mi.AnyType)


def _scalar(value: str, typ: mi.Type) -> Any:
    """A substituted value for a field of type ``typ``: a string wherever a string may go,
    else the number, boolean or null it spells (msgspec then checks it like any value)."""
    options = typ.types if isinstance(typ, mi.UnionType) else (typ,)
    if any(isinstance(t, _STRING_TYPES) for t in options) or any(
            isinstance(t, mi.LiteralType) and any(isinstance(v, str) for v in t.values)
            for t in options):
        return value
    text = value.strip()
    for t in options:
        if isinstance(t, mi.BoolType) and text.lower() in ("true", "false"):
            return text.lower() == "true"
        if isinstance(t, mi.IntType) and re.fullmatch(r"[-+]?[0-9]+", text):
            return int(text)
        if isinstance(t, mi.FloatType):
            try:
                return float(text)
            except ValueError:
                pass
        if isinstance(t, mi.NoneType) and text.lower() in ("", "null", "~"):
            return None
    return value


def _resolve_files(node: Any, origin: str, where: str = "") -> Any:
    """Read every ``<key>_file`` into ``<key>`` (secrets mounted as files)."""
    if isinstance(node, list):
        return [_resolve_files(v, origin, f"{where}[{i}]") for i, v in enumerate(node)]
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    for key, value in node.items():
        if isinstance(key, str) and key.endswith("_file") and key not in ("ca_file",):
            target = key[: -len("_file")]
            here = f"{where}.{key}" if where else key
            if target in node:
                raise ConfigError.of(origin, ConfigProblem(
                    f"both `{target}` and `{key}` set at `${'.' if where else ''}{where}`",
                    key=here))
            try:
                out[target] = Path(str(value)).read_text().strip()
            except OSError as exc:
                raise ConfigError.of(origin, ConfigProblem(
                    f"cannot read `{key}` at `${'.' if where else ''}{where}`: {exc.strerror}",
                    key=here)) from None
        else:
            out[key] = _resolve_files(value, origin, f"{where}.{key}" if where else str(key))
    return out


def _dec_hook(type_: type, obj: Any) -> Any:
    if type_ is Secret:
        if isinstance(obj, str):
            return Secret(obj)
        # msgspec turns this into a ValidationError at the key's path
        raise TypeError(f"Expected `str`, got `{type(obj).__name__}`")
    raise NotImplementedError


def parse(text: str, fmt: Literal["yaml", "toml"], origin: str,
          env: Mapping[str, str] | None = None) -> Config:
    """Parse configuration text; ``origin`` names the file in every error, and each problem
    carries the line and column of its key where the file holds it (YAML)."""
    source = config_source.read(text, fmt, origin)
    try:
        data = substitute_all(source.data, env, origin, _CONFIG_TYPE)
        data = _resolve_files(data, origin)
        _migrate(data, origin)
        try:
            config = msgspec.convert(data, Config, dec_hook=_dec_hook)
        except msgspec.ValidationError as exc:
            raise ConfigError.of(origin, _problem(str(exc), data)) from None
        check(config, origin)
    except ConfigError as exc:
        raise source.locate(exc) from None
    return config


# --- msgspec's validation errors in the words of this file --------------------------------------

_AT = re.compile(r"^(?P<what>.*?)(?: - at `(?P<path>\$[^`]*)`)?$", re.S)
_UNKNOWN = re.compile(r"Object contains unknown field `(?P<name>[^`]*)`")
_MISSING = re.compile(r"Object missing required field `(?P<name>[^`]*)`")
_BOUND = re.compile(r"Expected `(?:int|float)` (?:>=|>|<=|<) ")
#: msgspec repeats the value given for a choice (``Invalid enum value 'x'``): it may be a secret
#: written in the wrong place (``auth: ${SECRET}``), so these are reworded without it.
_CHOICE = re.compile(r"Invalid (?:enum )?value ")


def _problem(message: str, data: Any) -> ConfigProblem:
    """A msgspec validation message (``… - at `$.egress.max_in_flight```) as a problem about
    that key, in the words of this file: unknown keys with the closest known one, ranges with
    both bounds and the value given."""
    m = _AT.match(message)
    what, at = (m.group("what"), m.group("path") or "$") if m else (message, "$")
    path = _resolve_path(at, data)
    key = config_source.format_path(path) or None
    at = f"$.{key}" if key else "$"
    if unknown := _UNKNOWN.match(what):
        name = unknown.group("name")
        known = _fields_at(path)
        close = difflib.get_close_matches(name, known + _file_keys_at(path), n=1, cutoff=0.6)
        hint = (f"; did you mean `{close[0]}`?" if close
                else f"; known keys: {', '.join(known)}" if known else "")
        inside = f"in `{at}`" if path else "at the top level"
        return ConfigProblem(f"unknown key `{name}` {inside}{hint}",
                             key=config_source.format_path((*path, name)))
    if missing := _MISSING.match(what):
        inside = f"in `{at}`" if path else "at the top level"
        return ConfigProblem(f"missing required key `{missing.group('name')}` {inside}",
                             key=key)
    if _BOUND.match(what):
        bounds = _bounds(_type_at(path))
        value = _value_at(data, path)
        if bounds:
            got = f", got {value!r}" if value is not _ABSENT else ""
            return ConfigProblem(f"`{key}` must be {bounds}{got}", key=key)
    if _CHOICE.match(what):
        return ConfigProblem(f"`{key}` must be {_choices(_type_at(path), _value_at(data, path))}",
                             key=key)
    if not path:
        return ConfigProblem(what, key=key)
    return ConfigProblem(f"`{key}`: {what[:1].lower()}{what[1:]}", key=key)


def _choices(typ: mi.Type | None, given: Any) -> str:
    """``one of 'a', 'b'`` (``or a mapping`` where one may go too), and the closest choice to
    ``given``, which itself is never repeated (see :data:`_CHOICE`)."""
    options = typ.types if isinstance(typ, mi.UnionType) else (typ,)
    values = [v for t in options if isinstance(t, mi.LiteralType) for v in t.values]
    words = ", ".join(repr(v) for v in values) or "another value"
    out = f"one of {words}" if len(values) > 1 else words
    if any(isinstance(t, (mi.StructType, mi.DictType)) for t in options):
        out += " or a mapping"
    close = difflib.get_close_matches(given, [str(v) for v in values], n=1, cutoff=0.6) \
        if isinstance(given, str) else []
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"{out}{hint} (the value given is not repeated: it may be a secret)"


def _resolve_path(at: str, data: Any) -> config_source.KeyPath:
    """msgspec's path with each dict key it writes as ``[...]`` found again: the first key of
    that dict whose value does not validate on its own."""
    first, *rest = at.split("[...]")
    path = config_source.split_path(first)
    for tail in rest:
        mapping = _value_at(data, path)
        value_type = _dict_value_type(path)
        if not isinstance(mapping, dict) or value_type is None:
            return path
        bad = next((k for k, v in mapping.items() if not _valid(v, value_type)), None)
        if bad is None:
            return path
        path = (*path, str(bad), *config_source.split_path(tail))
    return path


def _dict_value_type(path: config_source.KeyPath) -> Any:
    """The Python type of the values of the dict setting at ``path`` (None: not one)."""
    struct = _pick(_type_at(path[:-1]), (mi.StructType,))
    if not path or not isinstance(struct, mi.StructType):
        return None
    field = next((f for f in msgspec.structs.fields(struct.cls) if f.encode_name == path[-1]),
                 None)
    for typ in (field.type, *get_args(field.type)) if field is not None else ():
        if get_origin(typ) is dict:
            return get_args(typ)[1]
    return None


def _valid(value: Any, typ: Any) -> bool:
    try:
        msgspec.convert(value, typ, dec_hook=_dec_hook)
    except msgspec.ValidationError:
        return False
    return True


def _type_at(path: config_source.KeyPath) -> mi.Type | None:
    """The type the configuration expects at ``path`` (None: not in the schema)."""
    typ: mi.Type | None = _CONFIG_TYPE
    for step in path:
        if isinstance(step, int):
            seq = _pick(typ, (mi.ListType, mi.SetType, mi.VarTupleType))
            typ = getattr(seq, "item_type", None)
            continue
        struct = _pick(typ, (mi.StructType,))
        if isinstance(struct, mi.StructType):
            typ = next((f.type for f in struct.fields if f.encode_name == step), None)
        else:
            mapping = _pick(typ, (mi.DictType,))
            typ = mapping.value_type if isinstance(mapping, mi.DictType) else None
    return typ


def _fields_at(path: config_source.KeyPath) -> list[str]:
    struct = _pick(_type_at(path), (mi.StructType,))
    return [f.encode_name for f in struct.fields] if isinstance(struct, mi.StructType) else []


def _file_keys_at(path: config_source.KeyPath) -> list[str]:
    """The ``<key>_file`` forms of the text settings at ``path`` (see :func:`_resolve_files`)."""
    struct = _pick(_type_at(path), (mi.StructType,))
    if not isinstance(struct, mi.StructType):
        return []
    return [f"{f.encode_name}_file" for f in struct.fields
            if _pick(f.type, (mi.StrType, mi.CustomType)) is not None]


def _bounds(typ: mi.Type | None) -> str | None:
    """``an integer from 1 to 65535``, ``a number > 0``… for a constrained number type."""
    num = _pick(typ, (mi.IntType, mi.FloatType))
    if not isinstance(num, (mi.IntType, mi.FloatType)):
        return None
    noun = "an integer" if isinstance(num, mi.IntType) else "a number"
    if num.ge is not None and num.le is not None:
        return f"{noun} from {num.ge} to {num.le}"
    parts = [f"{op} {v}" for op, v in ((">=", num.ge), (">", num.gt), ("<=", num.le),
                                       ("<", num.lt)) if v is not None]
    return f"{noun} {' and '.join(parts)}" if parts else None


_ABSENT = object()


def _value_at(data: Any, path: config_source.KeyPath) -> Any:
    for step in path:
        try:
            data = data[step]
        except (KeyError, IndexError, TypeError):
            return _ABSENT
    return data


_CONFIG_TYPE = mi.type_info(Config)
#: Keys that moved: (old section, old key) → (new section, new key). The old key is still
#: accepted, with a warning, unless the new one is set too.
MOVED = {("downlink", "echo_window_ms"): ("echo", "window_ms")}


def _migrate(data: dict[str, Any], origin: str) -> None:
    """Move deprecated keys of the parsed file to their new place (:data:`MOVED`)."""
    for (old_sec, old_key), (new_sec, new_key) in MOVED.items():
        section = data.get(old_sec)
        if not isinstance(section, dict) or old_key not in section:
            continue
        target = data.setdefault(new_sec, {})
        if not isinstance(target, dict):
            continue  # msgspec names the wrong type
        if new_key in target:
            raise _invalid(origin, f"{old_sec}.{old_key}",
                           f"`{old_sec}.{old_key}` is the old name of `{new_sec}.{new_key}`; "
                           f"set only `{new_sec}.{new_key}`")
        target[new_key] = section.pop(old_key)
        log.warning("%s: `%s.%s` is deprecated; use `%s.%s`", origin, old_sec, old_key,
                    new_sec, new_key)


def load(path: str | os.PathLike[str], env: Mapping[str, str] | None = None) -> Config:
    """Load and validate a configuration file; raises :class:`ConfigError`."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise ConfigError.of(str(p), ConfigProblem(
            f"cannot read configuration: {exc.strerror}")) from None
    except UnicodeDecodeError as exc:
        raise ConfigError.of(str(p), ConfigProblem(
            f"not UTF-8 text (byte {exc.start}): is this the configuration file?")) from None
    fmt: Literal["yaml", "toml"] = "toml" if p.suffix == ".toml" else "yaml"
    return parse(text, fmt, str(p), env)


def _invalid(origin: str, key: str, message: str) -> ConfigError:
    """An error about the value at ``key`` (``tts[0].template``); :func:`parse` adds the line
    the file holds it on."""
    return ConfigError.of(origin, ConfigProblem(message, key=key))


def _infinite(node: Any, path: config_source.KeyPath = ()) -> config_source.KeyPath | None:
    """The path of the first infinite number in ``node`` (YAML's ``.inf`` passes a ``> 0``
    bound, then breaks ``int(seconds * 1000)`` in a stage)."""
    if isinstance(node, float):
        return None if math.isfinite(node) else path
    items: Any = ()
    if isinstance(node, msgspec.Struct):
        items = ((f.encode_name, getattr(node, f.name)) for f in msgspec.structs.fields(node))
    elif isinstance(node, dict):
        items = ((str(k), v) for k, v in node.items())
    elif isinstance(node, list):
        items = enumerate(node)
    for step, value in items:
        found = _infinite(value, (*path, step))
        if found is not None:
            return found
    return None


def check(config: Config, origin: str) -> None:
    """Cross-field checks msgspec cannot express; each error names the key."""
    if (inf := _infinite(config)) is not None:
        key = config_source.format_path(inf)
        raise _invalid(origin, key, f"`{key}` must be a finite number")
    token = config.monitor.admin_token
    if token is not None and (len(token) < 16 or token.reveal() in DEMO_SECRETS):
        raise _invalid(origin, "monitor.admin_token",
                       "`monitor.admin_token` must be at least 16 characters and not a published "
                       "one (e.g. `openssl rand -hex 16`)")
    for i, host in enumerate(config.monitor.allowed_hosts):
        if not _HOST_NAME.match(host):
            key = f"monitor.allowed_hosts[{i}]"
            raise _invalid(origin, key, f"`{key}` must be a host name without scheme or port "
                                        "(e.g. bb-monitor.bridge.svc.cluster.local)")
    templates: set[str] = set()
    for i, t in enumerate(config.templates):
        if t.name in templates:
            raise _invalid(origin, f"templates[{i}].name",
                           f"duplicate template names in `templates` ({t.name!r})")
        templates.add(t.name)
    for i, t in enumerate(config.templates):
        seen_pins: set[str] = set()
        for j, ds in enumerate(t.datastreams):
            where = f"templates[{i}].datastreams[{j}]"
            pin = ds.pin.upper()
            if not re.fullmatch(r"V([0-9]|[1-9][0-9]|1[0-9][0-9]|2[0-4][0-9]|25[0-5])", pin):
                raise _invalid(origin, f"{where}.pin",
                               f"`{where}.pin` must be V0..V255, got {ds.pin!r}")
            if pin in seen_pins:
                raise _invalid(origin, f"{where}.pin",
                               f"pin {pin} used twice in template {t.name!r}")
            seen_pins.add(pin)
            if ds.min is not None and ds.max is not None and ds.min > ds.max:
                raise _invalid(origin, f"{where}.max",
                               f"`{where}`: `max` ({ds.max:g}) is below `min` ({ds.min:g})")
    integrations: list[tuple[str, Sequence[TtsApplication | ParticleProduct]]] = [
        ("tts", config.tts),
        ("particle", config.particle),
    ]
    for section, items in integrations:
        seen: set[str] = set()
        for i, integ in enumerate(items):
            if isinstance(integ, ParticleProduct) and integ.auth is None:
                raise _invalid(
                    origin, f"particle[{i}].auth",
                    f"`particle[{i}].auth` is missing: set `header` + `secret` or "
                    "`username` + `password`, or write `auth: none` to accept webhooks from "
                    "anyone"
                )
            key = "auth" if isinstance(integ, ParticleProduct) else "webhook_auth"
            auth = integ.auth if isinstance(integ, ParticleProduct) else integ.webhook_auth
            if isinstance(auth, HttpAuth):
                for name, secret in (("secret", auth.secret), ("password", auth.password)):
                    if secret is not None and secret.reveal() in DEMO_SECRETS:
                        raise _invalid(
                            origin, f"{section}[{i}].{key}.{name}",
                            f"`{section}[{i}].{key}.{name}` is the demo's published "
                            "secret: set your own (e.g. `openssl rand -hex 32`)"
                        )
        for i, integ in enumerate(items):
            if integ.name in seen:
                raise _invalid(origin, f"{section}[{i}].name",
                               f"duplicate integration name `{section}[{i}].name`")
            seen.add(integ.name)
            if integ.template is not None and integ.template not in templates:
                raise _invalid(
                    origin, f"{section}[{i}].template",
                    f"`{section}[{i}].template` names unknown template {integ.template!r}"
                )
            for k, rule in enumerate(integ.template_rules):
                if rule.template not in templates:
                    raise _invalid(
                        origin, f"{section}[{i}].template_rules[{k}].template",
                        f"`{section}[{i}].template_rules[{k}].template` names unknown "
                        f"template {rule.template!r}"
                    )
    for i, dev in enumerate(config.devices):
        if dev.template not in templates:
            raise _invalid(origin, f"devices[{i}].template",
                           f"`devices[{i}].template` names unknown template {dev.template!r}")
        if dev.server is not None and dev.server not in config.blynk.servers:
            raise _invalid(origin, f"devices[{i}].server",
                           f"`devices[{i}].server` names unknown server {dev.server!r}")
    _check_downlinks(config, origin)
    _check_transform(config, origin)
    _check_egress(config, origin)
    if config.blynk.default_server not in config.blynk.servers:
        raise _invalid(
            origin, "blynk.default_server",
            f"`blynk.default_server` {config.blynk.default_server!r} is not in "
            "`blynk.servers`"
        )


def _check_transform(config: Config, origin: str) -> None:
    if config.transform.lease_ttl_ms < 500:
        # pipeline.lease: renewed every ttl/4, given up ttl/5 (at least 50 ms) before it lapses.
        raise _invalid(origin, "transform.lease_ttl_ms",
                       f"`transform.lease_ttl_ms` ({config.transform.lease_ttl_ms}) must be at "
                       "least 500: a partition lease is renewed every ttl/4")


def _check_egress(config: Config, origin: str) -> None:
    ttl = config.egress.lease_ttl_ms
    floor = int(2 * config.blynk.timeout_s * 1000)
    if ttl and ttl < floor:
        # workers.egress: a request goes only while the lease is held for longer than the
        # Blynk timeout, and is renewed every ttl/4 with a ttl/5 margin.
        raise _invalid(origin, "egress.lease_ttl_ms",
                       f"`egress.lease_ttl_ms` ({ttl}) must be at least 2 × `blynk.timeout_s` "
                       f"({floor} ms): an egress owner sends only while its partition lease "
                       "outlasts the Blynk request timeout")


def _check_downlinks(config: Config, origin: str) -> None:
    names: set[str] = set()
    for i, w in enumerate(config.blynk_webhooks):
        if w.name in names:
            raise _invalid(origin, f"blynk_webhooks[{i}].name",
                           f"duplicate names in `blynk_webhooks` ({w.name!r})")
        names.add(w.name)
        # Whoever can post here sends commands to devices: no open door, no published secret.
        if w.auth is None:
            raise _invalid(origin, f"blynk_webhooks[{i}].auth",
                           f"`blynk_webhooks[{i}].auth` is missing: set `header` + `secret` or "
                           "`username` + `password` (the webhook's headers or Basic Auth)")
        for field, secret in (("secret", w.auth.secret), ("password", w.auth.password)):
            if secret is not None and secret.reveal() in DEMO_SECRETS:
                raise _invalid(origin, f"blynk_webhooks[{i}].auth.{field}",
                               f"`blynk_webhooks[{i}].auth.{field}` is the demo's published "
                               "secret: set your own (e.g. `openssl rand -hex 32`)")
        if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", w.name):
            raise _invalid(origin, f"blynk_webhooks[{i}].name",
                           f"`blynk_webhooks[{i}].name` must be 1-64 of "
                           f"A-Z a-z 0-9 _ . -, got {w.name!r}")
    for i, t in enumerate(config.templates):
        if t.downlinks == "mqtt" and (t.downlink is None or not t.downlink.pins):
            raise _invalid(origin, f"templates[{i}].downlinks",
                           f"`templates[{i}]` has `downlinks: mqtt`: list the command pins in "
                           "`downlink.pins`")
        if t.downlink is None:
            continue
        pins = {ds.pin.upper() for ds in t.datastreams}
        where = f"templates[{i}].downlink"
        refs = [(f"{where}.particle.{p}", p) for p in t.downlink.particle]
        refs += [(f"{where}.particle.{p}.return_pin", f.return_pin)
                 for p, f in t.downlink.particle.items() if f.return_pin]
        refs += [(f"{where}.encode[{k}].pin", r.pin) for k, r in enumerate(t.downlink.encode)]
        refs += [(f"{where}.pins[{k}]", p) for k, p in enumerate(t.downlink.pins)]
        if t.downlink.outcome_pin:
            refs.append((f"{where}.outcome_pin", t.downlink.outcome_pin))
        for key, pin in refs:
            if pins and pin.upper() not in pins:
                raise _invalid(origin, key, f"`{key}` names pin {pin!r}, which template "
                                            f"{t.name!r} has no datastream for")
    for name, url in config.blynk_sessions.servers.items():
        if name not in config.blynk.servers:
            raise _invalid(origin, f"blynk_sessions.servers.{name}",
                           f"`blynk_sessions.servers.{name}` names no `blynk.servers` entry")
        if not re.fullmatch(r"mqtts?://[^/:]+:[0-9]{1,5}", url):
            raise _invalid(origin, f"blynk_sessions.servers.{name}",
                           f"`blynk_sessions.servers.{name}` must be mqtt[s]://host:port, "
                           f"got {url!r}")
    for i, a in enumerate(config.tts):
        if a.downlink_via == "http" and not (a.api_url and a.downlink_webhook_id):
            raise _invalid(origin, f"tts[{i}].downlink_via",
                           f"`tts[{i}]` sends downlinks over http: set `api_url` "
                           "and `downlink_webhook_id`")


def env(name: str, default: str | None = None) -> str | None:
    """The one sanctioned ``os.environ`` read outside configuration loading."""
    return os.environ.get(name, default)
