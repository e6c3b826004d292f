"""slimpass.eval.timing: interleaved rounds and the verdict's noise rule (no clock involved: fake measures)."""

from __future__ import annotations

import pytest

from slimpass.eval import timing


def _fixed(values: dict[str, list[float]]):
    """Calls that return their next scripted time; `measure` reads it, so the rounds are known."""
    order: list[str] = []
    streams = {name: iter(times) for name, times in values.items()}
    calls = {name: (lambda name=name: order.append(name) or next(streams[name])) for name in values}
    return calls, order


def test_rounds_alternate_the_order_and_keep_each_sides_times():
    calls, order = _fixed({"a": [10, 11, 12, 13], "b": [20, 21, 22, 23]})
    result = timing.interleave(calls, rounds=4, measure=lambda call: call())
    assert order == ["a", "b", "b", "a", "a", "b", "b", "a"]
    assert result.ms == {"a": [10, 11, 12, 13], "b": [20, 21, 22, 23]} and result.median("a") == 11.5


def test_verdict_needs_the_rounds_to_agree_beyond_their_spread():
    clear = timing.Timings({"new": [5.0, 5.1, 5.2], "old": [10.0, 10.2, 10.4]})
    assert clear.verdict("new", "old") == "new is 2.00x faster than old (5.1 vs 10.2 ms, medians; faster in 3 of 3 rounds)"
    assert clear.verdict("old", "new").startswith("old is 2.00x slower than new")
    mixed = timing.Timings({"new": [5.0, 9.0, 14.0], "old": [8.0, 10.0, 12.0]})  # round 3: new was slower
    assert "within noise" in mixed.verdict("new", "old") and "faster in 2 of 3 rounds" in mixed.verdict("new", "old")
    close = timing.Timings({"new": [9.9, 9.95, 9.9], "old": [10.0, 10.0, 10.0]})  # every round, but by 1%
    assert "within noise" in close.verdict("new", "old")
    assert "too few for a verdict (give 3 or more)" in timing.Timings({"a": [1.0], "b": [2.0]}).verdict("a", "b")
    assert timing.Timings({"x": [2.0, 4.0]}).line("x") == "3.0 ms (median of 2, 2.0..4.0)"


def test_a_load_spike_in_one_call_does_not_hide_a_real_difference():
    """On a loaded machine one round's call can take several times its usual time; the paired rounds still
    agree (a rule on each side's min..max would call this noise: the spike spreads one side by 200%)."""
    spiky = timing.Timings({"new": [6.0, 5.8, 18.0, 6.1, 5.9], "old": [13.0, 12.5, 25.0, 13.4, 11.9]})
    assert spiky.verdict("new", "old").startswith("new is 2.")
    assert spiky.ratios("new", "old")[2] == pytest.approx(18 / 25)
    # a spike on the candidate's side makes one round disagree: still a real difference
    flipped = timing.Timings({"new": [5.5, 5.2, 9.4, 5.6, 5.1], "old": [12.8, 11.4, 8.4, 14.5, 12.9]})
    assert flipped.verdict("new", "old").startswith("new is 2.") and "faster in 4 of 5 rounds" in flipped.verdict("new", "old")
    # rounds that scatter both ways around the same time are noise
    scattered = timing.Timings({"new": [8.0, 11.0, 9.5, 12.0, 10.1], "old": [10.0, 10.0, 10.0, 10.0, 10.0]})
    assert "within noise" in scattered.verdict("new", "old")


def test_rounds_must_be_positive():
    with pytest.raises(ValueError, match="rounds=0"):
        timing.interleave({"a": lambda: None}, rounds=0)
