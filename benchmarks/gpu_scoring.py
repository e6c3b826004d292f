"""The TokenUnit block scorer on one CUDA GPU: the fused Triton kernel vs `tokenunit_torch`.

    PYTHONPATH=. python benchmarks/gpu_scoring.py --out scoring.json
    PYTHONPATH=. python benchmarks/gpu_scoring.py --lengths 8192,32768 --repeats 50 --out s.json

Shapes: Llama-3.1-8B's scoring layer (B=1, Hq=32, Hkv=8, D=128, bf16), block 64, unit 8, local
window 4, prompt lengths 8K..128K. Inputs are random normal post-RoPE-like q and k, in two layouts:
``bhld`` (contiguous ``[B, H, L, D]``, what RoPE returns) and ``blhd_t`` (the transpose of a
contiguous ``[B, L, H, D]``, a strided view).

Per length and layout it checks the kernel against `tokenunit_torch` (max relative error of the
scores, max absolute error, and whether ``argsort(descending=True, stable=True)`` -- the block
selection order -- is identical, with the first position where it differs), then times both: the
median (and min) of ``--repeats`` calls timed with CUDA events, after ``--warmup`` untimed calls,
both as eager calls (``kernel``/``torch``: Python and launch overhead included) and as replays of a
CUDA graph of one call (``kernel_graph``/``torch_graph``: device time alone; ``--no-graphs`` skips).
It also checks the op under ``torch.compile(backend="inductor", dynamic=True)`` at two lengths
(same scores, no recompile) unless ``--no-compile-check``. Writes JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import traceback
from pathlib import Path
from typing import Any

import torch

LLAMA_8B = dict(batch=1, heads_q=32, heads_kv=8, head_dim=128)
LENGTHS = (8192, 16384, 32768, 65536, 131072)


def make_inputs(length: int, layout: str, dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator(device="cuda").manual_seed(seed)
    b, hq, hkv, d = LLAMA_8B["batch"], LLAMA_8B["heads_q"], LLAMA_8B["heads_kv"], LLAMA_8B["head_dim"]
    if layout == "bhld":
        q = torch.randn(b, hq, length, d, device="cuda", generator=gen).to(dtype)
        k = torch.randn(b, hkv, length, d, device="cuda", generator=gen).to(dtype)
    elif layout == "blhd_t":
        q = torch.randn(b, length, hq, d, device="cuda", generator=gen).to(dtype).transpose(1, 2)
        k = torch.randn(b, length, hkv, d, device="cuda", generator=gen).to(dtype).transpose(1, 2)
    else:
        raise ValueError(layout)
    return q, k


def time_cuda(fn, warmup: int, repeats: int) -> dict[str, float]:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return {"median_ms": statistics.median(times), "min_ms": min(times)}


def time_graph(fn, repeats: int) -> dict[str, float]:
    """Device time alone: `fn` captured in a CUDA graph, each replay timed (no Python launch overhead)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up (compiles, allocator) off the capture
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return time_cuda(graph.replay, warmup=3, repeats=repeats)


def compare(kernel: torch.Tensor, reference: torch.Tensor) -> dict[str, Any]:
    diff = (kernel - reference).abs()
    rel = diff / reference.abs().clamp_min(torch.finfo(torch.float32).tiny)
    order_k = torch.argsort(kernel, dim=-1, descending=True, stable=True)
    order_r = torch.argsort(reference, dim=-1, descending=True, stable=True)
    same = order_k == order_r
    mismatched = (~same).nonzero()
    return {
        "shape": list(kernel.shape),
        "max_rel_error": rel.max().item() if rel.numel() else 0.0,
        "max_abs_error": diff.max().item() if diff.numel() else 0.0,
        "bitwise_equal": bool(torch.equal(kernel, reference)),
        "argsort_identical": bool(same.all().item()),
        "argsort_mismatches": int((~same).sum().item()),
        "first_mismatch_rank": int(mismatched[0, -1].item()) if len(mismatched) else None,
    }


