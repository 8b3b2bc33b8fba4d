"""The emulator process: one shared model served per region, limits, faults, inspection.

Each region is one dict-dispatched handler (:meth:`BlynkEmulator.dispatcher`); :meth:`serve`
runs it on aiohttp's low-level server behind the emulator's own HTTP front
(:mod:`emulators.blynk.front`), which answers the device API's simple GETs itself through
:meth:`BlynkEmulator.front_answer` (the same endpoint functions, the same request log) and hands
every other connection to aiohttp. :meth:`app` wraps the dispatcher in an
``aiohttp.web.Application`` for ``serve_app``. Organization message months are 30-day periods.

:class:`BlynkEmulator` is the Python API tests use::

    emu = BlynkEmulator.from_spec(spec)            # or .demo(), .from_file(path)
    async with emu.serve({"fra1": 0, "ny3": 0}) as urls:   # 0 = a free port
        ...                                         # urls["fra1"] == "http://127.0.0.1:PORT"
        emu.device_by_token(token).values          # inspection
        emu.faults.set(error_rate=0.5)             # fault injection

Admin endpoints (``/_admin/…``, on every region port, never subject to faults or limits):
``GET requests`` (ring buffer, tokens masked), ``GET devices``, ``GET devices/{id}`` (values,
history, events, properties), ``GET counts`` (messages per device and organization),
``GET webhooks`` (per-webhook stats, totals and the attempt log: what fired, what was sent, what
the 10/min limit dropped), ``GET|POST|DELETE faults``, ``POST oauth/expire``, ``POST reset``, and
``POST devices/{id}/app-write`` with ``{"pin":"v2","value":3}`` (or ``"dataStreamId"``): a
dashboard or mobile-app user changing a datastream (:meth:`BlynkEmulator.app_write`).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import msgspec
from aiohttp import web
from aiohttp.log import access_logger
from multidict import MultiDict

from emulators.blynk.device_api import (
    NO_DATASTREAM,
    TYPE_MISMATCH,
    WRONG_DATASTREAM_ID,
    WRONG_PIN,
    DeviceApi,
    Handler,
    Route,
    error,
    error_reply,
)
from emulators.blynk.front import Answer, FrontServer, Reply, query_pairs
from emulators.blynk.model import PINS, Datastream, Device, Mismatch, Model, Value, is_id
from emulators.blynk.mqtt import DeviceMqtt
from emulators.blynk.platform_api import PlatformApi
from emulators.blynk.settings import (
    EmulatorSpec,
    OAuthClient,
    RegionSpec,
    Settings,
    SpecError,
    WebhookSpec,
    load_spec,
)
from emulators.blynk.webhooks import Webhooks
from pipeline.redact import redact_url


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, body=msgspec.json.encode(data),
                        content_type="application/json")


class FaultSpec(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """What ``POST /_admin/faults`` accepts (every key optional; omitted keys are reset)."""

    #: Added latency per request (ms), plus up to ``jitter_ms`` more.
    latency_ms: float = 0.0
    jitter_ms: float = 0.0
    #: Share of requests answered with ``error_status`` (a 5xx by default).
    error_rate: float = 0.0
    error_status: int = 503
    #: Share of requests that hang (no answer for ``hang_s``, until the client times out).
    hang_rate: float = 0.0
    hang_s: float = 300.0
    #: Every request waits until the faults are set again (``POST /_admin/faults``), then is
    #: answered normally: a test keeps a write under way exactly as long as it needs to.
    hold: bool = False
    #: Share of requests whose connection is dropped without an answer.
    drop_rate: float = 0.0
    #: Full outage (every request 503) for this many seconds from now.
    outage_s: float = 0.0
    #: Every request 429 with ``Retry-After: retry_after_s`` for this many seconds from now.
    storm_429_s: float = 0.0
    retry_after_s: int = 1
    #: Only requests whose path starts with this are affected (default: every non-admin path).
    path_prefix: str = "/"


class Faults:
    """Run-time switchable failure injection; ``active`` is False on the fast path."""

    def __init__(self) -> None:
        self.spec = FaultSpec()
        self.active = False
        self.outage_until = 0.0
        self.storm_until = 0.0
        self.injected: dict[str, int] = {}
        self._release = asyncio.Event()

    def set(self, **kwargs: Any) -> None:
        self.apply(msgspec.convert(kwargs, FaultSpec))

    def apply(self, spec: FaultSpec) -> None:
        self.spec = spec
        now = time.monotonic()
        self.outage_until = now + spec.outage_s if spec.outage_s else 0.0
        self.storm_until = now + spec.storm_429_s if spec.storm_429_s else 0.0
        self.active = bool(spec.latency_ms or spec.jitter_ms or spec.error_rate or spec.hang_rate
                           or spec.drop_rate or spec.outage_s or spec.storm_429_s or spec.hold)
        self._release.set()
        self._release = asyncio.Event()

    def clear(self) -> None:
        self.apply(FaultSpec())

    def state(self) -> dict[str, Any]:
        now = time.monotonic()
        return {"spec": msgspec.to_builtins(self.spec), "active": self.active,
                "outage_left_s": max(0.0, self.outage_until - now),
                "storm_left_s": max(0.0, self.storm_until - now), "injected": self.injected}

    def _count(self, kind: str) -> None:
        self.injected[kind] = self.injected.get(kind, 0) + 1

    async def inject(self, request: web.BaseRequest) -> web.StreamResponse | None:
        """The fault for this request, or None to serve it normally."""
        s = self.spec
        if not request.path.startswith(s.path_prefix):
            return None
        now = time.monotonic()
        if now < self.outage_until:
            self._count("outage")
            return error("Service unavailable (emulated outage).", 503)
        if now < self.storm_until:
            self._count("429")
            resp = error("Too many requests.", 429)
            resp.headers["Retry-After"] = str(s.retry_after_s)
            return resp
        if s.hold:
            self._count("hold")
            await self._release.wait()
        if s.latency_ms or s.jitter_ms:
            await asyncio.sleep((s.latency_ms + random.random() * s.jitter_ms) / 1000)
        roll = random.random()
        if roll < s.drop_rate:
            self._count("drop")
            if request.transport is not None:
                request.transport.abort()
            return web.Response(status=499)  # never reaches the client: the socket is gone
        roll -= s.drop_rate
        if roll < s.hang_rate:
            self._count("hang")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._release.wait(), s.hang_s)
            return error("Gateway timeout (emulated hang).", 504)
        roll -= s.hang_rate
        if roll < s.error_rate:
            self._count(str(s.error_status))
            return error("Internal server error (emulated).", s.error_status)
        return None


class AppWrite(msgspec.Struct, forbid_unknown_fields=True):
    """The body of ``POST /_admin/devices/{id}/app-write``: a pin or a datastream id, a value."""

    value: Any
    pin: str | None = None
    dataStreamId: int | str | None = None


class AppWriteError(ValueError):
    """An app write refused; ``message`` is the device API's wording."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


