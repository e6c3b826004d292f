"""Does the offload pattern (pinned host memory, a side stream whose kernel reads it, events) slow the host's
kernel launches on the compute stream? Per phase: median host time of a decode-like launch loop (84 batch-1
`torch.mm` of 4096 x 4096 bf16, then 4 calls of an Inductor-compiled function of 48 Triton kernels), with
generate's stop-check sync after each step.

    python benchmarks/gpu_launch_probe.py results.json     # one CUDA GPU

Phases in order: plain; 4 GB more pinned host memory; freed; 4 GB pageable; freed; pinned again; a Triton
kernel on a side stream reading 32 MB of pinned memory each step, the compute stream waiting for it; freed.
This is the script of `docs/results/h200_launch_probe_phases.json` (PERF, seventh round); the round-robin
conditions of `h200_launch_probe_pinned.json` came from an earlier version of it (its `modes` list, run three
rounds).
"""
import json
import statistics
import sys
import time

import torch

if not torch.cuda.is_available():
    raise SystemExit("gpu_launch_probe: needs a CUDA GPU (it times kernel launches)")
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

dev = torch.device("cuda:0")
torch.cuda.set_device(dev)


@triton.jit
def read_kernel(src, dst, n, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    for start in range(pid * BLOCK, n, nprog * BLOCK):
        off = start + tl.arange(0, BLOCK)
        m = off < n
        tl.store(dst + off, tl.load(src + off, mask=m), mask=m)


N = 16 * 1024 * 1024  # 32 MB of bf16 a step, about what 7 offloaded layers move at random weights
pinned_src = torch.empty(N, dtype=torch.bfloat16, pin_memory=True).normal_()
dst = torch.empty(N, dtype=torch.bfloat16, device=dev)
side = torch.cuda.Stream(dev)
done, ready = torch.cuda.Event(), torch.cuda.Event()
x = torch.randn(1, 4096, dtype=torch.bfloat16, device=dev)
w = torch.randn(4096, 4096, dtype=torch.bfloat16, device=dev)
s = torch.zeros(64, device=dev)


def copy(src):
    read_kernel[(16,)](src, dst, N, BLOCK=4096)



small = [torch.randn(1 + k, device=dev) for k in range(48)]


@torch.compile(dynamic=False)
def many(xs):
    return [torch.sin(t) * (i + 2) for i, t in enumerate(xs)]  # one Triton kernel each


def loop():
    t = time.perf_counter()
    for _ in range(84):
        torch.mm(x, w)
    mid = time.perf_counter()
    for _ in range(4):
        many(small)
    end = time.perf_counter()
    parts.append((mid - t, end - mid))
    return end - t


parts = []


def run(mode, steps=80):
    times = []
    for i in range(steps):
        cur = torch.cuda.current_stream()
        if mode.get("wait"):
            cur.wait_event(ready)
        times.append(loop())
        if mode.get("side"):
            done.record(cur)
            with torch.cuda.stream(side):
                side.wait_event(done)
                if mode.get("src") is not None:
                    copy(mode["src"])
                ready.record(side)
        s.sum().item()  # the stop check's sync, compute stream
    torch.cuda.synchronize()
    mm = statistics.median(p[0] for p in parts[-steps + 10:]) * 1e3
    tr = statistics.median(p[1] for p in parts[-steps + 10:]) * 1e3
    return [round(statistics.median(times[10:]) * 1e3, 3), round(mm, 3), round(tr, 3)]


copy(pinned_src)
many(small)
many(small)
torch.cuda.synchronize()
results = {"note": "[loop ms, 84 mm ms, 4 compiled calls of 48 Triton kernels ms] per phase, in order"}
held = None
phases = ["baseline", "pinned_4gb", "freed", "pageable_4gb", "freed2", "pinned_4gb_again", "pinned_4gb_copying", "freed3"]
for phase in phases:
    if phase.startswith("pinned"):
        if held is None or not held.is_pinned():
            held = torch.empty(4 * 1024**3, dtype=torch.uint8, pin_memory=True)
    elif phase.startswith("pageable"):
        held = torch.ones(4 * 1024**3, dtype=torch.uint8)
    else:
        held = None
        torch.cuda.synchronize()
        torch._C._host_emptyCache()
    mode = {"side": True, "wait": True, "src": pinned_src} if phase.endswith("copying") else {}
    results[phase] = [run(mode), run(mode)]
    print(phase, results[phase], flush=True)
print(json.dumps(results, indent=1))
if len(sys.argv) > 1:
    open(sys.argv[1], "w").write(json.dumps(results, indent=1))
