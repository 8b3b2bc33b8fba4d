"""Coalescing a batch of Blynk writes into one message per device (pure: no I/O, no clock).

The rules, in the order they apply (DESIGN.md "Guarantees: Order"):

1. **Per device, per pin, the newest event time wins** (event-time last-writer-wins within the
   batch). On equal event times the later entry in the batch wins, so a flush is deterministic.
   The winner is the pin's *current* value, sent in the device's one ``batch/update``.
2. **History pins keep every point.** For a pin the entry lists in ``history_pins`` (its
   datastream says ``history: true``), every point the current value supersedes — and the
   current value itself when it is older than the live window (``event_ts_ms < now_ms -
   live_window_ms``: backlog after an outage) — is kept as a history point ``(event_ts_ms,
   value)`` for the timestamped upload, one per event time, so charts keep every reading at its
   true time. The current value still ends at the newest point, whatever its age.
3. **Nothing older than what Blynk already has** (:func:`drop_stale`): given the last written
   event time per pin (kept in Redis by :mod:`pipeline.order`), a current value whose time is
   strictly older is dropped, so a late entry can never roll a datastream back. A value with the
   *same* time is sent: it may be another event of that moment, and equal times are applied in
   arrival order (a redelivered entry re-sends the value Blynk already has, which changes
   nothing). A history point not newer is dropped, so no history point is written twice.

Points of other pins that lose rule 1 are *superseded*: coalesced away on purpose (that is what
turns five uplinks into one Blynk message) and counted in :attr:`DevicePlan.superseded`.

Every plan remembers which entries (by the caller's integer ``ref``) carried each pin, so the
caller can ack, retry or dead-letter exactly the entries behind a pin.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from pipeline.events import BlynkWrite, Value
from pipeline.redact import masked_repr


@dataclass(slots=True)
class PinPlan:
    """What one flush writes to one pin of one device."""

    #: Event time of the current value (the newest point seen for this pin).
    ts_ms: int
    value: Value
    #: Send ``value`` as the current value (``False`` once it proved stale).
    send_current: bool = True
    #: Backlog points for the timestamped upload, oldest first, one per event time.
    history: list[tuple[int, Value]] = field(default_factory=list)
    #: Entries (caller refs) that carried this pin, whether or not their value won.
    refs: set[int] = field(default_factory=set)


@dataclass(slots=True)
class DevicePlan:
    """One device's share of a flush: one ``batch/update`` plus history uploads."""

    device_key: str
    #: Token and server of the newest entry (a re-provisioned device may change token).
    token: str
    server: str
    pins: dict[str, PinPlan] = field(default_factory=dict)
    #: Every entry of this device in the batch.
    refs: list[int] = field(default_factory=list)
    #: Event time of the newest entry (whose token and server the plan uses).
    newest_ts_ms: int = -1
    #: Some pin got history points (they may since have been dropped as stale).
    backlog: bool = False
    #: Values neither sent as current nor kept as history points (rule 1 losers).
    superseded: int = 0
    #: Values dropped as stale (rule 3), set by the caller after :func:`drop_stale`.
    stale: int = 0

    def __repr__(self) -> str:
        return masked_repr(self)

    def current(self) -> dict[str, Value]:
        """Pins to send in the one ``batch/update`` (may be empty)."""
        return {pin: p.value for pin, p in self.pins.items() if p.send_current}

    def history(self) -> dict[str, list[tuple[int, Value]]]:
        """Pins with history points to upload."""
        return {pin: p.history for pin, p in self.pins.items() if p.history}

    def is_empty(self) -> bool:
        """Nothing left to send (everything was stale)."""
        return not any(p.send_current or p.history for p in self.pins.values())

    def refs_of(self, pins: Iterable[str]) -> set[int]:
        """Entries that carried any of ``pins``."""
        out: set[int] = set()
        for pin in pins:
            plan = self.pins.get(pin)
            if plan is not None:
                out |= plan.refs
        return out


