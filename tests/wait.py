"""The tests' one polling helper (and its twin for completion signals), bounded by a deadline.

Use :func:`wait_until` only where the code under test offers no completion signal to await (an
``Event``, a future, a blocking read): Redis state another process writes, a broker's delivery, a
metric; await a completion signal with :func:`within`. The deadline is a bound for a broken
build, not a timing: it is generous so a loaded machine passes, and a test never asserts how
long the wait took.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable
from typing import TypeVar, cast

T = TypeVar("T")

#: Long enough for two busy CPU hogs on a 2-core machine; reached only when something is wrong.
TIMEOUT_S = 30.0


async def wait_until(predicate: Callable[[], T | Awaitable[T]], timeout_s: float = TIMEOUT_S,
                     what: str = "the condition", interval: float = 0.01) -> T:
    """Call ``predicate`` (sync or async) until it returns something truthy, and return that.

    Polls every ``interval`` seconds; once ``timeout_s`` seconds have passed it checks one last
    time, then raises ``AssertionError`` naming ``what`` and the last value seen.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        last_chance = loop.time() >= deadline
        value = predicate()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return cast(T, value)
        if last_chance:
            raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what} "
                                 f"(last value: {value!r})")
        await asyncio.sleep(interval)


async def within(awaitable: Awaitable[T], what: str = "", timeout_s: float = TIMEOUT_S) -> T:
    """Await a completion signal (an event's ``wait()``, a task, a read), bounded by the same
    generous deadline; a timeout is an ``AssertionError`` naming ``what``."""
    try:
        return await asyncio.wait_for(awaitable, timeout_s)
    except TimeoutError:
        name = what or getattr(awaitable, "__qualname__", type(awaitable).__name__)
        raise AssertionError(f"timed out after {timeout_s:g} s waiting for {name}; where the "
                             f"other tasks wait:\n{_task_stacks()}") from None


def _task_stacks() -> str:
    """Where each pending task of the loop is suspended: a hang names its own line."""
    out = []
    for task in asyncio.all_tasks():
        if task is asyncio.current_task():
            continue
        frames = task.get_stack()
        where = " <- ".join(f"{f.f_code.co_name} ({f.f_code.co_filename.rsplit('/', 1)[-1]}:"
                            f"{f.f_lineno})" for f in reversed(frames))
        out.append(f"  {task.get_name()}: {where or '(not started)'}")
    return "\n".join(sorted(out))
