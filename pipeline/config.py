"""Typed configuration: one YAML or TOML file, validated at start-up.

This is the only module that reads ``os.environ``. Loading does, in order:

1. YAML (``.yaml``/``.yml``) or TOML (``.toml``) parsing;
2. ``${NAME}`` / ``${NAME:-default}`` substitution inside parsed string values — never into the
   file's text, so a value holding ``#``, quotes or ``, key: value`` stays one value. A value
   that is one reference and lands on a number, boolean or null field is read as one
   (``port: "${PORT}"``); anywhere a string goes it stays a string. An unset variable without a
   default is an error naming the variable, the key path that uses it and the file;
3. ``*_file`` keys: ``api_key_file: /run/secrets/tts`` reads that file into ``api_key``;
   keys that moved (:data:`MOVED`) are moved to their new place, with a warning;
4. validation with msgspec: unknown keys and wrong types are errors that name the key path and
   the file; then cross-field checks (:func:`check`), among them: every inbound integration
   has auth (or says ``auth: none``), and no inbound secret is one published with the demo.
"""

from __future__ import annotations

import logging
import os
import re
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
import msgspec.inspect as mi
import yaml

from pipeline.errors import ConfigError
from pipeline.redact import Secret

log = logging.getLogger("blynk_bridge.config")

DatastreamType = Literal["integer", "double", "string", "enum", "location"]
#: Seconds an event time may lie past its arrival before it counts as a wrong clock and becomes
#: the arrival time (pipeline.eventtime.clamp_future).
ClockSkew = Annotated[float, msgspec.Meta(ge=0)]


class _Base(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, omit_defaults=True):
    pass


class RedisConfig(_Base):
    url: str = "redis://127.0.0.1:6379/0"
    #: Prefix of every key blynk-bridge writes (streams, registry, leases, statuses).
    prefix: str = "bb:"
    #: Number of partitions of each stream (1 = unpartitioned).
    partitions: int = 1


class StreamsConfig(_Base):
    #: Deliveries of one entry before it is dead-lettered (``max_deliveries`` in DESIGN.md).
    max_deliveries: int = 5
    #: Pending entries idle this long are taken over from dead consumers (XAUTOCLAIM).
    claim_idle_ms: int = 30_000
    #: How long one blocking read waits for new entries.
    block_ms: int = 2_000
    #: Entries read per batch.
    batch: int = 500
    #: After a small batch, wait until this long after it was read before reading again, so
    #: batches fill under moderate load (fewer round trips per entry; adds at most this much
    #: latency). 0 = read again at once. Used by transform.
    linger_ms: int = 10
    #: Consumer name; default ``<hostname>-<pid>``.
    consumer: str | None = None


class PlatformConfig(_Base):
    """Blynk Platform API (OAuth2 client credentials) used to create devices."""

    url: str
    client_id: str
    client_secret: Secret
    org_id: int | None = None
    owner_id: int | None = None


class BlynkConfig(_Base):
    #: Region name → base URL, e.g. ``{fra1: "https://fra1.blynk.cloud"}``.
    servers: dict[str, str] = msgspec.field(
        default_factory=lambda: {"default": "https://blynk.cloud"}
    )
    default_server: str = "default"
    timeout_s: float = 10.0
    max_connections: int = 100
    platform: PlatformConfig | None = None


class DatastreamConfig(_Base):
    name: str
    pin: str
    type: DatastreamType = "double"
    min: float | None = None
    max: float | None = None
    #: Enum: the value → label options; values outside fall back to ``fallback``.
    options: dict[str, int] | None = None
    fallback: int | None = None
    #: Keep history: late points are written with their true timestamps.
    history: bool = False
    id: int | None = None


class KeyMapping(_Base):
    """How one decoded key lands on a datastream."""

    to: str
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
    f_port: int | None = None


class TemplateDownlink(_Base):
    """How a template's datastream changes reach its devices (see ``workers/downlink.py``)."""

    #: Particle: pin → function to call.
    particle: dict[str, ParticleFunction] = msgspec.field(default_factory=dict)
    #: TTS: pins sent as ``frm_payload`` bytes instead of ``decoded_payload``.
    encode: list[EncodeRule] = msgspec.field(default_factory=list)
    #: A datastream that receives each command's outcome: 1 delivered, 0 failed.
    outcome_pin: str | None = None


