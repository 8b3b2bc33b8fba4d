"""The read → handle → ack loop every consuming stage (transform, egress, downlink) shares.

Contract: ``handle(entries)`` must ack or dead-letter every entry it was given (through the
reader), or raise; so must a *job* (below). A :class:`~pipeline.errors.Retryable` or Redis error
leaves the batch pending and backs off (after a Redis error that says nothing about the
entries — :data:`NOT_THE_ENTRIES` — the retry does not count as a delivery); any other
exception is a bug or a poison entry, so the batch is retried one entry at a time, and each
entry that keeps failing reaches ``max_deliveries`` and is dead-lettered alone — it never
blocks the entries behind it.

A stage may pass ``prepare``: it is called on each batch as soon as it is read (with
``prefetch``, while the batch before it is being handled) and returns the batch's handling as a
*job* — a no-argument coroutine function that replaces ``handle(entries)`` for that batch — or
``None`` to have ``handle`` do it. ``prepare`` must leave Redis's state alone (the job does the
writing), since a prepared batch may be released unhandled.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable

from redis.exceptions import AskError, ClusterError, RedisError, TryAgainError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from pipeline.errors import Retryable
from pipeline.lifecycle import until_stopped
from pipeline.streams import Entry, StreamReader

log = logging.getLogger("blynk_bridge.consumer")

Handler = Callable[[list[Entry]], Awaitable[None]]
#: One batch's handling, prepared (see the module docstring).
Job = Callable[[], Awaitable[None]]
Prepare = Callable[[list[Entry]], Awaitable[Job | None]]


#: Redis errors that say nothing about the entries of the batch they refused: Redis out of
#: reach, or a Redis Cluster slot moving (``TRYAGAIN``, redirections past redis-py's limit).
#: The batch's retry does not count as a delivery of its entries (:func:`_not_delivered`).
NOT_THE_ENTRIES = (RedisConnectionError, RedisTimeoutError, ClusterError, TryAgainError,
                   AskError)


def backoff_s(attempt: int, cap_s: float = 30.0) -> float:
    """Capped, jittered exponential backoff (aiomqtt's recipe)."""
    return min(cap_s, random.uniform(0, 1.5 ** min(10, attempt)))


async def consume(
    reader: StreamReader,
    handle: Handler,
    stop: asyncio.Event,
    *,
    until_idle: bool = False,
    max_backoff_s: float = 30.0,
    prefetch: bool = False,
    prepare: Prepare | None = None,
) -> None:
    """Feed batches to ``handle`` until ``stop`` is set, or, with ``until_idle``, until no
    entry is left to read (burst mode, for tests and benchmarks).

    A read in flight when ``stop`` is set is finished (it returns within ``block_ms``) and its
    batch handled, not cancelled: Redis may already have delivered those entries to this
    consumer, and a cancelled read would leave them pending under a name a restarted process
    does not have, until another consumer claims them after ``claim_idle_ms``.

    With ``prefetch``, the next read is issued when a batch is handed to ``handle``, so the
    Redis round trip overlaps the handling. Batches are still handled one at a time, in the
    order read, so entries are never reordered. When a batch is not fully handled (an
    exception, or an entry left pending), the prefetched batch is NOT handled: its entries stay
    pending, released (:meth:`~pipeline.streams.StreamReader.release`: that read does not count
    as a delivery) and :meth:`~pipeline.streams.StreamReader.retry_pending` delivers them again
    after the failed ones, in stream order.

    With ``prepare``, each batch read is first given to it (module docstring); a failure in
    ``prepare`` is logged and ``handle`` takes the batch instead.

    Once stopped, the reads the reader still has in flight are finished and their entries
    given back (:meth:`~pipeline.streams.StreamReader.close`; the cluster layout's other
    partitions).
    """
    await _consume(reader, handle, stop, until_idle, max_backoff_s, prefetch, prepare)
    await _close(reader)  # not when cancelled: a read in flight may wait on its master


async def _consume(reader: StreamReader, handle: Handler, stop: asyncio.Event, until_idle: bool,
                   max_backoff_s: float, prefetch: bool, prepare: Prepare | None) -> None:
    if prefetch:
        await _consume_prefetching(reader, handle, prepare, stop, until_idle, max_backoff_s)
        return
    await reader.ensure_group()
    failures = 0
    while not stop.is_set():
        try:
            entries, job = await _read(reader, prepare, not until_idle)
        except RedisError as exc:
            failures += 1
            log.warning("%s: reading failed (%s); retrying", reader.stage, exc)
            await _sleep(backoff_s(failures, max_backoff_s), stop)
            continue
        if not entries:
            if until_idle:
                return
            continue
        try:
            # Shielded: a cancellation after the grace period must not cut an ack in half.
            await asyncio.shield(_handle(reader, handle, entries, job))
            failures = 0
        except (Retryable, RedisError) as exc:
            failures += 1
            await _not_delivered(reader, entries, exc)
            reader.retry_pending()
            delay = getattr(exc, "retry_after_s", None) or backoff_s(failures, max_backoff_s)
            log.warning("%s: batch left pending (%s); retry in %.1fs", reader.stage, exc, delay)
            await _sleep(delay, stop)


async def _consume_prefetching(
    reader: StreamReader, handle: Handler, prepare: Prepare | None, stop: asyncio.Event,
    until_idle: bool, max_backoff_s: float,
) -> None:
    """:func:`consume` with ``prefetch`` (see there)."""
    await reader.ensure_group()
    failures = 0
    ahead: asyncio.Task[tuple[list[Entry], Job | None]] | None = None
    try:
        while ahead is not None or not stop.is_set():
            try:
                if ahead is None:
                    entries, job = await _read(reader, prepare, not until_idle)
                else:
                    entries, job = await ahead
            except RedisError as exc:
                failures += 1
                log.warning("%s: reading failed (%s); retrying", reader.stage, exc)
                await _sleep(backoff_s(failures, max_backoff_s), stop)
                continue
            finally:
                ahead = None
            if not entries:
                if until_idle:
                    return
                continue
            if not stop.is_set():
                ahead = asyncio.create_task(_read(reader, prepare, not until_idle),
                                            name="prefetch")
            error: Retryable | RedisError | None = None
            try:
                clean = await asyncio.shield(_handle(reader, handle, entries, job))
                failures = 0 if clean else failures
            except (Retryable, RedisError) as exc:
                clean, error = False, exc
            if clean:
                continue
            if ahead is not None:
                # Finished, never cancelled (see consume); its entries stay pending, re-read
                # in order after the failed ones, and this read does not count as a delivery.
                await _release(reader, ahead)
                ahead = None
            if error is not None:
                await _not_delivered(reader, entries, error)
            reader.retry_pending()
            if error is not None:
                failures += 1
                delay = (getattr(error, "retry_after_s", None)
                         or backoff_s(failures, max_backoff_s))
                log.warning("%s: batch left pending (%s); retry in %.1fs", reader.stage,
                            error, delay)
                await _sleep(delay, stop)
    finally:
        if ahead is not None:  # only when cancelled from outside (after the grace period)
            ahead.cancel()


async def _read(reader: StreamReader, prepare: Prepare | None,
                block: bool) -> tuple[list[Entry], Job | None]:
    """One batch, and its job when ``prepare`` made one."""
    entries = await reader.read(block=block)
    if prepare is None or not entries:
        return entries, None
    try:
        return entries, await prepare(entries)
    except RedisError as exc:  # handle() does it all again
        log.debug("%s: preparing a batch failed (%s)", reader.stage, exc)
    except Exception:  # a bug or a poison entry: handle() and its per-entry retry deal with it
        log.exception("%s: preparing a batch of %d failed", reader.stage, len(entries))
    return entries, None


async def _not_delivered(reader: StreamReader, entries: list[Entry],
                         error: Retryable | RedisError) -> None:
    """After ``error`` (one of :data:`NOT_THE_ENTRIES`) left a batch pending, set its entries'
    delivery counts back (:meth:`~pipeline.streams.StreamReader.release`), so re-reading them
    does not count: a slot move or an outage, however many retries it takes, never pushes them
    past ``max_deliveries`` into the dead stream. Other errors (a Lua error, ``Retryable``)
    may be the entries' own and count."""
    if not isinstance(error, NOT_THE_ENTRIES):
        return
    try:
        await reader.release(entries)
    except RedisError as exc:  # they stay pending; only their delivery counts are off
        log.warning("%s: could not give back a batch left pending (%s)", reader.stage, exc)


async def _release(reader: StreamReader,
                   ahead: asyncio.Task[tuple[list[Entry], Job | None]]) -> None:
    try:
        await reader.release((await ahead)[0])
    except RedisError as exc:  # the entries stay pending; only their delivery counts are off
        log.warning("%s: could not release a batch read ahead (%s)", reader.stage, exc)


async def _handle(reader: StreamReader, handle: Handler, entries: list[Entry],
                  job: Job | None) -> bool:
    """``True`` when every entry was handled, ``False`` when some were left pending (and
    ``reader.retry_pending()`` called). A failed ``job`` is retried one entry at a time through
    ``handle``, like a failed batch."""
    try:
        await (job() if job is not None else handle(entries))
        return True
    except (Retryable, RedisError):
        raise
    except Exception:
        log.exception("%s: handler failed on a batch of %d", reader.stage, len(entries))
        if len(entries) == 1:
            reader.retry_pending()
            return False
        clean = True
        for entry in entries:
            try:
                await handle([entry])
            except (Retryable, RedisError):
                raise
            except Exception:
                log.exception("%s: entry %s failed; it stays pending", reader.stage, entry.id)
                reader.retry_pending()
                clean = False
        return clean


async def _close(reader: StreamReader) -> None:
    """Give back what the reader read ahead (cluster layout: other partitions' reads)."""
    try:
        await reader.close()
    except RedisError as exc:  # the entries stay pending; only their delivery counts are off
        log.warning("%s: could not give back the reads in flight (%s)", reader.stage, exc)


async def _sleep(delay: float, stop: asyncio.Event) -> None:
    await until_stopped(asyncio.sleep(delay), stop)
