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


def test_verdict_says_faster_only_beyond_the_spread_of_both_sides():
    clear = timing.Timings({"new": [5.0, 5.1, 5.2], "old": [10.0, 10.2, 10.4]})
    assert clear.verdict("new", "old").startswith("new is 2.00x faster than old")
    assert clear.verdict("old", "new").startswith("old is 2.00x slower than new")
    noisy = timing.Timings({"new": [5.0, 9.0, 14.0], "old": [8.0, 10.0, 12.0]})  # new's spread is 100%
    assert "within noise" in noisy.verdict("new", "old")
    assert timing.Timings({"x": [2.0, 4.0]}).line("x") == "3.0 ms (median of 2, 2.0..4.0)"


def test_rounds_must_be_positive():
    with pytest.raises(ValueError, match="rounds=0"):
        timing.interleave({"a": lambda: None}, rounds=0)
