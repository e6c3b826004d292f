"""Progress lines while a graph compiles: which graph, what it is, which step, how long each took.

A pruned 30-layer prefill graph takes minutes under Inductor on a CPU (seconds to trace, well under a second
for our passes, the rest Inductor's C++ build), and a user staring at a silent prompt cannot tell a slow
compile from a hang. Each step gets one line on stderr when `SlimConfig.progress` says so (None: when stderr
is a terminal); the same lines always go to this module's logger at DEBUG.
"""

from __future__ import annotations

import logging
import sys
import time

log = logging.getLogger(__name__)


def enabled(setting: bool | None) -> bool:
    """`SlimConfig.progress` resolved: None means "when stderr is a terminal"."""
    if setting is not None:
        return setting
    isatty = getattr(sys.stderr, "isatty", None)
    return bool(isatty and isatty())


class Progress:
    """The lines of one graph's compile. `started`: when the call that traced it began (perf_counter), if known."""

    def __init__(self, graph_id: str, show: bool, started: float | None = None) -> None:
        self.graph_id, self.show = graph_id, show
        self.start = time.perf_counter()
        self.traced = None if started is None else self.start - started

    def say(self, message: str) -> None:
        line = f"slimpass: {self.graph_id}: {message}"
        log.debug("%s", line)  # INFO keeps one line per graph (the backend's summary)
        if self.show:
            print(line, file=sys.stderr, flush=True)

    def passes_done(self, results: list, kind: str, layers: int) -> None:
        traced = f"traced in {self.traced:.1f} s; " if self.traced is not None else ""
        timings = ", ".join(f"{r.name} {r.seconds:.2f} s" for r in results if r.seconds is not None)
        self.say(f"{kind} graph, {layers} decoder layers; {traced}passes in {time.perf_counter() - self.start:.1f} s"
                 f" ({timings})")

    def lowering(self, compiler: str, what: str = "graph") -> None:
        if compiler == "eager":
            return  # nothing to wait for: the graph runs as Python
        hint = " (its C++ build takes minutes on a CPU)" if compiler == "inductor" and not _has_accelerator() else ""
        self.say(f"lowering the {what} with {compiler}{hint} ...")

    def done(self, seconds: float) -> None:
        self.say(f"compiled in {seconds:.1f} s" + (f" (+{self.traced:.1f} s tracing)" if self.traced is not None else ""))


def _has_accelerator() -> bool:
    import torch

    return torch.cuda.is_available()
