"""Held write entries, per device, and coalescing a device's entries into one plan.

Pure: no Redis, no Blynk, no clock of its own (callers pass ``now``, monotonic seconds, and
``wall_ms``, epoch milliseconds).

Every entry egress has read and not yet resolved is *held* here exactly once (keyed by stream
and entry id) until :meth:`HeldWrites.drop` forgets it: acked, dead-lettered, or handed back to
Redis. A device's entries are either *queued* (waiting for a flush) or *in flight* (one write of
the device is under way: at most one at a time, so a device's values reach Blynk in order).
Devices with queued entries and nothing in flight are *waiting*: the only ones a flush or a
deadline looks at. Each device is in one writes partition (that of its entries' stream);
:meth:`HeldWrites.forget_partition` forgets a partition's entries at once when egress stops
owning it (they stay pending in Redis for its next owner).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

import msgspec

from pipeline.coalesce import DevicePlan, coalesce
from pipeline.errors import Reason
from pipeline.events import BlynkWrite, decode_write
from pipeline.order import Record
from pipeline.streams import DeadItem, Entry


@dataclass(slots=True)
class Held:
    """One held entry, decoded."""

    entry: Entry
    write: BlynkWrite
    arrived: float  # monotonic


@dataclass(slots=True)
class DeviceQueue:
    """One device's held entries and its retry state."""

    key: str
    #: The writes partition of the device (of its entries' stream).
    partition: int = 0
    queued: list[Held] = field(default_factory=list)
    inflight: list[Held] = field(default_factory=list)
    #: Monotonic time before which this device sends nothing (429, rate limit, its partition
    #: lease not certainly held).
    not_before: float = 0.0
    #: Consecutive 429s, for the backoff when Blynk gives no ``Retry-After``.
    attempts: int = 0
    #: Pin → event times of the history points already uploaded for the held entries (no
    #: double upload when a later request of the same write fails and the whole write is
    #: retried). The times themselves, not the newest: a late point that joins the retried
    #: write may be older than points already uploaded, and must still go.
    history_done: dict[str, set[int]] = field(default_factory=dict)
    #: The device's record (:mod:`pipeline.order`), held by the owner of its partition; set
    #: by the flush that starts a write.
    record: Record | None = None
    #: The write under way, until the committer resolves it.
    pending: asyncio.Future[None] | None = None
    #: Its partition was given up: nothing of this write is recorded, acked or retried.
    gone: bool = False


class HeldWrites:
    """Every held entry, grouped per device (see module docstring)."""

    def __init__(self, live_window_ms: int,
                 partition_of: Callable[[str], int] = lambda stream: 0) -> None:
        self.live_window_ms = live_window_ms
        #: Stream → its writes partition.
        self.partition_of = partition_of
        #: (stream, entry id) → held entry.
        self.entries: dict[tuple[str, str], Held] = {}
        self.devices: dict[str, DeviceQueue] = {}
        #: Devices that may have queued entries and nothing in flight.
        self.waiting: dict[str, DeviceQueue] = {}

    def __len__(self) -> int:
        return len(self.entries)

    def hold(self, entries: list[Entry], now: float) -> list[DeadItem]:
        """Queue each entry under its device; returns the undecodable ones as
        ``(entry, "undecodable", detail)`` for the caller to dead-letter. An entry already held
        (handed back by ``XAUTOCLAIM``) is skipped."""
        bad: list[DeadItem] = []
        for entry in entries:
            if (entry.stream, entry.id) in self.entries:
                continue
            try:
                if entry.data is None:
                    raise msgspec.DecodeError("no 'd' field")
                write = decode_write(entry.data)
            except msgspec.DecodeError as exc:  # ValidationError is a DecodeError
                bad.append((entry, Reason.UNDECODABLE, str(exc)))
                continue
            held = Held(entry, write, now)
            self.entries[(entry.stream, entry.id)] = held
            dev = self.devices.get(write.device_key)
            if dev is None:
                dev = self.devices[write.device_key] = DeviceQueue(
                    write.device_key, self.partition_of(entry.stream))
            dev.queued.append(held)
            if not dev.inflight:
                self.waiting[dev.key] = dev
        return bad

    def start(self, dev: DeviceQueue, wall_ms: int) -> DevicePlan:
        """Put the device's queued entries in flight and coalesce them into its plan."""
        dev.inflight, dev.queued = dev.queued, []
        self.waiting.pop(dev.key, None)
        items = [(i, h.write) for i, h in enumerate(dev.inflight)]
        plans = coalesce(items, now_ms=wall_ms, live_window_ms=self.live_window_ms)
        return plans[dev.key]

    def requeue(self, dev: DeviceQueue, *, not_before: float) -> None:
        """Put the in-flight entries back in front of the queue, to be sent after ``not_before``
        (a device whose partition is gone keeps nothing)."""
        if dev.gone:
            dev.inflight = []
            return
        dev.queued = dev.inflight + dev.queued
        dev.inflight = []
        if dev.queued:
            self.waiting[dev.key] = dev
        dev.not_before = max(dev.not_before, not_before)

    def drop(self, dev: DeviceQueue, now: float) -> None:
        """Forget the resolved in-flight entries; forget the device when nothing is left (and
        no backoff of it is still running)."""
        entries = self.entries
        for h in dev.inflight:
            entries.pop((h.entry.stream, h.entry.id), None)
        dev.inflight = []
        if dev.queued:
            self.waiting[dev.key] = dev
        elif dev.not_before <= now and self.devices.get(dev.key) is dev:
            del self.devices[dev.key]

    def forget_partition(self, partition: int) -> list[DeviceQueue]:
        """Forget every entry of ``partition`` (nothing is acked: they stay pending in Redis);
        its devices are marked ``gone``. Returns those with a write under way."""
        busy: list[DeviceQueue] = []
        for key, dev in list(self.devices.items()):
            if dev.partition != partition:
                continue
            for h in dev.inflight + dev.queued:
                self.entries.pop((h.entry.stream, h.entry.id), None)
            dev.gone = True
            dev.queued = []
            if dev.inflight:
                busy.append(dev)
            del self.devices[key]
            self.waiting.pop(key, None)
        return busy

    def ids_by_stream(self) -> dict[str, list[str]]:
        """Stream → ids of every held entry."""
        out: dict[str, list[str]] = {}
        for stream, entry_id in self.entries:
            out.setdefault(stream, []).append(entry_id)
        return out
