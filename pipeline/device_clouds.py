"""Clients that deliver downlink commands to the device clouds: TTS over MQTT, TTS over HTTP,
the Particle Cloud API.

Contract of every ``send``/``call``: it returns once the device cloud accepted the command
(MQTT: the broker acknowledged the QoS 1 PUBLISH; HTTP: a 2xx answer), or raises

* :class:`Offline` — the device is not reachable now (Particle's "timed out"); retry later;
* :class:`Unauthorized` — our credentials were refused (401/403, MQTT CONNACK 4/5): the
  integration is Broken; retried, since credentials get fixed;
* :class:`~pipeline.errors.Retryable` — a transient failure (connection, timeout, 429, 5xx);
* :class:`~pipeline.errors.Permanent` — the cloud refused this command for good (unknown
  function or device, bad request); ``reason`` says why.

Nothing here retries or sleeps: the downlink stage owns retries, backoff and the TTL.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Awaitable, Callable
from urllib.parse import quote

import aiohttp
import msgspec

from pipeline import mqtt
from pipeline.config import ParticleProduct, TtsApplication
from pipeline.errors import Permanent, Reason, Retryable
from pipeline.lifecycle import cancel_and_wait

log = logging.getLogger("blynk_bridge.device_clouds")

#: TTS downlink outcome topics the stage listens to.
OUTCOMES = ("queued", "sent", "ack", "nack", "failed")
#: A TTS device id as TTS allows it (no MQTT level separators or wildcards can slip in).
_TTS_DEVICE = re.compile(r"[a-z0-9](?:[-]?[a-z0-9]){1,35}")
_PARTICLE_DEVICE = re.compile(r"[0-9a-fA-F]{24}|[A-Za-z0-9_-]{1,64}")
_FUNCTION = re.compile(r"[A-Za-z0-9_-]{1,64}")
#: Bytes of an error body kept in a detail.
_BODY_MAX = 300


class Offline(Retryable):
    """The device did not answer (Particle: timed out / not connected)."""

    reason = Reason.DEVICE_OFFLINE


class Unauthorized(Retryable):
    """The device cloud refused our credentials."""

    reason = Reason.UNAUTHORIZED


def tts_device_ok(device: str) -> bool:
    return _TTS_DEVICE.fullmatch(device) is not None


OutcomeHandler = Callable[[str, str, bytes], Awaitable[None]]


class TtsMqtt:
    """Publishes one application's downlinks on a connection of its own, and hands every
    ``down/<outcome>`` message it hears to ``on_outcome(integration, outcome, payload)``.

    The connection is made on first use and again after it breaks (the next ``send`` raises
    :class:`Retryable` meanwhile); ``close`` ends it.
    """

    def __init__(self, app: TtsApplication, consumer: str, on_outcome: OutcomeHandler,
                 *, timeout_s: float = 10.0) -> None:
        self.app = app
        self.settings = mqtt.Settings(
            host=app.host, port=app.effective_port, username=app.username,
            password=app.api_key.reveal() if app.api_key is not None else None,
            tls=not app.insecure, ca_file=app.ca_file,
            client_id=f"blynk-bridge-down-{app.app_id}-{consumer}"[:128], timeout_s=timeout_s)
        self._on_outcome = on_outcome
        self._session: mqtt.Session | None = None
        self._reader: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self.connected = asyncio.Event()

    def topic(self, device: str) -> str:
        return f"v3/{self.app.username}/devices/{device}/down/{self.app.downlink_queue}"

    async def send(self, device: str, body: bytes) -> None:
        if not tts_device_ok(device):
            raise Permanent(f"TTS device id {device[:64]!r} is not valid", reason=Reason.BAD_DEVICE)
        session = await self._connect()
        try:
            await session.publish(self.topic(device), body, qos=1)
        except mqtt.MqttError as exc:
            await self._drop(session)
            raise Retryable(f"publish failed: {exc.detail}", reason=Reason.MQTT) from None

    async def _connect(self) -> mqtt.Session:
        async with self._lock:
            if self._session is not None:
                return self._session
            session = mqtt.Session(self.settings)
            try:
                await session.__aenter__()
                await session.subscribe(mqtt.app_topics(self.app.username,
                                                        [f"down/{o}" for o in OUTCOMES]))
            except mqtt.AuthError as exc:
                await session.__aexit__(None, None, None)
                raise Unauthorized(f"TTS {self.app.name}: {exc.detail}") from None
            except mqtt.MqttError as exc:
                await session.__aexit__(None, None, None)
                raise Retryable(f"TTS {self.app.name}: {exc.detail}", reason=Reason.MQTT) from None
            self._session = session
            self._reader = asyncio.create_task(self._read(session),
                                               name=f"downlink-outcomes-{self.app.name}")
            self.connected.set()
            return session

    async def _read(self, session: mqtt.Session) -> None:
        try:
            async for topic, payload in session.messages():
                outcome = topic.rsplit("/", 1)[-1]
                try:
                    await self._on_outcome(self.app.name, outcome, payload)
                except Exception:  # one bad outcome never ends the listener
                    log.exception("downlink: handling a TTS %s failed", outcome)
        except mqtt.MqttError as exc:
            log.warning("downlink: TTS %s connection lost (%s)", self.app.name, exc.detail)
        finally:
            if self._session is session:
                self._session = None
                self.connected.clear()
            with contextlib.suppress(Exception):
                await session.__aexit__(None, None, None)

    async def _drop(self, session: mqtt.Session) -> None:
        if self._session is session:
            self._session = None
            self.connected.clear()
            with contextlib.suppress(Exception):
                await session.__aexit__(None, None, None)

    async def close(self) -> None:
        reader, self._reader = self._reader, None
        session, self._session = self._session, None
        self.connected.clear()
        if session is not None:
            with contextlib.suppress(Exception):
                await session.__aexit__(None, None, None)
        if reader is not None:
            await cancel_and_wait([reader])


def _http_failure(status: int, text: str, what: str) -> Exception:
    detail = f"{what}: HTTP {status}: {text[:_BODY_MAX]}"
    if status in (401, 403):
        return Unauthorized(detail)
    if status == 429 or status >= 500:
        return Retryable(detail, reason=Reason.CLOUD_UNAVAILABLE)
    return Permanent(detail, reason=Reason.CLOUD_REFUSED)


class TtsHttp:
    """Posts downlinks through the application's webhook downlink API (for applications that
    send uplinks by webhook): ``POST {api_url}/api/v3/as/applications/{app}/webhooks/{id}/
    devices/{dev}/down/push`` with ``Authorization: Bearer <api key>``."""

    def __init__(self, app: TtsApplication, http: aiohttp.ClientSession) -> None:
        self.app = app
        self._http = http

    def url(self, device: str) -> str:
        base = (self.app.api_url or "").rstrip("/")
        return (f"{base}/api/v3/as/applications/{quote(self.app.app_id, safe='')}/webhooks/"
                f"{quote(self.app.downlink_webhook_id or '', safe='')}/devices/"
                f"{quote(device, safe='')}/down/{self.app.downlink_queue}")

    async def send(self, device: str, body: bytes) -> None:
        if not tts_device_ok(device):
            raise Permanent(f"TTS device id {device[:64]!r} is not valid", reason=Reason.BAD_DEVICE)
        key = self.app.api_key.reveal() if self.app.api_key is not None else ""
        try:
            async with self._http.post(self.url(device), data=body, headers={
                    "Authorization": f"Bearer {key}",
                    "Content-Type": "application/json"}) as resp:
                text = (await resp.content.read(4096)).decode(errors="replace")
                if 200 <= resp.status < 300:
                    return
                raise _http_failure(resp.status, text, f"TTS {self.app.name}")
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise Retryable(f"TTS {self.app.name}: {type(exc).__name__}: {exc}",
                            reason=Reason.UNREACHABLE) from None


class _FunctionReply(msgspec.Struct):
    return_value: int | float | str | None = None
    error: str | None = None
    ok: bool | None = None


_reply = msgspec.json.Decoder(_FunctionReply)


class ParticleApi:
    """Calls Particle functions: ``POST {api_url}/v1/devices/{id}/{function}`` with the form
    field ``arg`` and ``Authorization: Bearer <access token>``; returns ``return_value``.

    Offline is an answer of 408, or 400/404 whose error says the device timed out or is not
    connected (Particle answers both ways, reference §3); another 404 is an unknown device or
    function (:class:`Permanent`).
    """

    def __init__(self, product: ParticleProduct, http: aiohttp.ClientSession) -> None:
        self.product = product
        self._http = http

    async def call(self, device: str, function: str, arg: str) -> int | float | str | None:
        if not _PARTICLE_DEVICE.fullmatch(device):
            raise Permanent(f"Particle device id {device[:64]!r} is not valid",
                            reason=Reason.BAD_DEVICE)
        if not _FUNCTION.fullmatch(function):
            raise Permanent(f"Particle function name {function[:80]!r} is not valid",
                            reason=Reason.BAD_FUNCTION)
        url = (f"{self.product.api_url.rstrip('/')}/v1/devices/{quote(device, safe='')}/"
               f"{quote(function, safe='')}")
        token = (self.product.access_token.reveal()
                 if self.product.access_token is not None else "")
        what = f"Particle {self.product.name} {function}"
        try:
            async with self._http.post(url, data={"arg": arg},
                                       headers={"Authorization": f"Bearer {token}"}) as resp:
                raw = await resp.content.read(16 * 1024)
                status = resp.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise Retryable(f"{what}: {type(exc).__name__}: {exc}",
                            reason=Reason.UNREACHABLE) from None
        text = raw.decode(errors="replace")
        try:
            reply: _FunctionReply | None = _reply.decode(raw)
        except (msgspec.DecodeError, msgspec.ValidationError):
            reply = None
        if 200 <= status < 300:
            return reply.return_value if reply is not None else None
        error = (reply.error or "") if reply is not None else text
        low = error.lower()
        if status == 408 or (status in (400, 404)
                             and ("timed out" in low or "not connected" in low
                                  or "offline" in low)):
            raise Offline(f"{what}: device {device} offline (HTTP {status}: {error[:100]})")
        if status == 404:
            raise Permanent(f"{what}: HTTP 404: {error[:_BODY_MAX]}",
                            reason=Reason.UNKNOWN_FUNCTION)
        raise _http_failure(status, error, what)
