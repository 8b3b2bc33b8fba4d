"""The one finish of a device write: record and ack (group-committed), dead-letter, or retry.

:meth:`Committer.finish` takes a device write's :class:`~workers.egress.sender.Result` and
resolves every in-flight entry of the device, then the write's ``pending`` future:

* **Record and ack.** What Blynk now has (pin → event time) is merged into the device's record
  in memory; the record, when it changed, and the acks of the entries fully written are one
  :class:`Commit`. Commits of device writes finishing within ``COMMIT_LINGER_S`` (or while the
  previous call ran) share one commit (:meth:`pipeline.order.LastWritten.commit`: a
  ``WATCH``ed transaction on one Redis, a script per partition on a cluster), which first
  checks that each partition's lease still holds the token of the ownership the writes were
  made under (:attr:`pipeline.lease.Lease.token`, one per acquisition). An entry is acked
  only after Blynk took everything it carried, or its values proved stale.
* **Fenced.** A partition whose lease did not hold that token any more (another replica's, or
  this one's own later acquisition) had nothing recorded or acked: it is given up at once
  (``lost``, counted in ``bb_egress_fenced_total``) unless already given up, and its entries
  stay pending for the new owner. A write that found its partition's lease not certainly held
  before sending (``Result.fenced``) is retried shortly, unless the partition is gone
  meanwhile. Nothing is done for a device whose partition is gone.
* **Dead-letter** the entries that carried a pin Blynk refused (original entry kept, reason and
  detail per pin) — after the commit, so the rest of the device's entries are acked first.
  Fenced like the commit (:meth:`pipeline.streams.StreamReader.dead_letter_fenced`, with the
  token of the ownership the write was made under): a dead letter that reaches Redis after the
  partition moved on writes and acks nothing (its entries are the new ownership's, which
  writes or dead-letters them itself: no duplicate dead letters); the partition is given up.
* **Invalid token**: all the device's in-flight entries are dead-lettered (fenced alike); the
  device is marked broken in the registry only if the refused token is the one its row holds
  (not one an uplink carried itself, not one replaced since).
* **Count superseded values** (``bb_superseded_values_total``, and :meth:`Committer.take_superseded`
  for the shared counter) and stale ones once a write is over, not when it is retried: a
  retried write is coalesced again, with whatever arrived meanwhile.
* **Retry** (a retryable answer, or a Redis error while committing): the entries go back to the
  device's queue, in memory, never acked and never re-read; after a 429 the device waits for
  ``Retry-After`` (or capped jittered backoff), kept in its rate limit (in its record,
  :mod:`pipeline.order`, written with its next commit); otherwise it waits for its server's
  backoff.

The common case (everything written) finishes from the commit's callback, without a task; the
dead-letter and invalid-token cases run in a tracked task. Redis errors while dead-lettering
leave the entries pending in Redis: they come back and are dead-lettered again.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from redis.exceptions import RedisError

from pipeline import metrics
from pipeline.batching import GroupCommit
from pipeline.blynk.outcomes import Fail, Retry
from pipeline.coalesce import DevicePlan
from pipeline.consumer import backoff_s
from pipeline.errors import Reason
from pipeline.keys import GROUP_EGRESS
from pipeline.lease import Lease
from pipeline.order import LastWritten, PartitionCommit, Record
from pipeline.redact import mask
from pipeline.registry import Registry, split_key
from pipeline.streams import DeadItem, Entry, StreamReader, now_ms
from workers.egress.queue import DeviceQueue, Held, HeldWrites
from workers.egress.scheduler import Servers
from workers.egress.sender import Result, Spawn

log = logging.getLogger("blynk_bridge.egress")

#: Device writes finishing within this long share one record-and-ack commit. It delays
#: only the ack and the device's next write, never a Blynk request.
COMMIT_LINGER_S = 0.005
#: A write that found its partition's lease not certainly held waits this long before trying
#: again (the lease is being renewed, or the partition is about to be given up).
FENCED_RETRY_S = 0.05


@dataclass(slots=True)  # not frozen: a frozen one's __init__ costs ~4x (0.56 vs 0.15 µs)
class Commit:
    """One device write's record and acks."""

    partition: int
    device_key: str
    #: The device's record, when it changed (else only acks).
    record: Record | None
    acks: list[Entry]
    #: The device as held when its write finished: ``gone`` once its partition was given up.
    dev: DeviceQueue


