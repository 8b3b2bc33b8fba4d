"""A local stand-in for the Particle Cloud: webhooks out, the Cloud API function endpoint in.

**Webhooks** (``docs/reference/tts-particle-formats.md`` §2). :class:`Webhook` is Particle's
own webhook configuration (``event``, ``url``, ``requestType``, ``json``/``form``/``body``,
``query``, ``headers``, ``auth``, ``noDefaults``), so a saved configuration such as the Blynk
blueprint's (``particle-webhook-template-blynk.json``) is sent the way Particle would send it:

* mustache: ``{{{x}}}`` raw, ``{{x}}`` HTML-escaped (``&<>"'``); the predefined variables
  (``PARTICLE_DEVICE_ID``, ``PARTICLE_EVENT_NAME``, ``PARTICLE_EVENT_VALUE``,
  ``PARTICLE_PUBLISHED_AT``, ``PARTICLE_EVENT_ID``, ``PRODUCT_ID``, ``PRODUCT_USER_ID``,
  ``PRODUCT_VERSION``, ``PARTICLE_EVENT_PUBLIC``, the ``SPARK_*`` aliases) and, when the event
  data is JSON, its fields with nested paths (``a.b``, ``c.0.d``); an unknown variable renders
  empty, like mustache;
* ``json`` templates are rendered value by value (keys too), so every value is a string;
  a ``body`` is rendered as text (numbers stay numbers; nothing is escaped);
* the default fields (``event``, ``data``, ``published_at``, ``coreid``) go with ``form``,
  ``json`` or ``query`` unless ``noDefaults``; a webhook with none of them sends the default
  form body; ``User-Agent: ParticleBot/1.1 (https://docs.particle.io/webhooks)`` always.
* **Retries, simplified**: a delivery answered with a non-2xx status, a transport error or no
  answer within 20 s is tried again after each of ``retry_delays_s`` (Particle: "retried after
  30 seconds and 1 minute before being dropped"), then dropped and counted as a hook-error.
  Particle's adaptive per-host throttling is not modelled.
* Assumption (unconfirmed): a ``body`` webhook without a Content-Type header is sent as
  ``text/plain``.

**Cloud API** (§3): ``POST /v1/devices/{id}/{fn}`` and ``POST /v1/products/{p}/devices/{id}/{fn}``
with ``arg`` (or legacy ``args``) as form or JSON and ``Authorization: Bearer``. Each device
registers firmware functions that return an ``int`` (:func:`int_arg`, :func:`returns`, or any
callable). Answers: 200 ``{"id",["name",]"connected":true,"return_value"}`` (the fixtures'
shape; ``?format=raw``: the bare integer); 401 bad or missing token; 403 an API-user token on the
unscoped path (fixture ``particle-error-apiuser-01``); 404 unknown device or function; an offline
device 408 ``{"ok":false,"error":"timed out"}`` (fixture ``particle-error-timeout-01``); 400 an
argument over ``max_arg_len``. What the reference leaves open is switchable in
:class:`CloudBehaviour`; the 401/404/400 bodies are not in the fixtures and are marked as
assumptions below. Every call is recorded in :attr:`ParticleCloud.calls` (and
``GET /_admin/calls``); a successful call's argument is the device's ``applied`` state.

Run it: ``blynk-bridge emulate particle send --url … --devices 10 --rate 5 --count 100`` or
``blynk-bridge emulate particle serve --port 8091 --token T --device ID``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import html
import json
import random
import re
import signal
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote

import aiohttp
import msgspec
from aiohttp import web

from pipeline.lifecycle import until_stopped

USER_AGENT = "ParticleBot/1.1 (https://docs.particle.io/webhooks)"
#: Particle: "Servers must return a response within the timeout period of 20 seconds."
TIMEOUT_S = 20.0
#: Particle: skipped events are "retried after 30 seconds and 1 minute before being dropped".
RETRY_DELAYS_S = (30.0, 60.0)


# --- events and webhook configurations -----------------------------------------------------------


@dataclass(frozen=True)
class Event:
    """One event as a device published it."""

    name: str
    data: str
    device_id: str
    published_at: str
    event_id: str
    product_id: int | None = None
    user_id: str = ""
    fw_version: int | None = None
    public: bool = False


def make_event(
    device_id: str,
    name: str = "sensor",
    data: str | Mapping[str, Any] | None = None,
    *,
    published_at: datetime | str | None = None,
    product_id: int | None = None,
    user_id: str = "",
    fw_version: int | None = None,
    public: bool = False,
    event_id: str | None = None,
) -> Event:
    """An event; a mapping ``data`` is serialized compactly, as firmware's ``JSONWriter`` does."""
    if data is None:
        data = ""
    elif not isinstance(data, str):
        data = json.dumps(data, separators=(",", ":"))
    if published_at is None:
        published_at = datetime.now(UTC)
    if isinstance(published_at, datetime):
        published_at = published_at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.") + (
            f"{published_at.microsecond // 1000:03d}Z"
        )
    return Event(
        name=name,
        data=data,
        device_id=device_id,
        published_at=published_at,
        event_id=event_id or uuid.uuid4().hex,
        product_id=product_id,
        user_id=user_id,
        fw_version=fw_version,
        public=public,
    )


