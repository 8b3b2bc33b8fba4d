"""Blynk webhooks: fired on every datastream update, rate-limited, sent in the background.

A trigger is decided and rendered synchronously inside the write (cheap: a dict lookup when no
webhook watches the datastream), then queued; worker tasks send it. So a slow or dead receiver
never slows the device API down. Over the per-webhook rate (default 10 per minute, a sliding
window) a trigger is dropped and counted, as Blynk documents. Every attempt goes to a log.

Every log entry names the trigger (device, pin, value, and the write's origin: ``device``,
``app`` or ``platform``), so a test can tell what fired, what was sent and what the limit dropped;
:meth:`Webhooks.stats` and :meth:`Webhooks.totals` count the same.

Configuration is checked when a webhook is added, with Blynk's documented rules (reference 2.2):
name ≤80 letters, digits, ``-``, ``'``, spaces; header names ≤100 characters and values of only
letters, digits, spaces, ``/ _ : ; . -``; URL ≤1024 characters. Authorization is None or Basic
(``auth: {username, password}``); OAuth 2.0 is not emulated.

Not retried: Blynk's retry policy is undocumented (reference 2.3), and a dropped trigger is what
the bridge must survive anyway.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import re
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode

import aiohttp

from emulators.blynk.model import (
    Datastream,
    Device,
    Model,
    Value,
    canonical_pin,
    format_value,
    is_id,
)
from emulators.blynk.settings import Settings, WebhookSpec
from pipeline.redact import redact_url

log = logging.getLogger("emulators.blynk.webhooks")

_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)(?:\[(\d+)\])?\}")
_NAME = re.compile(r"[A-Za-z0-9' -]{1,80}")
_HEADER_VALUE = re.compile(r"[A-Za-z0-9 /_:;.-]*")
MAX_URL = 1024
_CONTENT_TYPES = {"json": "application/json", "form": "application/x-www-form-urlencoded",
                  "plain": "text/plain"}


@dataclass
class WebhookStats:
    fired: int = 0
    sent: int = 0
    ok: int = 0
    failed: int = 0
    dropped_rate: int = 0
    dropped_queue: int = 0


@dataclass
class Webhook:
    spec: WebhookSpec
    rate_per_min: int
    stats: WebhookStats = field(default_factory=WebhookStats)
    window: deque[float] = field(default_factory=deque)

    def admit(self, now: float) -> bool:
        """Sliding one-minute window; False = over the limit (the trigger is dropped)."""
        w = self.window
        while w and now - w[0] >= 60.0:
            w.popleft()
        if len(w) >= self.rate_per_min:
            return False
        w.append(now)
        return True


@dataclass(frozen=True, slots=True)
class Trigger:
    """What fired a webhook: one datastream update."""

    device: int
    pin: str
    value: str
    origin: str | None


@dataclass(frozen=True, slots=True)
class Request:
    webhook: str
    trigger_id: int
    trigger: Trigger
    method: str
    url: str
    headers: dict[str, str]
    body: bytes | None
    content_type: str | None


def render(text: str, fields: dict[str, str], json_escape: bool = False) -> str:
    """Replace ``{name}`` / ``{name[i]}``; unknown placeholders stay as written."""

    def repl(m: re.Match[str]) -> str:
        key = m.group(1) if m.group(2) is None else f"{m.group(1)}[{m.group(2)}]"
        value = fields.get(key)
        if value is None:
            return m.group(0)
        return json.dumps(value)[1:-1] if json_escape else value

    return _PLACEHOLDER.sub(repl, text)


def placeholders(model_org: str, device: Device, ds: Datastream, value: Value, ts_ms: int,
                 unit: str) -> dict[str, str]:
    """Every placeholder value of one trigger (reference 2.2)."""
    t = device.template
    fields = {
        "device_id": str(device.id),
        "device_name": device.name,
        "device_authToken": device.token,
        "device_templateId": t.id,
        "device_productName": t.name,
        "device_orgName": model_org,
        "device_dataStreamId": str(ds.id),
        "device_dateCreated": str(device.activated_at),
        "device_pin": ds.pin.lower(),
        "device_pinValue": format_value(value) if not isinstance(value, list)
        else f"{value[0]},{value[1]}",
        "timestamp_unix": str(ts_ms if unit == "ms" else ts_ms // 1000),
        "timestamp_iso8601": datetime.fromtimestamp(ts_ms / 1000, UTC)
        .isoformat(timespec="milliseconds").replace("+00:00", "Z"),
    }
    if isinstance(value, list):
        for i, coord in enumerate(value):
            fields[f"device_pinValue[{i}]"] = repr(coord)
    elif isinstance(value, str):
        for i, part in enumerate(value.split(",")):
            fields[f"device_pinValue[{i}]"] = part
    for other in t.datastreams:
        v = device.value(other.pin)
        if v is not None:
            fields[f"device_dataStream_{other.id}"] = format_value(v)
    for mid, mval in device.metafields.items():
        fields[f"device_metadata_{mid}"] = mval
    return fields


class Webhooks:
    """The organization's webhooks; register :meth:`on_update` as a model listener."""

    def __init__(self, model: Model, settings: Settings, specs: list[WebhookSpec]) -> None:
        self.model = model
        self.settings = settings
        self.hooks: dict[str, Webhook] = {}
        #: (template id | device id, datastream id) → webhooks watching it.
        self._index: dict[tuple[str | int, int], list[Webhook]] = {}
        self.log: deque[dict[str, Any]] = deque(maxlen=1000)
        self.queue: asyncio.Queue[Request] = asyncio.Queue(maxsize=settings.webhook_queue)
        self._trigger_id = 0
        self._tasks: list[asyncio.Task[None]] = []
        self._session: aiohttp.ClientSession | None = None
        self._idle = asyncio.Event()
        self._idle.set()
        self._inflight = 0
        for spec in specs:
            self.add(spec)

    def add(self, spec: WebhookSpec) -> Webhook:
        if spec.name in self.hooks:
            raise ValueError(f"webhook {spec.name!r} defined twice")
        check_spec(spec)
        if spec.trigger == "template_datastream":
            t = self.model.template(spec.template or "")
            if t is None:
                raise ValueError(f"webhook {spec.name!r}: unknown template {spec.template!r}")
            scope: str | int = t.id
        else:
            if spec.device not in self.model.devices:
                raise ValueError(f"webhook {spec.name!r}: unknown device {spec.device!r}")
            assert spec.device is not None
            t = self.model.devices[spec.device].template
            scope = spec.device
        ds = self._datastream(t.by_id, t.by_pin, spec.datastream)
        if ds is None:
            raise ValueError(f"webhook {spec.name!r}: unknown datastream {spec.datastream!r}")
        hook = Webhook(spec, spec.rate_per_min or self.settings.webhook_rate_per_min)
        self.hooks[spec.name] = hook
        self._index.setdefault((scope, ds.id), []).append(hook)
        # listen only once a webhook exists: writes stay free of the call otherwise
        if self.on_update not in self.model.listeners:
            self.model.listeners.append(self.on_update)
        return hook

    @staticmethod
    def _datastream(by_id: dict[int, Datastream], by_pin: dict[str, Datastream],
                    ref: int | str) -> Datastream | None:
        if isinstance(ref, int):
            return by_id.get(ref)
        if is_id(ref):
            return by_id.get(int(ref))
        pin = canonical_pin(ref)
        return by_pin.get(pin) if pin else None

    # trigger (synchronous, on the write path) -------------------------------------------------
    def on_update(self, device: Device, ds: Datastream, value: Value, ts_ms: int) -> None:
        index = self._index
        if not index:
            return
        hooks = index.get((device.template.id, ds.id))
        dev_hooks = index.get((device.id, ds.id))
        if hooks is None and dev_hooks is None:
            return
        fields: dict[str, str] | None = None
        now = time.monotonic()
        trigger = Trigger(device.id, ds.pin.lower(), format_value(value), device.last_write_origin)
        for hook in (hooks or []) + (dev_hooks or []):
            hook.stats.fired += 1
            self._trigger_id += 1
            if not hook.admit(now):
                hook.stats.dropped_rate += 1
                self._log(hook.spec, self._trigger_id, trigger, "dropped", error="rate limit")
                continue
            if fields is None:
                fields = placeholders(self.settings.org_name, device, ds, value, ts_ms,
                                      self.settings.timestamp_unix_unit)
            req = self._build(hook.spec, fields, self._trigger_id, trigger)
            try:
                self.queue.put_nowait(req)
            except asyncio.QueueFull:
                hook.stats.dropped_queue += 1
                self._log(hook.spec, req.trigger_id, trigger, "dropped", error="queue full")
                continue
            self._idle.clear()

    def _build(self, spec: WebhookSpec, fields: dict[str, str], trigger_id: int,
               trigger: Trigger) -> Request:
        url = render(spec.url, fields)
        if spec.query:
            sep = "&" if "?" in url else "?"
            url += sep + urlencode({k: render(v, fields) for k, v in spec.query.items()})
        headers = {k: render(v, fields) for k, v in spec.headers.items()}
        if spec.auth is not None:
            creds = f"{spec.auth.username}:{spec.auth.password}".encode()
            headers["Authorization"] = "Basic " + base64.b64encode(creds).decode()
        body: bytes | None = None
        ctype: str | None = None
        if spec.method != "GET":
            ctype = _CONTENT_TYPES[spec.content_type]
            if spec.content_type == "form":
                body = urlencode({k: render(v, fields) for k, v in spec.fields.items()}).encode()
            else:
                escape = spec.content_type == "json" and self.settings.webhook_json_escape
                body = render(spec.body, fields, escape).encode()
        return Request(spec.name, trigger_id, trigger, spec.method, url, headers, body, ctype)

    def _log(self, spec: WebhookSpec, trigger_id: int, trigger: Trigger, status: str, *,
             code: int | None = None, error: str | None = None, url: str | None = None) -> None:
        self.log.append({"ts_ms": int(time.time() * 1000), "webhook": spec.name,
                         "trigger_id": trigger_id, "device": trigger.device, "pin": trigger.pin,
                         "value": trigger.value, "origin": trigger.origin, "status": status,
                         "code": code, "error": error, "url": redact_url(url or spec.url)})

    # sending (background) ---------------------------------------------------------------------
    async def start(self, workers: int = 4) -> None:
        if self._tasks:
            return
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.settings.webhook_timeout_s))
        self._tasks = [asyncio.create_task(self._worker(), name=f"blynk-webhook-{i}")
                       for i in range(workers)]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def drain(self) -> None:
        """Wait until every queued trigger has been attempted (tests)."""
        await self._idle.wait()

    async def _worker(self) -> None:
        while True:
            req = await self.queue.get()
            self._inflight += 1
            try:
                await self._send(req)
            finally:
                self._inflight -= 1
                self.queue.task_done()
                if self.queue.empty() and self._inflight == 0:
                    self._idle.set()

    async def _send(self, req: Request) -> None:
        hook = self.hooks.get(req.webhook)
        if hook is None or self._session is None:
            return
        headers = dict(req.headers)
        if req.content_type:
            headers.setdefault("Content-Type", req.content_type)
        hook.stats.sent += 1
        try:
            async with self._session.request(req.method, req.url, data=req.body,
                                             headers=headers) as resp:
                await resp.content.read(16 * 1024)
                ok = 200 <= resp.status < 300
                hook.stats.ok += ok
                hook.stats.failed += not ok
                self._log(hook.spec, req.trigger_id, req.trigger, "OK" if ok else "Failed",
                          code=resp.status, url=req.url)
        except (aiohttp.ClientError, TimeoutError) as exc:
            hook.stats.failed += 1
            self._log(hook.spec, req.trigger_id, req.trigger, "Failed", error=type(exc).__name__,
                      url=req.url)
            log.info("webhook %s failed: %s", req.webhook, type(exc).__name__)

    def stats(self) -> dict[str, dict[str, int]]:
        return {name: vars(h.stats).copy() for name, h in self.hooks.items()}

    def totals(self) -> dict[str, int]:
        """The counters of :meth:`stats` summed over every webhook."""
        out = vars(WebhookStats()).copy()
        for h in self.hooks.values():
            for key, n in vars(h.stats).items():
                out[key] += n
        return out

    def reset(self) -> None:
        """Forget the attempt log, the counters and the rate windows."""
        self.log.clear()
        for h in self.hooks.values():
            h.stats = WebhookStats()
            h.window.clear()


def check_spec(spec: WebhookSpec) -> None:
    """Blynk's documented form rules (reference 2.2); raises ``ValueError`` naming the field."""
    where = f"webhook {spec.name!r}"
    if not _NAME.fullmatch(spec.name):
        raise ValueError(f"{where}: name must be 1-80 letters, digits, spaces, - or '")
    if len(spec.url) > MAX_URL:
        raise ValueError(f"{where}: url longer than {MAX_URL} characters")
    for key, value in spec.headers.items():
        if not key or len(key) > 100:
            raise ValueError(f"{where}: header name {key[:20]!r}… must be 1-100 characters")
        if not _HEADER_VALUE.fullmatch(_PLACEHOLDER.sub("", value)):
            raise ValueError(f"{where}: header {key!r}: Blynk allows only letters, digits, "
                             "spaces and / _ : ; . - in header values")
    if spec.auth is not None and "Authorization" in {k.title() for k in spec.headers}:
        raise ValueError(f"{where}: give Basic auth or an Authorization header, not both")
