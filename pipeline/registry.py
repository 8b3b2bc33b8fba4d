"""The device registry: source device → Blynk device, in Redis, with a bounded in-process cache.

**Rows.** One hash per device at ``keys.device(source, integration, device)`` with the fields
``token``, ``template`` (a configured template name), ``server`` (a ``blynk.servers`` name or a
base URL; empty = the default server), ``id`` (Blynk device id, when known), ``status``
(``ok`` | ``broken``), ``reason``/``detail`` (why it is broken), ``firmware`` (from a decoded
``Blynk Firmware Version``), ``meta_pending`` (provisioned, metafield not set yet),
``updated_ms``. A *device key* is ``"{source}:{integration}:{device}"``. Rows written with a token
are also indexed by Blynk token and id (:mod:`pipeline.blynk_index`, for downlinks).

**Cache.** Rows read by this process are kept in an LRU of ``cache_size`` entries, so a worker's
memory is bounded by the cache, not by the fleet. The cache never serves a row older than the
last change committed before the current batch began:

* every change to a row goes through :meth:`Registry._commit` — one ``MULTI`` that writes the
  row, ``INCRBY``-s ``registry:version``, appends the device key to the ``registry:changes``
  stream and ``PUBLISH``-es it on ``registry:changed``;
* subscribers evict on each pub/sub message at once (the fast path);
* the version check (:meth:`sync_queue`/:meth:`sync_apply`, queued in the pipeline each batch
  already sends, so it costs no round trip) reads the changes since the last one applied and
  evicts them. If fewer changes are found than the version moved (the change log was trimmed,
  or this worker was far behind), the whole cache is dropped. A missed or late pub/sub message
  therefore cannot leave a stale entry past the next batch.

New rows need no invalidation (absence is never cached), but are logged as changes too.

**Broken devices** are also indexed in the sorted set ``keys.broken_devices()`` (device key →
when it was marked), kept in line with each row's status by every change, for
``blynk-bridge devices list`` and the retry after ``egress.broken_retry_s``
(:meth:`Registry.retry_broken`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import sys
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

from redis.asyncio.client import Pipeline
from redis.exceptions import RedisError, WatchError

from pipeline import blynk_index, metrics
from pipeline.config import DeviceEntry
from pipeline.errors import Reason
from pipeline.keys import Keys
from pipeline.redact import masked_repr
from pipeline.streams import Redis, now_ms, single_connection_client

log = logging.getLogger("blynk_bridge.registry")

STATUS_OK = "ok"
STATUS_BROKEN = "broken"
#: Entries kept in the change log; a worker further behind than this drops its whole cache.
CHANGES_MAXLEN = 100_000
#: Changes read per version check; more than this also drops the whole cache.
SYNC_MAX = 10_000


def device_key(source: str, integration: str, device: str) -> str:
    return f"{source}:{integration}:{device}"


def token_device_key(key: str, token: str) -> str:
    """The device key of writes whose Blynk token came with the uplink itself (the Particle
    blueprint's ``t``), apart from the registry row ``key``: their order, lease and rate limit are
    the token's own, and a refusal of that token never touches the row. Names the token by a
    hash, never in full."""
    return f"{key}#{hashlib.sha256(token.encode()).hexdigest()[:16]}"


def split_key(key: str) -> tuple[str, str, str]:
    """``"tts:app:dev-1"`` → ``("tts", "app", "dev-1")``; raises ``ValueError`` on other shapes."""
    source, integration, device = key.split(":", 2)
    return source, integration, device


@dataclass(frozen=True, slots=True)
class Device:
    """One registry row (immutable: a change replaces the cached object)."""

    key: str
    token: str
    template: str
    server: str | None = None
    blynk_id: int | None = None
    status: str = STATUS_OK
    reason: str | None = None
    detail: str | None = None
    firmware: str | None = None
    meta_pending: bool = False

    def __repr__(self) -> str:
        return masked_repr(self)

    @property
    def broken(self) -> bool:
        return self.status == STATUS_BROKEN

    @classmethod
    def from_fields(cls, key: str, v: Sequence[bytes | None]) -> Device | None:
        """A device from ``HMGET`` of :data:`FIELDS` (in that order)."""
        token = v[0]
        if not token:
            return None
        # Template, server and status repeat across the fleet: interned, each cached row
        # keeps only its own key and token.
        return cls(
            key=key,
            token=token.decode(),
            template=sys.intern(v[1].decode()) if v[1] else "",
            server=sys.intern(v[2].decode()) if v[2] else None,
            blynk_id=int(v[3]) if v[3] else None,
            status=sys.intern(v[4].decode()) if v[4] else STATUS_OK,
            reason=v[5].decode() if v[5] else None,
            detail=v[6].decode() if v[6] else None,
            firmware=v[7].decode() if v[7] else None,
            meta_pending=v[8] == b"1",
        )


#: The row fields a lookup reads, in :meth:`Device.from_fields` order.
FIELDS = ("token", "template", "server", "id", "status", "reason", "detail", "firmware",
          "meta_pending")
#: One command for a whole batch of misses (redis-py's cost per command it packs and parses
#: outweighs the lookup, BENCHMARKS.md; a million-device fleet behind a 100k cache misses most
#: of the time).
_LOAD = """
local out = {}
for i = 1, #KEYS do out[i] = redis.call('HMGET', KEYS[i], unpack(ARGV)) end
return out
"""

# A change: the device key and the fields to set (None = delete the row), fields to delete.
_Change = tuple[str, dict[str, str] | None, tuple[str, ...]]


class Registry:
    """Lookups through the bounded cache; every write is a logged, published change."""

    def __init__(self, redis: Redis, keys: Keys, *, cache_size: int = 100_000) -> None:
        self._redis = redis
        self._keys = keys
        self._cache: OrderedDict[str, Device] = OrderedDict()
        self._cache_size = max(1, cache_size)
        #: Per version/change-log pair (:meth:`pipeline.keys.Keys.registry_partitions`: one on
        #: one Redis, one per partition in the cluster layout): the version the cache is in
        #: line with and the last change-log entry applied.
        self._parts = keys.registry_partitions()
        self._applied: dict[int | None, int] | None = None
        self._applied_id: dict[int | None, str] = dict.fromkeys(self._parts, "0-0")
        # Bumped by every eviction: a load that overlapped one is returned but not cached.
        self._gen = 0
        self._listener: asyncio.Task[None] | None = None
        self._load = redis.register_script(_LOAD)
        self.subscribed = asyncio.Event()

    # ---- keys ------------------------------------------------------------------------------

    def row_key(self, key: str) -> str:
        return self._keys.device(*split_key(key))

    # ---- lookups ---------------------------------------------------------------------------

    def cached(self, key: str) -> Device | None:
        """The cached row of a device, if any (no I/O)."""
        dev = self._cache.get(key)
        if dev is not None:
            self._cache.move_to_end(key)
        return dev

    def __len__(self) -> int:
        return len(self._cache)

    @property
    def version(self) -> int | None:
        """The registry version the cache is in line with (``None`` before :meth:`start`).

        A caller that has its writes refused unless ``registry:version`` still equals this
        value at write time (transform's fast path) never acts on a row older than the last
        change: any change bumps the version. On a refusal it calls :meth:`sync`.

        In the cluster layout it is the sum of the partitions' versions (each only grows, so
        it moves exactly when one of them does); the check itself is against the version of
        the batch's partition (:meth:`version_for`).
        """
        if self._applied is None:
            return None
        return sum(self._applied.values())

    def version_for(self, stream: str) -> int | None:
        """The version :meth:`pipeline.keys.Keys.registry_version_for` ``stream`` names, as
        the cache is in line with it."""
        if self._applied is None:
            return None
        part = self._keys.partition_of_stream(stream) if self._keys.cluster else None
        return self._applied.get(part or 0 if self._keys.cluster else None)

    @property
    def sync_replies(self) -> int:
        """How many replies :meth:`sync_queue` queues (what :meth:`sync_apply` takes)."""
        return 2 * len(self._parts)

    def parts_for(self, stream: str) -> list[int | None]:
        """The version/change-log pairs the rows of a batch read from ``stream`` depend on:
        its partition's in the cluster layout (a master that does not answer then holds up
        only its own partitions' checks), the one pair on one Redis."""
        if not self._keys.cluster:
            return self._parts
        return [self._keys.partition_of_stream(stream) or 0]

    async def get(self, key: str, *, sync: bool = True) -> Device | None:
        return (await self.get_many([key], sync=sync))[key]

    async def get_many(self, keys: Iterable[str], *, sync: bool = True) -> dict[str, Device | None]:
        """Rows of many devices: cache hits, then one pipelined ``HGETALL`` for the misses.

        ``sync=False`` skips the version check, for a caller that ran :meth:`sync_queue` and
        :meth:`sync_apply` in its own pipeline for this batch already.
        """
        if sync:
            await self.sync()
        out: dict[str, Device | None] = {}
        misses: list[str] = []
        cache = self._cache
        for key in keys:
            if key in out:
                continue
            dev = cache.get(key)
            if dev is None:
                misses.append(key)
                out[key] = None
            else:
                cache.move_to_end(key)
                out[key] = dev
        if misses:
            metrics.REGISTRY_LOOKUPS.labels("miss").inc(len(misses))
            out.update(await self.load(misses))
        hits = len(out) - len(misses)
        if hits:
            metrics.REGISTRY_LOOKUPS.labels("hit").inc(hits)
        return out

    async def load(self, keys: Sequence[str]) -> dict[str, Device | None]:
        """Read rows from Redis (bypassing the cache) and cache the ones found."""
        gen = self._gen
        if not self._keys.cluster:
            rows = await self._load(keys=[self.row_key(k) for k in keys], args=FIELDS)
        else:  # one script call per partition (one slot each), pipelined
            by_part: dict[int, list[int]] = {}
            for i, k in enumerate(keys):
                by_part.setdefault(self._keys.partition_of_device_key(k), []).append(i)
            async with self._redis.pipeline(transaction=False) as pipe:
                for idx in by_part.values():
                    await self._load(keys=[self.row_key(keys[i]) for i in idx], args=FIELDS,
                                     client=pipe)
                replies = await pipe.execute()
            rows = [None] * len(keys)
            for idx, got in zip(by_part.values(), replies, strict=True):
                for i, row in zip(idx, got, strict=True):
                    rows[i] = row
        out: dict[str, Device | None] = {}
        for key, row in zip(keys, rows, strict=True):
            dev = Device.from_fields(key, row)
            out[key] = dev
            if dev is not None and gen == self._gen:
                self._put(dev)
        return out

    def _put(self, dev: Device) -> None:
        cache = self._cache
        cache[dev.key] = dev
        cache.move_to_end(dev.key)
        if len(cache) > self._cache_size:
            cache.popitem(last=False)

    def evict(self, key: str) -> None:
        self._gen += 1
        self._cache.pop(key, None)

    def clear(self) -> None:
        self._gen += 1
        self._cache.clear()

    # ---- the version check -----------------------------------------------------------------

    def sync_queue(self, pipe: Pipeline, parts: Sequence[int | None] | None = None) -> None:
        """Queue the version check (:attr:`sync_replies` commands; two per pair of ``parts``,
        default all) in a caller's pipeline; see :meth:`sync_apply`."""
        for part in self._parts if parts is None else parts:
            pipe.get(self._keys.registry_version(part))
            pipe.xrange(self._keys.registry_changes(part), min=f"({self._applied_id[part]}",
                        count=SYNC_MAX)

    def sync_apply(self, *replies: Any, parts: Sequence[int | None] | None = None) -> bool:
        """Apply the replies of :meth:`sync_queue` (a version, then its changes, per pair of
        ``parts``, the same as queued); ``False`` = the caller must :meth:`reset` them."""
        if self._applied is None:
            return False
        ok = True
        for i, part in enumerate(self._parts if parts is None else parts):
            ok = self._apply_one(part, replies[2 * i], replies[2 * i + 1]) and ok
        return ok

    def _apply_one(self, part: int | None, version: Any,
                   changes: Sequence[tuple[bytes, dict[bytes, bytes]]]) -> bool:
        assert self._applied is not None
        v = int(version or 0)
        delta = v - self._applied[part]
        if delta == 0 and not changes:
            return True
        for _, fields in changes:
            key = fields.get(b"k")
            if key is not None:
                self.evict(key.decode())
        if len(changes) < delta or len(changes) >= SYNC_MAX:
            # Changes are missing from the log (trimmed) or too many to read: start over.
            metrics.REGISTRY_RESETS.inc()
            return False
        self._applied[part] += len(changes)
        if changes:
            last = changes[-1][0]
            self._applied_id[part] = last.decode() if isinstance(last, bytes) else str(last)
        return True

    async def sync(self, stream: str | None = None) -> None:
        """Run the version check on its own (one round trip): of every pair, or of those the
        rows of a batch read from ``stream`` depend on (:meth:`parts_for`)."""
        parts = None if stream is None else self.parts_for(stream)
        async with self._redis.pipeline(transaction=False) as pipe:
            self.sync_queue(pipe, parts)
            replies = await pipe.execute()
        if not self.sync_apply(*replies, parts=parts):
            await self.reset(parts)

    async def reset(self, parts: Sequence[int | None] | None = None) -> None:
        """Drop the cache and take the current version and change-log position atomically
        (per pair: one ``MULTI`` each, one slot in the cluster layout) — of every pair, or of
        ``parts`` (the others stay in line with the emptied cache)."""
        applied: dict[int | None, int] = {}
        if parts is not None and self._applied is not None:
            applied = {p: v for p, v in self._applied.items() if p not in parts}
        for part in self._parts if parts is None or self._applied is None else parts:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.get(self._keys.registry_version(part))
                pipe.xrevrange(self._keys.registry_changes(part), count=1)
                version, last = await pipe.execute()
            applied[part] = int(version or 0)
            if last:
                rid = last[0][0]
                self._applied_id[part] = rid.decode() if isinstance(rid, bytes) else str(rid)
            else:
                self._applied_id[part] = "0-0"
        self.clear()
        self._applied = applied

    # ---- pub/sub -------------------------------------------------------------------------

    async def start(self) -> None:
        """Take the current version and start the pub/sub listener."""
        await self.reset()
        if self._listener is None:
            self._listener = asyncio.create_task(self._listen(), name="registry-listener")

    async def close(self) -> None:
        if self._listener is not None:
            listener, self._listener = self._listener, None
            # Cancel again until it ends: a cancellation that lands as the client library's
            # pub/sub read completes can be absorbed, and the listener then waits on the next
            # message, which may never come (close() hung in the test suite on a loaded machine).
            while not listener.done():
                listener.cancel()
                await asyncio.wait({listener}, timeout=1.0)
            with contextlib.suppress(asyncio.CancelledError):
                await listener

    async def _listen(self) -> None:
        """Evict on every published change; reconnect with backoff (the version check covers
        whatever is missed meanwhile).

        The subscription has a client (and connection pool) of its own: a cancelled pub/sub
        read must never hand a connection still in subscribe mode back to the pool every other
        command uses.
        """
        from pipeline.consumer import backoff_s

        client = single_connection_client(self._redis)
        attempt = 0
        channel = self._keys.registry_channel()
        try:
            while True:
                pubsub = client.pubsub(ignore_subscribe_messages=True)
                try:
                    await pubsub.subscribe(channel)
                    self.subscribed.set()
                    attempt = 0
                    async for message in pubsub.listen():
                        data = message.get("data")
                        if isinstance(data, bytes):
                            self.evict(data.decode())
                except RedisError as exc:
                    self.subscribed.clear()
                    attempt += 1
                    log.warning("registry: pub/sub lost (%s); reconnecting", exc)
                    await pubsub.aclose()
                    await asyncio.sleep(backoff_s(attempt, 10.0))
        finally:
            self.subscribed.clear()
            await client.aclose(close_connection_pool=True)

    # ---- writes --------------------------------------------------------------------------

    async def _commit(self, changes: Sequence[_Change]) -> None:
        """Write rows, bump the version, log and publish each change — in one ``MULTI`` (in
        the cluster layout one per partition, then the reverse index, broken-device index and
        publications: keys of other slots, which a crash between could leave behind — the
        index backfill and the version check repair them)."""
        if not changes:
            return
        if not self._keys.cluster:
            async with self._redis.pipeline(transaction=True) as pipe:
                self._queue(pipe, changes)
                await pipe.execute()
        else:
            by_part: dict[int, list[_Change]] = {}
            for change in changes:
                by_part.setdefault(self._keys.partition_of_device_key(change[0]), []).append(
                    change)
            for part, group in by_part.items():
                async with self._redis.pipeline(transaction=True) as pipe:
                    self._queue_rows(pipe, group, part)
                    await pipe.execute()
            await self._write_side(changes)
        for key, _, _ in changes:
            self.evict(key)

    async def _write_side(self, changes: Sequence[_Change]) -> None:
        async with self._redis.pipeline(transaction=False) as pipe:
            self._queue_side(pipe, changes, now_ms())
            await pipe.execute()
        # Cluster pub/sub reaches every node's subscribers whichever node it is sent to.
        channel = self._keys.registry_channel()
        for key, _, _ in changes:
            await self._redis.publish(channel, key)

    def _queue(self, pipe: Pipeline, changes: Sequence[_Change]) -> None:
        """Queue :meth:`_commit`'s commands (one Redis); the broken-device index follows each
        row's status."""
        ts = self._queue_rows(pipe, changes, None)
        self._queue_side(pipe, changes, ts)

    def _queue_rows(self, pipe: Pipeline, changes: Sequence[_Change],
                    part: int | None) -> int:
        """The rows, change log and version of one version/change-log pair; returns the time
        written into the rows."""
        log_key = self._keys.registry_changes(part)
        ts = now_ms()
        for key, fields, drop in changes:
            row = self.row_key(key)
            if fields is None:
                pipe.delete(row)
            else:
                if drop:
                    pipe.hdel(row, *drop)
                values: dict[Any, Any] = {**fields, "updated_ms": str(ts)}
                pipe.hset(row, mapping=values)
            pipe.xadd(log_key, {b"k": key.encode()}, maxlen=CHANGES_MAXLEN, approximate=True)
        pipe.incrby(self._keys.registry_version(part), len(changes))
        return ts

    def _queue_side(self, pipe: Pipeline, changes: Sequence[_Change], ts: int) -> None:
        """The reverse index, the broken-device index and the publications of ``changes``."""
        channel = self._keys.registry_channel()
        broken = self._keys.broken_devices()
        for key, fields, _ in changes:
            if fields is None:
                pipe.zrem(broken, key)
            else:
                blynk_index.queue_write(pipe, self._keys, key, fields)
                status = fields.get("status")
                if status == STATUS_BROKEN:
                    pipe.zadd(broken, {key: ts})
                elif status == STATUS_OK:
                    pipe.zrem(broken, key)
            if not self._keys.cluster:  # a cluster pipeline refuses PUBLISH: _write_side
                pipe.publish(channel, key)

    async def register(
        self,
        key: str,
        *,
        token: str,
        template: str,
        server: str | None = None,
        blynk_id: int | None = None,
        meta_pending: bool = False,
    ) -> Device:
        """Create or replace a device's row (status back to ``ok``); returns the new row."""
        await self._commit([_register_change(key, token, template, server, blynk_id,
                                             meta_pending)])
        dev = Device(key=key, token=token, template=template, server=server, blynk_id=blynk_id,
                     meta_pending=meta_pending)
        self._put(dev)
        return dev

    async def mark_broken(self, device_key: str, reason: Reason, detail: str, *,
                          token: str | None = None) -> bool:
        """Mark a device broken (Blynk said its token is invalid). Transform then dead-letters
        its uplinks with reason ``device_broken`` until it is registered again, unbroken by an
        operator (``blynk-bridge devices unbreak``) or retried (:meth:`retry_broken`).

        With ``token``, only when the row (still) holds that token: a refusal of a token the
        row does not hold — one an uplink carried itself, or one replaced since — says nothing
        about the device. Returns whether the device was marked.
        """
        change: _Change = (device_key, {"status": STATUS_BROKEN, "reason": reason,
                                        "detail": detail[:500]}, ())
        if token is None:
            await self._commit([change])
        elif not await self._commit_if_token(device_key, token, change):
            return False
        metrics.DEVICES_BROKEN.labels(reason).inc()
        log.warning("device %s marked broken: %s (%s)", device_key, reason, detail[:200])
        return True

    async def _commit_if_token(self, device_key: str, token: str, change: _Change) -> bool:
        """:meth:`_commit` of ``change`` if the row's token is ``token`` (checked atomically:
        ``WATCH`` on the row)."""
        row = self.row_key(device_key)
        async with self._redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    await pipe.watch(row)
                    have = await pipe.hget(row, "token")
                    if not isinstance(have, bytes) or have.decode() != token:
                        return False  # leaving the block unwatches
                    pipe.multi()  # type: ignore[no-untyped-call]
                    if self._keys.cluster:
                        self._queue_rows(pipe, [change],
                                         self._keys.partition_of_device_key(device_key))
                    else:
                        self._queue(pipe, [change])
                    await pipe.execute()
                    break
                except WatchError:
                    continue  # the row changed meanwhile: look again
        if self._keys.cluster:
            await self._write_side([change])
        self.evict(device_key)
        return True

    async def mark_ok(self, device_key: str, *, by: str = "operator") -> bool:
        """Set a broken device back to ok (``by``: ``operator`` or ``retry``, for the metric);
        ``False`` when it has no row. Uplinks flow again; if its token is still refused, egress
        marks it broken again."""
        if not await self._redis.exists(self.row_key(device_key)):
            return False
        await self._commit([(device_key, {"status": STATUS_OK}, ("reason", "detail"))])
        metrics.DEVICES_UNBROKEN.labels(by).inc()
        log.info("device %s set back to ok (%s)", device_key, by)
        return True

    async def broken(self, *, before_ms: int | None = None,
                     limit: int | None = None) -> list[tuple[str, int]]:
        """``(device key, broken since ms)`` of broken devices, oldest first; ``before_ms``:
        only those marked before then."""
        raw = await self._redis.zrangebyscore(
            self._keys.broken_devices(), "-inf", "+inf" if before_ms is None else before_ms,
            start=0 if limit is not None else None, num=limit, withscores=True)
        rows = cast(list[tuple[bytes, float]], raw)
        return [(k.decode(), int(v)) for k, v in rows]

    async def retry_broken(self, older_than_ms: int) -> list[str]:
        """Set back to ok every device broken for longer than ``older_than_ms``; returns them.
        Replicas doing this at once each take a device once (``ZREM`` decides who)."""
        due = await self.broken(before_ms=now_ms() - older_than_ms, limit=1000)
        done: list[str] = []
        for key, _ in due:
            if await self._redis.zrem(self._keys.broken_devices(), key):
                await self.mark_ok(key, by="retry")
                done.append(key)
        return done

    async def metafield_done(self, device_key: str) -> None:
        await self._commit([(device_key, {}, ("meta_pending",))])

    async def remove(self, device_key: str) -> None:
        await self._commit([(device_key, None, ())])

    async def set_firmware(self, items: Mapping[str, str]) -> None:
        """Record devices' firmware versions. Not a mapping change: no version bump, and the
        cached rows are updated in place so a worker writes each new version once."""
        if not items:
            return
        async with self._redis.pipeline(transaction=False) as pipe:
            for key, fw in items.items():
                pipe.hset(self.row_key(key), "firmware", fw)
            await pipe.execute()
        for key, fw in items.items():
            dev = self._cache.get(key)
            if dev is not None:
                self._cache[key] = _replace_firmware(dev, fw)

    async def load_static(
        self, devices: Sequence[DeviceEntry], *, chunk: int = 1000
    ) -> int:
        """Register the configuration's static devices; idempotent. Returns rows changed.

        Only rows whose token, template or server differ are written (a device marked broken
        stays broken until its token changes), so restarting every worker changes nothing.
        """
        changed = 0
        for start in range(0, len(devices), chunk):
            part = devices[start : start + chunk]
            keys = [device_key(d.source, d.integration, d.device) for d in part]
            async with self._redis.pipeline(transaction=False) as pipe:
                for key in keys:
                    pipe.hgetall(self.row_key(key))
                rows = await pipe.execute()
            todo: list[_Change] = []
            for key, dev, row in zip(keys, part, rows, strict=True):
                want = {"token": dev.token.reveal(), "template": dev.template,
                        "server": dev.server or ""}
                have = {k: row.get(k.encode(), b"").decode() for k in want}
                if have != want:
                    todo.append(_register_change(key, want["token"], dev.template, dev.server,
                                                 None, False))
            await self._commit(todo)
            changed += len(todo)
        return changed


def _register_change(
    key: str, token: str, template: str, server: str | None, blynk_id: int | None,
    meta_pending: bool,
) -> _Change:
    fields = {"token": token, "template": template, "server": server or "",
              "status": STATUS_OK, "id": "" if blynk_id is None else str(blynk_id)}
    drop: tuple[str, ...] = ("reason", "detail")
    if meta_pending:
        fields["meta_pending"] = "1"
    else:
        drop += ("meta_pending",)
    return key, fields, drop


def _replace_firmware(dev: Device, fw: str) -> Device:
    from dataclasses import replace

    return replace(dev, firmware=fw)
