"""Auto-provisioning: create an unknown device in Blynk from its template, once, and register it.

Contract of :meth:`Provisioner.ensure`:

* returns the registered device (created now, by another worker meanwhile, or already there);
* concurrent first uplinks of one device — in this process or any other — create it **once**:
  the creator holds the :class:`~pipeline.lease.Lease` ``keys.provision_lock(...)`` and
  re-reads the registry after acquiring it; the others poll the registry (bounded, with
  backoff) until the row appears or the lock is gone, then take the lock themselves;
* raises :class:`~pipeline.errors.Retryable` when Blynk's platform API failed in a way that may
  pass, or when another worker is still creating the device after ``wait_s``: the caller leaves
  the uplink pending (it is delivered again, never acked before its write exists);
* raises :class:`~pipeline.errors.Permanent` (reason ``provision_failed``) when creating can never
  work (template without an id, template unknown to Blynk, no platform client configured);
* enforces the integration's limits (:class:`Limits`, checked by the creator under the lock,
  right before Blynk's ``device/create``, in one script with the shared state in Redis, so
  they hold across replicas): past ``provision_max`` devices created for the integration it
  raises ``Permanent`` with reason ``provision_limit``; past ``provision_rate`` (GCRA,
  ``provision_burst`` at once) it raises ``Retryable`` with reason ``provision_rate`` and
  ``retry_after_s``. A creation that fails gives its place under ``provision_max`` back.

Device names are the source device id where Blynk accepts it as is; otherwise the id with its
invalid characters replaced (and cut to fit), plus ``-`` and 6 hex digits of its SHA-256, so two
ids that read the same once cleaned (``a.b``, ``a:b``) never share a name (:func:`device_name`).

The metafield ("TheThingsNetwork Device" / "Particle Device" = the source device id) is set
right after registering; the row carries ``meta_pending`` until it is, and a failure there does
not hold the uplink back: it is retried on a later uplink of the device (see
:meth:`Provisioner.finish`). Known limit: if a worker dies between Blynk's ``device/create``
answer and registering the row, the next attempt creates a second Blynk device (Blynk offers no
documented lookup by metafield to detect it).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, Protocol

from pipeline import metrics
from pipeline.errors import Permanent, Reason, Retryable
from pipeline.keys import Keys
from pipeline.lease import Lease
from pipeline.ratelimit import GCRA_TAKE_LUA
from pipeline.registry import Device, Registry, split_key
from pipeline.streams import Redis

log = logging.getLogger("blynk_bridge.provision")

#: Seconds between attempts at a pending metafield.
META_RETRY_S = 30.0
METAFIELD = {"tts": "TheThingsNetwork Device", "particle": "Particle Device"}
#: Blynk device names: up to 50 letters, digits, spaces, apostrophes, underscores, hyphens.
_NAME_BAD = re.compile(r"[^A-Za-z0-9 '_-]")

class CreatedDevice(Protocol):
    @property
    def id(self) -> int: ...
    @property
    def token(self) -> str: ...


class Platform(Protocol):
    """What provisioning needs of :class:`pipeline.blynk.platform.PlatformClient`."""

    async def create_device(self, template_id: str, name: str) -> CreatedDevice: ...

    async def set_metafield(self, device_id: int, name: str, value: str) -> None: ...

    async def template_datastreams(self, template_id: str) -> list[dict[str, Any]]: ...


def device_name(source_device: str) -> str:
    """A Blynk-valid device name from a source device id (``eui-70b3…``, a Particle coreid),
    the same for the same id, different for different ids (module docstring)."""
    if len(source_device) <= 50 and _NAME_BAD.search(source_device) is None \
            and source_device.strip() == source_device and source_device:
        return source_device
    digest = hashlib.sha256(source_device.encode()).hexdigest()[:6]
    name = _NAME_BAD.sub("-", source_device).strip()[:43].rstrip()
    return f"{name}-{digest}" if name else f"device-{digest}"


# KEYS = the integration's GCRA key, its created-devices counter; ARGV = interval µs, burst, max
_TAKE = GCRA_TAKE_LUA + """
if tonumber(redis.call('GET', KEYS[2]) or '0') >= tonumber(ARGV[3]) then return -1 end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local wait = gcra_take(KEYS[1], now, tonumber(ARGV[1]), tonumber(ARGV[2]), 1)
if wait > 0 then return wait end
redis.call('INCR', KEYS[2])
return 0
"""

_GIVE_BACK = """
if tonumber(redis.call('GET', KEYS[1]) or '0') > 0 then redis.call('DECR', KEYS[1]) end
return 0
"""


@dataclass(frozen=True, slots=True)
class Limit:
    """One integration's auto-provisioning limits (its ``provision_*`` configuration)."""

    rate: float
    burst: int
    max: int


