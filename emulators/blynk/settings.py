"""The emulator's file format: regions, behaviour switches, the model, OAuth clients, webhooks.

Every behaviour the reference (``docs/reference/blynk-api.md``) marks UNCONFIRMED is a field of
:class:`Settings`; the default is our best reading and the comment says which section it is
about. ``blynk_bridge/examples/blynk-emulator.yaml`` shows every key with a comment. String
values may name environment variables (``${BRIDGE_URL:-http://127.0.0.1:8080}``), substituted
by the bridge configuration's rule (:func:`load_spec`).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Literal

import msgspec
import yaml

from emulators.blynk.model import DeviceSpec, TemplateSpec, _Spec
from pipeline.config import substitute_all
from pipeline.errors import ConfigError


class Settings(_Spec):
    # --- answers (section 1.3 / 1.4 / 6.2, 6.3) ---------------------------------------------
    #: One bad pin in a ``batch/update``: ``reject_all`` (nothing written, 400) or
    #: ``apply_valid`` (the good pins are written, then the 400 for the bad one). UNCONFIRMED.
    batch_partial: Literal["reject_all", "apply_valid"] = "reject_all"
    #: Body of a successful ``batch/update`` GET: empty or ``OK`` (the docs disagree). UNCONFIRMED.
    batch_success_body: str = ""
    #: Body of a successful timestamped ``POST batch/update`` (documented: ``OK``).
    upload_success_body: str = "OK"
    #: A token used on the wrong region: ``redirect`` (308, current docs) or ``invalid_token``
    #: (400 ``Invalid token.``, what the 2023 docs describe).
    wrong_region: Literal["redirect", "invalid_token"] = "redirect"
    #: ``1.0`` accepted for an Integer datastream. UNCONFIRMED (section 5); default: rejected.
    decimal_integers: bool = False
    #: Max length of a String value in bytes (documented: 1024).
    string_max_bytes: int = 1024
    #: Format of a double in a one-pin ``get`` (Python format string, e.g. ``"{:.5f}"`` for the
    #: old docs' ``100.00000``); null = shortest round-trip text. UNCONFIRMED (section 1.5).
    double_format: str | None = None
    #: Timestamped uploads: oldest accepted point (documented: one month) and whether points in
    #: the future are accepted (UNCONFIRMED for HTTP; MQTT accepts one month ahead).
    upload_max_age_s: int = 31 * 86_400
    upload_accept_future: bool = True
    #: Whether an upload's newest point also becomes the current value. UNCONFIRMED; default yes.
    upload_sets_current: bool = True
    #: ``isHardwareConnected`` for HTTP-only devices: ``never`` (Particle guide) or
    #: ``after_data`` (Connection Lifecycle "Log when device reports any data", for
    #: ``online_window_s`` after each write). UNCONFIRMED (section 1.6).
    hardware_connected: Literal["never", "after_data"] = "never"
    online_window_s: int = 60

    # --- limits (section 1.11; the over-limit answer is UNCONFIRMED) --------------------------
    #: Requests per second per device (documented: 50); null = unlimited.
    device_rps: float | None = 50.0
    #: ``update`` + ``batch/update`` calls per device per day (documented: 500,000).
    daily_updates: int | None = 500_000
    #: Timestamped points imported per device per day (documented: 10,000).
    daily_import_points: int | None = 10_000
    #: logEvent calls per device per day (documented: 100).
    daily_events: int | None = 100
    #: Device messages per organization per month: 100,000 on FREE, unlimited (null) on PRO.
    monthly_messages: int | None = None
    #: Max request size, headers + body (documented: 2 MB).
    max_request_bytes: int = 2 * 1024 * 1024
    #: Points per timestamped upload (documented: 10,000).
    max_batch_points: int = 10_000
    #: The answer to an over-limit device request. UNCONFIRMED: 429 + JSON error + Retry-After.
    over_limit_status: int = 429
    over_limit_message: str = "Too many requests."
    retry_after_s: int = 1
    #: Platform API requests per minute per organization (documented: 10,000, then 429).
    platform_rpm: int | None = 10_000

    # --- platform API (section 3) -------------------------------------------------------------
    #: Lifetime of an OAuth2 access token in seconds (documented example: 300).
    token_expires_in: int = 300
    #: ``search/devices?query=`` also matches metafield values. UNCONFIRMED; default no.
    search_matches_metafields: bool = False
    #: Device names must be ≤50 letters, digits, spaces, ``'``, ``_``, ``-`` (documented).
    validate_device_names: bool = True
    org_id: int = 1
    org_name: str = "Emulated Org"
    owner_id: int = 1

    # --- webhooks (section 2; retries, units and escaping are UNCONFIRMED) --------------------
    #: Requests per minute per webhook (documented: 10; over-limit triggers are dropped).
    webhook_rate_per_min: int = 10
    #: ``{timestamp_unix}`` in ``ms`` (Blynk's unit everywhere else) or ``s``. UNCONFIRMED.
    timestamp_unix_unit: Literal["ms", "s"] = "ms"
    #: JSON-escape placeholder values inside Custom JSON bodies. UNCONFIRMED; default no.
    webhook_json_escape: bool = False
    #: Device MQTT API: whether a device's own writes also come back on its ``downlink/ds/*``
    #: (section 8 says UNCONFIRMED; default: only app, automation and API changes do).
    mqtt_echo_device_writes: bool = False
    #: Timeout of one webhook request.
    webhook_timeout_s: float = 10.0
    #: Triggers waiting to be sent; past this they are dropped and counted.
    webhook_queue: int = 10_000

    # --- inspection -----------------------------------------------------------------------------
    #: Points of history kept per device and pin.
    history_len: int = 1000
    #: Requests kept in the inspection ring buffer (0 = recording off).
    request_log_len: int = 10_000
    #: Host put in ``Location`` headers and region URLs when a region has no ``public_url``.
    advertise_host: str = "127.0.0.1"


class OAuthClient(_Spec):
    client_id: str
    client_secret: str


class WebhookAuth(_Spec):
    """Basic Auth of a webhook (the form's Authorization "Basic Auth")."""

    username: str
    password: str


class WebhookSpec(_Spec):
    """One Blynk webhook (Console > Developers > Webhooks), triggered by a datastream update."""

    name: str
    url: str
    #: ``template_datastream`` (every device of ``template``) or ``device_datastream`` (``device``).
    trigger: Literal["template_datastream", "device_datastream"] = "template_datastream"
    template: str | None = None
    device: int | None = None
    #: Datastream id, or its pin (``V7``).
    datastream: int | str = 0
    method: Literal["GET", "POST", "PUT", "DELETE"] = "POST"
    #: ``json`` (Custom JSON), ``form`` (Web Form) or ``plain`` (Plain text).
    content_type: Literal["json", "form", "plain"] = "json"
    #: Body text with ``{placeholders}`` (json / plain).
    body: str = ""
    #: Web Form rows: key → placeholder text.
    fields: dict[str, str] = msgspec.field(default_factory=dict)
    query: dict[str, str] = msgspec.field(default_factory=dict)
    #: Custom headers (e.g. a shared secret the receiver checks). Blynk allows only letters,
    #: digits, spaces and ``/ _ : ; . -`` in values.
    headers: dict[str, str] = msgspec.field(default_factory=dict)
    #: Authorization: None (null) or Basic.
    auth: WebhookAuth | None = None
    #: Overrides ``settings.webhook_rate_per_min`` for this webhook.
    rate_per_min: int | None = None


class RegionSpec(_Spec):
    port: int
    #: Base URL other regions' 308 answers point at (default ``http://advertise_host:port``).
    public_url: str | None = None
    #: Port of the region's device MQTT API (null: served only with ``serve(mqtt=True)``).
    mqtt_port: int | None = None


class EmulatorSpec(_Spec):
    #: Region name → port, or → ``{port, public_url}``. The first region is the default one.
    regions: dict[str, int | RegionSpec] = msgspec.field(default_factory=lambda: {"fra1": 8081})
    host: str = "127.0.0.1"
    settings: Settings = msgspec.field(default_factory=Settings)
    oauth_clients: list[OAuthClient] = msgspec.field(default_factory=list)
    templates: list[TemplateSpec] = msgspec.field(default_factory=list)
    devices: list[DeviceSpec] = msgspec.field(default_factory=list)
    webhooks: list[WebhookSpec] = msgspec.field(default_factory=list)


class SpecError(ValueError):
    """The emulator file is invalid; the message names the file and the key."""


def load_spec(path: str | Path, env: Mapping[str, str] | None = None) -> EmulatorSpec:
    """Read an emulator file. String values may use ``${NAME}`` / ``${NAME:-default}`` as the
    bridge's configuration does (the one rule: :func:`pipeline.config.substitute_all`), taken
    from ``env`` (None: the process's environment); an unset variable without a default is a
    :class:`SpecError` naming it and the key that uses it."""
    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise SpecError(f"{p}: {exc}") from None
    try:
        data = substitute_all(data, env, str(p))
    except ConfigError as exc:
        raise SpecError(str(exc)) from None
    try:
        return msgspec.convert(data, EmulatorSpec, strict=False)
    except msgspec.ValidationError as exc:
        raise SpecError(f"{p}: {exc}") from None
