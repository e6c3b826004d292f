"""Side-by-side timing that tells the truth: warm-up apart, A and B interleaved, medians with spread, a verdict.

The demo and `slimpass run --compare` time the model with and without SlimInfer this way:

    warm = warm_up({"without": dense_call, "with": slim_call})        # first calls (compiling), seconds
    result = interleave({"without": dense_call, "with": slim_call}, rounds=5)
    print(result.verdict("with", "without"))

Rounds alternate the order (A B, B A, A B, ...) so that a machine that slows down or speeds up during the run
(a loaded CI box, thermal limits) weighs on both sides alike. The spread of a side is its min..max over the
rounds; the verdict calls a difference real only when the medians differ by more than both sides' relative
spread, and otherwise says it is within noise.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable


def _seconds(fn: Callable[[], object]) -> tuple[float, object]:
    start = time.perf_counter()
    value = fn()
    return time.perf_counter() - start, value


def warm_up(calls: dict[str, Callable[[], object]]) -> dict[str, float]:
    """Each call once (where a compiled model compiles), in seconds: reported apart from the timings."""
    return {name: _seconds(fn)[0] for name, fn in calls.items()}


@dataclasses.dataclass
class Timings:
    """Per side, the milliseconds of each round (in round order)."""

    ms: dict[str, list[float]]

    def median(self, name: str) -> float:
        return statistics.median(self.ms[name])

    def spread(self, name: str) -> float:
        """(max - min) / median over the rounds."""
        times, middle = self.ms[name], self.median(name)
        return (max(times) - min(times)) / middle if middle else 0.0

    def line(self, name: str) -> str:
        times = self.ms[name]
        return f"{self.median(name):.1f} ms (median of {len(times)}, {min(times):.1f}..{max(times):.1f})"

    def verdict(self, candidate: str, baseline: str) -> str:
        """One line: `candidate` faster / slower than `baseline`, or within noise."""
        new, old = self.median(candidate), self.median(baseline)
        noise = max(self.spread(candidate), self.spread(baseline))
        if not old or not new or abs(new / old - 1) <= noise:
            return (f"{candidate} vs {baseline}: within noise ({new:.1f} vs {old:.1f} ms; the rounds spread "
                    f"{100 * noise:.0f}%); run more rounds on a quieter machine to tell them apart")
        if new < old:
            return f"{candidate} is {old / new:.2f}x faster than {baseline} ({new:.1f} vs {old:.1f} ms, medians)"
        return f"{candidate} is {new / old:.2f}x slower than {baseline} ({new:.1f} vs {old:.1f} ms, medians)"


def interleave(calls: dict[str, Callable[[], object]], rounds: int = 5,
               measure: Callable[[Callable[[], object]], float] | None = None) -> Timings:
    """Time every call once per round, alternating their order round by round. `measure(fn)` returns the
    milliseconds of one call (default: wall time of fn()); e.g. a time-to-first-token read inside generate."""
    if rounds < 1:
        raise ValueError(f"rounds={rounds}: give at least 1")
    measure = measure or (lambda fn: _seconds(fn)[0] * 1e3)
    names = list(calls)
    ms: dict[str, list[float]] = {name: [] for name in names}
    for index in range(rounds):
        for name in names if index % 2 == 0 else names[::-1]:
            ms[name].append(measure(calls[name]))
    return Timings(ms)
