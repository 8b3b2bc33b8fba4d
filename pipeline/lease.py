"""A Redis lease: at most one owner of a named resource at a time, across processes.

``SET key token NX PX ttl`` acquires; a Lua compare-and-extend renews (only the owner can);
a Lua compare-and-delete releases (only the owner can). An owner that stops renewing — killed,
frozen, cut off from Redis — loses the lease after ``ttl_ms`` and a standby acquires it.

**The value is a token per acquisition** (:attr:`Lease.token`: ``"<owner> <nonce>"``, a fresh
random nonce each time), not the owner's name: renew and release compare the whole token, and
so does anything fenced by the lease (egress's commit and dead letters), with the token
of the ownership its work started under. A request sent under an earlier ownership that reaches
Redis after the same owner lost and re-took the lease is refused, as a stranger's would be.
:func:`owner_of` (and :meth:`Lease.holder`) reads the owner's name back.

Safety rests on the owner giving up *before* Redis expires the key: :meth:`Lease.valid` is
false from ``ttl_ms - margin_ms`` after the last successful acquire/renew was *sent*, so a
renewal that fails or is late makes the owner stop at once, not when a standby already took
over. :func:`hold` packages that: it runs the owner's work while renewing and cancels the work
the moment the lease is not certainly held.

:class:`PartitionLeases` shares ``partitions`` among replicas, one lease each (blynk-sessions'
device sessions, egress's writes partitions): each replica heartbeats in a sorted set (on
Redis's clock), holds at most :func:`fair_share` of the partitions, takes free ones up to it,
gives extras back, and drops a partition the moment its lease is not certainly held
(:meth:`PartitionLeases.fence`, a task that needs no Redis). The owner's work per partition is
its callbacks'.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import secrets
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from redis.exceptions import RedisError

from pipeline import metrics
from pipeline.consumer import backoff_s
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

# KEYS[1] = the heartbeats (replica → until when, ms); ARGV = this replica, ttl ms. On Redis's
# clock: a replica whose clock is ahead by more than the ttl would otherwise remove every other
# heartbeat in each round, count itself alone and take every partition it can.
_HEARTBEAT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
return redis.call('ZCARD', KEYS[1])
"""


def new_token(owner: str) -> str:
    """A lease value unique to one acquisition by ``owner`` (module docstring)."""
    return f"{owner} {secrets.token_hex(8)}"


def owner_of(value: bytes | str) -> str:
    """The owner's name in a lease value (:func:`new_token`); a value without a nonce is
    returned whole."""
    text = value.decode() if isinstance(value, bytes) else value
    owner, sep, _ = text.rpartition(" ")
    return owner if sep else text


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
        #: The value of this owner's latest acquisition ("" before the first): what renew,
        #: release and fenced writes compare the lease with. Kept after the lease is lost or
        #: released, so a write of that ownership still carries it (and is refused).
        self.token = ""
        self._renew = redis.register_script(_RENEW)
        self._release = redis.register_script(_RELEASE)

    def valid(self) -> bool:
        """True while this owner certainly holds the lease (by its own clock)."""
        return time.monotonic() < self._valid_until

    def remaining_s(self) -> float:
        """Seconds this owner may still rely on the lease without renewing it."""
        return max(0.0, self._valid_until - time.monotonic())

    async def acquire(self) -> bool:
        """Take the lease if nobody holds it, under a new :attr:`token`; True when this owner
        now holds it."""
        sent = time.monotonic()
        token = new_token(self.owner)
        ok = await self._redis.set(self.key, token, nx=True, px=self.ttl_ms)
        if ok:
            self.token = token
            self._valid_until = sent + (self.ttl_ms - self.margin_ms) / 1000
        return bool(ok)

    async def renew(self) -> bool:
        """Extend the lease; False (and :meth:`valid` false) when another ownership holds it
        (another owner, or this one's later acquisition)."""
        sent = time.monotonic()
        ok = await self._renew(keys=[self.key], args=[self.token, self.ttl_ms])
        if ok:
            self._valid_until = sent + (self.ttl_ms - self.margin_ms) / 1000
        else:
            self._valid_until = 0.0
        return bool(ok)

    async def release(self) -> bool:
        """Give the lease up if still ours, so a standby takes over without waiting."""
        self._valid_until = 0.0
        return bool(await self._release(keys=[self.key], args=[self.token]))

    async def holder(self) -> str | None:
        """The name of the lease's owner (:func:`owner_of`), ``None`` when nobody holds it."""
        raw = await self._redis.get(self.key)
        return None if raw is None else owner_of(raw)


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


def fair_share(partitions: int, replicas: int) -> int:
    """Partitions one replica may hold: adding a replica moves a proportional share."""
    return math.ceil(partitions / max(1, replicas))


