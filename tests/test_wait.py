"""tests.wait.wait_until: the one polling helper waits on sync and async conditions, and fails
naming what it waited for."""

from __future__ import annotations

import pytest

from tests.wait import wait_until


async def test_returns_the_first_truthy_value_of_a_sync_predicate() -> None:
    calls = iter([0, None, "", "ready"])
    assert await wait_until(lambda: next(calls), what="ready") == "ready"


async def test_awaits_an_async_predicate() -> None:
    seen: list[int] = []

    async def third_time() -> list[int] | None:
        seen.append(1)
        return seen if len(seen) == 3 else None

    assert await wait_until(third_time) == [1, 1, 1]


async def test_fails_naming_what_it_waited_for_after_a_last_check() -> None:
    calls: list[int] = []

    def never() -> bool:
        calls.append(1)
        return False

    with pytest.raises(AssertionError, match=r"waiting for the moon \(last value: False\)"):
        await wait_until(never, timeout_s=0, what="the moon")
    assert calls == [1]  # a deadline already passed still gets one check


async def test_within_returns_the_result_or_fails_naming_what() -> None:
    import asyncio

    from tests.wait import within

    async def answer() -> int:
        return 42

    assert await within(answer()) == 42
    with pytest.raises(AssertionError, match="waiting for the never-set event"):
        await within(asyncio.Event().wait(), "the never-set event", timeout_s=0.01)
