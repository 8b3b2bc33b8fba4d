"""A faithful local Blynk IoT cloud: device HTTPS API, platform API, webhooks, regions, quotas.

Run it: ``blynk-bridge emulate blynk [-c FILE] [--port P] [--regions fra1=8081,ny3=8082]``.
Without ``-c`` it serves the built-in demo model (:mod:`emulators.blynk.demo`); the file format
is :class:`emulators.blynk.settings.EmulatorSpec`, shown with comments in
``blynk_bridge/examples/blynk-emulator.yaml``.

Behaviour follows ``docs/reference/blynk-api.md``. Where the reference marks something
UNCONFIRMED, a :class:`~emulators.blynk.settings.Settings` field switches it; the defaults are:

* ``batch_partial: reject_all`` — one bad pin rejects the whole ``batch/update`` (alternative
  ``apply_valid``: the good pins are written, then the 400 for the bad one);
* ``batch_success_body: ""`` — empty 200 body (alternative ``"OK"``, the 2022 docs);
* over-limit device requests: ``429`` + ``{"error":{"message":"Too many requests."}}`` +
  ``Retry-After: 1`` (status, message and header configurable);
* ``wrong_region: redirect`` — 308 + ``Location`` (alternative ``invalid_token``, 2023 docs);
* a datastream with neither a value nor a default: a one-pin ``get`` answers 200 with an empty
  body; multi-pin ``get`` and ``getAll`` leave it out;
* one-pin ``get`` of a location: ``[lon,lat]`` as JSON text; doubles as shortest text
  (``double_format`` to change);
* ``get?token=…&pin=V1`` and ``device/meta`` by name are accepted;
* Integer datastreams reject ``1.0`` (``decimal_integers``); timestamped uploads accept future
  points (``upload_accept_future``) and set the current value (``upload_sets_current``);
* ``isHardwareConnected`` is ``false`` for HTTP devices (``hardware_connected: never``);
* webhooks fire on every update, including device-API writes and same values; not retried;
  ``{timestamp_unix}`` in milliseconds; placeholders substituted raw (``webhook_json_escape``);
  Web Form is ``application/x-www-form-urlencoded``, Plain text is ``text/plain``; a dashboard
  write is ``POST /_admin/devices/{id}/app-write`` (validated like a device write, origin
  ``app``; each device keeps its last write's time and origin);
* ``search/devices`` matches device names only (``search_matches_metafields``);
* the device MQTT API (``serve(mqtt=True)`` or a region's ``mqtt_port``; :mod:`.mqtt`): CONNACK
  0x04 on a bad token, a second client of a token disconnects the older one, a device of
  another region gets ``downlink/redirect``, a device's own writes are not echoed on
  ``downlink/ds/*`` (``mqtt_echo_device_writes``).

Modules: ``model`` (templates, devices, value rules; pure), ``settings`` (file format),
``device_api``, ``platform_api``, ``webhooks``, ``mqtt`` (device MQTT API), ``server``
(:class:`BlynkEmulator`: limits, faults, inspection, serving), ``front`` (the HTTP front that
answers simple device-API GETs without aiohttp's machinery), ``demo``, ``cli`` (:func:`main`).
"""

from __future__ import annotations

from emulators.blynk.cli import main
from emulators.blynk.model import (
    DatastreamSpec,
    DeviceSpec,
    MetafieldSpec,
    Model,
    TemplateSpec,
)
from emulators.blynk.server import BlynkEmulator, FaultSpec
from emulators.blynk.settings import EmulatorSpec, OAuthClient, Settings, WebhookSpec

__all__ = [
    "BlynkEmulator",
    "DatastreamSpec",
    "DeviceSpec",
    "EmulatorSpec",
    "FaultSpec",
    "MetafieldSpec",
    "Model",
    "OAuthClient",
    "Settings",
    "TemplateSpec",
    "WebhookSpec",
    "main",
]