class BlynkEmulator:
    """One emulated Blynk organization served on one port per region."""

    def __init__(self, model: Model, settings: Settings | None = None, *,
                 regions: dict[str, int | RegionSpec] | None = None, host: str = "127.0.0.1",
                 oauth_clients: list[OAuthClient] | None = None,
                 webhooks: list[WebhookSpec] | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.model = model
        self.settings = settings or Settings()
        self.host = host
        self.regions: dict[str, RegionSpec] = {
            name: r if isinstance(r, RegionSpec) else RegionSpec(port=r)
            for name, r in (regions or {"fra1": 8081}).items()}
        self.model.default_region = next(iter(self.regions))
        #: Region → base URL (known once serving, or set by hand with :meth:`bind_region`).
        self.region_urls: dict[str, str] = {n: r.public_url for n, r in self.regions.items()
                                            if r.public_url}
        self.clock = clock
        self.spec_clients = oauth_clients if oauth_clients is not None else [
            OAuthClient(client_id="demo-client", client_secret="demo-secret")]
        self.faults = Faults()
        self.platform = PlatformApi(self)
        self.webhooks = Webhooks(model, self.settings, webhooks or [])
        #: The device MQTT API (served with ``serve(mqtt=True)`` or a region's ``mqtt_port``).
        self.mqtt = DeviceMqtt(self)
        self.requests: deque[tuple[int, str, str, str, int]] = deque(
            maxlen=max(1, self.settings.request_log_len))
        self._record = self.settings.request_log_len > 0
        self.org_messages = 0
        self.org_month = 0
        self.refused: dict[str, int] = {}
        self._runners: list[web.BaseRunner] = []
        self._fronts: list[FrontServer] = []
        self._device_apis: dict[str, DeviceApi] = {}
        self._apps_running = 0

    # construction -----------------------------------------------------------------------------
    @classmethod
    def from_spec(cls, spec: EmulatorSpec, **kwargs: Any) -> BlynkEmulator:
        model = Model(history_len=spec.settings.history_len,
                      default_region=next(iter(spec.regions), "fra1"))
        for t in spec.templates:
            model.add_template(t)
        now = int(time.time() * 1000)
        for d in spec.devices:
            model.add_device_spec(d, now)
        return cls(model, spec.settings, regions=spec.regions, host=spec.host,
                   oauth_clients=spec.oauth_clients or None, webhooks=spec.webhooks, **kwargs)

    @classmethod
    def from_file(cls, path: str | Path, **kwargs: Any) -> BlynkEmulator:
        spec = load_spec(path)
        try:
            return cls.from_spec(spec, **kwargs)
        except SpecError:
            raise
        except ValueError as exc:
            # A model or webhook form rule the file breaks (a header value from the environment
            # with a sign Blynk refuses): the CLI's one-line error, not a traceback.
            raise SpecError(f"{path}: {exc}") from None

    @classmethod
    def demo(cls, **kwargs: Any) -> BlynkEmulator:
        from emulators.blynk.demo import demo_spec

        return cls.from_spec(demo_spec(), **kwargs)

    def now_ms(self) -> int:
        return int(self.clock() * 1000)

    # limits ----------------------------------------------------------------------------------
    def _over(self, kind: str) -> Reply:
        s = self.settings
        self.refused[kind] = self.refused.get(kind, 0) + 1
        status, body, headers = error_reply(s.over_limit_message, s.over_limit_status)
        return Reply(status, body, (*headers, ("Retry-After", str(s.retry_after_s))))

    def admit(self, dev: Device, *, update: bool) -> Reply | None:
        """Rate, daily and monthly limits of one device-API request; counts the message."""
        s = self.settings
        rps = s.device_rps
        if rps is not None:
            now = time.monotonic()
            bucket = dev.bucket + (now - dev.bucket_ts) * rps
            if bucket > rps:
                bucket = rps
            dev.bucket_ts = now
            if bucket < 1.0:
                dev.bucket = bucket
                return self._over("rate")
            dev.bucket = bucket - 1.0
        now_ms = self.now_ms()
        day = now_ms // 86_400_000
        if dev.day != day:
            dev.day, dev.updates_today, dev.imports_today, dev.events_today = day, 0, 0, 0
        if update and s.daily_updates is not None:
            if dev.updates_today >= s.daily_updates:
                return self._over("daily_updates")
            dev.updates_today += 1
        month = day // 30
        if month != self.org_month:
            self.org_month, self.org_messages = month, 0
        if s.monthly_messages is not None and self.org_messages >= s.monthly_messages:
            return self._over("monthly_messages")
        self.org_messages += 1
        dev.messages += 1
        return None

    def admit_import(self, dev: Device, points: int) -> Reply | None:
        limit = self.settings.daily_import_points
        if limit is not None and dev.imports_today + points > limit:
            return self._over("daily_import_points")
        dev.imports_today += points
        return None

    def admit_event(self, dev: Device) -> Reply | None:
        limit = self.settings.daily_events
        if limit is not None and dev.events_today >= limit:
            return self._over("daily_events")
        dev.events_today += 1
        return None

    # apps -------------------------------------------------------------------------------------
    def device_api(self, region: str) -> DeviceApi:
        """The device API of a region (one per region, shared by aiohttp and the front)."""
        if region not in self.regions:
            raise KeyError(f"unknown region {region!r}")
        api = self._device_apis.get(region)
        if api is None:
            api = self._device_apis[region] = DeviceApi(self, region)
        return api

    def dispatcher(self, region: str) -> Handler:
        """The one request handler of a region: routing, faults, recording, in one call.

        A dict lookup instead of aiohttp's router and middlewares keeps ``batch/update`` cheap;
        :meth:`app` and :meth:`serve` both run this same function.
        """
        table: dict[tuple[str, str], Handler] = {
            (method, path): fn for method, path, fn in
            self.device_api(region).routes() + self.platform.routes() + self._admin_routes()}
        paths = {path for _, path in table}
        faults = self.faults
        requests = self.requests

        async def dispatch(request: web.BaseRequest) -> web.StreamResponse:
            path = request.path
            fn = table.get((request.method, path))
            if path.startswith("/_admin"):
                if fn is None:
                    return await self._admin_fallback(request, path)
                return await fn(request)
            if faults.active:
                faulted = await faults.inject(request)
                if faulted is not None:
                    self._log(region, request, faulted.status)
                    return faulted
            if fn is None:
                status = 405 if path in paths else 404
                resp: web.StreamResponse = error(
                    "Method not allowed." if status == 405 else "Not found.", status)
            else:
                try:
                    resp = await fn(request)
                except web.HTTPException as exc:
                    self._log(region, request, exc.status)
                    raise
            if self._record:
                requests.append((int(self.clock() * 1000), region, request.method,
                                 request.raw_path, resp.status))
            return resp

        return dispatch

    def front_answer(self, region: str) -> Answer | None:
        """What :meth:`dispatcher` does for a device-API GET, for the front (None: no front).

        Leaves the request to aiohttp (returns None, before any side effect) while faults are
        active and for every path that is not a device-API GET endpoint.
        """
        status = self.settings.over_limit_status
        if not 200 <= status <= 999 or status in (204, 304):
            return None  # answers without a body: aiohttp's rules, not worth copying
        endpoints = self.device_api(region).endpoints()
        faults = self.faults
        requests = self.requests
        clock = self.clock

        def answer(path: str, query: str, raw_path: str) -> Reply | None:
            fn = endpoints.get(path)
            if fn is None or faults.active:
                return None
            reply = fn(MultiDict(query_pairs(query)), raw_path)
            if self._record:
                requests.append((int(clock() * 1000), region, "GET", raw_path, reply.status))
            return reply

        return answer

    def front_counts(self) -> dict[str, int]:
        """Requests the front answered itself and connections it handed to aiohttp."""
        return {"answered": sum(f.answered for f in self._fronts),
                "handed_over": sum(f.handed_over for f in self._fronts)}

    def _log(self, region: str, request: web.BaseRequest, status: int) -> None:
        if self._record:
            self.requests.append((self.now_ms(), region, request.method, request.raw_path,
                                  status))

    def _handler_args(self) -> dict[str, Any]:
        size = self.settings.max_request_bytes
        return {"max_line_size": size, "max_field_size": size}

    def app(self, region: str | None = None) -> web.Application:
        """An aiohttp app of one region (for ``serve_app``); all regions share this state."""
        dispatch = self.dispatcher(region or next(iter(self.regions)))
        app = web.Application(client_max_size=self.settings.max_request_bytes,
                              handler_args=self._handler_args())
        app.router.add_route("*", "/{tail:.*}", dispatch)
        app.on_startup.append(self._on_startup)
        app.on_cleanup.append(self._on_cleanup)
        return app

    def bind_region(self, region: str, base_url: str) -> None:
        """Tell the emulator where a region is reachable (for 308 ``Location`` headers)."""
        self.region_urls[region] = base_url.rstrip("/")

    async def _on_startup(self, app: web.Application | None = None) -> None:
        self._apps_running += 1
        await self.webhooks.start()

    async def _on_cleanup(self, app: web.Application | None = None) -> None:
        self.faults.clear()  # releases hanging requests
        self._apps_running -= 1
        if self._apps_running == 0:
            await self.webhooks.stop()

    @contextlib.asynccontextmanager
    async def serve(self, ports: dict[str, int] | None = None, *, host: str | None = None,
                    access_log: bool = False, front: bool = True,
                    mqtt: bool = False) -> AsyncIterator[dict[str, str]]:
        """Serve every region (``ports`` overrides the configured ones; 0 = a free port).

        Yields region → base URL. Uses aiohttp's low-level server (no router, no middlewares)
        with the same :meth:`dispatcher`, behind the front (:meth:`front_answer`) unless
        ``front=False`` or ``access_log`` (every request then goes through aiohttp; the answers
        are the same bytes). Webhook senders run while serving. The device MQTT API is served
        per region when ``mqtt`` (on each region's ``mqtt_port``, else a free port) or when a
        region configures ``mqtt_port``; its
        addresses are in ``self.mqtt.addresses``.
        """
        host = host or self.host
        wanted = ports or {n: r.port for n, r in self.regions.items()}
        urls: dict[str, str] = {}
        max_size = self.settings.max_request_bytes
        loop = asyncio.get_running_loop()

        def factory(message: Any, payload: Any, protocol: Any, writer: Any,
                    task: Any) -> web.BaseRequest:
            return web.BaseRequest(message, payload, protocol, writer, task, loop,
                                   client_max_size=max_size)

        await self._on_startup()
        try:
            for region, port in wanted.items():

                answer = self.front_answer(region) if front and not access_log else None
                server = FrontServer(self.dispatcher(region), answer=answer,
                                     request_factory=factory,
                                     access_log=access_logger if access_log else None,
                                     **self._handler_args())
                self._fronts.append(server)
                runner = web.ServerRunner(server)
                await runner.setup()
                self._runners.append(runner)
                site = web.TCPSite(runner, host, port, reuse_address=True)
                await site.start()
                sock = site._server.sockets[0]  # type: ignore[union-attr]
                real_port = sock.getsockname()[1]
                configured = self.regions[region].public_url
                advertised = self.settings.advertise_host if host in ("0.0.0.0", "::") else host
                urls[region] = configured or f"http://{advertised}:{real_port}"
                self.region_urls[region] = urls[region]
            if mqtt or any(r.mqtt_port is not None for r in self.regions.values()):
                advertised = self.settings.advertise_host if host in ("0.0.0.0", "::") else host
                await self.mqtt.serve(
                    {r: spec.mqtt_port if spec.mqtt_port is not None else 0
                     for r, spec in self.regions.items() if r in wanted},
                    host, advertised)
            yield urls
        finally:
            await self.close()
            await self._on_cleanup()

    async def close(self) -> None:
        self.faults.clear()
        await self.mqtt.close()
        for runner in self._runners:
            await runner.cleanup()
        self._runners = []

    # the dashboard ------------------------------------------------------------------------------
    def app_write(self, device: Device | int, pin: str | None = None, value: Any = None, *,
                  datastream_id: int | str | None = None) -> tuple[Datastream, Value]:
        """A dashboard or mobile-app user sets a datastream: validated like a device write
        (type, then min/max clamp or enum fallback), stored as the current value with origin
        ``app``, and the watching webhooks fire (their 10/min limit applies). Not a device-API
        message: no device limits, faults or message counts. Raises :class:`AppWriteError` with
        the device API's wording."""
        dev = device if isinstance(device, Device) else self.model.devices.get(device)
        if dev is None:
            raise AppWriteError(f"no device {device}", 404)
        t = dev.template
        if datastream_id is not None:
            ref = str(datastream_id)
            ds = t.by_id.get(int(ref)) if is_id(ref) else None
            if ds is None:
                raise AppWriteError(WRONG_DATASTREAM_ID)
        else:
            canon = PINS.get(pin) if isinstance(pin, str) else None
            if canon is None:
                raise AppWriteError(WRONG_PIN)
            found = t.by_pin.get(canon)
            if found is None:
                raise AppWriteError(NO_DATASTREAM)
            ds = found
        try:
            stored = ds.coerce_json(value, string_max=self.settings.string_max_bytes)
        except Mismatch:
            raise AppWriteError(TYPE_MISMATCH) from None
        self.model.write(dev, ds, stored, self.now_ms(), origin="app")
        return ds, stored

    # inspection -------------------------------------------------------------------------------
    def device_by_token(self, token: str) -> Device:
        return self.model.by_token[token]

    def recorded(self, limit: int | None = None) -> list[dict[str, Any]]:
        """Requests received, newest last, tokens masked."""
        items = list(self.requests)
        if limit is not None:
            items = items[-limit:]
        return [{"ts_ms": ts, "region": region, "method": m, "path": redact_url(path),
                 "status": status} for ts, region, m, path, status in items]

    def counts(self) -> dict[str, Any]:
        return {"organization": {"id": self.settings.org_id, "messages": self.org_messages},
                "devices": {str(d.id): {"name": d.name, "messages": d.messages,
                                        "updates_today": d.updates_today,
                                        "imports_today": d.imports_today}
                            for d in self.model.devices.values()},
                "refused": dict(self.refused)}

    def device_state(self, d: Device) -> dict[str, Any]:
        return {"id": d.id, "name": d.name, "template": d.template.id, "region": d.region,
                "token": redact_url(f"token={d.token}")[6:], "messages": d.messages,
                "values": {p.lower(): {"value": v, "ts_ms": ts, "origin": d.origins.get(p)}
                           for p, (v, ts) in d.values.items()},
                "last_write": {"ts_ms": d.last_write_ms, "origin": d.last_write_origin},
                "history": {p.lower(): [[ts, v] for ts, v in h] for p, h in d.history.items()},
                "metafields": {m.name: d.metafields.get(m.id, "") for m in d.template.metafields},
                "properties": {p.lower(): props for p, props in d.properties.items()},
                "events": [list(e) for e in d.events]}

    def reset(self) -> None:
        """Forget values, history, counters, recorded requests, faults and webhook logs."""
        self.model.reset_values()
        self.requests.clear()
        self.org_messages = 0
        self.refused.clear()
        self.faults.clear()
        self.faults.injected.clear()
        self.webhooks.reset()

    async def _admin_fallback(self, request: web.BaseRequest, path: str) -> web.Response:
        """``GET /_admin/devices/{id}``, ``POST /_admin/devices/{id}/app-write``, else 404."""
        prefix = "/_admin/devices/"
        if path.startswith(prefix):
            ref, _, action = path[len(prefix):].partition("/")
            d = self.model.devices.get(int(ref)) if is_id(ref) else None
            if d is not None and request.method == "GET" and not action:
                return _json(self.device_state(d))
            if d is not None and request.method == "POST" and action == "app-write":
                return await self._app_write(request, d)
        return _json({"error": f"no such admin resource: {request.method} {path}"}, 404)

    async def _app_write(self, request: web.BaseRequest, d: Device) -> web.Response:
        try:
            body = msgspec.json.decode(await request.read(), type=AppWrite)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            return _json({"error": {"message": f"Wrong body format: {exc}"}}, 400)
        fired = self.webhooks.totals()["fired"]
        try:
            ds, stored = self.app_write(d, body.pin, body.value, datastream_id=body.dataStreamId)
        except AppWriteError as exc:
            return error(exc.message, exc.status)
        return _json({"device": d.id, "pin": ds.pin.lower(), "dataStreamId": ds.id,
                      "value": stored, "ts_ms": d.last_write_ms, "origin": "app",
                      "webhooks_fired": self.webhooks.totals()["fired"] - fired})

    def _admin_routes(self) -> list[Route]:
        j = _json

        async def requests(request: web.BaseRequest) -> web.Response:
            limit = request.query.get("limit")
            return j(self.recorded(int(limit) if limit and is_id(limit) else None))

        async def devices(request: web.BaseRequest) -> web.Response:
            return j([self.device_state(d) for d in self.model.devices.values()])

        async def counts(request: web.BaseRequest) -> web.Response:
            return j(self.counts())

        async def webhooks(request: web.BaseRequest) -> web.Response:
            return j({"stats": self.webhooks.stats(), "totals": self.webhooks.totals(),
                      "log": list(self.webhooks.log)})

        async def faults_get(request: web.BaseRequest) -> web.Response:
            return j(self.faults.state())

        async def faults_post(request: web.BaseRequest) -> web.Response:
            try:
                spec = msgspec.json.decode(await request.read(), type=FaultSpec)
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                return j({"error": str(exc)}, 400)
            self.faults.apply(spec)
            return j(self.faults.state())

        async def faults_delete(request: web.BaseRequest) -> web.Response:
            self.faults.clear()
            return j(self.faults.state())

        async def expire(request: web.BaseRequest) -> web.Response:
            self.platform.expire_tokens()
            return j({"expired": True})

        async def mqtt(request: web.BaseRequest) -> web.Response:
            return j({"stats": dict(self.mqtt.stats), "sessions": len(self.mqtt.sessions),
                      "addresses": {r: f"{h}:{p}" for r, (h, p) in self.mqtt.addresses.items()},
                      "mcu": {str(k): v for k, v in self.mqtt.mcu.items()}})

        async def reset(request: web.BaseRequest) -> web.Response:
            self.reset()
            return j({"reset": True})

        return [
            ("GET", "/_admin/requests", requests),
            ("GET", "/_admin/devices", devices),
            ("GET", "/_admin/counts", counts),
            ("GET", "/_admin/webhooks", webhooks),
            ("GET", "/_admin/mqtt", mqtt),
            ("GET", "/_admin/faults", faults_get),
            ("POST", "/_admin/faults", faults_post),
            ("DELETE", "/_admin/faults", faults_delete),
            ("POST", "/_admin/oauth/expire", expire),
            ("POST", "/_admin/reset", reset),
        ]
