"""Where prefill time goes: a kernel-level breakdown of one call, per variant, on one CUDA GPU.

    PYTHONPATH=. python benchmarks/gpu_profile.py --variants hf_eager,sliminfer_paper --lengths 8192,16384
    PYTHONPATH=. python benchmarks/gpu_profile.py --tiny --lengths 128      # CPU dry run

Same model and workload as `gpu_prefill.py` (Llama-3.1-8B shape, random bf16, batch 1, last-token
logits). Per variant and length: warm-up calls (the first compiles), then one call under
`torch.profiler`. Kernels are put into buckets by name (matrix products, attention, Triton kernels
Inductor generated, copies, the rest) and the script prints and saves each bucket's GPU milliseconds
and the top kernels. Variants run in one process, one after another, so the weights are built once.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_prefill  # noqa: E402  (the benchmark's model, variants and inputs)

# First match wins; names are CUDA kernel names as the profiler reports them.
BUCKETS = (
    ("attention", re.compile(r"flash|fmha|cudnn|attention|sdpa|cutlass.*Attention", re.I)),
    ("matmul", re.compile(r"gemm|nvjet|sm90_xmma|cutlass|cublas|wgmma|splitK", re.I)),
    ("scoring", re.compile(r"tokenunit", re.I)),
    ("triton (inductor)", re.compile(r"^triton_")),
    ("copy / gather", re.compile(r"copy|gather|index|cat|Memcpy|Memset", re.I)),
)


def bucket(name: str) -> str:
    for label, pattern in BUCKETS:
        if pattern.search(name):
            return label
    return "other"


def profile_one(model: Any, inputs: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """One call under the profiler: GPU ms per bucket, top kernels, and the wall time of the call."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        gpu_prefill.prefill(model, inputs)
        gpu_prefill.sync(device)
    kernels: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            entry = kernels[event.name]
            entry[0] += event.time_range.elapsed_us() / 1e3  # the kernel's own duration, us -> ms
            entry[1] += 1
    buckets: dict[str, float] = defaultdict(float)
    for name, (ms, _) in kernels.items():
        buckets[bucket(name)] += ms
    top = sorted(kernels.items(), key=lambda kv: -kv[1][0])[:25]
    return {
        "gpu_ms_total": sum(buckets.values()),
        "buckets_ms": dict(sorted(buckets.items(), key=lambda kv: -kv[1])),
        "kernel_launches": sum(count for _, count in kernels.values()),
        "top_kernels": [{"name": name[:160], "ms": ms, "calls": count, "bucket": bucket(name)}
                        for name, (ms, count) in top],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", type=gpu_prefill.parse_variants,
                        default=gpu_prefill.parse_variants("hf_eager,sliminfer_paper"))
    parser.add_argument("--lengths", type=gpu_prefill.parse_lengths, default=gpu_prefill.parse_lengths("8192"))
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-mask", action="store_true")
    parser.add_argument("--options", type=json.loads, default={}, help="more slimpass options (JSON)")
    args = parser.parse_args(argv)
    device = torch.device("cpu" if args.tiny else "cuda")
    base = gpu_prefill.build_model(args, device)
    results: dict[str, Any] = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                               "torch": torch.__version__, "options": args.options, "profiles": {}}
    for variant in args.variants:
        model = gpu_prefill.prepare(base, variant, args.options)
        for length in args.lengths:
            inputs = gpu_prefill.make_inputs(length, base.config.vocab_size, args, device)
            for _ in range(args.warmup):
                gpu_prefill.prefill(model, inputs)
            timed = [gpu_prefill.timed_call(model, inputs, device)[0] for _ in range(3)]
            result = profile_one(model, inputs, device)
            result["median_ms_unprofiled"] = sorted(timed)[1]
            results["profiles"][f"{variant}@{length}"] = result
            print(f"\n== {variant} @ {length}: {result['median_ms_unprofiled']:.1f} ms unprofiled, "
                  f"GPU kernels {result['gpu_ms_total']:.1f} ms in {result['kernel_launches']} launches")
            for label, ms in result["buckets_ms"].items():
                print(f"   {label:20s} {ms:9.2f} ms")
            for k in result["top_kernels"][:12]:
                print(f"   {k['ms']:8.2f} ms x{k['calls']:<4d} [{k['bucket']}] {k['name'][:110]}")
        if "_slimpass_original_forward" in base.__dict__:
            import slimpass

            slimpass.restore(base)  # the next variant starts from the plain model
        model = None
        torch._dynamo.reset()
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
