"""De-duplication of uplinks by ``event_id`` within a window, in the partition owner's memory.

**Who decides.** Transform owns uplinks partitions (a :class:`pipeline.lease.PartitionLeases`
lease each, as egress owns writes partitions) and a device's uplinks all go to one partition,
so every copy of an event reaches the same owner: the owner keeps the partition's window in
memory (:class:`Window`) and checks each uplink there — no Redis command per event.

**Contract.** A *claim* of ``(event_id, mark)`` answers the mark that owns the event within the
window, or ``None`` when the event is new (it is then owned by ``mark``). The *mark* names the
stream entry that claimed the event (:func:`mark_of`: 4 bytes of CRC-32 of
``<stream>/<entry id>``), which is what makes marking before writing safe:

* the reply is ``None`` → the event is new; this entry now owns it;
* the reply is this entry's own mark → this is a *redelivery* of the entry that claimed the
  event (its commit failed, or was not made yet), so it is processed again;
* any other mark → another entry carries the same event: a duplicate, acked and counted.

So a second entry with the same event is dropped only because the first one owns it, and the
first stays pending until its outputs are written. Two marks that collide (CRC-32) only make a
duplicate look like a redelivery: it is processed again (a duplicate write, which egress's
event-time ordering makes a no-op), never dropped.

**Marked with the write.** Claims live in memory until their entry is committed: transform's
commit (:class:`workers.transform.scripts.Commit`), fenced by the partition lease's token, writes
the outputs, acks the inputs and appends one *block* of the committed new events (:func:`block`:
16 bytes each, digest + mark) to the partition's key of the current time step
(:func:`block_key`), created with the window's expiry — atomically. A new owner loads the
partition's blocks (:func:`load`, one ``MGET``) before it reads an entry. Hence:

* a crash loses no event: an uncommitted entry is unmarked (nothing in Redis) and redelivered;
* every committed event is in a block the next owner loads, so it drops the duplicates;
* an owner that lost its lease commits nothing (the commit refuses), so no block misses an
  event whose outputs were written.

**Window.** Time steps of ``window / STEPS`` (at least 1 ms) on the owner's clock: an event is
remembered while its step is at most ``ceil(window / step)`` steps old — at least the window,
at most one step longer — and a step's events are dropped whole (memory follows the window).
Blocks are named by step, expire ``window + 2 steps`` after their creation, and a takeover
loads the live steps and one step either side (owners' clocks differ a little).

**Memory bound.** ``transform.dedup_max_events`` per process (over the partitions it owns;
:class:`Budget`): past it the oldest steps are dropped early, counted in
``bb_dedup_evicted_total`` and logged once per episode; a takeover loads the newest records up
to the cap at most (the blocks in Redis are not capped), the older ones counted alike. A
duplicate older than the shortened window then passes as a new event: a duplicate write (a
no-op for egress's ordering), never a lost reading. Each event costs ~:data:`BYTES_PER_EVENT`
bytes of the owner's memory and 16 bytes (+ string overhead per step) of Redis.

**Exact, not probabilistic.** A digest collision would drop a real reading, so the digest is
96 bits: with 360 million events in the window (100,000/s for an hour) the chance that a new
event collides with any of them is ~5·10⁻²¹, one lost reading in ~10⁷ years at that rate.

**Dead letters and replays.** An uplink dead-lettered whole forgets its own claim
(:meth:`Window.forget`; it was never committed in a block). A replayed dead letter is appended
with the field :data:`pipeline.events.REPLAY`: its entry *takes* the event
(:meth:`Window.take`), whatever owns it, so the replay is processed instead of dropped as a
duplicate — the owner's memory needs no message from the replaying process.

**Upgrade.** The Redis sorted-set shards of the release before (``<base>:r<time>:…``) are not
read: the upgrade starts a new de-dup window (blocks are named ``<base>:b<step ms>:<step>``,
disjoint from them; the old shards expire with their TTLs).
"""

from __future__ import annotations

import hashlib
import logging
import time
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Sequence

from pipeline import metrics
from pipeline.keys import Keys
from pipeline.streams import Entry, Redis

log = logging.getLogger("blynk_bridge.dedup")