class BasicAuth(msgspec.Struct):
    username: str
    password: str


class Webhook(msgspec.Struct, kw_only=True):
    """A Particle webhook configuration, field names as Particle spells them."""

    url: str
    event: str = ""
    name: str | None = None
    requestType: str = "POST"
    noDefaults: bool = False
    json: dict[str, Any] | str | None = None
    form: dict[str, Any] | None = None
    body: str | None = None
    query: dict[str, Any] | None = None
    headers: dict[str, str] | None = None
    auth: BasicAuth | None = None
    rejectUnauthorized: bool = True


def load_webhook(text: str | bytes, *, url: str | None = None) -> Webhook:
    """Read a saved webhook configuration (unknown fields ignored); ``url`` replaces its URL."""
    hook = msgspec.json.decode(text, type=Webhook)
    return msgspec.structs.replace(hook, url=url) if url else hook


DEFAULT_JSON: dict[str, Any] = {
    "event": "{{{PARTICLE_EVENT_NAME}}}",
    "data": "{{{PARTICLE_EVENT_VALUE}}}",
    "coreid": "{{{PARTICLE_DEVICE_ID}}}",
    "published_at": "{{{PARTICLE_PUBLISHED_AT}}}",
}
#: The Console's product template (Particle's InfluxData tutorial), plus the event id.
PRODUCT_JSON: dict[str, Any] = {
    **DEFAULT_JSON,
    "userid": "{{{PRODUCT_USER_ID}}}",
    "fw_version": "{{{PRODUCT_VERSION}}}",
    "public": "{{{PARTICLE_EVENT_PUBLIC}}}",
    "productID": "{{{PRODUCT_ID}}}",
    "event_id": "{{{PARTICLE_EVENT_ID}}}",
}
#: A ``body`` template inlining the event data as JSON (the Telegraf/InfluxData guides' style).
INLINE_BODY = (
    '{"event":"{{{PARTICLE_EVENT_NAME}}}","coreid":"{{{PARTICLE_DEVICE_ID}}}",'
    '"published_at":"{{{PARTICLE_PUBLISHED_AT}}}","event_id":"{{{PARTICLE_EVENT_ID}}}",'
    '"data":{{{PARTICLE_EVENT_VALUE}}}}'
)
FORMATS = ("form", "json", "product", "custom", "body")


def webhook_for(fmt: str, url: str, *, event: str = "sensor",
                fields: Sequence[str] = ("temp", "hum")) -> Webhook:
    """A webhook of one of the common shapes (:data:`FORMATS`).

    ``custom`` is a ``json`` template spreading the data fields ``fields`` (each becomes a
    string, as in Particle), with ``noDefaults`` and the device id and event name in the query.
    """
    match fmt:
        case "form":
            return Webhook(url=url, event=event)
        case "json":
            return Webhook(url=url, event=event, json=dict(DEFAULT_JSON), noDefaults=True)
        case "product":
            return Webhook(url=url, event=event, json=dict(PRODUCT_JSON), noDefaults=True)
        case "custom":
            template = {f: "{{{" + f + "}}}" for f in fields}
            template["published_at"] = "{{{PARTICLE_PUBLISHED_AT}}}"
            return Webhook(url=url, event=event, json=template, noDefaults=True,
                           query={"coreid": "{{{PARTICLE_DEVICE_ID}}}",
                                  "event": "{{{PARTICLE_EVENT_NAME}}}"})
        case "body":
            return Webhook(url=url, event=event, body=INLINE_BODY,
                           headers={"Content-Type": "application/json"})
    raise ValueError(f"unknown webhook format {fmt!r}; one of {', '.join(FORMATS)}")