class TemplateConfig(_Base):
    name: str
    #: Blynk template id (``TMPL…``), needed for auto-provisioning and datastream pulls.
    id: str | None = None
    datastreams: list[DatastreamConfig] = msgspec.field(default_factory=list)
    #: Decoded key → datastream name/pin, or a full mapping with scale/offset.
    mapping: dict[str, str | KeyMapping] = msgspec.field(default_factory=dict)
    #: Pull datastreams from the Blynk Platform API instead of (or on top of) ``datastreams``.
    pull: bool = False
    downlink: TemplateDownlink | None = None


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
    name: str
    app_id: str
    tenant: str = "ttn"
    host: str = "eu1.cloud.thethings.network"
    port: int | None = None
    insecure: bool = False
    api_key: Secret | None = None
    ca_file: str | None = None
    template: str | None = None
    template_rules: list[TemplateRule] = msgspec.field(default_factory=list)
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
    downlink_f_port: int = 1
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
DEMO_SECRETS = frozenset({"demo-webhook-secret", "demo-secret"})


class ParticleProduct(_Base):
    name: str
    template: str | None = None
    template_rules: list[TemplateRule] = msgspec.field(default_factory=list)
    provision: bool = False
    #: As for :class:`TtsApplication`.
    provision_rate: Annotated[float, msgspec.Meta(gt=0)] = 1.0
    provision_burst: Annotated[int, msgspec.Meta(ge=1)] = 10
    provision_max: Annotated[int, msgspec.Meta(ge=0)] = 1000
    #: Required: a shared-secret header, HTTP basic, or ``none`` (anyone may post).
    auth: HttpAuth | NoAuth | None = None
    #: Particle Cloud API for downlinks (function calls).
    api_url: str = "https://api.particle.io"
    access_token: Secret | None = None
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
    device: str
    token: Secret
    template: str
    server: str | None = None


class BlynkWebhook(_Base):
    """A Blynk webhook posting datastream changes to ``POST /blynk/{name}`` (downlinks)."""

    name: str
    auth: HttpAuth | None = None


class DownlinkConfig(_Base):
    """The downlink stage (``workers/downlink.py``)."""

    #: A command older than this (by its Blynk time) is dead-lettered, never sent late.
    ttl_s: int = 600
    #: Cap of the retry backoff of an offline device.
    max_backoff_s: float = 30.0
    #: Timeout of one Particle or TTS HTTP call.
    timeout_s: float = 35.0
    #: How long a command's correlation is kept for matching TTS outcomes.
    outcome_ttl_s: int = 3_600
    #: Registry rows kept in memory (LRU) to resolve Blynk devices.
    cache_size: int = 100_000


class EchoConfig(_Base):
    """Echo records (``pipeline/echo.py``): egress writes one per value it sends to Blynk, the
    downlink stage consumes it; a section of its own because both stages must agree on it."""

    #: A webhook repeating a value the bridge itself wrote to that pin this recently is an
    #: echo of the uplink, not a command.
    window_ms: int = 60_000


class IngestHttpConfig(_Base):
    host: str = "0.0.0.0"
    port: int = 8080
    max_body_bytes: int = 64 * 1024
    #: Refuse input with 503 + Retry-After when the uplinks stream lag passes this (entries)…
    backlog_high_water: int = 1_000_000
    #: …or when the uplinks streams hold more than this many bytes in Redis (``MEMORY USAGE``).
    backlog_high_water_bytes: int = 1 << 30
    #: A connection whose request head (request line and headers) has not fully arrived this
    #: long after it opened, or after the first byte of a next request, is closed.
    header_timeout_s: float = 10.0
    #: A request body not fully read this long after its head arrived: 408, connection closed.
    body_timeout_s: float = 30.0
    #: An idle keep-alive connection is closed after this long.
    keepalive_timeout_s: float = 75.0
    #: Open connections from one peer address; more are closed at once. Behind a reverse proxy
    #: every connection comes from the proxy: raise it, or 0 for no cap.
    max_connections_per_peer: int = 128
    #: Requests with bad credentials answered 401 per peer address and minute; past it 429
    #: (credentials are still checked first: a peer's good requests always pass).
    auth_failures_per_minute: int = 30
    #: On stop: requests in flight get this long to finish before connections are closed.
    shutdown_timeout_s: float = 10.0
    #: Consecutive refused webhooks (bad auth or body) that mark a Particle integration Broken.
    broken_after_failures: int = 3


