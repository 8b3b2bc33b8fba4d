"""The read → handle → ack loop every consuming stage (transform, egress, downlink) shares.

Contract: ``handle(entries)`` must ack or dead-letter every entry it was given (through the
reader), or raise. A :class:`~pipeline.errors.Retryable` or Redis error leaves the batch pending
and backs off; any other exception is a bug or a poison entry, so the batch is retried one entry
at a time, and each entry that keeps failing reaches ``max_deliveries`` and is dead-lettered
alone — it never blocks the entries behind it.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable

from redis.exceptions import RedisError

from pipeline.errors import Retryable
from pipeline.lifecycle import until_stopped
from pipeline.streams import Entry, StreamReader

log = logging.getLogger("blynk_bridge.consumer")

Handler = Callable[[list[Entry]], Awaitable[None]]


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
) -> None:
    """Feed batches to ``handle`` until ``stop`` is set, or, with ``until_idle``, until no
    entry is left to read (burst mode, for tests and benchmarks).

    A read in flight when ``stop`` is set is finished (it returns within ``block_ms``) and its
    batch handled, not cancelled: Redis may already have delivered those entries to this
    consumer, and a cancelled read would leave them pending under a name a restarted process
    does not have, until another consumer claims them after ``claim_idle_ms``.
    """
    await reader.ensure_group()
    failures = 0
    while not stop.is_set():
        try:
            entries = await reader.read(block=not until_idle)
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
            await asyncio.shield(_handle(reader, handle, entries))
            failures = 0
        except (Retryable, RedisError) as exc:
            failures += 1
            reader.retry_pending()
            delay = getattr(exc, "retry_after_s", None) or backoff_s(failures, max_backoff_s)
            log.warning("%s: batch left pending (%s); retry in %.1fs", reader.stage, exc, delay)
            await _sleep(delay, stop)


async def _handle(reader: StreamReader, handle: Handler, entries: list[Entry]) -> None:
    try:
        await handle(entries)
    except (Retryable, RedisError):
        raise
    except Exception:
        log.exception("%s: handler failed on a batch of %d", reader.stage, len(entries))
        if len(entries) == 1:
            reader.retry_pending()
            return
        for entry in entries:
            try:
                await handle([entry])
            except (Retryable, RedisError):
                raise
            except Exception:
                log.exception("%s: entry %s failed; it stays pending", reader.stage, entry.id)
                reader.retry_pending()


async def _sleep(delay: float, stop: asyncio.Event) -> None:
    await until_stopped(asyncio.sleep(delay), stop)
