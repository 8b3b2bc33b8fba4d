"""Blynk Platform (organization) API client: OAuth2 client credentials, device provisioning.

Contract:

* The access token is cached and refreshed *before* it expires (``expires_in`` minus a margin),
  with the refresh token when there is one, else with client credentials again. A ``401`` anyway
  (revoked, clock skew) → one fresh token and one retry; a second ``401`` is permanent.
* Failures raise :class:`pipeline.errors.Retryable` (timeouts, connection errors, 5xx, 429 with
  ``retry_after_s`` from ``Retry-After``) or :class:`pipeline.errors.Permanent` with ``reason``
  ``unauthorized`` (bad client credentials), ``not_found`` (404) or ``bad_request`` (other 4xx).
* Redirects are never followed (they would carry the client secret or the access token
  elsewhere): a 3xx is :class:`~pipeline.errors.Permanent` ``redirect_refused``, counted in
  ``bb_blynk_redirects_refused_total{api="platform"}``.
* Secrets (client secret, access and refresh tokens, device tokens) never appear in logs or
  exception text.
* Uses the :class:`~pipeline.blynk.client.BlynkClient`'s session (one pool per process) when one
  is given; otherwise its own.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import msgspec

from pipeline import metrics
from pipeline.blynk.client import BlynkClient, error_message, retry_after
from pipeline.config import PlatformConfig
from pipeline.errors import Permanent, Reason, Retryable
from pipeline.redact import mask, masked_repr, redact_url

log = logging.getLogger("pipeline.blynk.platform")


@dataclass(frozen=True, slots=True)
class CreatedDevice:
    id: int
    token: str
    name: str

    def __repr__(self) -> str:
        return f"CreatedDevice(id={self.id}, token={mask(self.token)!r}, name={self.name!r})"


class _TokenAnswer(msgspec.Struct):
    access_token: str
    expires_in: float = 300.0
    refresh_token: str | None = None
    token_type: str = "Bearer"


class _Created(msgspec.Struct):
    id: int
    token: str
    name: str = ""

    def __repr__(self) -> str:
        return masked_repr(self)


class _Metafield(msgspec.Struct):
    id: int
    name: str


class PlatformClient:
    """Blynk Platform API client (see the module docstring)."""

    def __init__(self, config: PlatformConfig, blynk: BlynkClient | None = None, *,
                 timeout_s: float = 10.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.base = config.url.rstrip("/")
        self._blynk = blynk
        self._own: aiohttp.ClientSession | None = None
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._clock = clock
        self._access: str | None = None
        self._refresh: str | None = None
        self._expires_at = 0.0
        self._lock = asyncio.Lock()
        #: template id → metafield name → id; device id → template id (devices we created).
        self._metafields: dict[str, dict[str, int]] = {}
        self._device_template: dict[int, str] = {}
        #: How many tokens were fetched (observability, tests).
        self.tokens_fetched = 0

    def _session(self) -> aiohttp.ClientSession:
        if self._blynk is not None:
            return self._blynk.session()
        if self._own is None or self._own.closed:
            self._own = aiohttp.ClientSession(timeout=self._timeout)
        return self._own

    async def close(self) -> None:
        if self._own is not None:
            await self._own.close()
            self._own = None

    # tokens -----------------------------------------------------------------------------------
    async def _token(self, *, force: bool = False) -> str:
        async with self._lock:
            if not force and self._access is not None and self._clock() < self._expires_at:
                return self._access
            answer = None
            if self._refresh is not None:
                try:
                    answer = await self._fetch_token("refresh_token", self._refresh)
                except Permanent:
                    answer = None  # refresh token no longer valid: start over
            if answer is None:
                answer = await self._fetch_token("client_credentials")
            self._access = answer.access_token
            self._refresh = answer.refresh_token
            margin = min(30.0, answer.expires_in * 0.1)
            self._expires_at = self._clock() + answer.expires_in - margin
            self.tokens_fetched += 1
            return self._access

    async def _fetch_token(self, grant: str, refresh: str | None = None) -> _TokenAnswer:
        params = {"grant_type": grant}
        if refresh is not None:
            params["refresh_token"] = refresh
        status, body, headers = await self._send("oauth_token", "POST", "/oauth2/token",
                                                 params=params, basic=self._basic())
        if status == 200:
            try:
                return msgspec.json.decode(body, type=_TokenAnswer)
            except msgspec.DecodeError as exc:
                raise Retryable(f"token answer not understood: {exc}",
                                reason=Reason.BAD_ANSWER) from None
        self._raise(status, body, headers, "token")
        raise AssertionError("unreachable")

    def _basic(self) -> str:
        raw = f"{self.config.client_id}:{self.config.client_secret!s}".encode()
        return "Basic " + base64.b64encode(raw).decode()

    # requests ---------------------------------------------------------------------------------
    async def _send(self, endpoint: str, method: str, path: str, *,
                    params: dict[str, str] | None = None, json: Any = None,
                    basic: str | None = None,
                    bearer: str | None = None) -> tuple[int, bytes, dict[str, str]]:
        headers = {"Authorization": f"Bearer {bearer}"} if bearer else {}
        if basic is not None:
            headers["Authorization"] = basic
        data = None
        if json is not None:
            data = msgspec.json.encode(json)
            headers["Content-Type"] = "application/json"
        counter = metrics.BLYNK_REQUESTS
        try:
            async with self._session().request(method, self.base + path, params=params,
                                               data=data, headers=headers,
                                               timeout=self._timeout,
                                               allow_redirects=False) as resp:
                body = await resp.read()
                counter.labels(f"platform_{endpoint}", str(resp.status)).inc()
                return resp.status, body, dict(resp.headers)
        except TimeoutError:
            counter.labels(f"platform_{endpoint}", "timeout").inc()
            raise Retryable(f"platform API {endpoint}: no answer", reason=Reason.TIMEOUT) from None
        except aiohttp.ClientError as exc:
            counter.labels(f"platform_{endpoint}", "error").inc()
            raise Retryable(f"platform API {endpoint}: {type(exc).__name__}",
                            reason=Reason.CONNECTION) from None

    def _raise(self, status: int, body: bytes, headers: dict[str, str], what: str) -> None:
        text = body.decode(errors="replace")
        message = error_message(text)
        if status == 400 and '"invalid_client"' in text:
            raise Permanent(f"platform API {what}: client id or secret rejected",
                            reason=Reason.UNAUTHORIZED)
        if 300 <= status < 400:
            metrics.BLYNK_REDIRECTS_REFUSED.labels("platform", Reason.NOT_FOLLOWED).inc()
            raise Permanent(f"platform API {what}: HTTP {status} redirect not followed "
                            f"(to {redact_url(headers.get('Location', ''))!r}): check "
                            "platform.url", reason=Reason.REDIRECT_REFUSED)
        if status == 429:
            raise Retryable(f"platform API {what}: rate limited", reason=Reason.RATE_LIMITED,
                            retry_after_s=retry_after(headers.get("Retry-After")))
        if status >= 500:
            raise Retryable(f"platform API {what}: HTTP {status}", reason=Reason.SERVER_ERROR,
                            retry_after_s=retry_after(headers.get("Retry-After")))
        if status in (401, 403):
            raise Permanent(f"platform API {what}: HTTP {status} {message}",
                            reason=Reason.UNAUTHORIZED)
        if status == 404:
            raise Permanent(f"platform API {what}: {message}", reason=Reason.NOT_FOUND)
        raise Permanent(f"platform API {what}: HTTP {status} {message}", reason=Reason.BAD_REQUEST)

    async def _call(self, endpoint: str, method: str, path: str, *,
                    params: dict[str, str] | None = None, json: Any = None) -> bytes:
        """An authorized request; 401 → one fresh token and one retry. Returns the 2xx body."""
        token = await self._token()
        status, body, headers = await self._send(endpoint, method, path, params=params,
                                                 json=json, bearer=token)
        if status == 401:
            log.info("platform API token rejected; fetching a new one")
            token = await self._token(force=True)
            status, body, headers = await self._send(endpoint, method, path, params=params,
                                                     json=json, bearer=token)
        if 200 <= status < 300:
            return body
        self._raise(status, body, headers, endpoint)
        raise AssertionError("unreachable")

    # API --------------------------------------------------------------------------------------
    async def create_device(self, template_id: str, name: str) -> CreatedDevice:
        """Create a device from a template (``TMPL…``); 201 carries its token."""
        payload: dict[str, Any] = {"templateId": template_id, "name": name}
        if self.config.org_id is not None:
            payload["orgId"] = self.config.org_id
        if self.config.owner_id is not None:
            payload["ownerId"] = self.config.owner_id
        body = await self._call("device_create", "POST", "/api/v1/organization/device/create",
                                json=payload)
        try:
            created = msgspec.json.decode(body, type=_Created)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise Permanent(f"device create answer not understood: {exc}",
                            reason=Reason.BAD_REQUEST) from None
        self._device_template[created.id] = template_id
        log.info("created Blynk device %d %r (token %s)", created.id, name, mask(created.token))
        return CreatedDevice(created.id, created.token, created.name or name)

    async def _metafield_ids(self, device_id: int) -> dict[str, int]:
        template = self._device_template.get(device_id)
        if template is not None and template in self._metafields:
            return self._metafields[template]
        if template is not None:
            body = await self._call("template_metafields", "GET",
                                    "/api/v1/organization/template/metafields",
                                    params={"templateId": template})
        else:
            body = await self._call("device_metafields", "GET",
                                    "/api/v1/organization/device/metafield",
                                    params={"deviceId": str(device_id)})
        try:
            fields = msgspec.json.decode(body, type=list[_Metafield])
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise Permanent(f"metafields answer not understood: {exc}",
                            reason=Reason.BAD_REQUEST) from None
        ids = {f.name: f.id for f in fields}
        if template is not None:
            self._metafields[template] = ids
        return ids

    async def set_metafield(self, device_id: int, name: str, value: str) -> None:
        """Set a metafield by its name (its id is looked up once per template and cached)."""
        ids = await self._metafield_ids(device_id)
        if name not in ids:
            raise Permanent(f"device {device_id}: the template has no metafield {name!r}",
                            reason=Reason.NOT_FOUND)
        await self._call("metafield_set", "POST", "/api/v1/organization/device/metafield",
                         json={"deviceId": device_id, "metaFieldId": ids[name],
                               "newValue": value})

    async def template_datastreams(self, template_id: str) -> list[dict[str, Any]]:
        body = await self._call("template_datastreams", "GET",
                                "/api/v1/organization/template/datastreams",
                                params={"templateId": template_id})
        data = msgspec.json.decode(body)
        if not isinstance(data, list):
            raise Permanent("template datastreams answer is not a list", reason=Reason.BAD_REQUEST)
        return data
