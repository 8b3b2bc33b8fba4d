"""Table tests for pipeline.coalesce: event-time LWW per device/pin, backlog split, staleness."""

from __future__ import annotations

from typing import Any

import pytest

from pipeline.coalesce import chunks, coalesce, drop_stale, split
from pipeline.events import BlynkWrite, Value

NOW = 1_700_000_000_000
WINDOW = 60_000
OLD = NOW - WINDOW - 1  # just outside the live window: backlog


def w(dev: str, ts: int, pins: dict[str, Value], *, hist: tuple[str, ...] = (),
      token: str | None = None, server: str = "s1") -> BlynkWrite:
    return BlynkWrite(
        token=token or f"tok-{dev}", server=server, device_key=dev, pins=pins, event_ts_ms=ts,
        received_ts_ms=ts, event_id=f"{dev}-{ts}", history_pins=list(hist),
    )


def current_of(batch: list[BlynkWrite]) -> dict[str, dict[str, Value]]:
    plans = coalesce(list(enumerate(batch)), now_ms=NOW, live_window_ms=WINDOW)
    return {dev: p.current() for dev, p in plans.items()}


@pytest.mark.parametrize(
    ("batch", "expected"),
    [
        pytest.param([], {}, id="empty"),
        pytest.param([w("a", NOW, {"V1": 1})], {"a": {"V1": 1}}, id="single"),
        pytest.param(
            [w("a", NOW - 3, {"V1": 1}), w("a", NOW - 2, {"V1": 2}), w("a", NOW - 1, {"V1": 3})],
            {"a": {"V1": 3}}, id="in-order: newest wins",
        ),
        pytest.param(
            [w("a", NOW - 1, {"V1": 3}), w("a", NOW - 3, {"V1": 1}), w("a", NOW - 2, {"V1": 2})],
            {"a": {"V1": 3}}, id="out-of-order: newest event time wins, not last read",
        ),
        pytest.param(
            [w("a", NOW, {"V1": 1}), w("a", NOW, {"V1": 2})],
            {"a": {"V1": 2}}, id="tie: later entry in the stream wins",
        ),
        pytest.param(
            [w("a", NOW - 2, {"V1": 1, "V2": 10}), w("a", NOW - 1, {"V1": 2})],
            {"a": {"V1": 2, "V2": 10}}, id="pins merge: each keeps its own newest",
        ),
        pytest.param(
            [w("a", NOW - 1, {"V1": 1, "V2": "x"}),
             w("a", NOW - 2, {"V2": "old", "V3": [1.0, 2.0]})],
            {"a": {"V1": 1, "V2": "x", "V3": [1.0, 2.0]}}, id="older entry still adds new pins",
        ),
        pytest.param(
            [w("a", NOW, {"V1": 1}), w("b", NOW, {"V1": 2}), w("a", NOW + 1, {"V2": 3})],
            {"a": {"V1": 1, "V2": 3}, "b": {"V1": 2}}, id="devices kept apart",
        ),
        pytest.param(
            [w("a", OLD - 5, {"V1": 1}), w("a", OLD, {"V1": 2})],
            {"a": {"V1": 2}}, id="backlog only: current is still the newest",
        ),
        pytest.param(
            [w("a", NOW, {"V1": None})], {"a": {"V1": None}}, id="None is a value like any other",
        ),
    ],
)
def test_current_values(batch: list[BlynkWrite], expected: dict[str, Any]) -> None:
    assert current_of(batch) == expected


def test_five_uplinks_per_device_make_one_message_each() -> None:
    batch = [w(f"d{d}", NOW - 5 + i, {"V1": i, "V2": d}) for i in range(5) for d in range(10)]
    plans = coalesce(list(enumerate(batch)), now_ms=NOW, live_window_ms=WINDOW)
    assert len(plans) == 10  # one batch/update each: 0.2 messages per uplink
    for d in range(10):
        plan = plans[f"d{d}"]
        assert plan.current() == {"V1": 4, "V2": d}
        assert len(plan.refs) == 5
        assert plan.history() == {}


