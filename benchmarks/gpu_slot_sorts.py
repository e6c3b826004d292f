"""Host time of reselection's slot update (`candidate_blocks` + `assign_slots`, what each reselecting layer
runs every decoding step) compiled by Inductor with a static and with a symbolic count of slots, and, per
Triton kernel, its host time and whether Inductor's static launcher launched it. By hand on a GPU:

    PYTHONPATH=. python benchmarks/gpu_slot_sorts.py --out sorts.json

With a static count of at most 512 slots Inductor sorts in its own persistent Triton kernels; with a
symbolic one it calls `aten.sort`. On the CPU (no Triton) it runs the same calls, to test the script.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from slimpass.runtime.reselection import assign_slots, candidate_blocks  # noqa: E402


class LaunchNotes:
    """While open, per Triton kernel that Inductor launches: calls, host seconds, and calls that went
    through the static launcher."""

    def __init__(self) -> None:
        self.calls: Counter = Counter()
        self.static: Counter = Counter()
        self.seconds: defaultdict = defaultdict(float)
        self._saved: list = []

    def __enter__(self) -> LaunchNotes:
        try:
            from torch._inductor.runtime import static_triton_launcher, triton_heuristics
        except ImportError:  # no Triton: nothing is launched through these
            return self
        current: list = [None, False]
        run = triton_heuristics.CachingAutotuner.run

        def timed_run(autotuner, *args, **kwargs):
            current[:] = [getattr(autotuner.fn, "__name__", "?"), False]
            start = time.perf_counter()
            try:
                return run(autotuner, *args, **kwargs)
            finally:
                self.seconds[current[0]] += time.perf_counter() - start
                self.calls[current[0]] += 1
                self.static[current[0]] += current[1]

        self._saved.append((triton_heuristics.CachingAutotuner, "run", run))
        triton_heuristics.CachingAutotuner.run = timed_run
        for kernel in vars(static_triton_launcher).values():
            if isinstance(kernel, type) and "run" in vars(kernel):
                launch = vars(kernel)["run"]

                def noted(launcher, *args, _launch=launch, **kwargs):
                    current[1] = True
                    return _launch(launcher, *args, **kwargs)

                self._saved.append((kernel, "run", launch))
                kernel.run = noted
        return self

    def __exit__(self, *exc) -> None:
        for owner, name, value in reversed(self._saved):
            setattr(owner, name, value)

    def clear(self) -> None:
        self.calls.clear(), self.static.clear(), self.seconds.clear()


def slot_update(scores: torch.Tensor, active: torch.Tensor, block_size: int, sink_blocks: int) -> torch.Tensor:
    best = candidate_blocks(scores, scores.shape[1] * block_size, active.shape[1], block_size, sink_blocks)
    return assign_slots(active, best)


def measure(device: torch.device, blocks: int, slots: int, calls: int, symbolic: bool, notes: LaunchNotes) -> dict:
    torch._dynamo.reset()
    compiled = torch.compile(slot_update, backend="inductor", dynamic=None if symbolic else False)
    scores = torch.randn(1, blocks, device=device)
    active = torch.randperm(blocks - 8, device=device)[:slots].sort().values[None] + 4
    if symbolic:
        torch._dynamo.mark_dynamic(active, 1)
        torch._dynamo.mark_dynamic(scores, 1)
    for _ in range(5):
        compiled(scores, active, 16, 4)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    notes.clear()
    start = time.perf_counter()
    for _ in range(calls):
        compiled(scores, active, 16, 4)
    host = (time.perf_counter() - start) / calls
    sync()
    return {"host_us_per_call": host * 1e6,
            "kernels": {name: {"per_call": notes.calls[name] / calls, "static_launch_share": notes.static[name] / notes.calls[name],
                               "host_us": notes.seconds[name] / notes.calls[name] * 1e6} for name in notes.calls}}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--blocks", type=int, default=2048, help="prompt blocks scored (32k tokens / 16)")
    parser.add_argument("--slots", type=int, default=128, help="active blocks (2048 active tokens / 16)")
    parser.add_argument("--calls", type=int, default=500)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    result = {"args": {k: str(v) for k, v in vars(args).items()}, "torch": torch.__version__, "device": str(device)}
    with LaunchNotes() as notes:
        for name, symbolic in (("static", False), ("symbolic", True)):
            result[name] = measure(device, args.blocks, args.slots, args.calls, symbolic, notes)
            print(name, json.dumps(result[name], indent=1), flush=True)
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
