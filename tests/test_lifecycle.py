"""``wait_event``: a deadline on an event wait that never swallows a cancel."""

from __future__ import annotations

import asyncio

import pytest

from pipeline.lifecycle import wait_event


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