# --- rendering -----------------------------------------------------------------------------------


_MUSTACHE = re.compile(r"\{\{\{\s*([^}]*?)\s*\}\}\}|\{\{\s*([^}]*?)\s*\}\}")


def variables(event: Event) -> dict[str, str]:
    """Every mustache variable of an event, the data's JSON fields included."""
    out: dict[str, str] = {}
    try:
        decoded = json.loads(event.data) if event.data else None
    except ValueError:
        decoded = None
    if isinstance(decoded, dict | list):
        _paths(decoded, "", out)
    product = "" if event.product_id is None else str(event.product_id)
    version = "" if event.fw_version is None else str(event.fw_version)
    out.update({
        "PARTICLE_DEVICE_ID": event.device_id,
        "PARTICLE_EVENT_NAME": event.name,
        "PARTICLE_EVENT_VALUE": event.data,
        "PARTICLE_PUBLISHED_AT": event.published_at,
        "PARTICLE_EVENT_ID": event.event_id,
        "PARTICLE_EVENT_PUBLIC": "true" if event.public else "false",
        "PRODUCT_ID": product,
        "PRODUCT_USER_ID": event.user_id,
        "PRODUCT_VERSION": version,
        "SPARK_CORE_ID": event.device_id,
        "SPARK_EVENT_NAME": event.name,
        "SPARK_EVENT_VALUE": event.data,
        "SPARK_PUBLISHED_AT": event.published_at,
    })
    out["PARTICLE_EVENT_JSON"] = json.dumps({
        "data": event.data, "ttl": 60, "published_at": event.published_at,
        "coreid": event.device_id, "userid": event.user_id, "version": event.fw_version or 0,
        "public": event.public, "productID": event.product_id or 0, "name": event.name,
    }, separators=(",", ":"))
    out["PARTICLE_EVENT_BASE64"] = base64.b64encode(out["PARTICLE_EVENT_JSON"].encode()).decode()
    return out


def _paths(node: Any, prefix: str, out: dict[str, str]) -> None:
    items = node.items() if isinstance(node, dict) else enumerate(node)
    for key, value in items:
        path = f"{prefix}{key}"
        if isinstance(value, dict | list):
            out[path] = json.dumps(value, separators=(",", ":"))
            _paths(value, path + ".", out)
        else:
            out[path] = _js_text(value)


