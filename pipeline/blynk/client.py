"""The bridge's client of Blynk's device HTTPS API: one session, typed outcomes, region memory.

Contract of every request method:

* It never raises for anything Blynk or the network does: the answer is an :data:`Outcome` —
  :class:`Ok` (2xx; ``server`` = the base URL that answered), :class:`Retry` (timeouts,
  connection errors, 5xx, 429 with ``Retry-After`` in ``retry_after_s``, a second redirect) or
  :class:`Fail` with a reason code from :mod:`pipeline.blynk.outcomes` (``invalid_token``,
  ``wrong_pin``, ``type_mismatch``, ``no_datastream``, ``too_large``, ``bad_request``…).
  Blynk's error messages are matched loosely (lower case, trailing period stripped): its docs
  disagree on the periods.
* ``server`` is a key of ``config.servers`` or a full base URL. A ``308`` is followed once, and
  only to one of ``config.servers``, the origin asked, or ``https://<region>.blynk.cloud``, and
  never from https to http (:func:`redirect_refusal`); any other is :class:`Fail`
  ``redirect_refused`` before a byte goes there, counted in ``bb_blynk_redirects_refused_total``.
  The region a followed 308 points at is remembered per token in Redis
  (``keys.region(sha256(token)[:16])``), so every replica learns it, and is asked first next time
  (a remembered region that is not allowed is ignored).
* Tokens never appear in full in logs, outcomes or exceptions (``pipeline.redact.mask``).
* Every request is counted in ``bb_blynk_requests_total{endpoint, status}``.

Device API requests go through :class:`pipeline.blynk.http.HttpClient` (a lean keep-alive
pool of ``config.max_connections`` with a total timeout of ``config.timeout_s`` per request;
its docstring says why not aiohttp). :meth:`BlynkClient.session` is an
:class:`aiohttp.ClientSession` (created lazily, same limits) for the platform API.
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
import string
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import quote, urlsplit

import aiohttp
import msgspec
from redis.exceptions import RedisError
from yarl import URL

from pipeline import metrics
from pipeline.blynk.http import ConnectionLost, HttpClient, HttpError, Response
from pipeline.blynk.outcomes import Fail, Ok, Outcome, Retry
from pipeline.config import BlynkConfig
from pipeline.errors import Reason
from pipeline.events import Value
from pipeline.keys import Keys
from pipeline.redact import mask, redact_url
from pipeline.streams import Redis

log = logging.getLogger("pipeline.blynk")

#: Blynk's documented error messages (normalized) → reason code. Prefix matches for messages
#: that carry a name or a number.
_MESSAGES: dict[str, Reason] = {
    "invalid token": Reason.INVALID_TOKEN,
    "wrong pin format": Reason.WRONG_PIN,
    "wrong datastreamid format": Reason.WRONG_PIN,
    "value doesn't match the datastream data type": Reason.TYPE_MISMATCH,
    "no datastream setup for that pin": Reason.NO_DATASTREAM,
    "unknown content type": Reason.BAD_REQUEST,
}
_PREFIXES: tuple[tuple[str, Reason], ...] = (
    ("requested datastream doesn't exist", Reason.NO_DATASTREAM),
    ("too much data in batch", Reason.TOO_LARGE),
)
#: Refusals that name the pin they are about.
_PIN_REASONS = frozenset({Reason.TYPE_MISMATCH, Reason.NO_DATASTREAM, Reason.WRONG_PIN})

#: Points per timestamped upload (Blynk's documented maximum).
MAX_UPLOAD_POINTS = 10_000
_REGION_TTL_S = 30 * 86_400
_REGION_CACHE = 100_000
_SPLITS_CACHE = 1_000
_error_decoder = msgspec.json.Decoder()


def normalize(message: str) -> str:
    """``"Invalid token."`` → ``"invalid token"``: how Blynk messages are compared."""
    return message.strip().lower().rstrip(".").strip()


def classify(message: str) -> Reason:
    """The reason code of one Blynk error message (``bad_request`` when unknown)."""
    norm = normalize(message)
    reason = _MESSAGES.get(norm)
    if reason is not None:
        return reason
    for prefix, code in _PREFIXES:
        if norm.startswith(prefix):
            return code
    return Reason.BAD_REQUEST


def error_message(body: str) -> str:
    """The ``message`` of ``{"error":{"message":"…"}}``, else the body itself (shortened)."""
    try:
        data = _error_decoder.decode(body)
    except msgspec.DecodeError:
        return body[:200]
    if isinstance(data, dict):
        err = data.get("error")
        if isinstance(err, dict) and isinstance(err.get("message"), str):
            return str(err["message"])
        if isinstance(err, str):
            return err
    return body[:200]


def retry_after(value: str | None) -> float | None:
    """``Retry-After`` in seconds (delta-seconds or an HTTP date); None when absent/garbled."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        return max(0.0, when.timestamp() - time.time())
    return max(0.0, seconds) if math.isfinite(seconds) else None


