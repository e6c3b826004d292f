"""Side-by-side timing that tells the truth: warm-up apart, A and B interleaved, medians with spread, a verdict.

The demo and `slimpass run --compare` time the model with and without SlimInfer this way:

    warm = warm_up({"without": dense_call, "with": slim_call})        # first calls (compiling), seconds
    result = interleave({"without": dense_call, "with": slim_call}, rounds=5)
    print(result.verdict("with", "without"))

Rounds alternate the order (A B, B A, A B, ...) so that a machine that slows down or speeds up during the run
(a loaded CI box, thermal limits) weighs on both sides alike. The verdict is paired, round by round: each
round's candidate / baseline ratio compares two calls made next to each other, under the same load. A
difference is called real when the median of the rounds' log ratios lies more than `Z` robust standard
errors from 0 (the rounds' spread estimated from their median absolute deviation, which one load spike does
not move) and more than `MARGIN` from a ratio of 1; otherwise it is within noise. Fewer than `MIN_ROUNDS`
rounds give no verdict. `line` shows a side's median and min..max.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from collections.abc import Callable

MIN_ROUNDS = 3
"""Rounds below which the verdict says nothing (agreement of 1 or 2 rounds is chance half the time)."""
MARGIN = 0.02
"""Median per-round ratios within 2% of 1 are within noise, however alike the rounds."""
Z = 3.0
"""How many robust standard errors (1.4826 MAD / sqrt(rounds)) the median log ratio must lie from 0."""


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

    def line(self, name: str) -> str:
        times = self.ms[name]
        return f"{self.median(name):.1f} ms (median of {len(times)}, {min(times):.1f}..{max(times):.1f})"

    def ratios(self, candidate: str, baseline: str) -> list[float]:
        """Per round: candidate's time / baseline's (below 1: the candidate was faster in that round)."""
        return [new / old for new, old in zip(self.ms[candidate], self.ms[baseline], strict=True)]

    def verdict(self, candidate: str, baseline: str) -> str:
        """One line: `candidate` faster / slower than `baseline`, or within noise (see the module's doc)."""
        new, old = self.median(candidate), self.median(baseline)
        rounds = len(self.ms[candidate])
        if rounds < MIN_ROUNDS:
            return (f"{candidate} vs {baseline}: {new:.1f} vs {old:.1f} ms; {rounds} round(s) are too few for a "
                    f"verdict (give {MIN_ROUNDS} or more)")
        ratios = self.ratios(candidate, baseline)
        logs = [math.log(r) for r in ratios]
        middle = statistics.median(logs)
        error = 1.4826 * statistics.median(abs(x - middle) for x in logs) / math.sqrt(rounds)
        ratio, faster = math.exp(middle), sum(r < 1 for r in ratios)
        agree = f"faster in {faster} of {rounds} rounds"
        if abs(middle) <= max(math.log1p(MARGIN), Z * error):
            return (f"{candidate} vs {baseline}: within noise ({new:.1f} vs {old:.1f} ms; {agree}); run more "
                    "rounds on a quieter machine to tell them apart")
        if ratio < 1:
            return f"{candidate} is {1 / ratio:.2f}x faster than {baseline} ({new:.1f} vs {old:.1f} ms, medians; {agree})"
        return f"{candidate} is {ratio:.2f}x slower than {baseline} ({new:.1f} vs {old:.1f} ms, medians; {agree})"


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
