"""Group commit: small writes submitted by many independent callers share one round trip.

A :class:`GroupCommit` wraps a batch function ``run(items) -> results`` (one result per item, in
order: one Redis script call or pipeline). Items submitted while the previous ``run`` is busy, or
within ``linger_s`` of the first one, go into the same call, at most ``max_batch`` per call.

Contract:

* :meth:`GroupCommit.submit` never blocks and never does I/O; it returns a future that gets the
  item's result, or the exception ``run`` raised for its batch (every caller of that batch gets
  the same exception and decides for itself: retry, give up, dead-letter).
* Items run in submission order; one ``run`` at a time per instance.
* A caller that stops waiting (its future cancelled) does not stop the item: it still runs with
  its batch, its result is just dropped.
* :meth:`GroupCommit.close` returns once everything submitted so far has run.

Used by :class:`pipeline.streams.StreamWriter` (appends) and egress (records and acks: its
fenced commit, :mod:`workers.egress.committer`).

:class:`Linger` decides when a batching loop that otherwise goes at once (natural batching: a
batch holds what arrived during the previous round trip) should wait ``linger_s`` for its batch
to fill instead: only while entries arrive faster than ``above_per_s`` (measured over windows of
``RATE_WINDOW_S``). Below that rate latency is one round trip and the CPU spent on small batches
is small in absolute terms; above it the wait buys full batches, and with them the CPU per entry
the loop has at high load. ``above_per_s`` 0 = wait always (the behaviour before issue 15);
``linger_s`` 0 = never wait. Used by ingest-mqtt's appender and :class:`pipeline.streams
.StreamReader` (transform).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class GroupCommit(Generic[T, R]):
    """One ``run`` call for the items submitted together (see module docstring)."""

    def __init__(self, run: Callable[[list[T]], Awaitable[Sequence[R]]], *,
                 max_batch: int = 1000, linger_s: float = 0.0,
                 name: str = "group-commit") -> None:
        self._run = run
        self._max = max_batch
        self._linger = linger_s
        self._name = name
        self._items: list[tuple[T, asyncio.Future[R]]] = []
        self._flusher: asyncio.Task[None] | None = None
        #: The flusher's loop while it runs: ``asyncio.get_running_loop()`` asks the kernel for
        #: the process id each call (a fork check), ~1 µs per submit under load
        #: (``bench/ingest_http.py``); an item submitted while a flusher runs is on its loop.
        self._loop: asyncio.AbstractEventLoop | None = None

    async def __call__(self, item: T) -> R:
        return await self.submit(item)

    def submit(self, item: T) -> asyncio.Future[R]:
        """Queue ``item``; the future gets its result (``asyncio.shield`` it to keep the write
        going when the caller may be cancelled)."""
        if self._flusher is None:
            self._loop = loop = asyncio.get_running_loop()
            self._flusher = loop.create_task(self._flush(), name=self._name)
        else:
            assert self._loop is not None
            loop = self._loop
        fut: asyncio.Future[R] = loop.create_future()
        self._items.append((item, fut))
        return fut

    async def close(self) -> None:
        """Wait until every item submitted so far has run."""
        while self._flusher is not None:
            await asyncio.shield(self._flusher)

    async def _flush(self) -> None:
        try:
            while self._items:
                # Let the callers of this moment (or of the linger) join the batch.
                await asyncio.sleep(self._linger)
                batch, self._items = self._items[: self._max], self._items[self._max :]
                try:
                    results = await self._run([item for item, _ in batch])
                except Exception as exc:  # handed to every waiter, who decides
                    for _, fut in batch:
                        if not fut.done():
                            fut.set_exception(exc)
                    continue
                for (_, fut), result in zip(batch, results, strict=True):
                    if not fut.done():
                        fut.set_result(result)
        finally:
            self._flusher = None
            self._loop = None


#: The rate above which ingest-mqtt's appender and transform's reads linger by default
#: (``linger_above_per_s``). Below it every uplink goes at once, at up to ~1.6× the CPU per
#: uplink of lingering (BENCHMARKS.md, issue 15 goal 1): a price worth paying while the
#: process is far from busy, which it is up to here on 2 cores (a Node-RED flow's highest
#: rate there, the issue's latency being measured at half of it).
DEFAULT_LINGER_ABOVE_PER_S = 2_000.0

#: Rate measurement window of :class:`Linger`: long enough for a stable rate at the rates where
#: lingering matters (100 entries at 1,000/s), short enough to follow a change of load quickly.
RATE_WINDOW_S = 0.1


class Linger:
    """Whether a batching loop should wait for its batch to fill (see module docstring).

    Pure: the caller passes the clock. :meth:`note` is told of each batch taken (its size);
    :meth:`active` says whether the next one should wait ``linger_s``.
    """

    def __init__(self, linger_s: float, above_per_s: float) -> None:
        self.linger_s = linger_s
        self.above_per_s = above_per_s
        #: Entries per second over the last complete window (0 until one completed).
        self.rate = 0.0
        self._count = 0
        self._window_start: float | None = None

    def active(self, now: float) -> bool:
        """Wait ``linger_s`` before the next batch, at ``now``?"""
        if self.linger_s <= 0:
            return False
        rate, start = self.rate, self._window_start
        if start is not None and now - start >= RATE_WINDOW_S:
            # The window is over but no batch closed it (an idle spell): its rate so far.
            rate = self._count / (now - start)
        return rate >= self.above_per_s

    def note(self, n: int, now: float) -> None:
        """``n`` entries were taken at ``now`` (``time.monotonic()``)."""
        start = self._window_start
        if start is None:
            self._window_start = now
        elif now - start >= RATE_WINDOW_S:
            # A window that spans an idle gap gives a low rate: no linger right after idleness.
            self.rate = self._count / (now - start)
            self._count = 0
            self._window_start = now
        self._count += n
