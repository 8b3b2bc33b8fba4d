"""When egress sends: flush readiness and deadlines, server backoff, and the in-flight cap.

No I/O. Times are monotonic seconds: passed in by callers, except :class:`Servers`, which reads
its clock (``time.monotonic`` unless given another) only when a server fails.

* :class:`Servers` — per Blynk server: after an outage or 5xx every device of the server waits
  (capped jittered backoff, or ``Retry-After``); once it is over, ONE device probes and the others
  follow its answer. It reports each server going down or answering again to a callback once per
  transition (the stage records the integration status).
* :class:`FlushScheduler` — which waiting devices may be sent now and whether a flush is due
  (held entries of ready devices reach ``flush_count`` or ``flush_bytes``, or the oldest has
  waited ``flush_age_ms``, so at once with the default 0; a final flush is always due), and how
  long until the next one can be.
* :class:`InFlight` — at most ``limit`` Blynk requests at once. Coroutines wait for a slot in
  order (:meth:`InFlight.acquire`); callback-driven sends that found no slot are queued and started
  one per freed slot once no coroutine is waiting (:meth:`InFlight.queue`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from pipeline.blynk.outcomes import Outcome, Retry
from pipeline.consumer import backoff_s
from workers.egress.queue import DeviceQueue, HeldWrites

log = logging.getLogger("blynk_bridge.egress")


@dataclass(slots=True)
class ServerState:
    """Server-wide backoff: an outage or 5xx holds every device of the server back."""

    failures: int = 0
    not_before: float = 0.0
    probing: bool = False


class Servers:
    """Backoff and up/down state of each Blynk server (see module docstring)."""

    def __init__(self, max_backoff_s: float, report: Callable[[str, Retry | None], None], *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.max_backoff_s = max_backoff_s
        self._clock = clock
        #: Called with (server, the failure) when a server goes down, (server, None) when it
        #: answers after being down or for the first time.
        self._report = report
        self.failing: dict[str, ServerState] = {}
        self._up: set[str] = set()  # servers last seen answering

    def note(self, name: str, outcome: Outcome) -> None:
        """A server's answer (a 429 is about one device's budget, not the server's)."""
        server = self.failing.get(name)
        if isinstance(outcome, Retry) and outcome.status != 429:
            if server is None:
                server = self.failing[name] = ServerState()
            now = self._clock()
            if now >= server.not_before:  # one failure per backoff period, not per request
                server.failures += 1
                delay = outcome.retry_after_s or backoff_s(server.failures, self.max_backoff_s)
                server.not_before = now + delay
                log.warning("egress: Blynk server %s failing (%s: %s); backing off %.1fs",
                            name, outcome.reason, outcome.detail, delay)
                if server.failures == 1:
                    self._up.discard(name)
                    self._report(name, outcome)
        elif not isinstance(outcome, Retry):
            if server is not None:
                log.info("egress: Blynk server %s answers again", name)
                del self.failing[name]
            if name not in self._up:
                self._up.add(name)
                self._report(name, None)

    def release_probe(self, name: str) -> None:
        """The write that probed ``name`` (if it was one) is over."""
        server = self.failing.get(name)
        if server is not None:
            server.probing = False

    def wait_s(self, name: str | None, now: float) -> float:
        """How long a device of ``name`` waits after a retryable answer that was not a 429."""
        server = self.failing.get(name) if name is not None else None
        return max(0.0, server.not_before - now) if server else backoff_s(1)


class FlushScheduler:
    """Flush readiness and deadlines over the waiting devices of :class:`HeldWrites`."""

    def __init__(self, held: HeldWrites, servers: Servers, *, flush_count: int,
                 flush_bytes: int, flush_age_ms: int) -> None:
        self._held = held
        self._servers = servers
        self.flush_count = flush_count
        self.flush_bytes = flush_bytes
        self.flush_age_s = flush_age_ms / 1000

    def ready(self, now: float, *, final: bool) -> list[DeviceQueue]:
        """The devices to send now (empty when no flush is due); a server in backoff whose wait
        is over sends one probe, and is marked probing."""
        ready: list[DeviceQueue] = []
        count = 0
        oldest = now
        probes: set[str] = set()
        gone: list[str] = []
        failing = self._servers.failing
        waiting = self._held.waiting
        for dev in waiting.values():
            if not dev.queued or dev.inflight:
                gone.append(dev.key)
                continue
            if dev.not_before > now:
                continue
            server_name = dev.queued[-1].write.server
            server = failing.get(server_name)
            if server is not None and server.failures:
                if server.probing or server.not_before > now or server_name in probes:
                    continue
                probes.add(server_name)
            ready.append(dev)
            count += len(dev.queued)
            oldest = min(oldest, dev.queued[0].arrived)
        for key in gone:
            del waiting[key]
        if not ready:
            return []
        due = final or count >= self.flush_count or now - oldest >= self.flush_age_s
        if not due:  # the byte size only matters when nothing else made the flush due
            size = sum(len(h.entry.data or b"") for dev in ready for h in dev.queued)
            due = size >= self.flush_bytes
        if not due:
            return []
        for name in probes:
            failing[name].probing = True
        return ready

    def next_deadline(self, now: float) -> float | None:
        """Seconds until a flush or a backoff expiry may make a device ready; ``None`` when
        nothing is due (an answer or a read wakes the caller instead)."""
        deadline: float | None = None
        failing = self._servers.failing
        for dev in self._held.waiting.values():
            if not dev.queued or dev.inflight:
                continue
            server = failing.get(dev.queued[-1].write.server)
            if server is not None and server.failures and server.probing:
                continue  # the probe's answer wakes the loop
            at = max(dev.queued[0].arrived + self.flush_age_s, dev.not_before,
                     server.not_before if server and server.failures else 0.0)
            deadline = at if deadline is None else min(deadline, at)
        return None if deadline is None else max(0.0, deadline - now)


class InFlight:
    """At most ``limit`` requests at once (see module docstring)."""

    __slots__ = ("_queued", "_waiters", "count", "limit")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.count = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._queued: deque[Callable[[], None]] = deque()

    def free(self) -> bool:
        """A slot is free and nobody is waiting for one."""
        return self.count < self.limit and not self._waiters

    def take(self) -> None:
        """Take a slot the caller found free (:meth:`free`, or a queued start)."""
        self.count += 1

    def untake(self) -> None:
        """Give back a slot taken for a request that was not sent after all. Nothing is
        started from here: the caller goes on to wait for a slot itself, and starting a queued
        send that may also not go out would recurse through the whole queue."""
        self.count -= 1

    def queue(self, start: Callable[[], None]) -> None:
        """Call ``start`` (which takes its slot) when a slot frees and no coroutine waits."""
        self._queued.append(start)

    async def acquire(self) -> None:
        """Wait for a slot and take it (waiters are served in order)."""
        while self.count >= self.limit:
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():  # pass the wake-up on
                    self._wake_one()
                raise
        self.count += 1

    def release(self) -> None:
        """A request finished: wake the first waiting coroutine, else start the next queued
        send."""
        self.count -= 1
        if self._waiters and self._wake_one():
            return
        if self._queued and self.count < self.limit:
            self._queued.popleft()()

    def _wake_one(self) -> bool:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return True
        return False