class IngestMqttConfig(_Base):
    """The ingest-mqtt stage: one owner per TTS application through a Redis lease."""

    #: Lease time: a standby takes an application over this long after its owner died.
    lease_ttl_ms: int = 5_000
    #: Entries appended per pipelined ``XADD`` round trip.
    batch: int = 1_000
    #: Decoded messages waiting for Redis; past it new ones are dropped and counted.
    queue_max: int = 100_000
    #: Payloads above this are dead-lettered as ``too_large``.
    max_payload_bytes: int = 256 * 1024
    #: Cap of the reconnect backoff.
    max_backoff_s: float = 30.0
    #: Standbys subscribe too and keep the last ``lease_ttl_ms`` (+ the acquisition interval
    #: + ``standby_margin_ms``) of raw messages in memory, appended when they take over: no
    #: uplink is lost in a failover (duplicates are removed downstream by event_id).
    warm_standby: bool = True
    standby_margin_ms: int = 2_000
    #: An owner whose broker connection has been down this long hands the application to a
    #: warm standby that is connected (if one is); the standby replays what it kept, so the
    #: handover loses nothing — while an owner that waits out a blip itself loses what TTS
    #: published during it (QoS 0). Hence 0: hand over at once; raise it to trade that for
    #: fewer handovers (each replays the standby's buffer; duplicates are dropped by event_id).
    #: A replica that is not connected never takes an application from a connected one.
    handover_after_ms: int = 0
    #: Bounds of a standby's buffer; past them the oldest messages go first (counted).
    standby_max_messages: int = 100_000
    standby_max_bytes: int = 128 * 1024 * 1024


class TransformConfig(_Base):
    dedup_window_s: int = 3600
    #: Registry rows kept in memory (LRU).
    cache_size: int = 100_000
    #: Cap of the backoff after a failed batch (Redis unreachable…).
    max_backoff_s: float = 30.0
    #: How often templates with ``pull: true`` re-read their datastreams from Blynk.
    template_refresh_s: float = 300.0
    #: How long an uplink waits for another worker that is creating its device.
    provision_wait_s: float = 20.0
    #: Distinct unmapped keys remembered per template (``keys.unmapped``); more are counted
    #: under one field (:data:`pipeline.unmapped.OTHER`).
    unmapped_max_keys: int = 200
    #: The unmapped-keys hash of a template expires this long after its last update.
    unmapped_ttl_s: int = 7 * 86400


class EgressConfig(_Base):
    flush_count: int = 500
    flush_bytes: int = 512 * 1024
    flush_age_ms: int = 100
    per_device_rps: float = 50.0
    max_in_flight: int = 64
    #: Entries older than this are backlog: written through the timestamped upload.
    live_window_s: float = 60.0
    max_backoff_s: float = 30.0
    #: A device marked broken (Blynk refused the token stored for it) is set back to ok this
    #: long after, so its next uplink tries the token again (fixed in Blynk meanwhile?); 0 =
    #: only ``blynk-bridge devices unbreak`` does.
    broken_retry_s: float = 3600.0


class MetricsConfig(_Base):
    """The metrics port: ``/metrics``, ``/status``, ``/healthz``, ``/readyz`` (no auth: keep it
    off the internet)."""

    host: str = "0.0.0.0"
    port: int | None = None


class MonitorConfig(_Base):
    """The monitor stage: backlog gauges, trimming, removal of dead consumers."""

    #: Seconds between two samples (and trims).
    interval_s: float = 5.0
    #: Trim streams below what every group acknowledged (``XTRIM MINID``).
    trim: bool = True
    #: Dead letters older than this are trimmed from the dead stream.
    dead_retention_s: int = 7 * 86_400
    #: At most this many dead letters are kept (the oldest go first, counted and logged), so a
    #: sender that makes every message fail cannot grow Redis without bound: each letter keeps
    #: at most ``DEAD_RAW_MAX`` (8 KiB) of its raw input.
    dead_max_len: int = 100_000
    #: Consumers idle this long with nothing pending are removed (``XGROUP DELCONSUMER``).
    consumer_idle_s: float = 3600.0


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

    def template(self, name: str) -> TemplateConfig:
        for t in self.templates:
            if t.name == name:
                return t
        raise KeyError(name)


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
        raise ConfigError(f"{origin}: environment variable ${{{name}}} is not set{used}")

    return _VAR.sub(repl, text.replace("$${", "\0")).replace("\0", "${")