def format_value(value: Value) -> str | None:
    """Query-string text of a value: bool → 1/0, location ``[lon, lat]`` → ``lon,lat``."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, list):
        return ",".join(repr(float(v)) for v in value)
    return str(value)


def json_value(value: Value) -> Any:
    """JSON value of a timestamped point: bool → 1/0, everything else as is."""
    if isinstance(value, bool):
        return 1 if value else 0
    return value


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()[:16]


_SAFE = "-._~:,"
_UNQUOTED = string.ascii_letters + string.digits + _SAFE


def _q(text: str) -> str:
    if not text.strip(_UNQUOTED):  # nothing to escape (pins, numbers, most tokens)
        return text
    return quote(text, safe=_SAFE)


class BlynkClient:
    """Blynk device HTTPS API client for one process (see the module docstring)."""

    def __init__(self, config: BlynkConfig, redis: Redis, keys: Keys) -> None:
        self.config = config
        self.redis = redis
        self.keys = keys
        self._session: aiohttp.ClientSession | None = None
        self.http = HttpClient(limit=config.max_connections, timeout_s=config.timeout_s)
        #: (endpoint, status) → its ``bb_blynk_requests_total`` child (labels() is not free).
        self._counters: dict[tuple[str, str], Any] = {}
        #: token hash → base URL learned from a 308 ("" = none known); bounded LRU.
        self._regions: OrderedDict[str, str] = OrderedDict()
        self._token_hashes: dict[str, str] = {}
        #: Where a 308 may lead (canonical base URLs; see :func:`redirect_refusal`).
        self._servers = frozenset(s for s in map(canonical_base, config.servers.values()) if s)
        #: base URL → (its origin, its path) as :func:`_split_url` splits a URL of it, so the
        #: task-free write does not split every request's URL again (few: servers, regions).
        self._splits: dict[str, tuple[str, str]] = {}
        #: The same for ``base_url(server)``, by server (a name of ``config.servers`` or a URL).
        self._server_splits: dict[str, tuple[str, str]] = {}

    # session ----------------------------------------------------------------------------------
    def session(self) -> aiohttp.ClientSession:
        """The aiohttp session for the platform API (created on first use, in the loop)."""
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(limit=self.config.max_connections,
                                             keepalive_timeout=30.0, ttl_dns_cache=300)
            self._session = aiohttp.ClientSession(
                connector=connector,
                timeout=aiohttp.ClientTimeout(total=self.config.timeout_s),
                auto_decompress=True,
            )
        return self._session

    async def close(self) -> None:
        await self.http.close()
        if self._session is not None:
            await self._session.close()
            self._session = None

    def base_url(self, server: str) -> str:
        """A key of ``config.servers`` → its URL; anything else is taken as a base URL."""
        return self.config.servers.get(server, server).rstrip("/")

    # region memory ----------------------------------------------------------------------------
    async def _region(self, token: str) -> str | None:
        return self._cached_region(token_hash(token)) or await self._load_region(token)

    def _cached_region(self, h: str) -> str | None:
        """The region known in this process: a base URL, ``""`` (none), None (not known)."""
        cached = self._regions.get(h)
        if cached is not None:
            self._regions.move_to_end(h)
        return cached

    async def _load_region(self, token: str) -> str | None:
        h = token_hash(token)
        cached = self._cached_region(h)
        if cached is not None:
            return cached or None
        try:
            raw = await self.redis.get(self.keys.region(h))
        except RedisError as exc:  # Redis trouble must not stop writes: use the configured server
            log.warning("region lookup failed for token %s: %s", mask(token), type(exc).__name__)
            return None
        base = raw.decode() if isinstance(raw, bytes) else (raw or "")
        if base and redirect_refusal(base, base, self._servers, same_origin=False) is not None:
            log.warning("ignoring the remembered region %s of token %s: not an allowed server",
                        redact_url(base), mask(token))
            base = ""
        self._remember_local(h, base)
        return base or None

    def _remember_local(self, h: str, base: str) -> None:
        self._regions[h] = base
        self._regions.move_to_end(h)
        while len(self._regions) > _REGION_CACHE:
            self._regions.popitem(last=False)

    async def _remember(self, token: str, base: str) -> None:
        h = token_hash(token)
        self._remember_local(h, base)
        try:
            await self.redis.set(self.keys.region(h), base.encode(), ex=_REGION_TTL_S)
        except RedisError as exc:  # the region is still known in this process
            log.warning("could not store region of token %s: %s", mask(token),
                        type(exc).__name__)
        log.info("token %s lives at %s (learned from a 308)", mask(token), base)

    # requests ---------------------------------------------------------------------------------
    async def _request(self, endpoint: str, server: str, token: str, path_query: str, *,
                       method: str = "GET", body: bytes | None = None,
                       pin: str | None = None) -> Outcome:
        """Send one request; follow a 308 once; classify the answer."""
        h = self._token_hashes.get(token)
        if h is None:
            h = token_hash(token)
            if len(self._token_hashes) >= _REGION_CACHE:
                self._token_hashes.clear()
            self._token_hashes[token] = h
        known = self._cached_region(h)
        if known is None:
            known = await self._load_region(token)
        base = known or self.base_url(server)
        redirected = False
        while True:
            url = base + path_query
            outcome, location = await self._send(endpoint, method, url, body, token, pin)
            if location is None:
                if isinstance(outcome, Ok):
                    return Ok(outcome.status, outcome.body, server=base)
                return outcome
            if redirected:
                return Retry(Reason.REDIRECT, "redirected twice: " + redact_url(location),
                             status=308)
            new_base = _base_of(location, path_query)
            if new_base is None:
                return Retry(Reason.REDIRECT, "308 without a usable Location: "
                             + redact_url(location), status=308)
            why = redirect_refusal(base, new_base, self._servers)
            if why is not None:
                metrics.BLYNK_REDIRECTS_REFUSED.labels("device", why).inc()
                detail = _REFUSALS[why].format(redact_url(new_base))
                log.warning("not following %s's 308 for token %s: %s", base, mask(token), detail)
                return Fail(Reason.REDIRECT_REFUSED, detail, status=308)
            redirected = True
            base = new_base
            await self._remember(token, base)

    async def _send(self, endpoint: str, method: str, url: str, body: bytes | None, token: str,
                    pin: str | None) -> tuple[Outcome, str | None]:
        base, target = _split_url(url)
        try:
            resp = await self.http.request(base, target, method=method, body=body)
        except (TimeoutError, HttpError, ValueError) as exc:
            return self._answer(endpoint, exc, token, pin)
        return self._answer(endpoint, resp, token, pin)

    def _answer(self, endpoint: str, resp: Response | BaseException, token: str,
                pin: str | None, *, server: str = "") -> tuple[Outcome, str | None]:
        """Classify one answer (or the error instead of one); counts it in the metrics.
        ``server``: the base URL a 2xx's :class:`Ok` names."""
        if isinstance(resp, BaseException):
            if isinstance(resp, TimeoutError):
                self._count(endpoint, "timeout")
                return Retry(Reason.TIMEOUT, f"no answer within {self.config.timeout_s}s"), None
            if not isinstance(resp, (HttpError, ValueError)):
                raise resp
            self._count(endpoint, "error")
            detail = f"{type(resp).__name__}: {_scrub(str(resp), token)}"
            return Retry(Reason.CONNECTION, detail), None
        status = resp.status
        self._count(endpoint, str(status))
        text = resp.text()
        if 200 <= status < 300:
            return Ok(status, text, server), None
        location = resp.headers.get("location")
        if status in (301, 302, 307, 308) and location:
            return Ok(status), location
        return classify_answer(status, text, resp.headers.get("retry-after"), pin), None

    def _count(self, endpoint: str, status: str) -> None:
        child = self._counters.get((endpoint, status))
        if child is None:
            child = self._counters[(endpoint, status)] = metrics.BLYNK_REQUESTS.labels(
                endpoint, status)
        child.inc()

    async def batch_update(self, server: str, token: str, pins: Mapping[str, Value]) -> Outcome:
        """``GET batch/update?token=…&V1=…``: one message, one timestamp for every pin."""
        query = _batch_query(token, pins)
        if query is None:
            return Ok(200, "nothing to write")
        return await self._request("batch_update", server, token, query[0], pin=query[1])

    def batch_update_nowait(self, server: str, token: str, pins: Mapping[str, Value],
                            on_done: Callable[[Outcome | None], None]) -> bool:
        """:meth:`batch_update` without a coroutine, for the common case only.

        Sends when the token's region is known in this process and a keep-alive connection is
        idle, and returns ``True``; ``on_done`` then gets the outcome, or ``None`` when the
        answer needs what only :meth:`batch_update` does (a 308 to follow, or a reused
        connection that died before answering): call it then, nothing was written. Returns
        ``False``, having sent nothing, in every other case (no pins to send included).
        """
        query = _batch_query(token, pins)
        if query is None:
            return False
        h = self._token_hashes.get(token)
        known = self._cached_region(h) if h is not None else None
        if known is None:
            return False
        path_query, pin = query
        split = self._splits.get(known) if known else self._server_splits.get(server)
        if split is None:
            url = known or self.base_url(server)
            split = self._split_base(url)
            if split is None:
                base, target = _split_url(url + path_query)
            else:
                if not known:
                    self._server_splits[server] = split
                base, target = split[0], split[1] + path_query
        else:
            base, target = split[0], split[1] + path_query

        def answered(resp: Response | BaseException) -> None:
            if isinstance(resp, BaseException) and (
                    not isinstance(resp, (TimeoutError, HttpError, ValueError))
                    or (isinstance(resp, ConnectionLost) and not resp.got_bytes)):
                on_done(None)  # perhaps a keep-alive connection the server had just closed
                return
            outcome, location = self._answer("batch_update", resp, token, pin, server=base)
            on_done(None if location is not None else outcome)

        try:
            return self.http.send_nowait(base, target, answered)
        except ValueError:  # not an http(s) URL: batch_update says so as an outcome
            return False

    def _split_base(self, url: str) -> tuple[str, str] | None:
        """:attr:`_splits` of ``url`` (cached), or ``None`` for a URL without ``//`` or ending
        in ``/``, which only :func:`_split_url` of the whole URL splits right."""
        if "//" not in url or url.endswith("/"):
            return None
        if len(self._splits) >= _SPLITS_CACHE:
            self._splits.clear()
            self._server_splits.clear()
        i = url.find("/", url.find("//") + 2)
        split = self._splits[url] = (url, "") if i < 0 else (url[:i], url[i:])
        return split

    async def update(self, server: str, token: str, pin: str, value: Value) -> Outcome:
        """``GET update?token=…&V1=…`` (a location goes as ``pin=V1&value=lon&value=lat``)."""
        if isinstance(value, list):
            query = (f"&pin={_q(pin)}" +
                     "".join(f"&value={_q(repr(float(v)))}" for v in value))
        else:
            text = format_value(value)
            if text is None:
                return Ok(200, "nothing to write")
            query = f"&{_q(pin)}={_q(text)}"
        return await self._request("update", server, token,
                                   f"/external/api/update?token={_q(token)}{query}", pin=pin)

    async def upload_history(self, server: str, token: str, pin: str,
                             points: Sequence[tuple[int, Value]]) -> Outcome:
        """``POST batch/update?token=…&pin=…`` with ``[[ts_ms, value], …]`` (JSON).

        More than 10,000 points go in several requests, in order; the first answer that is not
        Ok is returned (the points before it were written).
        """
        path = f"/external/api/batch/update?token={_q(token)}&pin={_q(pin)}"
        outcome: Outcome = Ok(200, "nothing to write")
        for start in range(0, len(points), MAX_UPLOAD_POINTS):
            chunk = [[ts, json_value(v)] for ts, v in points[start:start + MAX_UPLOAD_POINTS]
                     if v is not None]
            if not chunk:
                continue
            outcome = await self._request("upload", server, token, path, method="POST",
                                          body=msgspec.json.encode(chunk), pin=pin)
            if not isinstance(outcome, Ok):
                return outcome
        return outcome

    async def get(self, server: str, token: str, pins: Sequence[str]) -> Outcome:
        """``GET get?token=…&v1&v2``: one pin → raw text in ``Ok.body``; several → JSON text."""
        query = "".join(f"&{_q(p)}" for p in pins)
        return await self._request("get", server, token,
                                   f"/external/api/get?token={_q(token)}{query}",
                                   pin=pins[0] if len(pins) == 1 else None)