def coalesce(
    items: Sequence[tuple[int, BlynkWrite]], *, now_ms: int, live_window_ms: int
) -> dict[str, DevicePlan]:
    """Group ``(ref, write)`` pairs by device and apply rules 1 and 2 (see module docstring).

    Input order is stream order; it only breaks ties between equal event times. Returns one plan
    per ``device_key``, in order of first appearance.
    """
    horizon = now_ms - live_window_ms
    if len(items) == 1:  # a device's one entry (the common write): nothing to compare
        ref, write = items[0]
        return {write.device_key: _one(ref, write, horizon)}
    plans: dict[str, DevicePlan] = {}
    # device → pin → event time → value, every point of history pins (later entries win ties)
    points: dict[str, dict[str, dict[int, Value]]] = {}
    for ref, write in items:
        plan = plans.get(write.device_key)
        if plan is None:
            plan = plans[write.device_key] = DevicePlan(write.device_key, write.token, write.server)
        plan.refs.append(ref)
        ts = write.event_ts_ms
        if ts >= plan.newest_ts_ms:
            plan.newest_ts_ms, plan.token, plan.server = ts, write.token, write.server
        history_pins = set(write.history_pins) if write.history_pins else ()
        for pin, value in write.pins.items():
            plan.superseded += 1  # taken back below for each value that is kept
            current = plan.pins.get(pin)
            if current is None:
                current = plan.pins[pin] = PinPlan(ts, value)
            elif ts >= current.ts_ms:
                current.ts_ms, current.value = ts, value
            current.refs.add(ref)
            if pin in history_pins:
                points.setdefault(write.device_key, {}).setdefault(pin, {})[ts] = value
    for plan in plans.values():
        plan.superseded -= len(plan.pins)  # the current values
        for pin, by_ts in points.get(plan.device_key, {}).items():
            now_ts = plan.pins[pin].ts_ms
            history = sorted((ts, v) for ts, v in by_ts.items() if ts < now_ts or ts < horizon)
            if history:
                plan.backlog = True
                plan.pins[pin].history = history
                plan.superseded -= sum(1 for ts, _ in history if ts != now_ts)
    return plans


def _one(ref: int, write: BlynkWrite, horizon: int) -> DevicePlan:
    """:func:`coalesce` of one entry: each pin's value is current; a history pin's value is
    also a history point when it is older than the live window (rule 2)."""
    ts = write.event_ts_ms
    history_pins = write.history_pins
    pins: dict[str, PinPlan] = {}
    backlog = False
    for pin, value in write.pins.items():
        if history_pins and ts < horizon and pin in history_pins:
            pins[pin] = PinPlan(ts, value, True, [(ts, value)], {ref})
            backlog = True
        else:
            pins[pin] = PinPlan(ts, value, True, [], {ref})
    return DevicePlan(write.device_key, write.token, write.server, pins, [ref], max(ts, -1),
                      backlog)


def drop_stale(plan: DevicePlan, last_written: Mapping[str, int]) -> list[str]:
    """Rule 3: drop current values older than ``last_written`` (pin → event time in Blynk) and
    history points not newer.

    Mutates ``plan`` and returns the pins whose current value was dropped as stale.
    """
    stale: list[str] = []
    for pin, p in plan.pins.items():
        last = last_written.get(pin)
        if last is None:
            continue
        if p.send_current and p.ts_ms < last:
            p.send_current = False
            stale.append(pin)
        if p.history and p.history[0][0] <= last:
            p.history = [(ts, v) for ts, v in p.history if ts > last]
    return stale


def history_only(plan: DevicePlan) -> int:
    """History points that are not also a pin's current value (for counting those
    :func:`drop_stale` drops: a current value dropped as stale is counted once, as its pin)."""
    if not plan.backlog:  # the common case, on every device write: no walk over the pins
        return 0
    return sum(1 for p in plan.pins.values() for ts, _ in p.history if ts != p.ts_ms)


def split(pins: Mapping[str, Value]) -> tuple[dict[str, Value], dict[str, Value]]:
    """Halve a pin set (for isolating a bad pin or shrinking a request that was too large)."""
    names = list(pins)
    mid = len(names) // 2
    return {k: pins[k] for k in names[:mid]}, {k: pins[k] for k in names[mid:]}


def chunks(points: Sequence[tuple[int, Value]], size: int) -> list[list[tuple[int, Value]]]:
    """Split history points into uploads of at most ``size`` (Blynk: 10,000 per request)."""
    return [list(points[i : i + size]) for i in range(0, len(points), size)]