def _js_text(value: Any) -> str:
    """How JavaScript prints a JSON scalar (``true``, ``2`` for ``2.0``, ``""`` for null)."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def render(template: str, values: Mapping[str, str]) -> str:
    """Mustache variables only: ``{{{x}}}`` raw, ``{{x}}`` HTML-escaped, unknown → empty."""

    def repl(m: re.Match[str]) -> str:
        if m.group(1) is not None:
            return values.get(m.group(1), "")
        return html.escape(values.get(m.group(2), ""), quote=True).replace("&#x27;", "&#39;")

    return _MUSTACHE.sub(repl, template)


def _render_tree(node: Any, values: Mapping[str, str]) -> Any:
    if isinstance(node, str):
        return render(node, values)
    if isinstance(node, dict):
        return {render(str(k), values): _render_tree(v, values) for k, v in node.items()}
    if isinstance(node, list):
        return [_render_tree(v, values) for v in node]
    return node


def _urlencode(fields: Mapping[str, str]) -> str:
    """RFC 3986 per key and value, as Particle sends forms (space → ``%20``, ``!`` → ``%21``)."""
    return "&".join(f"{quote(k, safe=_SAFE)}={quote(v, safe=_SAFE)}" for k, v in fields.items())


_SAFE = "-._~"


@dataclass(frozen=True)
class Request:
    """One HTTP request exactly as it goes on the wire (minus the connection headers)."""

    method: str
    url: str
    headers: dict[str, str]
    body: bytes | None


def build_request(hook: Webhook, event: Event) -> Request:
    """The request Particle sends for ``event`` through ``hook``."""
    values = variables(event)
    defaults: dict[str, str] = {} if hook.noDefaults else {
        "event": event.name, "data": event.data, "published_at": event.published_at,
        "coreid": event.device_id,
    }
    headers = {"User-Agent": USER_AGENT}
    method = hook.requestType.upper()
    body: bytes | None = None
    query = {k: _js_text(v) for k, v in (_render_tree(hook.query or {}, values)).items()}
    if hook.json is not None and method != "GET":
        rendered = _render_tree(hook.json, values)
        obj = json.loads(rendered) if isinstance(rendered, str) else rendered
        body = json.dumps({**defaults, **obj}, separators=(",", ":")).encode()
        headers["Accept"] = "application/json"
        headers["Content-Type"] = "application/json"
    elif hook.body is not None and method != "GET":
        body = render(hook.body, values).encode()
        headers["Content-Type"] = "text/plain"
    elif method == "GET" or (hook.query is not None and hook.form is None):
        query = {**defaults, **query}
    else:
        form = {k: _js_text(v) for k, v in _render_tree(hook.form or {}, values).items()}
        body = _urlencode({**defaults, **form}).encode()
        headers["Content-Type"] = "application/x-www-form-urlencoded"
    for name, value in (hook.headers or {}).items():
        headers = {k: v for k, v in headers.items() if k.lower() != name.lower()}
        headers[name] = render(value, values)
    if hook.auth is not None:
        creds = f"{hook.auth.username}:{hook.auth.password}".encode()
        headers["Authorization"] = "Basic " + base64.b64encode(creds).decode()
    url = hook.url
    if query:
        url += ("&" if "?" in url else "?") + _urlencode(query)
    return Request(method=method, url=url, headers=headers, body=body)


# --- sending -------------------------------------------------------------------------------------


@dataclass
class Delivery:
    """What became of one event: every status seen, and the final outcome."""

    event: Event
    statuses: list[int | str] = field(default_factory=list)
    ok: bool = False


@dataclass
class FleetStats:
    sent: int = 0
    delivered: int = 0
    retries: int = 0
    dropped: int = 0
    statuses: Counter[int | str] = field(default_factory=Counter)


async def deliver(
    session: aiohttp.ClientSession,
    hook: Webhook,
    event: Event,
    *,
    retry_delays_s: Sequence[float] = RETRY_DELAYS_S,
    timeout_s: float = TIMEOUT_S,
) -> Delivery:
    """Send one event through one webhook, retrying as described in the module docstring."""
    request = build_request(hook, event)
    result = Delivery(event)
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    for delay in (0.0, *retry_delays_s):
        if delay:
            await asyncio.sleep(delay)
        try:
            async with session.request(request.method, request.url, headers=request.headers,
                                       data=request.body, timeout=timeout,
                                       skip_auto_headers=("Content-Type",)) as resp:
                await resp.read()
                result.statuses.append(resp.status)
                if 200 <= resp.status < 300:
                    result.ok = True
                    return result
        except (aiohttp.ClientError, TimeoutError) as exc:
            result.statuses.append(type(exc).__name__)
    return result


class ParticleFleet:
    """Devices publishing events at ``rate_per_s`` (all devices together), round-robin.

    ``fmt`` is one of :data:`FORMATS` or a :class:`Webhook` (its ``url`` replaced by ``url``);
    ``auth`` is ``(user, password)`` for HTTP basic or a mapping of extra headers; ``data(device,
    seq)`` makes each event's data (default: ``{"temp": …, "hum": …}`` as JSON).
    """

    def __init__(
        self,
        url: str,
        devices: int | Sequence[str],
        rate_per_s: float,
        *,
        fmt: str | Webhook = "form",
        auth: tuple[str, str] | Mapping[str, str] | None = None,
        event: str = "sensor",
        data: Callable[[str, int], str | Mapping[str, Any]] | None = None,
        product_id: int | None = None,
        retry_delays_s: Sequence[float] = RETRY_DELAYS_S,
        timeout_s: float = TIMEOUT_S,
        max_in_flight: int = 64,
    ) -> None:
        self.devices = ([f"e00fce68{i:016x}" for i in range(devices)]
                        if isinstance(devices, int) else list(devices))
        if not self.devices or rate_per_s <= 0:
            raise ValueError("need at least one device and a positive rate")
        hook = (webhook_for(fmt, url, event=event) if isinstance(fmt, str)
                else msgspec.structs.replace(fmt, url=url))
        if isinstance(auth, tuple):
            hook = msgspec.structs.replace(hook, auth=BasicAuth(*auth))
        elif auth is not None:
            hook = msgspec.structs.replace(hook, headers={**(hook.headers or {}), **auth})
        self.webhook = hook
        self.rate_per_s = rate_per_s
        self.event = event
        self.data = data or _default_data
        self.product_id = product_id
        self.retry_delays_s = tuple(retry_delays_s)
        self.timeout_s = timeout_s
        self.max_in_flight = max_in_flight
        self.stats = FleetStats()
        self.deliveries: list[Delivery] = []

    def next_event(self, seq: int) -> Event:
        device = self.devices[seq % len(self.devices)]
        return make_event(device, self.event, self.data(device, seq), product_id=self.product_id,
                          fw_version=3 if self.product_id else None,
                          user_id="5e6ad98d764c6d00014be177" if self.product_id else "")

    async def run(self, count: int | None = None, duration_s: float | None = None,
                  stop: asyncio.Event | None = None, stop_grace_s: float = 2.0) -> FleetStats:
        """Publish until ``count`` events, ``duration_s`` seconds or ``stop`` is set, then wait
        for every delivery (retries included) to finish.

        After ``stop``, deliveries still in flight get ``stop_grace_s`` to finish and are then
        cancelled (not counted as sent): a delivery waiting out Particle's retry delays (30 s,
        60 s) must not hold a stop for minutes."""
        if count is None and duration_s is None and stop is None:
            raise ValueError("give count, duration_s or stop")
        stop = stop or asyncio.Event()
        gate = asyncio.Semaphore(self.max_in_flight)
        start = time.monotonic()
        tasks: set[asyncio.Task[None]] = set()
        connector = aiohttp.TCPConnector(limit=self.max_in_flight)
        async with aiohttp.ClientSession(connector=connector) as session:
            seq = 0
            while (count is None or seq < count) and not stop.is_set() and (
                duration_s is None or time.monotonic() - start < duration_s
            ):
                due = start + seq / self.rate_per_s
                delay = due - time.monotonic()
                if delay > 0:
                    # Pacing, or told to stop.
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), delay)
                    continue
                # At the in-flight cap the wait for a free slot must also end on stop.
                acquired = (await until_stopped(gate.acquire(), stop) if gate.locked()
                            else await gate.acquire())
                if not acquired:
                    break
                task = asyncio.create_task(self._send(session, self.next_event(seq), gate))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                seq += 1
            if tasks and stop.is_set():
                _, late = await asyncio.wait(set(tasks), timeout=stop_grace_s)
                for task in late:
                    task.cancel()
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)
        return self.stats

    async def _send(self, session: aiohttp.ClientSession, event: Event,
                    gate: asyncio.Semaphore) -> None:
        try:
            done = await deliver(session, self.webhook, event,
                                 retry_delays_s=self.retry_delays_s, timeout_s=self.timeout_s)
        finally:
            gate.release()
        self.deliveries.append(done)
        self.stats.sent += 1
        self.stats.retries += len(done.statuses) - 1
        self.stats.statuses.update(done.statuses)
        if done.ok:
            self.stats.delivered += 1
        else:
            self.stats.dropped += 1


def _default_data(device: str, seq: int) -> dict[str, Any]:
    rng = random.Random(f"{device}:{seq}")
    return {"temp": round(rng.uniform(15, 30), 2), "hum": rng.randint(20, 80)}


# --- the Cloud API function endpoint -------------------------------------------------------------

#: Fixture ``particle-error-timeout-01.json`` (offline device, 408).
TIMED_OUT = {"ok": False, "error": "timed out"}
#: An offline device as Blynk's Particle guide quotes Particle (status 400), older behaviour.
TIMED_OUT_400 = {"ok": False, "error": "Timed out."}
#: Fixture ``particle-error-apiuser-01.json`` (403).
API_USER_FORBIDDEN = {"error": "unauthorized",
                      "error_description": "API users are not allowed to call this endpoint"}
#: Assumption: Particle's OAuth error body for a bad or missing token (not in the fixtures).
INVALID_TOKEN = {"error": "invalid_token",
                 "error_description": "The access token provided is invalid."}
#: Assumptions (not in the fixtures): the bodies of the other refusals.
DEVICE_NOT_CONNECTED = {"ok": False, "error": "Device is not connected"}
DEVICE_NOT_FOUND = {"ok": False, "error": "Device not found."}
PERMISSION_DENIED = {"ok": False, "error": "Permission Denied",
                     "info": "I didn't recognize that device name or ID"}
ARG_TOO_LONG = {"ok": False, "error": "Argument too long"}
BAD_BODY = {"ok": False, "error": "Invalid request body"}

OfflineAnswer = Literal["timeout_408", "timed_out_400", "not_connected_404"]
UnknownDeviceAnswer = Literal["not_found_404", "permission_denied_403"]
_OFFLINE: dict[str, tuple[int, dict[str, Any]]] = {
    "timeout_408": (408, TIMED_OUT),
    "timed_out_400": (400, TIMED_OUT_400),
    "not_connected_404": (404, DEVICE_NOT_CONNECTED),
}
_UNKNOWN: dict[str, tuple[int, dict[str, Any]]] = {
    "not_found_404": (404, DEVICE_NOT_FOUND),
    "permission_denied_403": (403, PERMISSION_DENIED),
}


class CloudBehaviour(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """The answers the reference leaves open (§3), each a documented, switchable default.

    * ``offline``: ``timeout_408`` — the current getting-started page and fixture
      ``particle-error-timeout-01`` (``{"ok":false,"error":"timed out"}``, 408);
      ``timed_out_400`` — what Blynk's Particle guide quotes (400, ``"Timed out."``);
      ``not_connected_404`` — the reference table's "404 … not currently connected".
    * ``unknown_device``: 404 (default) or 403 ``Permission Denied``; both bodies assumed.
    * ``max_arg_len``: characters of ``arg``; Device OS accepts 63, 622, 864 or 1024 depending
      on its version. A longer ``arg`` answers ``arg_too_long_status`` with :data:`ARG_TOO_LONG`
      (what Particle answers is UNCONFIRMED).
    """

    offline: OfflineAnswer = "timeout_408"
    unknown_device: UnknownDeviceAnswer = "not_found_404"
    max_arg_len: int = 1024
    arg_too_long_status: int = 400


@dataclass(frozen=True)
class FunctionCall:
    device: str
    function: str
    arg: str
    product: str | None
    status: int
    ts_ms: int
    #: The firmware's ``return_value`` (None when the call was refused).
    return_value: int | None = None


#: A firmware function: its argument in, its ``int`` return value out.
Function = Callable[[str], int]


def int_arg(arg: str) -> int:
    """A firmware function that returns its argument as an int (``-1`` if it is not one), as a
    Blynk ``{"args":"{device_pinValue}"}`` webhook's target typically does."""
    try:
        return int(arg.strip())
    except ValueError:
        return -1


