"""``wait_event`` and ``cancel_and_wait``: waits with a deadline that never swallow a cancel."""

from __future__ import annotations

import asyncio

import pytest

from pipeline.lifecycle import cancel_and_wait, until_stopped, wait_event
from tests.wait import TIMEOUT_S, within


async def test_it_reports_whether_the_event_was_set() -> None:
    event = asyncio.Event()
    assert await wait_event(event, 0) is False
    event.set()
    assert await wait_event(event, 0) is True


async def test_a_cancel_arriving_as_the_event_is_set_still_cancels() -> None:
    # The race asyncio.wait_for loses on 3.11: the event's waiter completes and the cancel
    # lands in the same loop iteration; wait_for then returns normally and a loop around it
    # never ends. Tried many times, since the interleaving depends on scheduling.
    for _ in range(200):
        event = asyncio.Event()
        task = asyncio.create_task(wait_event(event, 60))
        await asyncio.sleep(0)  # the task is now waiting on the event
        event.set()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def _ignores_cancels(until: asyncio.Event, cancelled: asyncio.Event | None = None) -> None:
    """A chore that loses every cancel (as one landing in redis-py's wait_for can be lost)
    and ends only when ``until`` is set; ``cancelled`` is set at the first cancel."""
    while not until.is_set():
        try:
            await until.wait()
        except asyncio.CancelledError:
            if cancelled is not None:
                cancelled.set()


async def test_reaping_a_task_that_lost_its_cancel_lets_the_callers_cancel_through() -> None:
    # A chore whose cancel is lost (as one landing in redis-py's wait_for can be) keeps
    # running; the stage reaping it is then cancelled itself (a stop past its grace). With
    # ``task.cancel(); with suppress(CancelledError): await task`` that second cancel was
    # swallowed and the stage went on; cancel_and_wait must raise it.
    release = asyncio.Event()
    lost = asyncio.Event()
    chore = asyncio.create_task(_ignores_cancels(release, lost))
    await asyncio.sleep(0)  # the chore is now waiting

    async def stage() -> str:
        await cancel_and_wait([chore], timeout_s=60)
        return "went on"

    reaper = asyncio.create_task(stage())
    try:
        await within(lost.wait())  # the reaper cancelled the chore and now waits for it
        reaper.cancel()
        # Not within(): on the old pattern the reaper would never end (its cancel went into
        # the chore, which ignores it); a bounded wait lets that fail instead of hanging.
        await asyncio.wait({reaper}, timeout=TIMEOUT_S)
        assert reaper.cancelled(), "the stage's own cancel was swallowed or never ended it"
    finally:
        release.set()  # the chore ignores cancels: it ends through its event
        await within(chore)


async def test_reaping_is_bounded_and_retrieves_errors() -> None:
    never = asyncio.Event()

    async def fails() -> None:
        raise RuntimeError("chore failed")

    stuck, failed = asyncio.create_task(_ignores_cancels(never)), asyncio.create_task(fails())
    await asyncio.sleep(0)
    reaping = asyncio.create_task(cancel_and_wait([stuck, failed], timeout_s=0.05))
    try:
        # Not within(): an unbounded reap would never end (the chore ignores cancels).
        await asyncio.wait({reaping}, timeout=TIMEOUT_S)
        assert reaping.done(), "reaping a task that ignores its cancel was not bounded"
        assert failed.done() and not stuck.done()
    finally:
        never.set()  # the chore ignores cancels: it ends through its event
        await within(stuck)


async def test_a_task_that_lost_one_cancel_is_cancelled_again_and_ends() -> None:
    # The ingest-mqtt hang: a warm standby's advertiser lost the cancel in a Redis call and
    # looped on, so its task group, and the stage's stop, waited for ever.
    lost_once = asyncio.Event()
    never = asyncio.Event()

    async def loses_the_first_cancel() -> None:
        while True:
            try:
                await never.wait()
            except asyncio.CancelledError:
                if lost_once.is_set():
                    raise
                lost_once.set()

    chore = asyncio.create_task(loses_the_first_cancel())
    await asyncio.sleep(0)  # the chore is now waiting
    await within(cancel_and_wait([chore], timeout_s=TIMEOUT_S))
    assert lost_once.is_set() and chore.cancelled()


async def test_a_stop_cutting_a_read_short_still_lets_the_callers_cancel_through() -> None:
    # until_stopped cancels the read when the stop comes; a read whose cancel takes a while
    # to finish (a client library cleaning up its connection) must not swallow a cancel of
    # the stage that lands meanwhile, as ``with suppress(CancelledError): await task`` did.
    reading = asyncio.Event()
    cleaning = asyncio.Event()
    cleaned = asyncio.Event()

    async def read() -> str:
        try:
            reading.set()
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cleaning.set()
            await cleaned.wait()
            raise
        return "entries"

    stop = asyncio.Event()

    async def stage() -> str:
        await until_stopped(read(), stop)
        return "went on"

    runner = asyncio.create_task(stage())
    try:
        await within(reading.wait())
        stop.set()
        await within(cleaning.wait())  # the stop cancelled the read, which is cleaning up
        runner.cancel()
        await asyncio.wait({runner}, timeout=TIMEOUT_S)
        assert runner.cancelled(), "the stage's own cancel was swallowed by the reap"
    finally:
        cleaned.set()
        await asyncio.wait({runner}, timeout=TIMEOUT_S)


async def test_a_read_that_ends_first_answers_and_a_stop_answers_none() -> None:
    stop = asyncio.Event()

    async def read() -> str:
        return "entries"

    assert await within(until_stopped(read(), stop)) == "entries"
    stop.set()
    assert await within(until_stopped(asyncio.Event().wait(), stop)) is None