def _substitute_all(data: Any, env: Mapping[str, str], origin: str) -> Any:
    """:func:`_substitute` over the whole file; every unset variable is named in one error."""
    unset: list[str] = []
    out = _substitute(data, _CONFIG_TYPE, env, origin, "", unset)
    if unset:
        raise ConfigError(f"{origin}: environment variables not set: {'; '.join(unset)}")
    return out


def _substitute(node: Any, typ: mi.Type | None, env: Mapping[str, str], origin: str,
                where: str, unset: list[str]) -> Any:
    """Substitute inside every string value of ``node``, which should be of type ``typ`` (None:
    not in the schema, e.g. a ``*_file`` key or an unknown key msgspec will name); unset
    variables are appended to ``unset``."""
    if isinstance(node, str):
        if "${" not in node:
            return node
        try:
            value = substitute_env(node, env, origin, where)
        except ConfigError:
            unset.extend(f"${{{m.group(1)}}} (used by `{where}`)" for m in _VAR.finditer(node)
                         if m.group(1) not in env and m.group(2) is None)
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


def _resolve_files(node: Any, origin: str, where: str = "$") -> Any:
    """Read every ``<key>_file`` into ``<key>`` (secrets mounted as files)."""
    if isinstance(node, list):
        return [_resolve_files(v, origin, f"{where}[{i}]") for i, v in enumerate(node)]
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    for key, value in node.items():
        if isinstance(key, str) and key.endswith("_file") and key not in ("ca_file",):
            target = key[: -len("_file")]
            if target in node:
                raise ConfigError(f"{origin}: both `{target}` and `{key}` set at `{where}`")
            try:
                out[target] = Path(str(value)).read_text().strip()
            except OSError as exc:
                raise ConfigError(
                    f"{origin}: cannot read `{key}` at `{where}`: {exc.strerror}"
                ) from None
        else:
            out[key] = _resolve_files(value, origin, f"{where}.{key}")
    return out


def _dec_hook(type_: type, obj: Any) -> Any:
    if type_ is Secret and isinstance(obj, str):
        return Secret(obj)
    raise NotImplementedError


def parse(text: str, fmt: Literal["yaml", "toml"], origin: str,
          env: Mapping[str, str] | None = None) -> Config:
    """Parse configuration text; ``origin`` names the file in every error."""
    try:
        data = tomllib.loads(text) if fmt == "toml" else yaml.safe_load(text)
    except (yaml.YAMLError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{origin}: not valid {fmt.upper()}: {exc}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{origin}: the top level must be a mapping")
    data = _substitute_all(data, os.environ if env is None else env, origin)
    data = _resolve_files(data, origin)
    _migrate(data, origin)
    try:
        config = msgspec.convert(data, Config, dec_hook=_dec_hook)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"{origin}: {exc}") from None
    check(config, origin)
    return config


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
            raise ConfigError(f"{origin}: `{old_sec}.{old_key}` is the old name of "
                              f"`{new_sec}.{new_key}`; set only `{new_sec}.{new_key}`")
        target[new_key] = section.pop(old_key)
        log.warning("%s: `%s.%s` is deprecated; use `%s.%s`", origin, old_sec, old_key,
                    new_sec, new_key)


