"""One device write to Blynk: a device's plan in, exactly one :class:`Result` out.

:meth:`Sender.send` runs one state machine per device write and hands its result to ONE
``finish`` (the committer), exactly once:

* **Task-free** (the common case: no backlog). When the in-flight cap has a slot (else the send
  is queued and started, in order, when one frees), the plan's one ``batch/update`` goes out from
  an idle keep-alive connection of the lean HTTP client (``BlynkClient.batch_update_nowait``)
  and a 2xx is finished from the callback: no task, no coroutine.
* **Coroutine path**, for everything else: a backlog to upload with true times, no idle
  connection or the token's region not known in this process (nothing was sent), or an answer
  other than a 2xx — a refusal, an outage, a 429, a 308 or a dead keep-alive connection. The
  answer already received is used as the first request's answer, so nothing is sent twice. It
  uploads history first (backlog), then the ``batch/update`` with the current values (so the
  current value lands last); a permanent refusal is narrowed down to the failing pins (the pin
  Blynk names, else halving the pin set) and the rest is written. Before each request after the
  first, :class:`Pacer` waits for the device's next rate-limit slot (in its record, in memory).

**Fencing.** Every request, the first included, goes only while ``may_send(device)`` says
the device's partition lease is certainly held for longer than a Blynk request can take
(:mod:`workers.egress.stage`) and the write's partition ownership is still the one it started
under (a partition lost and taken back is written again from what its new ownership took
over); otherwise nothing more is sent and the result says ``fenced``.

Every answer updates its server's state (:class:`workers.egress.scheduler.Servers`), the task-free
ones included. A retryable answer, an invalid token or a Redis error stops the write: the
:class:`Result` says so and the finish decides what happens to the entries.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from redis.exceptions import RedisError

from pipeline.blynk.client import BlynkClient
from pipeline.blynk.outcomes import Fail, Ok, Outcome, Retry
from pipeline.coalesce import DevicePlan, chunks, split
from pipeline.errors import Reason
from pipeline.events import Value
from pipeline.ratelimit import RateLimiter
from workers.egress.queue import DeviceQueue
from workers.egress.scheduler import InFlight, Servers

log = logging.getLogger("blynk_bridge.egress")

#: Points per timestamped upload (Blynk's documented maximum).
MAX_UPLOAD_POINTS = 10_000


@dataclass(slots=True)
class Result:
    """What one device write achieved."""

    written: dict[str, int] = field(default_factory=dict)  # pin → event time now in Blynk
    failed: dict[str, tuple[Reason, str]] = field(default_factory=dict)  # pin → (reason, detail)
    #: pin → (reason, detail, event times of the history points Blynk refused)
    history_failed: dict[str, tuple[Reason, str, set[int]]] = field(default_factory=dict)
    values: int = 0
    again: Retry | None = None
    invalid_token: Fail | None = None
    #: The partition's lease was not certainly held: nothing (more) was sent.
    fenced: bool = False


#: The one finish of a device write: (device, plan, result, the write's pending future).
Finish = Callable[[DeviceQueue, DevicePlan, Result, "asyncio.Future[None]"], None]
#: Start a tracked task (coroutine, name).
Spawn = Callable[[Coroutine[Any, Any, None], str], None]
#: One request of the coroutine path: given the call to make, its outcome.
_Request = Callable[[Callable[[], Awaitable[Outcome]]], Awaitable[Outcome]]


class _Again(Exception):
    """A retryable answer: the device's write is retried later, from memory."""

    def __init__(self, outcome: Retry) -> None:
        super().__init__(outcome.detail)
        self.outcome = outcome


class _Fenced(Exception):
    """The device's partition lease is not certainly held: send nothing more."""


class _InvalidToken(Exception):
    def __init__(self, outcome: Fail) -> None:
        super().__init__(outcome.detail)
        self.outcome = outcome


class Pacer:
    """Before a device write's second and later requests: wait for the device's next
    rate-limit slot (in its record, held in memory by the one writer of the device)."""

    def __init__(self, limiter: RateLimiter) -> None:
        self._interval_us = limiter.interval_us
        self._burst = limiter.burst

    async def next_request(self, dev: DeviceQueue) -> None:
        """Wait until the device's next request may go, and count it."""
        record = dev.record
        if record is None:
            return
        while True:
            wait = record.take(self._interval_us, self._burst)
            if wait <= 0:
                return
            await asyncio.sleep(wait)  # pacing: the exact time to the slot, not a guess


