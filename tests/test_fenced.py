"""pipeline/fenced.py: the fenced transaction's replies, refusals and errors (one Redis).

The abort-and-retry path is tested through its users: tests/test_egress.py and
tests/test_transform.py (a watched key touched between the read and the ``EXEC``)."""

from __future__ import annotations

from typing import Any

import pytest
from redis.exceptions import ResponseError

from pipeline import fenced
from pipeline.streams import Redis


async def test_a_transaction_runs_when_planned_and_nothing_when_not(redis: Redis,
                                                                    prefix: str) -> None:
    fence, out = f"{prefix}fence", f"{prefix}out"
    await redis.set(fence, "mine")
    seen: list[list[Any]] = []

    def plan(values: list[Any]) -> tuple[list[tuple[Any, ...] | bytes], str]:
        seen.append(values)
        if values[0] != b"mine":
            return [], "refused"
        # a tuple and a command packed by the caller, each queued (+QUEUED read and dropped)
        return [("RPUSH", out, "a"),
                b"*3\r\n$5\r\nRPUSH\r\n%b%b" % (fenced.bulk(out), fenced.bulk(7))], "done"

    assert await fenced.transact(redis, [fence, f"{prefix}missing"], plan) == "done"
    assert seen == [[b"mine", None]]
    assert await redis.lrange(out, 0, -1) == [b"a", b"7"]
    await redis.set(fence, "theirs")
    assert await fenced.transact(redis, [fence], plan) == "refused"
    assert await redis.lrange(out, 0, -1) == [b"a", b"7"]
    assert await redis.ping()  # the connection went back to the pool, usable


@pytest.mark.parametrize("bad", [("RPUSH",), ("INCR", "{out}")],
                         ids=["refused-when-queued", "failing-inside-exec"])
async def test_an_error_reply_raises_and_the_connection_is_dropped(
        redis: Redis, prefix: str, bad: tuple[str, ...]) -> None:
    """A command refused when queued (wrong arity: Redis then refuses the ``EXEC``) runs
    nothing; one failing inside the ``EXEC`` (``INCR`` of a list) raises after the others
    ran, as Redis runs them. Either way the connection, with replies left unread, is
    disconnected: the next command on the pool reads its own reply."""
    out = f"{prefix}out"
    await redis.rpush(out, "x")
    bad = tuple(a.replace("{out}", out) for a in bad)
    with pytest.raises(ResponseError):
        await fenced.transact(redis, [out], lambda _: ([("RPUSH", out, "y"), bad], None))
    expected = [b"x"] if len(bad) == 1 else [b"x", b"y"]
    assert await redis.lrange(out, 0, -1) == expected
    assert await redis.get(f"{prefix}nothing") is None
