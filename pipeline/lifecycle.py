"""Worker lifecycle: ``startup()`` → ``main_loop(stop)`` → ``shutdown()``, uvicorn-style.

A signal only *requests* a stop (it sets an ``asyncio.Event``). Each stage then stops taking new
work, finishes and acks what it holds, and returns; :func:`run_stages` waits up to
``grace_s`` for that and only then cancels. A stage that raises takes the whole process down with
a non-zero exit (the supervisor restarts it), never silently.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, Protocol, TypeVar

log = logging.getLogger("blynk_bridge.lifecycle")

T = TypeVar("T")


class Stage(Protocol):
    """One pipeline stage (ingest-http, ingest-mqtt, transform, egress, downlink, monitor)."""

    name: str

    async def startup(self) -> None:
        """Connect and create what the stage needs (consumer groups, sockets)."""

    async def main_loop(self, stop: asyncio.Event) -> None:
        """Work until ``stop`` is set, then finish in-flight work and return."""

    async def shutdown(self) -> None:
        """Release resources; called once, after ``main_loop`` returned or was cancelled."""


async def until_stopped(aw: Awaitable[T], stop: asyncio.Event) -> T | None:
    """Await ``aw`` unless ``stop`` is set first; then cancel it and return ``None``.

    Used around blocking reads so a stop request is honoured at once instead of after the read's
    own timeout. Cancelling a read loses nothing: unacked entries stay pending.
    """
    task = asyncio.ensure_future(aw)
    if stop.is_set():
        await cancel_and_wait([task])
        return None
    stopper = asyncio.create_task(stop.wait())
    try:
        done, _ = await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopper.cancel()
    if task in done:
        return task.result()
    await cancel_and_wait([task])
    return None


#: How often :func:`cancel_and_wait` cancels again a task that has not ended.
RECANCEL_S = 0.1


async def cancel_and_wait(tasks: Iterable[asyncio.Task[Any]], timeout_s: float = 1.0) -> None:
    """Cancel ``tasks`` and wait for them to end, at most ``timeout_s``; their results and
    errors are dropped (a background chore's own loop logs what it needs to).

    The one way to reap background tasks. ``task.cancel()`` then ``await task`` under
    ``suppress(CancelledError)`` also swallows a cancel of the *caller* that lands while it
    waits (a stop past its grace then hangs the stage), and waits for ever on a task whose
    cancel was lost: on 3.11 one landing inside ``wait_for`` as its awaitable completes is
    (redis-py's socket reads use it), and a ``while True`` loop then goes on. Here the
    caller's cancel goes through (``asyncio.wait``), a task still running is cancelled again
    every :data:`RECANCEL_S`, and the whole wait is bounded.
    """
    tasks = list(tasks)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    pending = [t for t in tasks if not t.done()]
    while pending:
        for task in pending:
            task.cancel()
        left = deadline - loop.time()
        if left <= 0:
            break
        await asyncio.wait(pending, timeout=min(left, RECANCEL_S))
        pending = [t for t in pending if not t.done()]
    for task in tasks:
        if task.done() and not task.cancelled():
            task.exception()  # retrieved: no "exception was never retrieved" at exit


async def wait_event(event: asyncio.Event, timeout_s: float) -> bool:
    """Wait up to ``timeout_s`` for ``event``; ``True`` if it is set.

    The one way to wait on an event with a deadline: ``asyncio.timeout``, never ``wait_for``.
    On 3.11 ``wait_for`` returns normally when a cancel arrives as the event is set, so the
    caller's loop goes on and the task that cancelled it waits for ever (a lease holder that
    never hands over, a stage that never stops).
    """
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout_s):
            await event.wait()
    return event.is_set()


async def run_stages(
    stages: Sequence[Stage],
    *,
    stop: asyncio.Event | None = None,
    grace_s: float = 20.0,
    install_signals: bool = True,
    on_started: Callable[[], None] | None = None,
) -> None:
    """Run stages together until a signal (or ``stop``) asks them to finish."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    if install_signals:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, _request_stop, stop, sig)
    started: list[Stage] = []
    try:
        for stage in stages:
            await stage.startup()
            started.append(stage)
        if on_started:
            on_started()
        async with asyncio.TaskGroup() as tg:
            tasks = [tg.create_task(s.main_loop(stop), name=s.name) for s in stages]
            tg.create_task(_cancel_after_grace(stop, tasks, grace_s), name="grace-timer")
    finally:
        stop.set()
        for stage in reversed(started):
            try:
                await stage.shutdown()
            except Exception:
                log.exception("shutdown of %s failed", stage.name)
        if install_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)


def _request_stop(stop: asyncio.Event, sig: signal.Signals) -> None:
    log.info("received %s: stopping (finishing in-flight work)", sig.name)
    stop.set()


async def _cancel_after_grace(
    stop: asyncio.Event, tasks: list[asyncio.Task[None]], grace_s: float
) -> None:
    """After a stop request, give stages ``grace_s`` to drain, then cancel the stragglers."""
    waiter: asyncio.Future[Any] = asyncio.gather(*tasks, return_exceptions=True)
    stopper: asyncio.Future[Any] = asyncio.ensure_future(stop.wait())
    await asyncio.wait([waiter, stopper], return_when=asyncio.FIRST_COMPLETED)
    stopper.cancel()
    if waiter.done():
        return
    try:
        await asyncio.wait_for(asyncio.shield(waiter), grace_s)
    except TimeoutError:
        for t in tasks:
            if not t.done():
                log.warning("stage %s did not stop within %.0fs: cancelling", t.get_name(), grace_s)
                t.cancel()


def collect_young_less_often(gen0: int) -> tuple[int, int, int]:
    """Raise the cyclic collector's young-generation threshold to at least ``gen0`` and freeze
    what start-up built; returns the previous thresholds so a stage can restore them.

    Process-wide, and it never lowers a setting: in ``run`` mode every stage that asks gets the
    highest threshold any of them asked for. Hot stages allocate many short-lived objects per
    message; at CPython's default (700) collections took a large share of egress and
    ingest-http CPU (BENCHMARKS.md). ``gc.freeze()`` keeps start-up objects (modules, config,
    pools) out of every later collection.
    """
    previous = gc.get_threshold()
    if previous[0] < gen0:
        gc.set_threshold(gen0, previous[1], previous[2])
    gc.freeze()
    return previous