@pytest.mark.parametrize(
    ("batch", "expected_history", "expected_current"),
    [
        pytest.param(
            [w("a", OLD - 2, {"V1": 1}, hist=("V1",)), w("a", OLD - 1, {"V1": 2}, hist=("V1",)),
             w("a", NOW, {"V1": 3}, hist=("V1",))],
            {"V1": [(OLD - 2, 1), (OLD - 1, 2)]}, {"V1": 3},
            id="backlog points become history; live newest is current",
        ),
        pytest.param(
            [w("a", OLD - 1, {"V1": 2}, hist=("V1",)), w("a", OLD - 2, {"V1": 1}, hist=("V1",))],
            {"V1": [(OLD - 2, 1), (OLD - 1, 2)]}, {"V1": 2},
            id="history sorted by time; old newest is both history and current",
        ),
        pytest.param(
            [w("a", OLD - 2, {"V1": 1, "V2": 5}, hist=("V1",)), w("a", NOW, {"V2": 6})],
            {"V1": [(OLD - 2, 1)]}, {"V1": 1, "V2": 6},
            id="only pins listed in history_pins keep history",
        ),
        pytest.param(
            [w("a", NOW - 10, {"V1": 1}, hist=("V1",)), w("a", NOW, {"V1": 2}, hist=("V1",))],
            {"V1": [(NOW - 10, 1)]}, {"V1": 2},
            id="superseded live points of a history pin are history too",
        ),
        pytest.param(
            [w("a", NOW, {"V1": 1}, hist=("V1",)), w("a", NOW, {"V1": 2}, hist=("V1",))],
            {}, {"V1": 2}, id="a live point of the current value's time is not history",
        ),
        pytest.param(
            [w("a", NOW - 10, {"V1": 1, "V2": 1}, hist=("V2",)), w("a", NOW, {"V1": 2, "V2": 2})],
            {"V2": [(NOW - 10, 1)]}, {"V1": 2, "V2": 2},
            id="the history_pins of the entry that carried the point count",
        ),
        pytest.param(
            [w("a", OLD, {"V1": 1}, hist=("V1",)), w("a", OLD, {"V1": 9}, hist=("V1",))],
            {"V1": [(OLD, 9)]}, {"V1": 9}, id="one history point per event time (later wins)",
        ),
        pytest.param(
            [w("a", NOW - WINDOW, {"V1": 1}, hist=("V1",))],
            {}, {"V1": 1}, id="exactly at the window edge is live",
        ),
    ],
)
def test_backlog_split(
    batch: list[BlynkWrite], expected_history: dict[str, Any], expected_current: dict[str, Any]
) -> None:
    plan = coalesce(list(enumerate(batch)), now_ms=NOW, live_window_ms=WINDOW)["a"]
    assert plan.history() == expected_history
    assert plan.current() == expected_current
    # every value is sent, kept as history, or counted as superseded
    values = sum(len(x.pins) for x in batch)
    kept = sum(1 for pin, pts in plan.history().items() for ts, _ in pts
               if ts != plan.pins[pin].ts_ms)
    assert plan.superseded == values - len(plan.current()) - kept


@pytest.mark.parametrize(
    ("batch", "superseded"),
    [
        pytest.param([w("a", NOW + i, {"V1": i, "V2": i}) for i in range(5)], 8,
                     id="five uplinks, two pins: eight values superseded"),
        pytest.param([w("a", NOW + i, {"V1": i}, hist=("V1",)) for i in range(5)], 0,
                     id="a history pin keeps every point"),
        pytest.param([w("a", NOW, {"V1": 1}, hist=("V1",)), w("a", NOW, {"V1": 2}, hist=("V1",))],
                     1, id="two values of one moment: the earlier arrival is superseded"),
    ],
)
def test_superseded_values_are_counted(batch: list[BlynkWrite], superseded: int) -> None:
    plan = coalesce(list(enumerate(batch)), now_ms=NOW, live_window_ms=WINDOW)["a"]
    assert plan.superseded == superseded