def returns(n: int) -> Function:
    """A firmware function that always returns ``n``."""
    return lambda _arg: n


@dataclass
class Device:
    id: str
    name: str | None = None
    online: bool = True
    product: str | None = None
    #: Function name → handler(arg) → return_value; ``None``: every function returns 1.
    functions: dict[str, Function] | None = None
    #: Function name → the last argument a successful call passed (the device's applied state).
    applied: dict[str, str] = field(default_factory=dict)


class ParticleCloud:
    """The Cloud API function endpoint; ``app`` is its aiohttp application.

    Also ``GET /_admin/calls`` (every recorded call and counts by status) and
    ``POST /_admin/devices/{id}`` with ``{"online": false}`` to take a device offline.
    """

    def __init__(
        self,
        devices: Iterable[str | Device],
        *,
        tokens: Iterable[str] = ("particle-token",),
        api_user_tokens: Iterable[str] = (),
        max_arg_len: int | None = None,
        behaviour: CloudBehaviour | None = None,
    ) -> None:
        self.devices = {d.id if isinstance(d, Device) else d:
                        d if isinstance(d, Device) else Device(d) for d in devices}
        self.tokens = set(tokens)
        self.api_user_tokens = set(api_user_tokens)
        behaviour = behaviour or CloudBehaviour()
        if max_arg_len is not None:
            behaviour = msgspec.structs.replace(behaviour, max_arg_len=max_arg_len)
        self.behaviour = behaviour
        self.calls: list[FunctionCall] = []
        self._injected: list[int] = []
        self._changed = asyncio.Condition()
        self.app = web.Application()
        self.app.router.add_post("/v1/devices/{device}/{function}", self.call_function)
        self.app.router.add_post("/v1/products/{product}/devices/{device}/{function}",
                                 self.call_function)
        self.app.router.add_get("/_admin/calls", self._admin_calls)
        self.app.router.add_post("/_admin/devices/{device}", self._admin_device)

    @property
    def max_arg_len(self) -> int:
        return self.behaviour.max_arg_len

    def fail_next(self, status: int, times: int = 1) -> None:
        """The next ``times`` authorized calls answer ``status`` (408, 429, 500…)."""
        self._injected.extend([status] * times)

    def set_online(self, device_id: str, online: bool) -> None:
        self.devices[device_id].online = online

    async def wait_for_calls(self, n: int, timeout_s: float = 5.0) -> list[FunctionCall]:
        """Wait until at least ``n`` calls were recorded; raises ``TimeoutError``."""
        async with asyncio.timeout(timeout_s), self._changed:
            await self._changed.wait_for(lambda: len(self.calls) >= n)
        return list(self.calls)

    def counts(self) -> dict[str, int]:
        """Recorded calls by HTTP status."""
        return {str(k): v for k, v in sorted(Counter(c.status for c in self.calls).items())}

    async def call_function(self, request: web.Request) -> web.Response:
        device_id = request.match_info["device"]
        function = request.match_info["function"]
        product = request.match_info.get("product")
        auth = request.headers.get("Authorization", "")
        token = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
        arg = await _arg(request)
        status, body = self._answer(device_id, function, product, token, arg)
        async with self._changed:
            self.calls.append(FunctionCall(device_id, function, arg or "", product, status,
                                           time.time_ns() // 1_000_000,
                                           body.get("return_value") if status == 200 else None))
            self._changed.notify_all()
        if status == 200 and request.query.get("format") == "raw":
            return web.Response(text=str(body["return_value"]))
        return web.json_response(body, status=status)

    def _answer(self, device_id: str, function: str, product: str | None, token: str,
                arg: str | None) -> tuple[int, dict[str, Any]]:
        b = self.behaviour
        if token not in self.tokens and token not in self.api_user_tokens:
            return 401, INVALID_TOKEN
        if token in self.api_user_tokens and product is None:
            return 403, API_USER_FORBIDDEN
        device = self.devices.get(device_id)
        if device is None or (product is not None and device.product not in (None, product)):
            return _UNKNOWN[b.unknown_device]
        if arg is None:
            return 400, BAD_BODY
        if len(arg) > b.max_arg_len:
            return b.arg_too_long_status, ARG_TOO_LONG
        if self._injected:
            status = self._injected.pop(0)
            return status, TIMED_OUT if status == 408 else {"ok": False,
                                                           "error": f"error {status}"}
        if not device.online:
            return _OFFLINE[b.offline]
        if device.functions is not None and function not in device.functions:
            return 404, {"ok": False, "error": f"Function {function} not found"}  # assumption
        handler = device.functions.get(function) if device.functions else None
        value = handler(arg) if handler else 1
        device.applied[function] = arg
        # Key order as fixture particle-function-response-02 (``name`` only when the device has
        # one; the current docs' fixture -01 has none).
        body: dict[str, Any] = {"id": device.id}
        if device.name:
            body["name"] = device.name
        body.update({"connected": True, "return_value": value})
        return 200, body

    async def _admin_calls(self, request: web.Request) -> web.Response:
        return web.json_response({
            "counts": self.counts(),
            "calls": [{"device": c.device, "function": c.function, "arg": c.arg,
                       "product": c.product, "status": c.status, "ts_ms": c.ts_ms,
                       "return_value": c.return_value} for c in self.calls],
            "devices": {d.id: {"online": d.online, "applied": d.applied}
                        for d in self.devices.values()},
        })

    async def _admin_device(self, request: web.Request) -> web.Response:
        device = self.devices.get(request.match_info["device"])
        if device is None:
            return web.json_response({"error": "no such device"}, status=404)
        try:
            body = await request.json()
        except ValueError:
            body = None
        if not isinstance(body, dict) or not isinstance(body.get("online"), bool):
            return web.json_response({"error": 'give {"online": true|false}'}, status=400)
        device.online = body["online"]
        return web.json_response({"id": device.id, "online": device.online})


