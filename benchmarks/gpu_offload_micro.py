"""Where offload's decode time goes, without a model: the manager's host time per step, its copy kernel's
time, and what the copies do to decode-like compute running beside them. By hand on a GPU:

    PYTHONPATH=. python benchmarks/gpu_offload_micro.py --out micro.json

Shapes: Llama-3.1-8B at 32k after pruning (20 offloaded slim layers of 8319 cached tokens, 8 KV heads,
head dim 128, bf16, 128 active blocks of 16 tokens, `--changed` of them new each step). Compute: per
layer one bf16 GEMV of `--weights-mb` of weights (8B decoding: ~0.2 ms a layer on an H100).

1. ``manager``: simulated decoding steps of 20 offloaded layers (no compute): the manager's host ms per
   step around the step (no sync), wall ms per step, and the host time of one copy-kernel launch (a
   group's).
2. ``compute``: the GEMVs alone; ``compute+zero_copy <tile>``: the same with the copy kernel of each copy
   group (`--group` layers) on a side stream after the group's last layer, per copy-kernel layout
   (`--kernels`: slots per program x warps x programs; each also timed alone and checked against plain
   indexing by `gpu_offload_check.check_kernel`); ``compute+memcpy``: with one contiguous pinned->device
   copy of the same bytes per group (an idealised DMA copy) instead; ``priority ...``: the same with the
   GEMVs on a high-priority stream (the copies' side stream keeps the default, lowest priority).
3. ``breakdown``: host microseconds of each piece of the manager's work around a step, steady state (one
   copy group): before the step (the wait), after it (the next sets stacked, the copy issued), the stack
   alone, a group's issue and the copy kernel's launch alone, and a replay of the same copy captured in a
   CUDA graph (the manager's own captures were removed: they leaked host memory; docs/PERF.md).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from gpu_offload_check import check_kernel
from slimpass.runtime import copy_kernel, offload


def make_manager(device, layers, tokens, heads, dim, slots, block, group, first=None):
    """A manager of `layers` offloaded layers; with `first` ([1, slots] blocks) its fronts filled for step 1
    (`OffloadManager.start`), as a cache does before its second decoding step."""
    manager = offload.OffloadManager(device, copy_group=group)
    keys = torch.randn(1, heads, tokens, dim, device=device, dtype=torch.bfloat16)
    manager.add_layers([offload.LayerToOffload(index, keys, keys, slots, 64, block) for index in range(layers)])
    if first is not None:
        manager.start({index: (keys, keys, first) for index in range(layers)}, 1)
    return manager


def step_sets(steps, slots, blocks, changed, device):
    sets, current = [], torch.randperm(blocks - 5)[:slots] + 4
    for _ in range(steps):
        out = current.clone()
        pool = torch.tensor([b for b in range(4, blocks - 1) if b not in set(current.tolist())])
        out[torch.randperm(slots)[:changed]] = pool[torch.randperm(len(pool))[:changed]]
        sets.append(out[None].to(device))
        current = out
    return sets


def bench_manager(args, device):
    """Host and wall time of the manager's work around simulated decoding steps of `--layers` layers (no
    compute): before each step, then each layer's next set written (what the decode graph does; not host
    time of the manager's), then after the step; and the Triton copy kernel's launch alone."""
    sets = step_sets(args.steps + 2, args.slots, args.tokens // 16, args.changed, device)
    manager = make_manager(device, args.layers, args.tokens, 8, 128, args.slots, 16, args.group, first=sets[0])
    host = 0.0
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        tick = time.perf_counter()
        manager.before_step()
        host += time.perf_counter() - tick
        for layer in manager.layers.values():
            layer.pending.copy_(sets[step])
        tick = time.perf_counter()
        manager.after_step(step)
        host += time.perf_counter() - tick
    torch.cuda.synchronize(device)
    total = time.perf_counter() - start
    group = manager.groups[0]
    tick = time.perf_counter()
    for _ in range(200):
        copy_kernel.copy_blocks_triton(group, 0, len(group.layers), group.pending, 1, manager.issued)
    launch = (time.perf_counter() - tick) / 200
    torch.cuda.synchronize(device)
    return {"host_ms_per_step": host / args.steps * 1e3, "wall_ms_per_step": total / args.steps * 1e3,
            "copy_launch_us": launch * 1e6, "report": manager.report()}


def per_call_us(fn, calls: int = 2000) -> float:
    """Host microseconds per call of `fn` (no sync inside the loop)."""
    for _ in range(20):
        fn()
    tick = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - tick) / calls * 1e6


def bench_breakdown(args, device):
    """Host time of the manager's pieces around a step, per call (see the module docstring)."""
    sets = step_sets(2, args.slots, args.tokens // 16, args.changed, device)
    manager = make_manager(device, args.group, args.tokens, 8, 128, args.slots, 16, args.group, first=sets[0])
    group = manager.groups[0]
    layers = [manager.layers[index] for index in group.layers]
    steps = iter(range(1, 10**9))

    def after():  # a step of one group: its next sets stacked, its copy issued (replayed after two steps)
        manager.after_step(next(steps))

    def kernel():
        copy_kernel.copy_blocks_triton(group, 0, args.group, group.pending, 1, manager.issued)

    out = {"before_step_per_group": per_call_us(manager.before_step, 500),
           "after_step_per_group": per_call_us(after, 500),
           "stack_next_sets": per_call_us(lambda: torch.stack([layer.pending for layer in layers], out=group.pending)),
           "issue_per_group": per_call_us(lambda: manager._issue(group, next(steps)), 500),
           "kernel_launch_per_group": per_call_us(kernel, 500)}
    stream = torch.cuda.current_stream(device)
    torch.cuda.synchronize(device)
    graph, side = torch.cuda.CUDAGraph(), torch.cuda.Stream(device)
    side.wait_stream(stream)
    with torch.cuda.stream(side):
        kernel()  # compiled and warm
        graph.capture_begin(capture_error_mode="thread_local")
        kernel()
        graph.capture_end()
    torch.cuda.synchronize(device)
    with torch.cuda.stream(side):
        out["graph_replay_per_group"] = per_call_us(graph.replay, 500)
    torch.cuda.synchronize(device)
    return out


def full_copy(manager, want):
    for group in manager.groups:
        for position in range(len(group.layers)):
            copy_kernel.copy_blocks_triton(group, position, 1, want, 0, manager.issued)


def bench_overlap(args, device):
    layers = args.layers + 12  # 32 decoder layers, 20 of them offloaded
    weights = [torch.randn(4096, args.weights_mb * 2**20 // (2 * 4096), device=device, dtype=torch.bfloat16)
               for _ in range(layers)]
    x = torch.randn(1, 4096, device=device, dtype=torch.bfloat16)
    manager = make_manager(device, args.layers, args.tokens, 8, 128, args.slots, 16, args.group)
    sets = step_sets(args.steps + 1, args.slots, args.tokens // 16, args.changed, device)
    per_layer = args.changed * 2 * 8 * 16 * 128 * 2
    staging = torch.empty(per_layer * args.group, dtype=torch.uint8, pin_memory=True)
    target = torch.empty(per_layer * args.group, dtype=torch.uint8, device=device)
    side = torch.cuda.Stream(device)
    ends = {group.layers[-1]: group for group in manager.groups}  # a group's copy goes after its last layer

    def copy_all(step, tile):
        for group in manager.groups:
            want = sets[step][None].expand(len(group.layers), -1, -1).contiguous()
            copy_kernel.copy_blocks_triton(group, 0, len(group.layers), want, step, manager.issued, **tile)

    def run(mode, tile=None, priority=False):
        full_copy(manager, sets[0])
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        compute = torch.cuda.Stream(device, priority=-5) if priority else torch.cuda.current_stream(device)
        with torch.cuda.stream(compute):
            run_steps(mode, tile)
        torch.cuda.synchronize(device)
        return (time.perf_counter() - start) / args.steps * 1e3

    def run_steps(mode, tile):
        for step in range(args.steps):
            for index in range(layers):
                (x @ weights[index]).sum()
                group = ends.get(index - 12)
                if mode != "compute" and group is not None:
                    with torch.cuda.stream(side):
                        if mode == "compute+zero_copy":
                            want = sets[step + 1][None].expand(len(group.layers), -1, -1).contiguous()
                            copy_kernel.copy_blocks_triton(group, 0, len(group.layers), want, step + 1,
                                                           manager.issued, **tile)
                        else:
                            target[:per_layer * len(group.layers)].copy_(staging[:per_layer * len(group.layers)],
                                                                         non_blocking=True)

    out = {}
    for mode in ("compute", "compute", "compute+memcpy"):
        out.setdefault(mode, []).append(run(mode))
    copies = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for variant in args.kernels.split(","):
        per, warps, programs = (int(x) for x in variant.split("x"))
        tile = {"slots_per_program": per, "num_warps": warps, "programs": programs or None}
        out[f"compute+zero_copy {variant}"] = run("compute+zero_copy", tile)
        if args.priority:
            out["priority compute"] = run("compute", priority=True)
            out[f"priority compute+zero_copy {variant}"] = run("compute+zero_copy", tile, priority=True)
        full_copy(manager, sets[0])
        copies[0].record()
        for step in range(args.steps):
            copy_all(step + 1, tile)
        copies[1].record()
        torch.cuda.synchronize(device)
        out[f"zero_copy_alone {variant}"] = copies[0].elapsed_time(copies[1]) / args.steps
        out[f"exact {variant}"] = all(check_kernel(device, [tile]).values())
    copies[0].record()
    for step in range(args.steps):
        for group in manager.groups:
            target[:per_layer * len(group.layers)].copy_(staging[:per_layer * len(group.layers)], non_blocking=True)
    copies[1].record()
    torch.cuda.synchronize(device)
    out["memcpy_alone"] = copies[0].elapsed_time(copies[1]) / args.steps
    out["bytes_per_step"] = per_layer * args.layers
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=20)
    parser.add_argument("--tokens", type=int, default=8319)
    parser.add_argument("--slots", type=int, default=128)
    parser.add_argument("--changed", type=int, default=95)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--weights-mb", type=int, default=436)
    parser.add_argument("--group", type=int, default=4, help="copy group (SlimConfig.copy_group)")
    parser.add_argument("--kernels", default="1x4x0,4x4x16,4x4x8,4x4x32,8x4x16,4x2x16",
                        help="copy-kernel layouts to time: slots per program x warps x programs (0: one per item), "
                             "comma-separated")
    parser.add_argument("--priority", action="store_true", help="also time each layout with the GEMVs on a "
                        "high-priority stream")
    parser.add_argument("--only", choices=("manager", "breakdown", "overlap"), action="append",
                        help="run only these parts (repeatable; default: all)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    device = torch.device("cuda:0")
    bench_manager(args, device)  # warm: kernel compiled
    result = {"device": torch.cuda.get_device_name(device), "torch": torch.__version__,
              "args": vars(args) | {"out": None}}
    for part, bench in (("manager", bench_manager), ("breakdown", bench_breakdown), ("overlap", bench_overlap)):
        if not args.only or part in args.only:
            result[part] = bench(args, device)
    print(json.dumps(result, indent=1, default=str))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1, default=str))


if __name__ == "__main__":
    main()