@pytest.mark.parametrize(
    ("batch", "last", "current", "history", "stale"),
    [
        pytest.param([w("a", NOW, {"V1": 1})], {}, {"V1": 1}, {}, [], id="never written"),
        pytest.param([w("a", NOW, {"V1": 1})], {"V1": NOW - 1}, {"V1": 1}, {}, [], id="newer"),
        pytest.param([w("a", NOW, {"V1": 1})], {"V1": NOW}, {"V1": 1}, {}, [],
                     id="same time: applied in arrival order (only strictly older is stale)"),
        pytest.param([w("a", NOW - 5, {"V1": 1})], {"V1": NOW}, {}, {}, ["V1"],
                     id="late: older is stale"),
        pytest.param([w("a", NOW, {"V1": 1, "V2": 2})], {"V2": NOW + 1}, {"V1": 1}, {}, ["V2"],
                     id="only the stale pin is dropped"),
        pytest.param(
            [w("a", OLD - 2, {"V1": 1}, hist=("V1",)), w("a", OLD - 1, {"V1": 2}, hist=("V1",)),
             w("a", NOW, {"V1": 3}, hist=("V1",))],
            {"V1": OLD - 2}, {"V1": 3}, {"V1": [(OLD - 1, 2)]}, [],
            id="history points already written are not written twice",
        ),
        pytest.param(
            [w("a", OLD - 2, {"V1": 1}, hist=("V1",)), w("a", OLD - 1, {"V1": 2}, hist=("V1",))],
            {"V1": OLD - 1}, {"V1": 2}, {}, [],
            id="a redelivered backlog writes no history point twice (equal current value goes)",
        ),
    ],
)
def test_drop_stale(
    batch: list[BlynkWrite], last: dict[str, int], current: dict[str, Any],
    history: dict[str, Any], stale: list[str],
) -> None:
    plan = coalesce(list(enumerate(batch)), now_ms=NOW, live_window_ms=WINDOW)["a"]
    assert drop_stale(plan, last) == stale
    assert plan.current() == current
    assert plan.history() == history
    assert plan.is_empty() == (not current and not history)


def test_refs_track_entries_per_pin() -> None:
    batch = [w("a", NOW - 2, {"V1": 1, "V2": 2}), w("a", NOW - 1, {"V1": 3}),
             w("b", NOW, {"V1": 4}), w("a", NOW, {"V3": 5})]
    plans = coalesce(list(enumerate(batch)), now_ms=NOW, live_window_ms=WINDOW)
    a = plans["a"]
    assert a.refs == [0, 1, 3]
    assert a.refs_of(["V1"]) == {0, 1}
    assert a.refs_of(["V2", "V3"]) == {0, 3}
    assert a.refs_of(["V9"]) == set()
    assert plans["b"].refs == [2]


def test_token_and_server_of_the_newest_entry() -> None:
    batch = [w("a", NOW, {"V1": 1}, token="new", server="fra1"),
             w("a", NOW - 9, {"V1": 0}, token="old", server="ny3")]
    plan = coalesce(list(enumerate(batch)), now_ms=NOW, live_window_ms=WINDOW)["a"]
    assert (plan.token, plan.server) == ("new", "fra1")


@pytest.mark.parametrize(
    ("pins", "left", "right"),
    [
        ({"V1": 1}, {}, {"V1": 1}),
        ({"V1": 1, "V2": 2}, {"V1": 1}, {"V2": 2}),
        ({"V1": 1, "V2": 2, "V3": 3}, {"V1": 1}, {"V2": 2, "V3": 3}),
    ],
)
def test_split(pins: dict[str, Value], left: dict[str, Value], right: dict[str, Value]) -> None:
    assert split(pins) == (left, right)


def test_chunks() -> None:
    points: list[tuple[int, Value]] = [(i, i) for i in range(25)]
    assert [len(c) for c in chunks(points, 10)] == [10, 10, 5]
    assert chunks([], 10) == []


@pytest.mark.parametrize("write", [
    w("d1", 1_000, {"V1": 1.5, "V2": True}),
    w("d1", 1_000, {"V1": 1.5, "V2": 2}, hist=("V1",)),  # a live history pin: no point
    w("d1", 10, {"V1": 1.5, "V2": 2}, hist=("V1",)),  # older than the live window: a point
    w("d1", 1_500, {"V1": 1.5}, hist=("V1",)),  # at the window's edge: live
    w("d1", -5, {"V1": [1.0, 2.0]}, hist=("V1",)),
    w("d1", 1_000, {}),
])
def test_one_entry_is_coalesced_as_in_a_batch(write: BlynkWrite) -> None:
    """A device's one entry takes a shortcut; its plan is the one a batch would give it."""
    other = w("d2", 1_000, {"V1": 1.0})
    alone = coalesce([(0, write)], now_ms=2_000, live_window_ms=500)
    batch = coalesce([(0, write), (1, other)], now_ms=2_000, live_window_ms=500)
    assert alone == {"d1": batch["d1"]}