def classify_answer(status: int, body: str, retry_after_header: str | None,
                    pin: str | None = None) -> Outcome:
    """The outcome of a non-2xx, non-redirect answer."""
    if status == 429:
        return Retry(Reason.RATE_LIMITED, error_message(body), retry_after_s=retry_after(
            retry_after_header), status=status)
    if status >= 500:
        return Retry(Reason.SERVER_ERROR, f"HTTP {status}: {error_message(body)}",
                     retry_after_s=retry_after(retry_after_header), status=status)
    if status == 400:
        message = error_message(body)
        reason = classify(message)
        return Fail(reason, message, status=status,
                    pin=pin if reason in _PIN_REASONS else None)
    if status == 413 or status == 414:
        return Fail(Reason.TOO_LARGE, f"HTTP {status}: {error_message(body)}", status=status,
                    pin=pin)
    if status in (401, 403):
        return Fail(Reason.UNAUTHORIZED, f"HTTP {status}: {error_message(body)}", status=status)
    if status == 404:
        return Fail(Reason.NOT_FOUND, f"HTTP {status}: {error_message(body)}", status=status)
    if status == 408:
        return Retry(Reason.TIMEOUT, f"HTTP {status}", status=status)
    return Fail(Reason.BAD_REQUEST, f"HTTP {status}: {error_message(body)}", status=status)