async def _arg(request: web.Request) -> str | None:
    """``arg`` (or legacy ``args``) from a JSON or form body; ``""`` when the body has none;
    ``None`` when the body cannot be read."""
    if not request.body_exists:
        return ""
    try:
        if request.content_type == "application/json":
            obj = await request.json()
            if not isinstance(obj, dict):
                return None
            value = obj.get("arg", obj.get("args", ""))
        else:
            form = await request.post()
            value = form.get("arg", form.get("args", ""))
    except (ValueError, UnicodeDecodeError):
        return None
    return value if isinstance(value, str) else json.dumps(value)


# --- command line --------------------------------------------------------------------------------


def main(argv: Sequence[str]) -> int:
    """``emulate particle send …`` (a fleet of webhooks) or ``emulate particle serve …``."""
    parser = argparse.ArgumentParser(prog="blynk-bridge emulate particle",
                                     description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="action", required=True)
    send = sub.add_parser("send", help="send webhooks for a fleet of devices")
    send.add_argument("--url", required=True, help="e.g. http://127.0.0.1:8080/particle/my-product")
    send.add_argument("--devices", type=int, default=10)
    send.add_argument("--rate", type=float, default=10.0, help="events per second, all devices")
    send.add_argument("--count", type=int, help="stop after this many events "
                      "(default: send until Ctrl-C)")
    send.add_argument("--duration", type=float, help="stop after this many seconds")
    send.add_argument("--format", default="form", choices=FORMATS)
    send.add_argument("--webhook", help="a saved Particle webhook configuration (JSON) instead")
    send.add_argument("--event", default="sensor")
    send.add_argument("--header", action="append", default=[], help="'Name: value'")
    send.add_argument("--basic", help="user:password")
    send.add_argument("--retry-delays", default="30,60", help="seconds, comma-separated")
    serve = sub.add_parser("serve", help="serve the Cloud API function endpoint")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8091)
    serve.add_argument("--token", action="append", default=[])
    serve.add_argument("--device", action="append", default=[])
    serve.add_argument("--offline", action="append", default=[])
    serve.add_argument("--function", action="append", default=[], metavar="NAME=N|arg",
                       help="a function every device has: returns N, or its argument as an int "
                       "('arg'); without any, every function name returns 1")
    serve.add_argument("--offline-answer", default="timeout_408",
                       choices=sorted(_OFFLINE), help="how an offline device is answered")
    serve.add_argument("--max-arg-len", type=int, default=1024)
    args = parser.parse_args(list(argv))
    if args.action == "send":
        hook = load_webhook(Path(args.webhook).read_bytes(), url=args.url) if args.webhook else None
        return asyncio.run(_send(args, hook))
    return asyncio.run(_serve(args))


