"""``blynk-bridge migrate-to-cluster``: copy a one-Redis deployment's state to a Redis Cluster,
under the cluster key layout's names (docs/DESIGN.md, "Redis Cluster", "Migrating").

Contract:

* Refuses (exit 2, nothing copied) unless every stream of the source is drained: no group of
  the uplinks, writes or downlinks streams (each partition) has entries not yet delivered
  (lag) or delivered and not acknowledged (pending), and no such stream holds entries no group
  reads. Stop the bridge after ``blynk-bridge lag`` shows 0, then migrate.
* Copies, each key whole (``DUMP``/``RESTORE … REPLACE``, its time to live kept), so running it
  again is harmless: registry rows (``dev:…``: auto-provisioned devices; static rows too,
  which the bridge writes again at start anyway) and egress records of versions before the
  per-partition hashes (``lw:…``) to their partition's tagged names, provisioning counts to
  their integration's tag, and the keys whose names the cluster layout keeps (broken devices,
  the Blynk reverse index and its backfill mark, integration statuses, unmapped keys, the
  superseded count) under the same names.
* Copies egress records (``records:N`` hashes: last-written times, rate state) field by field
  to the hash of each device's partition in the cluster layout (``HSET``: running it again
  writes the same), each target hash's time to live the longest of the source hashes feeding
  it.
* Does not copy what is drained or short-lived: streams, the de-dup window (an event the
  device cloud sends again after the migration is processed again: the same value, which
  last-written times keep from going backwards), rate-limit state, leases, the registry's
  version and change log (caches start empty), statistics.
* Neither Redis is changed but the target's copied keys. Redis errors (e.g. ``RESTORE`` on a
  Redis older than the source's) exit 1 with a message. Dead letters stay on the source.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from redis.exceptions import RedisError

from blynk_bridge.output import print_json
from pipeline import config as config_mod
from pipeline.backlog import as_str, snapshot
from pipeline.keys import DOWNLINKS, UPLINKS, WRITES, Keys
from pipeline.redact import safe_url
from pipeline.registry import split_key
from pipeline.streams import Redis, connect

#: Keys copied per pipelined round trip.
CHUNK = 500


class NotDrained(Exception):
    """The source still has stream entries the bridge has not finished with."""


@dataclass
class Copied:
    """How many keys of each kind were copied."""

    counts: dict[str, int] = field(default_factory=dict)

    def add(self, kind: str, n: int) -> None:
        self.counts[kind] = self.counts.get(kind, 0) + n


async def check_drained(redis: Redis, keys: Keys) -> None:
    """Raise :class:`NotDrained` naming every stream/group with lag or pending entries."""
    busy: list[str] = []
    for s in await snapshot(redis, keys):
        if s.name not in (UPLINKS, WRITES, DOWNLINKS):
            continue  # dead letters: copied by nobody, kept on the source
        if s.length and not s.groups:
            busy.append(f"{s.key}: {s.length} entries no group has read")
        for g in s.groups:
            if g.lag or g.pending:
                busy.append(f"{s.key} group {g.name}: lag {g.lag}, pending {g.pending}")
    if busy:
        raise NotDrained("; ".join(busy))


async def _scan(redis: Redis, prefix: str) -> AsyncIterator[str]:
    async for key in redis.scan_iter(match=f"{prefix}*", count=1000):
        yield as_str(key)


async def _copy(source: Redis, target: Redis, pairs: list[tuple[str, str]]) -> int:
    """Copy each ``(source key, target key)``; a key gone meanwhile is skipped."""
    copied = 0
    for i in range(0, len(pairs), CHUNK):
        chunk = pairs[i:i + CHUNK]
        async with source.pipeline(transaction=False) as pipe:
            for src, _ in chunk:
                pipe.dump(src)
                pipe.pttl(src)
            replies = await pipe.execute()
        async with target.pipeline(transaction=False) as pipe:
            for n, (_, dst) in enumerate(chunk):
                dumped, ttl = replies[2 * n], int(replies[2 * n + 1])
                if dumped is None:
                    continue
                pipe.restore(dst, max(ttl, 0), dumped, replace=True)
                copied += 1
            await pipe.execute()
    return copied


async def _copy_records(source: Redis, target: Redis, old: Keys, new: Keys) -> int:
    """Every field of the source's egress record hashes to the hash of its device's partition
    in the new layout; how many were copied."""
    copied = 0
    for p in range(old.partitions):
        src = old.records(p)
        ttl = int(await source.pttl(src))
        if ttl == -2:  # no such hash
            continue
        cursor = 0
        while True:
            cursor, fields = await source.hscan(src, cursor, count=CHUNK)
            by_target: dict[str, list[bytes | str]] = {}
            for name, value in (fields.items() if isinstance(fields, dict) else ()):
                dst = new.records(new.partition_of_device_key(as_str(name)))
                by_target.setdefault(dst, []).extend((name, value))
            if by_target:
                async with target.pipeline(transaction=False) as pipe:
                    for dst, pairs in by_target.items():
                        pipe.hset(dst, items=pairs)
                        if ttl > 0:  # set if none, else only lengthened
                            pipe.pexpire(dst, ttl, nx=True)
                            pipe.pexpire(dst, ttl, gt=True)
                    await pipe.execute()
                copied += sum(len(pairs) // 2 for pairs in by_target.values())
            if not int(cursor):
                break
    return copied


async def migrate(source: Redis, target: Redis, old: Keys, new: Keys) -> Copied:
    """Check the source is drained, then copy (module docstring); returns the counts."""
    await check_drained(source, old)
    out = Copied()
    renamed: list[tuple[str, Callable[[str], str | None]]] = [
        (f"{old.prefix}dev:", lambda rest: new.device(*split_key(rest))),
        (f"{old.prefix}lw:", new.last_written),
        (f"{old.prefix}provisioned:", lambda rest: new.provisioned(*rest.split(":", 1))
         if ":" in rest else None),
    ]
    for kind, (prefix, rename) in zip(("registry rows", "last-written times",
                                       "provisioning counts"), renamed, strict=True):
        pairs = []
        async for key in _scan(source, prefix):
            dst = rename(key[len(prefix):])
            if dst is not None:
                pairs.append((key, dst))
        out.add(kind, await _copy(source, target, pairs))
    out.add("last-written times", await _copy_records(source, target, old, new))
    same = [(old.broken_devices(), new.broken_devices()), (old.blynk_index(), new.blynk_index()),
            (old.blynk_index_backfilled(), new.blynk_index_backfilled()),
            (old.status(), new.status()), (old.superseded(), new.superseded())]
    unmapped = f"{old.prefix}unmapped:"
    async for key in _scan(source, unmapped):
        same.append((key, new.unmapped(key[len(unmapped):])))
    out.add("other", await _copy(source, target, same))
    return out


def cmd_migrate(args: argparse.Namespace) -> int:
    cfg = config_mod.load(args.config)
    old = Keys(cfg.redis.prefix, args.from_partitions or cfg.redis.partitions)
    new = Keys(cfg.redis.prefix, cfg.redis.partitions, cluster=True)

    async def main() -> Copied:
        source = connect(args.source)
        target = connect(args.target, cluster=True)
        try:
            return await migrate(source, target, old, new)
        finally:
            await source.aclose()
            await target.aclose()

    try:
        copied = asyncio.run(main())
    except NotDrained as exc:
        print(f"{safe_url(args.source)} is not drained, nothing copied: {exc}. Let the bridge "
              "finish (`blynk-bridge lag` at 0), stop it, then migrate.", file=sys.stderr)
        return 2
    except RedisError as exc:
        print(f"migrating {safe_url(args.source)} → {safe_url(args.target)}: {exc}",
              file=sys.stderr)
        return 1
    if args.json:
        print_json({"copied": copied.counts})
    else:
        for kind, n in copied.counts.items():
            print(f"{kind}: {n}")
    return 0