class Sender:
    """Sends device writes (see module docstring)."""

    def __init__(self, client: BlynkClient, cap: InFlight, servers: Servers, pacer: Pacer,
                 finish: Finish, spawn: Spawn, may_send: Callable[[DeviceQueue], bool]) -> None:
        self._client = client
        self._may_send = may_send
        self._cap = cap
        self._servers = servers
        self._pacer = pacer
        self._finish = finish
        self._spawn = spawn
        #: ``batch/update``s sent without a task (for tests and diagnostics).
        self.sent_now = 0
        #: Set by :meth:`close`: nothing more is sent.
        self.closed = False

    def close(self) -> None:
        """Send nothing more: queued sends, resends after a dead connection and coroutine
        paths not yet started are dropped (their entries stay pending in Redis)."""
        self.closed = True

    def send(self, dev: DeviceQueue, plan: DevicePlan, pending: asyncio.Future[None]) -> None:
        """Write ``plan`` (the device's in-flight entries) and hand the result to the finish.

        ``pending`` is the write's stand-in for the stage's idle and stop decisions; the finish
        resolves it, not the sender.
        """
        if self.closed:
            return
        if plan.backlog:
            self._coroutine(dev, plan, pending, None)
        elif self._cap.free():
            self._send_now(dev, plan, pending)
        else:
            self._cap.queue(functools.partial(self._send_now, dev, plan, pending))

    def _send_now(self, dev: DeviceQueue, plan: DevicePlan,
                  pending: asyncio.Future[None]) -> None:
        if self.closed:  # a queued send started after a stop gave up waiting
            return
        if not self._may_send(dev):
            self._finish(dev, plan, Result(fenced=True), pending)
            return
        pins = plan.current()

        def answered(outcome: Outcome | None) -> None:
            self._cap.release()
            if outcome is None:  # a 308 or a dead connection: the coroutine path resends
                self._coroutine(dev, plan, pending, None)
                return
            self._servers.note(plan.server, outcome)
            if isinstance(outcome, Ok):
                result = Result(values=len(pins))
                written = result.written
                for pin in pins:
                    written[pin] = plan.pins[pin].ts_ms
                self._finish(dev, plan, result, pending)
            else:
                self._coroutine(dev, plan, pending, outcome)

        self._cap.take()
        if self._client.batch_update_nowait(plan.server, plan.token, pins, answered):
            self.sent_now += 1
            return
        self._cap.untake()
        self._coroutine(dev, plan, pending, None)

    def _coroutine(self, dev: DeviceQueue, plan: DevicePlan, pending: asyncio.Future[None],
                   answer: Outcome | None) -> None:
        if self.closed:
            return
        self._spawn(self._write(dev, plan, pending, answer), f"egress-{dev.key}")

    async def _write(self, dev: DeviceQueue, plan: DevicePlan, pending: asyncio.Future[None],
                     answer: Outcome | None) -> None:
        """The coroutine path. ``answer``: Blynk's answer to the plan's ``batch/update``,
        already received on the task-free path (its slot and server bookkeeping done there);
        used instead of sending that request again."""
        result = Result()
        first = True

        async def request(call: Callable[[], Awaitable[Outcome]]) -> Outcome:
            nonlocal first, answer
            if answer is not None:
                given, answer, first = answer, None, False
                return given
            if not first:
                await self._pacer.next_request(dev)
            first = False
            return await self._request(plan.server, dev, call)

        try:
            if plan.backlog:
                await self._upload_history(dev, plan, result, request)
            await self._put(plan, plan.current(), result, request)
        except _Again as again:
            result.again = again.outcome
        except _InvalidToken as bad:
            result.invalid_token = bad.outcome
        except _Fenced:
            result.fenced = True
        except RedisError as exc:
            result.again = Retry(Reason.REDIS, str(exc))
        except Exception as exc:  # a defect: logged, and the write retried like an outage
            log.error("egress: writing %s failed", dev.key, exc_info=exc)
            result.again = Retry(Reason.ERROR, repr(exc))
        self._finish(dev, plan, result, pending)

    async def _request(self, server_name: str, dev: DeviceQueue,
                       call: Callable[[], Awaitable[Outcome]]) -> Outcome:
        """One request under the in-flight cap, if the partition's lease allows it (checked
        once the slot is ours: waiting for it takes time); notes the answer for its server."""
        await self._cap.acquire()
        try:
            if not self._may_send(dev):
                raise _Fenced
            outcome = await call()
        finally:
            self._cap.release()
        self._servers.note(server_name, outcome)
        return outcome

    async def _upload_history(self, dev: DeviceQueue, plan: DevicePlan, result: Result,
                              request: _Request) -> None:
        for pin, points in plan.history().items():
            done = dev.history_done.setdefault(pin, set())
            todo = [(ts, v) for ts, v in points if ts not in done]
            for chunk in chunks(todo, MAX_UPLOAD_POINTS):
                outcome = await request(
                    functools.partial(self._client.upload_history, plan.server, plan.token,
                                      pin, chunk)
                )
                match outcome:
                    case Ok():
                        done.update(ts for ts, _ in chunk)
                        result.values += len(chunk)
                    case Retry():
                        raise _Again(outcome)
                    case Fail(reason=reason) if reason == Reason.INVALID_TOKEN:
                        raise _InvalidToken(outcome)
                    case Fail():
                        # The current value still goes; the refused points are dead-lettered.
                        refused = {ts for ts, _ in todo if ts not in done}
                        result.history_failed[pin] = (
                            outcome.reason, f"history upload: {outcome.detail}", refused
                        )
                        break

    async def _put(self, plan: DevicePlan, pins: dict[str, Value], result: Result,
                   request: _Request) -> None:
        """One ``batch/update``; on a permanent answer narrow it down to the failing pins."""
        if not pins:
            return
        outcome = await request(lambda: self._client.batch_update(plan.server, plan.token, pins))
        match outcome:
            case Ok():
                for pin in pins:
                    result.written[pin] = plan.pins[pin].ts_ms
                result.values += len(pins)
            case Retry():
                raise _Again(outcome)
            case Fail(reason=reason) if reason == Reason.INVALID_TOKEN:
                raise _InvalidToken(outcome)
            case Fail() if len(pins) == 1:
                (pin,) = pins
                result.failed[pin] = (outcome.reason, outcome.detail)
            case Fail(pin=named) if named is not None and named.upper() in _by_upper(pins):
                bad = _by_upper(pins)[named.upper()]
                result.failed[bad] = (outcome.reason, outcome.detail)
                await self._put(plan, {p: v for p, v in pins.items() if p != bad}, result,
                                request)
            case Fail():
                left, right = split(pins)
                await self._put(plan, left, result, request)
                await self._put(plan, right, result, request)


def _by_upper(pins: dict[str, Value]) -> dict[str, str]:
    """Pin names by their upper-case form (Blynk names a pin in either case)."""
    return {p.upper(): p for p in pins}
