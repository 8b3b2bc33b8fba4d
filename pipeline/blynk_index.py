"""The registry's reverse index: Blynk device (token, id) → device key (source, integration,
device).

One hash (``keys.blynk_index()``) with ``t:<token hash>`` and ``i:<Blynk device id>`` fields.
:func:`queue_write` is called by :meth:`pipeline.registry.Registry._commit` for every row it
writes with a token, inside the same ``MULTI``, so the index never lags the registry. Entries
are never deleted on a token change: :func:`resolve` checks the row still carries that token
(or id), so a stale entry resolves to nothing rather than to the wrong device.

Rows written before the index existed (or by a bridge version that did not index) are indexed
by :func:`backfill`: a ``SCAN`` over the registry rows in bounded batches, run by the downlink
stage at start-up until one pass completed (``keys.blynk_index_backfilled``), and on demand by
``blynk-bridge devices reindex``.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from redis.asyncio.client import Pipeline

from pipeline.config import DeviceEntry
from pipeline.keys import Keys
from pipeline.streams import Redis

if TYPE_CHECKING:  # the registry imports this module
    from pipeline.registry import Device, Registry

log = logging.getLogger("blynk_bridge.blynk_index")

#: Registry rows read per ``SCAN`` step of :func:`backfill` (a bound on one round trip).
BACKFILL_BATCH = 1000


def token_ref(token: str) -> str:
    """A Blynk device named by its token without holding the token (keys, index fields)."""
    return hashlib.blake2b(token.encode(), digest_size=12).hexdigest()


def token_field(token: str) -> str:
    return "t:" + token_ref(token)


def id_field(blynk_id: int) -> str:
    return f"i:{blynk_id}"


def queue_write(pipe: Pipeline, keys: Keys, device_key: str, fields: dict[str, str]) -> None:
    """Queue the index entries of a registry row being written with ``fields``."""
    token = fields.get("token")
    if not token:
        return
    mapping = {token_field(token): device_key}
    bid = fields.get("id")
    if bid:
        mapping[id_field(int(bid))] = device_key
    pipe.hset(keys.blynk_index(), mapping=mapping)  # type: ignore[arg-type]


async def index_static(redis: Redis, keys: Keys, devices: Sequence[DeviceEntry]) -> None:
    """Index the configuration's static device table (idempotent). ``load_static`` writes only
    rows that changed, so rows written before the index existed are indexed here."""
    for start in range(0, len(devices), 1000):
        part = devices[start:start + 1000]
        await redis.hset(keys.blynk_index(), mapping={
            token_field(d.token.reveal()): f"{d.source}:{d.integration}:{d.device}"
            for d in part})


async def resolve(redis: Redis, registry: Registry, keys: Keys,
                  who: Sequence[tuple[int | None, str | None]]) -> list[Device | None]:
    """The registry row of each ``(blynk_id, token)``: by token when given, else by id; a row
    that no longer carries that token or id is ``None`` (one round trip for the lot when the
    rows are cached, two otherwise)."""
    fields: list[str] = []
    for blynk_id, token in who:
        fields.append(token_field(token) if token is not None
                      else id_field(blynk_id) if blynk_id is not None else "-")
    # The index lookup rides with the registry's version check: one round trip, and one more
    # only for rows not in the registry's cache.
    async with redis.pipeline(transaction=False) as pipe:
        registry.sync_queue(pipe)
        if fields:
            pipe.hmget(keys.blynk_index(), fields)
        replies = await pipe.execute()
    found = replies[registry.sync_replies:]
    if not registry.sync_apply(*replies[:registry.sync_replies]):
        await registry.reset()
    raw = found[0] if found else []
    device_keys = [v.decode() if isinstance(v, bytes) else None for v in raw]
    rows = await registry.get_many([k for k in device_keys if k is not None], sync=False)
    out: list[Device | None] = []
    for (blynk_id, token), key in zip(who, device_keys, strict=True):
        dev = rows.get(key) if key is not None else None
        stale = dev is not None and (dev.token != token if token is not None
                                     else dev.blynk_id != blynk_id)
        if stale:
            dev = None
        out.append(dev)
    return out


async def backfill(redis: Redis, keys: Keys, *, batch: int = BACKFILL_BATCH) -> int:
    """Index every registry row that carries a token; returns the index fields written.

    ``SCAN`` in steps of ``batch`` keys, each step a bounded number of round trips (on a
    cluster client ``scan_iter`` walks every master; the cluster layout's rows are matched by
    each partition's prefix). An entry already pointing at the row is left alone; one pointing
    at a row that no longer carries that token (or id) is replaced; an entry of another row
    that does carry it is kept (the row written last owns a shared token). Safe beside live
    writes: a row changed meanwhile is indexed by its own write, and :func:`resolve` checks
    every entry against its row. Marks the pass complete in ``keys.blynk_index_backfilled``.
    """
    written = rows = 0
    for row_prefix in keys.device_prefixes():
        names: list[str] = []
        async for raw in redis.scan_iter(match=f"{row_prefix}*", count=batch):
            names.append(raw.decode() if isinstance(raw, bytes) else str(raw))
            if len(names) >= batch:
                rows += len(names)
                written += await _index_rows(redis, keys, row_prefix, names)
                names = []
        rows += len(names)
        written += await _index_rows(redis, keys, row_prefix, names)
    await redis.set(keys.blynk_index_backfilled(), str(int(time.time() * 1000)))
    log.info("blynk index: %d registry rows scanned, %d index entries written", rows, written)
    return written


async def _index_rows(redis: Redis, keys: Keys, row_prefix: str, names: Sequence[str]) -> int:
    if not names:
        return 0
    async with redis.pipeline(transaction=False) as pipe:
        for name in names:
            pipe.hmget(name, ["token", "id"])
        found = await pipe.execute()
    # field → (device key, row field, value the row must hold)
    wanted: dict[str, tuple[str, str, str]] = {}
    for name, (token, bid) in zip(names, found, strict=True):
        if not token:
            continue
        device_key = name[len(row_prefix):]
        wanted[token_field(token.decode())] = (device_key, "token", token.decode())
        if bid:
            wanted[id_field(int(bid))] = (device_key, "id", bid.decode())
    if not wanted:
        return 0
    index = keys.blynk_index()
    fields = list(wanted)
    current = await redis.hmget(index, fields)
    others: list[tuple[str, str]] = []  # (field, holder) of entries naming another row
    mapping: dict[str, str] = {}
    for f, cur in zip(fields, current, strict=True):
        holder = cur.decode() if isinstance(cur, bytes) else None
        if holder is None:
            mapping[f] = wanted[f][0]
        elif holder != wanted[f][0]:
            others.append((f, holder))
    if others:
        async with redis.pipeline(transaction=False) as pipe:
            for f, holder in others:
                pipe.hget(_row(keys, holder), wanted[f][1])
            held = await pipe.execute()
        for (f, _), value in zip(others, held, strict=True):
            if value is None or value.decode() != wanted[f][2]:
                mapping[f] = wanted[f][0]
    if mapping:
        await redis.hset(index, mapping=mapping)  # type: ignore[arg-type]
    return len(mapping)


def _row(keys: Keys, device_key: str) -> str:
    """The registry row of a device key an index entry names."""
    source, _, rest = device_key.partition(":")
    integration, _, device = rest.partition(":")
    return keys.device(source, integration, device)