class PartitionLeases:
    """``partitions`` shared among live replicas, one :class:`Lease` per partition (module
    docstring). ``on_acquired(p)`` runs once a partition is taken (it is in :attr:`owned`
    already); ``on_dropped(p, why)`` once it is given up (it has left :attr:`owned` already;
    ``why``: ``lease_lost`` not renewed in time, ``lease_taken`` another owner has it,
    ``rebalance`` a share to hand over, or what :meth:`drop` was given).

    A ``rebalance`` hand-over runs in a task of its own: ``on_dropped`` may wait (egress waits
    for the partition's writes under way) while :meth:`balance` goes on renewing the partitions
    kept. Its lease is released once ``on_dropped`` returned — not if it returned ``False``
    (work of the partition may still be under way), failed or was cancelled: then the lease
    lapses by itself — and the partition is not taken again meanwhile."""

    def __init__(self, redis: Redis, *, lease_key: Callable[[int], str], owners_key: str,
                 owner: str, partitions: int, ttl_ms: int,
                 on_acquired: Callable[[int], Awaitable[None]],
                 on_dropped: Callable[[int, str], Awaitable[bool | None]]) -> None:
        self._redis = redis
        self.owner = owner
        self.partitions = partitions
        self.ttl_ms = ttl_ms
        self._owners_key = owners_key
        self.leases = [Lease(redis, lease_key(p), owner, ttl_ms=ttl_ms)
                       for p in range(partitions)]
        self._heartbeat = redis.register_script(_HEARTBEAT)
        self.owned: set[int] = set()
        #: Live replicas at the last :meth:`balance` (heartbeats), this one included.
        self.replicas = 1
        self._on_acquired = on_acquired
        self._on_dropped = on_dropped
        self._rng = random.Random()
        #: Partition → its hand-over under way (rebalance: ``on_dropped``, then the release).
        self.handing: dict[int, asyncio.Task[None]] = {}
        self._standby_logged = False

    def share(self) -> int:
        return fair_share(self.partitions, self.replicas)

    def report(self, stage: str, streams: str, work: str) -> None:
        """After an ownership round of a stage reading ``streams`` partitions: the
        ``bb_partitions_owned`` gauge, and a warm standby says so once (again after it owned
        a partition)."""
        owned = len(self.owned)
        metrics.PARTITIONS_OWNED.labels(stage).set(owned)
        if owned:
            self._standby_logged = False
        elif not self._standby_logged:
            self._standby_logged = True
            log.info("%s: warm standby: %d live replicas for %d %s partitions "
                     "(redis.partitions); this one %s once a partition is free",
                     stage, self.replicas, self.partitions, streams, work)

    async def take_share(self, stop: asyncio.Event, stage: str) -> None:
        """Burst mode: own this replica's share of the partitions before reading (another
        replica's partitions are waited for until their leases lapse or are released); Redis
        errors are retried with backoff until ``stop``."""
        failures = 0
        while not stop.is_set():
            try:
                await self.balance()
                failures = 0
                if len(self.owned) >= self.share():
                    return
                wait = self.ttl_ms / 4000
            except RedisError as exc:
                failures += 1
                log.warning("%s: taking partitions failed (%s); retrying", stage, exc)
                wait = backoff_s(failures)
            await wait_event(stop, wait)

    async def balance(self) -> None:
        """Heartbeat, renew the owned leases, give extras back, take free ones up to the
        share. Raises ``RedisError``."""
        self.replicas = max(1, int(await self._heartbeat(keys=[self._owners_key],
                                                         args=[self.owner, self.ttl_ms])))
        for p in list(self.owned):
            if not await self.leases[p].renew():
                await self.drop(p, "lease_taken")
        share = self.share()
        while len(self.owned) > share:
            # Not awaited here: a hand-over that waits must not hold up renewing the others.
            p = max(self.owned)
            self.owned.discard(p)
            self.handing[p] = asyncio.create_task(self._hand_over(p),
                                                  name=f"hand-over:{self.leases[p].key}")
        free = [p for p in range(self.partitions)
                if p not in self.owned and p not in self.handing]
        self._rng.shuffle(free)
        for p in free:
            if len(self.owned) >= share:
                break
            if await self.leases[p].acquire():
                self.owned.add(p)
                await self._on_acquired(p)

    async def _hand_over(self, p: int) -> None:
        """A rebalance: ``on_dropped``, then the release (class docstring)."""
        try:
            handed = await self._on_dropped(p, "rebalance") is not False
        except Exception:  # a defect: logged; the lease lapses by itself
            log.exception("partition %d: handing it over failed", p)
        else:
            if handed:
                await self.release(p)
        finally:
            self.handing.pop(p, None)

    async def run(self, stop: asyncio.Event, *, name: str,
                  after: Callable[[], None] | None = None) -> None:
        """:meth:`balance` every ttl/4 (then ``after()``) until ``stop``; then the hand-overs
        under way are waited for and the heartbeat is removed (the leases stay: the caller
        drops and releases them once its work is over)."""
        interval = self.ttl_ms / 4000
        while not stop.is_set():
            try:
                await self.balance()
            except RedisError as exc:
                log.warning("%s ownership: %s", name, exc)
            if after is not None:
                after()
            await wait_event(stop, interval)
        if self.handing:  # a cancel of this wait leaves them running: they end by themselves
            await asyncio.wait(list(self.handing.values()))
        await self.leave()

    async def leave(self) -> None:
        """Remove this replica's heartbeat (else it simply expires)."""
        with contextlib.suppress(RedisError):
            await self._redis.zrem(self._owners_key, self.owner)

    async def fence(self, stop: asyncio.Event) -> None:
        """Drop a partition the moment its lease is no longer certainly held. A task of its own
        and no Redis call: :meth:`run` may hang in a renewal (Redis frozen) while Redis expires
        the lease and another replica takes it."""
        # Wake at least twice per margin, so a lease acquired meanwhile is not overslept.
        cap = self.leases[0].margin_ms / 2000
        while not stop.is_set():
            for p in list(self.owned):
                if not self.leases[p].valid():
                    await self.drop(p, "lease_lost")
            wait = min((self.leases[p].remaining_s() for p in self.owned), default=cap)
            await wait_event(stop, min(cap, wait) + 0.001)

    async def drop(self, p: int, why: str) -> None:
        """Stop owning ``p`` (its lease is not released here)."""
        if p in self.owned:
            self.owned.discard(p)
            await self._on_dropped(p, why)

    async def release(self, p: int) -> None:
        """Give ``p``'s lease up (after :meth:`drop`), so another replica takes it at once."""
        with contextlib.suppress(RedisError):
            await self.leases[p].release()