_Dead = list[DeadItem]


class Committer:
    """Finishes device writes (see module docstring)."""

    def __init__(self, order: LastWritten, reader: StreamReader,
                 registry: Registry, held: HeldWrites, servers: Servers, spawn: Spawn,
                 max_backoff_s: float, *, stream_of: Callable[[int], str],
                 lease_of: Callable[[int], Lease], lost: Callable[[int], None]) -> None:
        self._order = order
        #: Partition → its writes stream, its lease (whose token is the latest acquisition's);
        #: a fenced partition is given up through ``lost``.
        self._stream_of = stream_of
        self._lease_of = lease_of
        self._lost = lost
        self._reader = reader
        self._registry = registry
        self._held = held
        self._servers = servers
        self._spawn = spawn
        self._max_backoff_s = max_backoff_s
        self.commits: GroupCommit[Commit, bool] = GroupCommit(
            self.commit_many, linger_s=COMMIT_LINGER_S, name="egress-group-commit")
        # device key → its integration's bb_written counter child (the split is per device, not
        # per write; cleared past _WRITTEN_CACHE devices so a huge fleet does not grow it), and
        # integration → that child (labels() is not free: a cleared device cache refills cheaply)
        self._written: dict[str, Any] = {}
        self._written_by_integration: dict[str, Any] = {}
        self._dropped_stale = metrics.EGRESS_DROPPED.labels("stale")
        #: Superseded values of finished writes not yet taken by :meth:`take_superseded`.
        self._superseded = 0

    def finish(self, dev: DeviceQueue, plan: DevicePlan, result: Result,
               pending: asyncio.Future[None]) -> None:
        """Resolve the device's in-flight entries after its write; resolves ``pending`` once
        they are (see module docstring)."""
        self._servers.release_probe(plan.server)
        if result.values:
            self._count_written(dev.key, result.values)
        if dev.gone:  # its partition was given up: its entries are pending for the next owner
            _resolve(pending)
            return
        if result.fenced:
            self._held.requeue(dev, not_before=time.monotonic() + FENCED_RETRY_S)
            _resolve(pending)
            return
        dead: _Dead = []
        ok: list[Held]
        if result.invalid_token is not None or result.again is not None:
            ok = []
        elif not result.failed and not result.history_failed:
            ok = dev.inflight
        else:
            ok, dead = sort_out(dev.inflight, result)
        record = dev.record
        if record is not None and (record.merge(result.written) or record.dirty):
            record.dirty = False
        else:
            record = None
        commit = self.commits.submit(
            Commit(dev.partition, dev.key, record, [h.entry for h in ok], dev))
        commit.add_done_callback(functools.partial(
            self._committed, dev, plan, result, ok, dead, now_ms(), pending))

    def _committed(self, dev: DeviceQueue, plan: DevicePlan, result: Result, ok: list[Held],
                   dead: _Dead, wall: int, pending: asyncio.Future[None],
                   commit: asyncio.Future[bool]) -> None:
        again = result.again
        exc = asyncio.CancelledError() if commit.cancelled() else commit.exception()
        if exc is None:
            if not commit.result() and not dev.gone:
                # Fenced off: nothing recorded or acked. A write of an ownership given up since
                # (``gone``) is refused as it should be and says nothing of a later ownership.
                self._lost(dev.partition)
        else:
            if isinstance(exc, RedisError):
                log.warning("egress: recording %s failed (%s); its write is retried",
                            dev.key, exc)
            else:
                log.error("egress: recording %s failed", dev.key, exc_info=exc)
            again = again or Retry(Reason.REDIS, str(exc))
            if dev.record is not None:
                dev.record.dirty = True  # merged in memory, not stored: the next commit does
        if dev.gone:
            _resolve(pending)
            return
        if result.invalid_token is not None:
            self._spawn(self._invalid_token(dev, plan, result.invalid_token,
                                            self._fence(dev), pending), f"egress-{dev.key}")
            return
        if again is not None:
            self._back_off(dev, again)
            _resolve(pending)
            return
        # Counted once the write is over (a retried write is coalesced again, with more).
        if plan.superseded:
            metrics.SUPERSEDED.inc(plan.superseded)
            self._superseded += plan.superseded
        if plan.stale:
            self._dropped_stale.inc(plan.stale)
        if dead:
            self._spawn(self._dead_letter(dev, ok, dead, wall, self._fence(dev), pending),
                        f"egress-{dev.key}")
        else:
            self._written_ok(dev, ok, wall)
            _resolve(pending)

    def _fence(self, dev: DeviceQueue) -> tuple[str, str]:
        """The ``(lease key, token)`` fencing a dead letter of ``dev``'s write: taken when the
        write finished, not gone, so of the partition's latest acquisition (see
        :meth:`commit_many`). Only the dead-letter paths need it, not every write."""
        lease = self._lease_of(dev.partition)
        return lease.key, lease.token

    def take_superseded(self) -> int:
        """Superseded values of the writes finished since the last call (for the shared
        counter ``blynk-bridge status`` shows)."""
        n, self._superseded = self._superseded, 0
        return n

    def _written_ok(self, dev: DeviceQueue, ok: Sequence[Held], wall: int) -> None:
        dev.attempts = 0
        dev.history_done.clear()
        for h in ok:
            metrics.LATENCY.observe(max(0, wall - h.write.received_ts_ms) / 1000)
        self._held.drop(dev, time.monotonic())

    async def _dead_letter(self, dev: DeviceQueue, ok: Sequence[Held], dead: _Dead, wall: int,
                           fence: tuple[str, str], pending: asyncio.Future[None]) -> None:
        try:
            try:
                self._fenced_off(dev, not await asyncio.shield(
                    self._reader.dead_letter_fenced(dead, *fence)))
            except RedisError as exc:
                # Not acked: the entries stay pending and come back (then dead again).
                log.warning("egress: dead-lettering %d entries failed (%s)", len(dead), exc)
            if not dev.gone:  # else its entries were forgotten (and may be held again)
                self._written_ok(dev, ok, wall)
        finally:
            _resolve(pending)

    def _fenced_off(self, dev: DeviceQueue, refused: bool) -> None:
        """A fenced dead letter was refused: the partition is another ownership's (nothing
        was written or acked); give it up unless already given up."""
        if refused and not dev.gone:
            self._lost(dev.partition)

    async def _invalid_token(self, dev: DeviceQueue, plan: DevicePlan, outcome: Fail,
                             fence: tuple[str, str], pending: asyncio.Future[None]) -> None:
        try:
            try:
                # Broken only if Blynk refused the token the registry holds for the device: a
                # token carried by an uplink (keyed apart, no row) or replaced since says
                # nothing about it.
                broken = await self._registry.mark_broken(dev.key, Reason.INVALID_TOKEN,
                                                          outcome.detail, token=plan.token)
                log.warning("egress: device %s: invalid token %s; %s%d entries dead",
                            dev.key, mask(plan.token),
                            "marked broken, " if broken else "", len(dev.inflight))
                self._fenced_off(dev, not await asyncio.shield(self._reader.dead_letter_fenced(
                    [(h.entry, Reason.INVALID_TOKEN, outcome.detail) for h in dev.inflight],
                    *fence)))
            except RedisError as exc:
                log.warning("egress: dead-lettering %s failed (%s); retried", dev.key, exc)
                self._held.requeue(dev, not_before=time.monotonic() + backoff_s(1))
                return
            if not dev.gone:
                self._held.drop(dev, time.monotonic())
        finally:
            _resolve(pending)

    def _back_off(self, dev: DeviceQueue, outcome: Retry) -> None:
        """Keep the entries in memory and try again later (never re-read, never acked)."""
        now = time.monotonic()
        if outcome.status == 429:
            dev.attempts += 1
            delay = outcome.retry_after_s or backoff_s(dev.attempts, self._max_backoff_s)
            if dev.record is not None:  # kept with the record: a next owner waits too
                dev.record.defer(delay)
                dev.record.dirty = True
        else:
            delay = self._servers.wait_s(
                dev.inflight[-1].write.server if dev.inflight else None, now)
        self._held.requeue(dev, not_before=now + delay)

    def _count_written(self, device_key: str, values: int) -> None:
        counter = self._written.get(device_key)
        if counter is None:
            if len(self._written) >= _WRITTEN_CACHE:
                self._written.clear()
            integration = _integration_of(device_key)
            counter = self._written_by_integration.get(integration)
            if counter is None:
                if len(self._written_by_integration) >= _WRITTEN_CACHE:
                    self._written_by_integration.clear()
                counter = self._written_by_integration[integration] = metrics.WRITTEN.labels(
                    integration)
            self._written[device_key] = counter
        counter.inc(values)

    async def commit_many(self, items: list[Commit]) -> list[bool]:
        """Records and acks of many device writes in one commit (:meth:`pipeline.order
        .LastWritten.commit`); per item, whether its partition's lease still held the token.

        A write whose partition was given up since it finished (``gone``) has nothing recorded
        or acked, even if the partition was taken back meanwhile: its record may predate
        another owner's writes, and its entries were taken over again. Every other write was
        made under the partition's latest acquisition (a partition is given up, its writes
        ``gone``, before it can be taken again), so its commit carries that acquisition's token:
        a call that reaches Redis only after the partition was lost and taken back (by this
        replica too) finds another token and does nothing."""
        parts: dict[int, PartitionCommit] = {}
        for c in items:
            if c.dev.gone:
                continue
            part = parts.get(c.partition)
            if part is None:
                part = parts[c.partition] = PartitionCommit(
                    self._stream_of(c.partition), self._lease_of(c.partition).token)
            if c.record is not None:
                part.records.append((c.device_key, c.record))
            part.acks.extend(e.id for e in c.acks)
        done = await self._order.commit(parts, GROUP_EGRESS)
        return [done.get(c.partition, True) for c in items]


