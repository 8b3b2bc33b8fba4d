"""A Redis lease: at most one owner of a named resource at a time, across processes.

``SET key owner NX PX ttl`` acquires; a Lua compare-and-extend renews (only the owner can);
a Lua compare-and-delete releases (only the owner can). An owner that stops renewing — killed,
frozen, cut off from Redis — loses the lease after ``ttl_ms`` and a standby acquires it.

Safety rests on the owner giving up *before* Redis expires the key: :meth:`Lease.valid` is
false from ``ttl_ms - margin_ms`` after the last successful acquire/renew was *sent*, so a
renewal that fails or is late makes the owner stop at once, not when a standby already took
over. :func:`hold` packages that: it runs the owner's work while renewing and cancels the work
the moment the lease is not certainly held.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from redis.exceptions import RedisError

from pipeline.lifecycle import cancel_and_wait, wait_event
from pipeline.streams import Redis

log = logging.getLogger("blynk_bridge.lease")

_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


class Lease:
    """One named lease as seen by one would-be owner."""

    def __init__(self, redis: Redis, key: str, owner: str, ttl_ms: int = 5_000,
                 margin_ms: int | None = None) -> None:
        if ttl_ms < 100:
            raise ValueError("lease ttl must be at least 100 ms")
        self._redis = redis
        self.key = key
        self.owner = owner
        self.ttl_ms = ttl_ms
        #: Give up this long before Redis would expire the key (clock and network slack).
        self.margin_ms = margin_ms if margin_ms is not None else max(50, ttl_ms // 5)
        self._valid_until = 0.0
        self._renew = redis.register_script(_RENEW)
        self._release = redis.register_script(_RELEASE)

    def valid(self) -> bool:
        """True while this owner certainly holds the lease (by its own clock)."""
        return time.monotonic() < self._valid_until

    def remaining_s(self) -> float:
        """Seconds this owner may still rely on the lease without renewing it."""
        return max(0.0, self._valid_until - time.monotonic())

    async def acquire(self) -> bool:
        """Take the lease if nobody holds it; True when this owner now holds it."""
        sent = time.monotonic()
        ok = await self._redis.set(self.key, self.owner, nx=True, px=self.ttl_ms)
        if ok:
            self._valid_until = sent + (self.ttl_ms - self.margin_ms) / 1000
        return bool(ok)

    async def renew(self) -> bool:
        """Extend the lease; False (and :meth:`valid` false) when another owner holds it."""
        sent = time.monotonic()
        ok = await self._renew(keys=[self.key], args=[self.owner, self.ttl_ms])
        if ok:
            self._valid_until = sent + (self.ttl_ms - self.margin_ms) / 1000
        else:
            self._valid_until = 0.0
        return bool(ok)

    async def release(self) -> bool:
        """Give the lease up if still ours, so a standby takes over without waiting."""
        self._valid_until = 0.0
        return bool(await self._release(keys=[self.key], args=[self.owner]))

    async def holder(self) -> str | None:
        raw = await self._redis.get(self.key)
        return raw.decode() if isinstance(raw, bytes) else raw


async def hold(
    lease: Lease,
    work: Callable[[], Coroutine[Any, Any, None]],
    stop: asyncio.Event,
    *,
    on_acquired: Callable[[], Awaitable[None]] | None = None,
    on_lost: Callable[[], Awaitable[None]] | None = None,
    may_acquire: Callable[[], Awaitable[bool]] | None = None,
) -> None:
    """Until ``stop``: acquire the lease (retrying every ``ttl/4``), run ``work`` while it is
    held, renew every ``ttl/4``, and cancel ``work`` as soon as the lease is lost or can no
    longer be confirmed. On ``stop`` the work is cancelled and the lease released.

    ``work`` should run until cancelled; if it returns or raises, the lease is released and
    acquisition starts over (so a crashing owner hands over to a healthy standby).
    ``may_acquire``, when given, is asked before each attempt: ``False`` skips it (this
    would-be owner should leave the lease to a better placed one).
    """
    interval = lease.ttl_ms / 4000
    while not stop.is_set():
        try:
            acquired = (may_acquire is None or await may_acquire()) and await lease.acquire()
        except RedisError as exc:
            log.warning("lease %s: cannot reach Redis (%s)", lease.key, exc)
            acquired = False
        if not acquired:
            await wait_event(stop, interval)
            continue
        log.info("lease %s acquired by %s", lease.key, lease.owner)
        if on_acquired is not None:
            await on_acquired()
        task: asyncio.Task[None] = asyncio.create_task(work(), name=f"lease-work:{lease.key}")
        try:
            await _renew_while(lease, task, stop, interval)
        finally:
            # Reaped without swallowing a cancel of the caller (a stop past its grace); the
            # lease is released only once the work has certainly ended, else it expires.
            await cancel_and_wait([task], timeout_s=lease.ttl_ms / 1000)
            ended = task.done()
            if ended and not task.cancelled() and task.exception() is not None:
                log.error("lease %s: owner work failed", lease.key, exc_info=task.exception())
            if not ended:
                log.warning("lease %s: owner work did not end when cancelled; the lease is "
                            "left to expire", lease.key)
            else:
                try:
                    await lease.release()
                except RedisError as exc:
                    log.warning("lease %s: release failed (%s); it expires by itself",
                                lease.key, exc)
            if on_lost is not None:
                await on_lost()
        if not stop.is_set():
            log.info("lease %s given up by %s", lease.key, lease.owner)
            # Let another replica have a turn when the work ended by itself.
            await wait_event(stop, interval)


async def _renew_while(
    lease: Lease, task: asyncio.Task[None], stop: asyncio.Event, interval: float
) -> None:
    """Renew until ``stop``, the work ends, or the lease is not certainly held."""
    stopper = asyncio.create_task(stop.wait())
    try:
        while True:
            timeout = min(interval, lease.remaining_s())
            done, _ = await asyncio.wait({task, stopper}, timeout=timeout,
                                         return_when=asyncio.FIRST_COMPLETED)
            if done:
                return
            if not lease.valid():
                log.warning("lease %s: not renewed in time; stopping at once", lease.key)
                return
            try:
                if not await lease.renew():
                    log.warning("lease %s: taken by another owner; stopping", lease.key)
                    return
            except RedisError as exc:
                # Keep the work running while the lease is still certainly ours; the next
                # iteration stops it when the validity runs out.
                log.warning("lease %s: renewal failed (%s)", lease.key, exc)
    finally:
        stopper.cancel()