#: Refusal reason → its explanation (``{}`` = the redirect's base URL, tokens masked).
_REFUSALS = {
    Reason.FOREIGN_HOST: "308 to {} not followed: not a configured Blynk server",
    Reason.DOWNGRADE: "308 to {} not followed: from https to http",
}
_BLYNK_REGION = re.compile(r"https://[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.blynk\.cloud")


def canonical_base(url: str) -> str | None:
    """``scheme://host[:port][/path]`` with the host lower case, the default port and trailing
    slashes dropped; None for anything but a plain http(s) base URL (user info, query,
    fragment, no host)."""
    try:
        u = urlsplit(url)
        port = u.port
    except ValueError:
        return None
    if (u.scheme.lower() not in ("http", "https") or not u.hostname or u.username is not None
            or u.password is not None or u.query or u.fragment or "@" in u.netloc):
        return None
    scheme = u.scheme.lower()
    host = f"[{u.hostname}]" if ":" in u.hostname else u.hostname
    if port is not None and port != (443 if scheme == "https" else 80):
        host += f":{port}"
    return f"{scheme}://{host}{u.path.rstrip('/')}"


def redirect_refusal(current: str, target: str, servers: frozenset[str] | set[str], *,
                     same_origin: bool = True) -> Reason | None:
    """Why a 308 from base URL ``current`` to base URL ``target`` must not be followed
    (``downgrade``: https to http; ``foreign_host``: neither one of ``servers`` (canonical
    base URLs), nor ``https://<region>.blynk.cloud``, nor ``current`` itself when
    ``same_origin``), or None to follow it."""
    to = canonical_base(target)
    if to is None:
        return Reason.FOREIGN_HOST
    if current.lower().startswith("https:") and to.startswith("http:"):
        return Reason.DOWNGRADE
    if to in servers or _BLYNK_REGION.fullmatch(to):
        return None
    if same_origin and to == canonical_base(current):
        return None
    return Reason.FOREIGN_HOST


