"""pipeline.batching.Linger: when a batching loop waits for its batch to fill (pure: the tests
pass the clock)."""

from __future__ import annotations

from pipeline.batching import RATE_WINDOW_S, Linger


def feed(linger: Linger, per_s: float, start: float, seconds: float) -> float:
    """Batches of 10 at ``per_s`` entries/s from ``start`` for ``seconds``; returns the end."""
    step, t = 10 / per_s, start
    while t < start + seconds:
        linger.note(10, t)
        t += step
    return t


def test_below_the_rate_no_batch_waits_and_above_it_every_one_does() -> None:
    linger = Linger(0.01, above_per_s=1_000)
    assert not linger.active(0.0)  # nothing measured yet: go at once
    t = feed(linger, 500, 0.0, 5 * RATE_WINDOW_S)
    assert not linger.active(t)
    t = feed(linger, 5_000, t, 5 * RATE_WINDOW_S)
    assert linger.active(t)
    t = feed(linger, 500, t, 5 * RATE_WINDOW_S)
    assert not linger.active(t)  # the load went down: back to going at once


def test_after_an_idle_spell_the_first_batch_goes_at_once() -> None:
    linger = Linger(0.01, above_per_s=1_000)
    t = feed(linger, 5_000, 0.0, 5 * RATE_WINDOW_S)
    assert linger.active(t)
    # Nothing for a second: no batch closed the window, yet the rate it holds is low.
    assert not linger.active(t + 1.0)
    linger.note(1, t + 1.0)
    assert not linger.active(t + 1.0)


def test_rate_zero_always_waits_and_linger_zero_never_does() -> None:
    always = Linger(0.005, above_per_s=0)
    never = Linger(0.0, above_per_s=0)
    assert always.active(0.0) and not never.active(0.0)
    for linger in (always, never):
        feed(linger, 50, 0.0, 5 * RATE_WINDOW_S)
    assert always.active(1.0) and not never.active(1.0)