def load(path: str | os.PathLike[str], env: Mapping[str, str] | None = None) -> Config:
    """Load and validate a configuration file; raises :class:`ConfigError`."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read configuration: {exc.strerror}") from None
    fmt: Literal["yaml", "toml"] = "toml" if p.suffix == ".toml" else "yaml"
    return parse(text, fmt, str(p), env)


def check(config: Config, origin: str) -> None:
    """Cross-field checks msgspec cannot express; each error names the key."""
    names = [t.name for t in config.templates]
    templates = set(names)
    if len(templates) != len(names):
        raise ConfigError(f"{origin}: duplicate template names in `templates`")
    for i, t in enumerate(config.templates):
        seen_pins: set[str] = set()
        for j, ds in enumerate(t.datastreams):
            pin = ds.pin.upper()
            if not re.fullmatch(r"V([0-9]|[1-9][0-9]|1[0-9][0-9]|2[0-4][0-9]|25[0-5])", pin):
                raise ConfigError(
                    f"{origin}: `templates[{i}].datastreams[{j}].pin` must be V0..V255, "
                    f"got {ds.pin!r}"
                )
            if pin in seen_pins:
                raise ConfigError(f"{origin}: pin {pin} used twice in template {t.name!r}")
            seen_pins.add(pin)
    integrations: list[tuple[str, Sequence[TtsApplication | ParticleProduct]]] = [
        ("tts", config.tts),
        ("particle", config.particle),
    ]
    for section, items in integrations:
        seen: set[str] = set()
        for i, integ in enumerate(items):
            if isinstance(integ, ParticleProduct) and integ.auth is None:
                raise ConfigError(
                    f"{origin}: `particle[{i}].auth` is missing: set `header` + `secret` or "
                    "`username` + `password`, or write `auth: none` to accept webhooks from "
                    "anyone"
                )
            key = "auth" if isinstance(integ, ParticleProduct) else "webhook_auth"
            auth = integ.auth if isinstance(integ, ParticleProduct) else integ.webhook_auth
            if isinstance(auth, HttpAuth):
                for name, secret in (("secret", auth.secret), ("password", auth.password)):
                    if secret is not None and secret.reveal() in DEMO_SECRETS:
                        raise ConfigError(
                            f"{origin}: `{section}[{i}].{key}.{name}` is the demo's published "
                            "secret: set your own (e.g. `openssl rand -hex 32`)"
                        )
        for i, integ in enumerate(items):
            if integ.name in seen:
                raise ConfigError(f"{origin}: duplicate integration name `{section}[{i}].name`")
            seen.add(integ.name)
            if integ.template is not None and integ.template not in templates:
                raise ConfigError(
                    f"{origin}: `{section}[{i}].template` names unknown template "
                    f"{integ.template!r}"
                )
            for k, rule in enumerate(integ.template_rules):
                if rule.template not in templates:
                    raise ConfigError(
                        f"{origin}: `{section}[{i}].template_rules[{k}].template` names unknown "
                        f"template {rule.template!r}"
                    )
    for i, dev in enumerate(config.devices):
        if dev.template not in templates:
            raise ConfigError(
                f"{origin}: `devices[{i}].template` names unknown template {dev.template!r}"
            )
        if dev.server is not None and dev.server not in config.blynk.servers:
            raise ConfigError(
                f"{origin}: `devices[{i}].server` names unknown server {dev.server!r}"
            )
    _check_downlinks(config, origin)
    if config.blynk.default_server not in config.blynk.servers:
        raise ConfigError(
            f"{origin}: `blynk.default_server` {config.blynk.default_server!r} is not in "
            "`blynk.servers`"
        )


def _check_downlinks(config: Config, origin: str) -> None:
    names = [w.name for w in config.blynk_webhooks]
    if len(set(names)) != len(names):
        raise ConfigError(f"{origin}: duplicate names in `blynk_webhooks`")
    for i, w in enumerate(config.blynk_webhooks):
        if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", w.name):
            raise ConfigError(f"{origin}: `blynk_webhooks[{i}].name` must be 1-64 of "
                              f"A-Z a-z 0-9 _ . -, got {w.name!r}")
    for i, t in enumerate(config.templates):
        if t.downlink is None:
            continue
        pins = {ds.pin.upper() for ds in t.datastreams}
        where = f"templates[{i}].downlink"
        refs = [(f"{where}.particle.{p}", p) for p in t.downlink.particle]
        refs += [(f"{where}.particle.{p}.return_pin", f.return_pin)
                 for p, f in t.downlink.particle.items() if f.return_pin]
        refs += [(f"{where}.encode[{k}].pin", r.pin) for k, r in enumerate(t.downlink.encode)]
        if t.downlink.outcome_pin:
            refs.append((f"{where}.outcome_pin", t.downlink.outcome_pin))
        for key, pin in refs:
            if pins and pin.upper() not in pins:
                raise ConfigError(f"{origin}: `{key}` names pin {pin!r}, which template "
                                  f"{t.name!r} has no datastream for")
    for i, a in enumerate(config.tts):
        if a.downlink_via == "http" and not (a.api_url and a.downlink_webhook_id):
            raise ConfigError(f"{origin}: `tts[{i}]` sends downlinks over http: set `api_url` "
                              "and `downlink_webhook_id`")
        if not 1 <= a.downlink_f_port <= 233:
            raise ConfigError(f"{origin}: `tts[{i}].downlink_f_port` must be 1..233")


def env(name: str, default: str | None = None) -> str | None:
    """The one sanctioned ``os.environ`` read outside configuration loading."""
    return os.environ.get(name, default)