def _resolve(pending: asyncio.Future[None]) -> None:
    """Mark a device write resolved. A stop that ran out of time cancelled the stand-ins of
    the writes it stopped waiting for (their entries stay pending in Redis); an answer that
    arrives after that finds its stand-in already done and must not raise from a callback."""
    if not pending.done():
        pending.set_result(None)


def sort_out(inflight: Sequence[Held], result: Result) -> tuple[list[Held], _Dead]:
    """Split a partly refused write's entries: fully written, and dead with the reason of their
    first refused pin and a detail naming every refused pin."""
    ok: list[Held] = []
    dead: _Dead = []
    for h in inflight:
        bad = [(pin, *result.failed[pin]) for pin in h.write.pins if pin in result.failed]
        for pin in h.write.pins:
            refused = result.history_failed.get(pin)
            if refused is not None and h.write.event_ts_ms in refused[2]:
                bad.append((pin, refused[0], refused[1]))
        if bad:
            detail = "; ".join(f"{pin}: {reason}: {text}" for pin, reason, text in bad)
            dead.append((h.entry, bad[0][1], detail[:2000]))
        else:
            ok.append(h)
    return ok, dead


_WRITTEN_CACHE = 10_000


def _integration_of(device_key: str) -> str:
    """``tts:farm:dev-1`` (or ``…#<token hash>``) → ``farm``; ``-`` for a key of another shape."""
    try:
        return split_key(device_key)[1]
    except ValueError:
        return "-"