#: Time steps per window (module docstring): memory follows the window within 1/STEPS of it,
#: and a takeover reads up to STEPS + 3 keys.
STEPS = 64
DIGEST_BYTES = 12
MARK_BYTES = 4
#: One event of a block: its digest, then the mark of the entry that claimed it.
RECORD_BYTES = DIGEST_BYTES + MARK_BYTES
#: Step keys per ``MGET`` of a takeover's load (newest first, stopping at the cap).
LOAD_STEPS = 8
#: Owner memory per event remembered, measured (tests/test_dedup.py checks it):
#: the digest's bytes object, the dict slot and the step-and-mark int, the step list's slot.
BYTES_PER_EVENT = 150
_MARK_MASK = (1 << 32) - 1


def digest(event_id: str) -> bytes:
    return hashlib.blake2b(event_id.encode(), digest_size=DIGEST_BYTES).digest()


def mark(stream: str, entry_id: str) -> int:
    """The mark of one stream entry."""
    return zlib.crc32(f"{stream}/{entry_id}".encode())


def mark_of(entry: Entry) -> int:
    return mark(entry.stream, entry.id)


def step_ms(window_s: int) -> int:
    """The length of a time step."""
    return max(1, -(-window_s * 1000 // STEPS))


def block_key(keys: Keys, stream: str, window_s: int, step: int) -> str:
    """The block of one partition's step (the partition's hash tag: :meth:`Keys.dedup`)."""
    return f"{keys.dedup(stream)}:b{step_ms(window_s)}:{step}"


def block_ttl_ms(window_s: int) -> int:
    return window_s * 1000 + 2 * step_ms(window_s)


def block(records: Iterable[tuple[bytes, int]]) -> bytes:
    """The bytes appended for committed events ``(digest, mark)``."""
    return b"".join(d + m.to_bytes(MARK_BYTES, "big") for d, m in records)


class Budget:
    """The events remembered by one process over every partition it owns, and its cap."""

    def __init__(self, max_events: int) -> None:
        self.max_events = max_events
        self.windows: set[Window] = set()
        self._evicting = False

    def total(self) -> int:
        return sum(len(w) for w in self.windows)

    def enforce(self) -> None:
        """Drop the oldest steps (of any window) until the events fit the cap."""
        over = self.total() - self.max_events
        if over <= 0:
            self._evicting = False
            return
        evicted = 0
        while over > 0:
            oldest = min((w for w in self.windows if w.steps), key=lambda w: w.steps[0][0],
                         default=None)
            if oldest is None:
                break
            n = oldest.drop_oldest()
            evicted += n
            over -= n
        self.evicted(evicted)

    def evicted(self, n: int) -> None:
        """``n`` events forgotten before their window ended: counted, logged once per
        episode."""
        if not self._evicting:
            self._evicting = True
            log.warning("de-duplication: more than %d events in the window "
                        "(transform.dedup_max_events): the oldest are forgotten early, so a "
                        "duplicate older than that passes as a new event (a duplicate write, "
                        "not a lost reading)", self.max_events)
        metrics.DEDUP_EVICTED.inc(n)


class Window:
    """One partition's de-duplication window in memory (module docstring)."""

    def __init__(self, window_s: int, budget: Budget | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self.step_ms = step_ms(window_s)
        #: Steps an event stays live after its own.
        self.live = -(-window_s * 1000 // self.step_ms)
        #: digest → step << 32 | mark.
        self._seen: dict[bytes, int] = {}
        #: (step, digests claimed in it), oldest first.
        self.steps: deque[tuple[int, list[bytes]]] = deque()
        self.budget = budget
        if budget is not None:
            budget.windows.add(self)

    def __len__(self) -> int:
        return len(self._seen)

    def close(self) -> None:
        """Forget everything and leave the budget (the partition was given up)."""
        self._seen.clear()
        self.steps.clear()
        if self.budget is not None:
            self.budget.windows.discard(self)

    def step(self) -> int:
        """The current step on the owner's clock."""
        return int(self._clock() * 1000) // self.step_ms

    def now(self) -> int:
        """The current step; steps that left the window are dropped."""
        step = self.step()
        steps = self.steps
        if not steps or steps[-1][0] < step:
            steps.append((step, []))
        oldest = step - self.live
        while steps and steps[0][0] < oldest:
            self.drop_oldest()
        return step

    def drop_oldest(self) -> int:
        """Forget the oldest step's events: how many were forgotten."""
        step, digests = self.steps.popleft()
        seen = self._seen
        n = 0
        for d in digests:
            v = seen.get(d)
            if v is not None and v >> 32 == step:
                del seen[d]
                n += 1
        return n

    def claim(self, d: bytes, m: int) -> int | None:
        """The mark owning digest ``d``, or ``None`` when new (then ``m`` owns it); call
        :meth:`now` first (once per batch)."""
        v = self._seen.get(d)
        if v is not None:
            return v & _MARK_MASK
        step, digests = self.steps[-1]
        self._seen[d] = step << 32 | m
        digests.append(d)
        return None

    def take(self, d: bytes, m: int) -> None:
        """``m`` owns ``d`` from now on, whatever owned it (a replay)."""
        step, digests = self.steps[-1]
        self._seen[d] = step << 32 | m
        digests.append(d)

    def find(self, d: bytes) -> int | None:
        """The mark owning ``d`` (``None``: not seen); no claim."""
        v = self._seen.get(d)
        return None if v is None else v & _MARK_MASK

    def forget(self, d: bytes, m: int) -> None:
        """Forget ``d`` if ``m`` owns it (a claim dead-lettered before being committed)."""
        v = self._seen.get(d)
        if v is not None and v & _MARK_MASK == m:
            del self._seen[d]

    def load(self, blocks: Sequence[tuple[int, bytes | None]], limit: int | None = None) -> int:
        """Add the committed events of ``(step, block)``, oldest step first (a later record of
        a digest wins: a replay's), at most the newest ``limit`` records (the older ones are
        counted as evicted: a takeover's load must not take more memory than the cap); how
        many records were read."""
        seen = self._seen
        loaded: dict[int, list[bytes]] = {}
        n = 0
        skip = 0
        if limit is not None:
            skip = max(0, sum(len(raw or b"") // RECORD_BYTES for _, raw in blocks) - limit)
            if skip and self.budget is not None:
                self.budget.evicted(skip)
        for step, raw in blocks:
            if not raw:
                continue
            records = len(raw) // RECORD_BYTES
            if skip >= records:
                skip -= records
                continue
            start, skip = skip * RECORD_BYTES, 0
            digests = loaded.setdefault(step, [])
            for o in range(start, len(raw) - RECORD_BYTES + 1, RECORD_BYTES):
                d = raw[o:o + DIGEST_BYTES]
                seen[d] = step << 32 | int.from_bytes(raw[o + DIGEST_BYTES:o + RECORD_BYTES],
                                                      "big")
                digests.append(d)
                n += 1
        merged = dict(self.steps)
        for step, digests in loaded.items():
            merged.setdefault(step, []).extend(digests)
        self.steps = deque(sorted(merged.items()))
        return n


async def load(redis: Redis, keys: Keys, stream: str, window_s: int, window: Window) -> int:
    """Load the blocks of ``stream``'s partition into ``window``; how many events were read.

    Newest steps first, :data:`LOAD_STEPS` keys per ``MGET`` (its keys share the partition's
    slot), and no further once the cap's worth of records is in hand: a takeover never holds
    (nor makes Redis send) more than the cap and one fetch of blocks, however large the
    window's blocks are. The steps not fetched are measured (``STRLEN``) and counted as
    evicted."""
    step = window.step()
    steps = list(range(step + 1, step - window.live - 2, -1))  # newest first
    limit = None if window.budget is None else window.budget.max_events
    fetched: list[tuple[int, bytes | None]] = []
    records = 0
    i = 0
    while i < len(steps) and (limit is None or records < limit):
        chunk = steps[i:i + LOAD_STEPS]
        raw = await redis.mget([block_key(keys, stream, window_s, s) for s in chunk])
        for s, v in zip(chunk, raw, strict=True):
            b = v.encode() if isinstance(v, str) else v
            fetched.append((s, b))
            records += len(b or b"") // RECORD_BYTES
        i += LOAD_STEPS
    if i < len(steps) and window.budget is not None:
        async with redis.pipeline(transaction=False) as pipe:
            for s in steps[i:]:
                pipe.strlen(block_key(keys, stream, window_s, s))
            left = sum(int(n) for n in await pipe.execute()) // RECORD_BYTES
        if left:
            window.budget.evicted(left)
    n = window.load(fetched[::-1], limit)
    window.now()  # drop what the load brought from before the window
    if window.budget is not None:  # with the other partitions', over the process's cap
        window.budget.enforce()
    return n


async def committed(redis: Redis, keys: Keys, stream: str, window_s: int,
                    event_id: str) -> int | None:
    """The mark that owns an event as committed in the partition's blocks (``None``: not
    within the window): what the partition's next owner will know; for tests and operators."""
    window = Window(window_s)
    await load(redis, keys, stream, window_s, window)
    return window.find(digest(event_id))