class Limits:
    """The creation limits of every integration, shared by all replicas through Redis."""

    def __init__(self, redis: Redis, keys: Keys, limits: Mapping[tuple[str, str], Limit]) -> None:
        self._keys = keys
        self._limits = dict(limits)
        self._take = redis.register_script(_TAKE)
        self._give_back = redis.register_script(_GIVE_BACK)

    async def take(self, source: str, integration: str, device: str) -> None:
        """Count one creation for the integration, or raise (``provision_limit`` /
        ``provision_rate``: module docstring). No limit configured: nothing to count."""
        lim = self._limits.get((source, integration))
        if lim is None:
            return
        reply = int(await self._take(
            keys=[self._keys.provision_rate(source, integration),
                  self._keys.provisioned(source, integration)],
            args=[int(1_000_000 / lim.rate), lim.burst, lim.max]))
        if reply == -1:
            metrics.PROVISIONED.labels(integration, "limit").inc()
            raise Permanent(f"not creating {device!r}: integration {integration!r} reached its "
                            f"provision_max of {lim.max} devices", reason=Reason.PROVISION_LIMIT)
        if reply > 0:
            metrics.PROVISIONED.labels(integration, "rate_limited").inc()
            raise Retryable(f"not creating {device!r} yet: integration {integration!r} creates "
                            f"at most {lim.rate:g} devices per second",
                            reason=Reason.PROVISION_RATE, retry_after_s=reply / 1_000_000)

    async def give_back(self, source: str, integration: str) -> None:
        """A creation counted by :meth:`take` did not happen."""
        if (source, integration) in self._limits:
            await self._give_back(keys=[self._keys.provisioned(source, integration)])


class Provisioner:
    def __init__(
        self,
        redis: Redis,
        keys: Keys,
        registry: Registry,
        platform: Platform | None,
        *,
        lock_ms: int = 30_000,
        wait_s: float = 20.0,
        limits: Limits | None = None,
    ) -> None:
        self._redis = redis
        self._keys = keys
        self._registry = registry
        self._platform = platform
        self._lock_ms = lock_ms
        self._wait_s = wait_s
        self._limits = limits
        #: Device keys whose metafield failed recently → when to try again (monotonic).
        self._meta_retry: dict[str, float] = {}

    async def ensure(self, key: str, template: str, template_id: str | None) -> Device:
        """The registered device for ``key``, creating it in Blynk if needed (see module doc)."""
        source, integration, device = split_key(key)
        if self._platform is None:
            raise Permanent("auto-provisioning needs `blynk.platform` in the configuration",
                            reason=Reason.PROVISION_FAILED)
        if not template_id:
            raise Permanent(f"template {template!r} has no Blynk template `id` to create "
                            f"device {device!r} from", reason=Reason.PROVISION_FAILED)
        lock = Lease(self._redis, self._keys.provision_lock(source, integration, device),
                     uuid.uuid4().hex, ttl_ms=self._lock_ms)
        deadline = time.monotonic() + self._wait_s
        delay = 0.005
        while True:
            if await lock.acquire():
                try:
                    return await self._create_locked(key, template, template_id)
                finally:
                    await lock.release()
            # Someone else is creating it: wait for the row (or for the lock to go).
            dev = (await self._registry.load([key]))[key]
            if dev is not None:
                return dev
            if time.monotonic() > deadline:
                raise Retryable(f"device {device!r} is still being provisioned elsewhere",
                                reason=Reason.PROVISION_PENDING)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.25)

    async def _create_locked(self, key: str, template: str, template_id: str) -> Device:
        assert self._platform is not None
        source, integration, device = split_key(key)
        dev = (await self._registry.load([key]))[key]
        if dev is not None:  # created while we waited for the lock
            return dev
        if self._limits is not None:
            await self._limits.take(source, integration, device)
        try:
            created = await self._platform.create_device(template_id, device_name(device))
        except Retryable:
            metrics.PROVISIONED.labels(integration, "retry").inc()
            await self._give_back(source, integration)
            raise
        except Permanent as exc:
            metrics.PROVISIONED.labels(integration, "failed").inc()
            await self._give_back(source, integration)
            raise Permanent(f"creating {device!r} from template {template_id}: {exc.detail}",
                            reason=Reason.PROVISION_FAILED) from exc
        dev = await self._registry.register(key, token=created.token, template=template,
                                            blynk_id=created.id, meta_pending=True)
        metrics.PROVISIONED.labels(integration, "created").inc()
        log.info("provisioned %s as Blynk device %s (template %s)", key, created.id, template_id)
        return await self.finish(dev, now=True)

    async def _give_back(self, source: str, integration: str) -> None:
        if self._limits is not None:
            await self._limits.give_back(source, integration)

    async def finish(self, dev: Device, *, now: bool = False) -> Device:
        """Set the metafield of a provisioned device whose row says ``meta_pending``.

        The creator calls it at once (``now``); a worker that merely finds the flag waits
        ``META_RETRY_S`` first (the creator is likely still at it), and so does a retry after a
        retryable failure. Never raises for Blynk errors: a permanent one is logged, counted and
        given up (the device works without its metafield).
        """
        if not dev.meta_pending or self._platform is None or dev.blynk_id is None:
            return dev
        if not now:
            if len(self._meta_retry) > 10_000:
                self._meta_retry.clear()
            due = self._meta_retry.setdefault(dev.key, time.monotonic() + META_RETRY_S)
            if time.monotonic() < due:
                return dev
        source, integration, device = split_key(dev.key)
        name = METAFIELD.get(source, "Device")
        try:
            await self._platform.set_metafield(dev.blynk_id, name, device)
        except Retryable as exc:
            self._meta_retry[dev.key] = time.monotonic() + META_RETRY_S
            metrics.PROVISIONED.labels(integration, "metafield_retry").inc()
            log.warning("metafield %r of %s not set yet: %s", name, dev.key, exc.detail)
            return dev
        except Permanent as exc:
            metrics.PROVISIONED.labels(integration, "metafield_failed").inc()
            log.error("metafield %r of %s cannot be set: %s", name, dev.key, exc.detail)
        self._meta_retry.pop(dev.key, None)
        await self._registry.metafield_done(dev.key)
        return replace(dev, meta_pending=False)