def _base_of(location: str, path_query: str) -> str | None:
    """The base URL of a redirect target: ``Location`` minus the path (``/external/api/…``)."""
    path = path_query.split("?", 1)[0]
    i = location.find(path)
    if i > 0:
        return location[:i].rstrip("/")
    try:
        u = URL(location)
    except ValueError:
        return None
    if not u.is_absolute():
        return None
    return str(u.origin())


#: The encoded start of a ``batch/update`` per token, and ``&<pin>=`` per pin name: the same
#: few strings on every write of a device (cleared past ``_REGION_CACHE`` entries).
_BATCH_PATHS: dict[str, str] = {}
_PIN_PARTS: dict[str, str] = {}


def _batch_query(token: str, pins: Mapping[str, Value]) -> tuple[str, str | None] | None:
    """Path and query of a ``batch/update``, and the pin when it is the only one; ``None``
    when no pin has a value to send."""
    path = _BATCH_PATHS.get(token)
    if path is None:
        if len(_BATCH_PATHS) >= _REGION_CACHE:
            _BATCH_PATHS.clear()
        path = _BATCH_PATHS[token] = "/external/api/batch/update?token=" + _q(token)
    parts = [path]
    only: str | None = None
    for pin, value in pins.items():
        text = format_value(value)
        if text is None:
            continue
        part = _PIN_PARTS.get(pin)
        if part is None:
            if len(_PIN_PARTS) >= _REGION_CACHE:
                _PIN_PARTS.clear()
            part = _PIN_PARTS[pin] = "&" + _q(pin) + "="
        parts += [part, _q(text)]
        only = pin if only is None else ""
    if only is None:
        return None
    return "".join(parts), only or None


def _split_url(url: str) -> tuple[str, str]:
    """``scheme://host[:port]/path?query`` → (base, ``/path?query``)."""
    i = url.find("/", url.find("//") + 2) if "//" in url else -1
    if i < 0:
        return url, "/"
    return url[:i], url[i:]


def _scrub(text: str, token: str) -> str:
    text = redact_url(text)
    return text.replace(token, mask(token)) if token else text