def bench_length(length: int, layout: str, args, settings) -> dict[str, Any]:
    from slimpass.runtime import tokenunit_kernel
    from slimpass.runtime.scoring import tokenunit_torch

    q, k = make_inputs(length, layout, torch.bfloat16, seed=length)
    block, unit, window = settings.block_size, settings.unit_size, settings.local_window

    def run_kernel():
        return tokenunit_kernel.tokenunit_scores(q, k, block, unit, window)

    def run_torch():
        return tokenunit_torch(q, k, settings)

    result: dict[str, Any] = {"length": length, "layout": layout, "q_stride": list(q.stride()), "k_stride": list(k.stride())}
    result.update(compare(run_kernel(), run_torch()))
    result["kernel"] = time_cuda(run_kernel, args.warmup, args.repeats)
    result["torch"] = time_cuda(run_torch, args.warmup, args.repeats)
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    run_torch()
    torch.cuda.synchronize()
    result["torch"]["peak_extra_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
    torch.cuda.reset_peak_memory_stats()
    run_kernel()
    torch.cuda.synchronize()
    result["kernel"]["peak_extra_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
    result["speedup"] = result["torch"]["median_ms"] / result["kernel"]["median_ms"]
    if args.graphs:
        result["kernel_graph"] = time_graph(run_kernel, args.repeats)
        result["torch_graph"] = time_graph(run_torch, args.repeats)
        result["speedup_graph"] = result["torch_graph"]["median_ms"] / result["kernel_graph"]["median_ms"]
    # keys bytes read once, over the kernel's median time
    key_bytes = k.shape[0] * k.shape[1] * (length // block) * block * k.shape[3] * k.element_size()
    result["kernel"]["key_gbps"] = key_bytes / (result["kernel"]["median_ms"] * 1e-3) / 1e9
    if args.graphs:
        result["kernel_graph"]["key_gbps"] = key_bytes / (result["kernel_graph"]["median_ms"] * 1e-3) / 1e9
    del q, k
    torch.cuda.empty_cache()
    return result


def compile_check(settings, lengths: tuple[int, int]) -> dict[str, Any]:
    """The op inside an Inductor graph compiled with dynamic=True: right scores at two lengths, one compile."""
    import torch._dynamo.testing

    from slimpass.runtime.scoring import tokenunit_torch

    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounterWithBackend("inductor")

    @torch.compile(backend=counter, fullgraph=True, dynamic=True)
    def scores(q, k):
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # [B, L, H, D] -> strided [B, H, L, D] views
        return torch.ops.slimpass.tokenunit_scores(q, k, settings.block_size, settings.unit_size, settings.local_window)

    out: dict[str, Any] = {"lengths": list(lengths), "results": []}
    for length in lengths:
        q, k = make_inputs(length, "blhd_t", torch.bfloat16, seed=length + 1)
        q, k = q.transpose(1, 2).contiguous(), k.transpose(1, 2).contiguous()  # contiguous [B, L, H, D]
        got = scores(q, k)
        want = tokenunit_torch(q.transpose(1, 2), k.transpose(1, 2), settings)
        out["results"].append({"length": length, **compare(got, want)})
    out["frame_count"] = counter.frame_count
    out["no_recompile"] = counter.frame_count == 1
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="where to write the JSON results")
    parser.add_argument("--lengths", default=",".join(map(str, LENGTHS)))
    parser.add_argument("--layouts", default="bhld,blhd_t")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--no-compile-check", action="store_true")
    parser.add_argument("--no-graphs", dest="graphs", action="store_false",
                        help="skip the CUDA-graph timings (device time without Python launch overhead)")
    args = parser.parse_args(argv)

    if not torch.cuda.is_available():
        print("gpu_scoring.py needs a CUDA device", file=sys.stderr)
        return 2
    import triton

    from slimpass.runtime import tokenunit_kernel
    from slimpass.runtime.scoring import ScoreSettings

    settings = ScoreSettings(block_size=64, unit_size=8, local_window=4)
    report: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "kernel_available": tokenunit_kernel.available(),
        "shapes": {**LLAMA_8B, "dtype": "bfloat16", "block_size": 64, "unit_size": 8, "local_window": 4},
        "warmup": args.warmup,
        "repeats": args.repeats,
        "results": [],
    }
    failed = False
    for length in [int(x) for x in args.lengths.split(",") if x.strip()]:
        for layout in [x.strip() for x in args.layouts.split(",") if x.strip()]:
            try:
                row = bench_length(length, layout, args, settings)
            except Exception as exc:  # keep going: one OOM must not lose the other lengths
                failed = True
                row = {"length": length, "layout": layout, "status": "ERROR", "error": repr(exc),
                       "traceback": traceback.format_exc()}
                torch.cuda.empty_cache()
            report["results"].append(row)
            if "error" in row:
                print(f"L={length:>6} {layout:>7}: ERROR {row['error']}", flush=True)
            else:
                print(
                    f"L={length:>6} {layout:>7}: kernel {row['kernel']['median_ms']:.3f} ms "
                    f"({row['kernel']['key_gbps']:.0f} GB/s of keys), torch {row['torch']['median_ms']:.3f} ms, "
                    f"x{row['speedup']:.1f}"
                    + (f"; graphed kernel {row['kernel_graph']['median_ms']:.3f} ms "
                       f"({row['kernel_graph']['key_gbps']:.0f} GB/s), torch {row['torch_graph']['median_ms']:.3f} ms"
                       if args.graphs else "")
                    + f"; max rel err {row['max_rel_error']:.2e}, "
                    f"argsort identical {row['argsort_identical']}",
                    flush=True,
                )
    if not args.no_compile_check:
        try:
            report["compile_check"] = compile_check(settings, (4096 + 37, 8192 + 64 * 3 + 5))
            print(f"compile check: {json.dumps(report['compile_check'])}", flush=True)
        except Exception as exc:
            failed = True
            report["compile_check"] = {"status": "ERROR", "error": repr(exc), "traceback": traceback.format_exc()}
            print(f"compile check: ERROR {exc!r}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
