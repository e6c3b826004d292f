"""Host time of reselection's slot update (`candidate_blocks` + `assign_slots`, what each reselecting layer
runs every decoding step) compiled by Inductor with a static and with a symbolic count of slots, and, per
kernel call, its host time and (Triton) whether Inductor's static launcher launched it
(`gpu_decode.LaunchTimes`). By hand on a GPU:

    PYTHONPATH=. python benchmarks/gpu_slot_sorts.py --out sorts.json

With a static count of at most 512 slots Inductor sorts in its own persistent Triton kernels; with a
symbolic one it calls `aten.sort`. On the CPU (no Triton) it runs the same calls, to test the script.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gpu_decode import LaunchTimes  # noqa: E402
from slimpass.runtime.reselection import assign_slots, candidate_blocks  # noqa: E402


def slot_update(scores: torch.Tensor, active: torch.Tensor, block_size: int, sink_blocks: int) -> torch.Tensor:
    best = candidate_blocks(scores, scores.shape[1] * block_size, active.shape[1], block_size, sink_blocks)
    return assign_slots(active, best)


def measure(device: torch.device, blocks: int, slots: int, calls: int, symbolic: bool, notes: LaunchTimes) -> dict:
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
    notes.clear()  # what the timed calls launch (the timing includes the notes' own cost)
    start = time.perf_counter()
    for _ in range(calls):
        compiled(scores, active, 16, 4)
    host = (time.perf_counter() - start) / calls
    sync()
    return {"host_us_per_call": host * 1e6, "kernels": notes.summary(calls)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--blocks", type=int, default=2048, help="prompt blocks scored (32k tokens / 16)")
    parser.add_argument("--slots", type=int, default=128, help="active blocks (2048 active tokens / 16)")
    parser.add_argument("--calls", type=int, default=500)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    result = {"args": {k: str(v) for k, v in vars(args).items()}, "torch": torch.__version__, "device": str(device)}
    with LaunchTimes() as notes:
        for name, symbolic in (("static", False), ("symbolic", True)):
            result[name] = measure(device, args.blocks, args.slots, args.calls, symbolic, notes)
            print(name, json.dumps(result[name], indent=1), flush=True)
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
