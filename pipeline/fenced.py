"""A fenced transaction on one Redis: ``WATCH``, read, decide in Python, ``MULTI`` … ``EXEC``.

The commits of egress (:meth:`pipeline.order.LastWritten.commit`) and transform
(:class:`workers.transform.scripts.Commit`) check a lease (and transform a registry version)
and write only while it holds. A script does that atomically but makes Redis's Lua convert
every argument and pay ``redis.call`` per command — about half of the commit's Redis time.
:func:`transact` does the same check and writes as one atomic step with plain commands.

**Contract** of ``transact(redis, watch, plan, tries=..., read=held)``:

1. One connection of ``redis``'s pool; ``read(conn, watch)`` ``WATCH``es the keys and reads
   them (:func:`held`: ``WATCH`` + ``MGET``, one round trip; ``None`` for a key missing).
2. ``plan(values)`` → ``(commands, result)``: the commands to run in ``MULTI`` (tuples of
   arguments, or packed: :func:`pack`), and what :func:`transact` returns once they ran. No
   commands: nothing to do (e.g. the lease is another owner's): ``UNWATCH``, ``result``
   returned, nothing written.
3. ``MULTI``, the commands, ``EXEC`` — packed (:func:`pack`) and sent at once (one round
   trip), the replies read under one timeout (the connection's). A watched key touched
   between the read and the ``EXEC`` (renewed, taken, expired, changed) makes Redis run none
   of it: the whole of it is tried again from step 1, which is correct because the aborted
   try changed nothing and the next decides on the keys as they are then. After ``tries``
   aborts in a row a :class:`~redis.exceptions.WatchError` (a ``RedisError``) goes to the
   caller, with nothing written.
4. A command refused when queued, or failing inside the ``EXEC``, raises its error.
5. Any error or cancellation disconnects the connection (dropping its ``WATCH`` and any reply
   not read); the connection always goes back to the pool.

Raw commands on a pooled connection, not redis-py's pipeline ``WATCH`` mode: that mode cost
egress's worker ~3× the script's CPU per commit (BENCHMARKS.md, "Egress commit: WATCH + MULTI
instead of a script"). **One Redis only**: a Redis Cluster client runs a ``WATCH`` transaction
far more slowly (a thread per command), so the cluster layout keeps the scripts.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

from redis._parsers.hiredis import NOT_ENOUGH_DATA as _NOT_ENOUGH_DATA
from redis._parsers.hiredis import _AsyncHiredisParser
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.exceptions import WatchError

from pipeline.streams import Redis

T = TypeVar("T")
Command = tuple[Any, ...]
#: ``plan(values) -> (commands, result)`` (module docstring, step 2).
Plan = Callable[[list[Any]], tuple[Sequence[Command | bytes], T]]
Read = Callable[[Any, Sequence[str]], Awaitable[list[Any]]]

#: Tries of a transaction whose ``EXEC`` a watched key touched meanwhile aborted.
TRIES = 3


async def held(conn: Any, watch: Sequence[str]) -> list[Any]:
    """``WATCH`` ``watch`` on ``conn`` and read them (``MGET``, one round trip)."""
    await conn.send_packed_command(conn.pack_commands([("WATCH", *watch), ("MGET", *watch)]))
    await conn.read_response()
    return list(await conn.read_response())


async def transact(redis: Redis, watch: Sequence[str], plan: Plan[T], *, tries: int = TRIES,
                   read: Read = held, what: str = "watched keys") -> T:
    """The fenced transaction of the module docstring; ``what`` names the keys in the
    ``WatchError`` after ``tries`` aborts."""
    pool = redis.connection_pool
    conn = await pool.get_connection()  # type: ignore[no-untyped-call]
    try:
        for _ in range(tries):
            commands, result = plan(await read(conn, watch))
            if not commands:
                await conn.send_command("UNWATCH")
                await conn.read_response()
                return result
            if await _exec(conn, commands):
                return result
        raise WatchError(f"{what} touched during {tries} transactions in a row")
    except BaseException:
        await conn.disconnect()
        raise
    finally:
        await pool.release(conn)


def bulk(a: bytes | str | int) -> bytes:
    """One argument in the protocol (RESP bulk string; ``str`` as UTF-8), for a caller packing
    a command itself."""
    if not isinstance(a, bytes):
        a = a.encode() if isinstance(a, str) else b"%d" % a
    return b"$%d\r\n%b\r\n" % (len(a), a)


def pack(conn: Any, commands: Sequence[Command | bytes]) -> list[bytes]:
    """``MULTI`` ``commands`` ``EXEC`` in the protocol (RESP): a tuple of arguments is packed
    by the connection's packer (hiredis's, in C, per command), a ``bytes`` command is one whole
    command already packed (a caller's hot path: the packer costs ~10 µs per command in Python
    around hiredis, more than the script call it replaces for a transaction of an ``XADD`` per
    output)."""
    out = [b"*1\r\n$5\r\nMULTI\r\n"]
    for cmd in commands:
        if isinstance(cmd, bytes):
            out.append(cmd)
        else:
            out += conn.pack_command(*cmd)
    out.append(b"*1\r\n$4\r\nEXEC\r\n")
    return out


async def _exec(conn: Any, commands: Sequence[Command | bytes]) -> bool:
    """``MULTI`` ``commands`` ``EXEC`` on ``conn`` (one round trip); False when the ``WATCH``
    aborted it (nothing done)."""
    await conn.send_packed_command(pack(conn, commands))
    # One bound (the connection's socket timeout) for all the replies, not one per reply: a
    # timer per ``read_response`` cost more worker CPU than the rest of the transaction.
    try:
        async with asyncio.timeout(conn.socket_timeout):
            await _skip(conn, len(commands) + 1)  # OK, QUEUED…: a refusal raises
            replies = await conn.read_response(timeout=math.inf)
    except TimeoutError as e:
        raise RedisTimeoutError("timeout reading a transaction's replies") from e
    if replies is None:
        return False
    for r in replies:
        if isinstance(r, Exception):
            raise r
    return True


async def _skip(conn: Any, n: int) -> None:
    """Read ``n`` replies of ``conn`` and drop them; the first error reply raises. From the
    hiredis reader of redis-py's parser when it has one (redis-py pinned to 8.2: its
    ``read_response`` layers cost ~3 µs per reply around the reader's ~0.1, and a transaction
    has a ``+QUEUED`` per command), else through ``read_response``."""
    parser = conn._parser
    reader = getattr(parser, "_reader", None)
    if not isinstance(parser, _AsyncHiredisParser) or reader is None:
        for _ in range(n):
            await conn.read_response(timeout=math.inf)
        return
    gets = reader.gets
    try:
        while n:
            r = gets()
            if r is _NOT_ENOUGH_DATA:
                await parser.read_from_socket()  # type: ignore[no-untyped-call]
                continue
            n -= 1
            if isinstance(r, Exception):
                raise r
    except OSError as e:  # as read_response: a RedisError for the callers
        raise RedisConnectionError(f"error reading a transaction's replies: {e}") from e