async def _send(args: argparse.Namespace, hook: Webhook | None) -> int:
    fmt: str | Webhook = hook or args.format
    auth: tuple[str, str] | dict[str, str] | None = None
    if args.basic:
        user, _, password = args.basic.partition(":")
        auth = (user, password)
    elif args.header:
        auth = dict(h.split(":", 1) for h in args.header)
        auth = {k.strip(): v.strip() for k, v in auth.items()}
    delays = [float(x) for x in args.retry_delays.split(",") if x.strip()]
    fleet = ParticleFleet(args.url, args.devices, args.rate, fmt=fmt, auth=auth,
                          event=args.event, retry_delays_s=delays)
    # Without --count or --duration it sends until Ctrl-C, then prints what it sent.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        # Not in the main thread (a test calling main()): Ctrl-C cannot reach it anyway.
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    stats = await fleet.run(count=args.count, duration_s=args.duration, stop=stop)
    print(json.dumps({"sent": stats.sent, "delivered": stats.delivered, "retries": stats.retries,
                      "dropped": stats.dropped,
                      "statuses": {str(k): v for k, v in stats.statuses.items()}}))
    return 0 if stats.dropped == 0 else 1


async def _serve(args: argparse.Namespace) -> int:
    functions: dict[str, Function] | None = None
    for spec in args.function:
        name, _, result = spec.partition("=")
        functions = functions or {}
        functions[name] = int_arg if result == "arg" else returns(int(result or "1"))
    devices = [Device(d, online=d not in args.offline,
                      functions=dict(functions) if functions is not None else None)
               for d in args.device + args.offline]
    behaviour = CloudBehaviour(offline=args.offline_answer, max_arg_len=args.max_arg_len)
    cloud = ParticleCloud(devices, tokens=args.token or ["particle-token"], behaviour=behaviour)
    runner = web.AppRunner(cloud.app)
    await runner.setup()
    await web.TCPSite(runner, args.host, args.port).start()
    print(f"Particle Cloud API emulator on http://{args.host}:{args.port}", file=sys.stderr)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()
    return 0
