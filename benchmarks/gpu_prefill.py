"""Long-prompt prefill benchmark on one CUDA GPU: HF eager vs stock Inductor vs sliminfer.

    python benchmarks/gpu_prefill.py --lengths 8192,16384,32768 --out results.json
    python benchmarks/gpu_prefill.py --variants hf_eager,sliminfer --no-mask
    python benchmarks/gpu_prefill.py --tiny --lengths 64,128        # CPU dry run of the whole pipeline

Model: a random-weight bf16 model of a real config (`--shape`: Llama-3.1-8B, the default, Qwen2.5-7B, Mistral-7B-v0.3,
or Qwen2.5-Coder-0.5B/1.5B) built directly on the GPU
(no checkpoint, no network). Workload: batch-1 prefill returning only the last token's logits,
``model(ids, attention_mask=ones, logits_to_keep=1, use_cache=False)`` under inference_mode.

Each variant runs in its own subprocess (this script with ``--worker VARIANT``), so that an
out-of-memory or a hung compile in one variant cannot take the others down, and each variant's peak
memory is measured in a fresh CUDA context. Per length a worker makes ``--warmup`` untimed calls (the
first compiles), then ``--repeats`` timed calls, and records the median time, the peak memory of the
timed calls and of the whole length (compile included), and the first call's seconds. It saves the
last-token logits so the parent can compare every variant with hf_eager.

slimpass does not need to be installed: with the source tree on PYTHONPATH, ``import slimpass``
registers the backend.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib.metadata
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

VARIANTS = ("hf_eager", "stock_inductor", "sliminfer", "sliminfer_flash", "sliminfer_cudnn")
# Pruning variants (not in the default set): sliminfer with the paper schedule, and the plain-PyTorch
# reference loop (slimpass.runtime.reference) with the same schedule.
PRUNING_VARIANTS = ("sliminfer_paper", "reference_paper")
# Any `sliminfer_<backend>` with a SlimConfig.attention_backend value is accepted on the command line.
ATTENTION_BACKENDS = ("flash", "cudnn", "efficient", "math")

# Llama-3.1-8B's config.json, minus tokenizer ids (which do not affect cost).
LLAMA_31_8B = dict(
    vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
    num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072, rms_norm_eps=1e-5,
    tie_word_embeddings=False,
    rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                         high_freq_factor=4.0, original_max_position_embeddings=8192),
)
# Qwen2.5-7B-Instruct's and Mistral-7B-v0.3's config.json (the issue-23 non-Llama shapes).
QWEN25_7B = dict(
    vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
    num_key_value_heads=4, max_position_embeddings=32768, rms_norm_eps=1e-6, tie_word_embeddings=False,
    rope_parameters=dict(rope_type="default", rope_theta=1000000.0),
)
MISTRAL_7B = dict(
    vocab_size=32768, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=8, max_position_embeddings=32768, rms_norm_eps=1e-5, tie_word_embeddings=False,
    sliding_window=None, rope_parameters=dict(rope_type="default", rope_theta=1000000.0),
)
# Qwen2.5-Coder-0.5B/1.5B-Instruct's config.json (the issue-24 quality models): TTFT beside their quality table.
QWEN25_CODER = dict(vocab_size=151936, max_position_embeddings=32768, rms_norm_eps=1e-6, tie_word_embeddings=True,
                    num_key_value_heads=2, rope_parameters=dict(rope_type="default", rope_theta=1000000.0))
QWEN25_CODER_05B = dict(QWEN25_CODER, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                        num_attention_heads=14)
QWEN25_CODER_15B = dict(QWEN25_CODER, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                        num_attention_heads=12)
SHAPES = {"llama-3.1-8b": ("LlamaConfig", "LlamaForCausalLM", LLAMA_31_8B),
          "qwen2.5-coder-0.5b": ("Qwen2Config", "Qwen2ForCausalLM", QWEN25_CODER_05B),
          "qwen2.5-coder-1.5b": ("Qwen2Config", "Qwen2ForCausalLM", QWEN25_CODER_15B),
          "qwen2.5-7b": ("Qwen2Config", "Qwen2ForCausalLM", QWEN25_7B),
          "mistral-7b": ("MistralConfig", "MistralForCausalLM", MISTRAL_7B)}
TINY = dict(
    vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
)
GB = 1024**3
Inputs = dict[str, Any]  # keyword arguments of one model call
Result = dict[str, Any]  # one length's measurements: {"status": "ok" | "OOM" | "ERROR" | ..., ...}


# --------------------------------------------------------------------------- command line


def parse_lengths(text: str) -> list[int]:
    lengths = [int(part) for part in text.split(",") if part.strip()]
    if not lengths or min(lengths) < 1:
        raise argparse.ArgumentTypeError(f"--lengths {text!r}: expected positive ints, e.g. 8192,16384")
    return lengths


def parse_variants(text: str) -> list[str]:
    known = set(VARIANTS) | set(PRUNING_VARIANTS) | {f"sliminfer_{b}" for b in ATTENTION_BACKENDS}
    variants = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [v for v in variants if v not in known]
    if unknown or not variants:
        raise argparse.ArgumentTypeError(f"--variants: unknown {unknown}; known: {', '.join(sorted(known))}")
    return variants


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=parse_lengths, default=parse_lengths("8192,16384,32768"))
    parser.add_argument("--variants", type=parse_variants,
                        help=f"comma-separated; default {','.join(VARIANTS)} "
                        "(with --tiny, without sliminfer_cudnn: CPUs have no cuDNN attention)")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--no-mask", action="store_true", help="call without attention_mask")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls per length (the first compiles)")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per length")
    parser.add_argument("--timeout", type=float, default=240.0, help="seconds per variant (all its lengths)")
    parser.add_argument("--seed", type=int, default=0, help="weights and prompts; the same in every worker")
    parser.add_argument("--tiny", action="store_true", help="tiny float32 model on CPU: test this script")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama-3.1-8b",
                        help="whose config (family and sizes) the random-weight model has")
    parser.add_argument("--options", type=json.loads, default={},
                        help='more slimpass options for the sliminfer variants, as JSON, '
                        'e.g. \'{"inductor_options": {"max_autotune_gemm": true}}\'')
    parser.add_argument("--worker", metavar="VARIANT", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.variants is None:
        args.variants = [v for v in VARIANTS if not (args.tiny and v == "sliminfer_cudnn")]
    if args.warmup < 1 or args.repeats < 1:
        parser.error("--warmup and --repeats must be >= 1 (the first warm-up call is the compile)")
    return args


# --------------------------------------------------------------------------- worker: model and calls


def build_model(args: argparse.Namespace, device: torch.device) -> torch.nn.Module:
    """Random-weight model of `args.shape` (family and sizes), allocated and initialised directly on `device` in
    its final dtype (with --tiny, the family at tiny sizes).

    Setting the default dtype (rather than calling .to(bfloat16) afterwards) avoids ever holding a
    float32 copy of the 8B parameters (32 GB). The seed makes the weights identical in every worker.
    """
    import transformers

    dtype = torch.float32 if args.tiny else torch.bfloat16
    config_name, model_name, full = SHAPES[getattr(args, "shape", "llama-3.1-8b")]
    shape = TINY if args.tiny else full
    if getattr(args, "layers", None):  # a shallower model of the same width (quicker to compile)
        shape = {**shape, "num_hidden_layers": args.layers}
    config = getattr(transformers, config_name)(**shape, dtype=dtype)
    config._attn_implementation = "sdpa"
    torch.manual_seed(args.seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = getattr(transformers, model_name)(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def prepare(model: torch.nn.Module, variant: str, extra: dict[str, Any] | None = None) -> torch.nn.Module:
    """`model` as `variant` runs it; compilation happens lazily on the first call. `extra`: more
    slimpass options for the sliminfer variants (e.g. inductor_options)."""
    if variant == "hf_eager":
        return model
    if variant == "stock_inductor":
        # Static shapes, as a user's torch.compile(model) compiles its first length. dynamic=False keeps
        # later lengths static too (by default Dynamo would recompile the second length dynamically).
        return torch.compile(model, dynamic=False)
    import slimpass  # registers backend="sliminfer" when slimpass is on PYTHONPATH but not installed

    # the paper's method: its schedule and its scorer (whatever the default scorer is)
    if variant == "reference_paper":
        return ReferenceLoop(model, slimpass.SlimConfig(prune=True, schedule="paper", scorer="tokenunit"))
    options: dict[str, Any] = {"compiler": "inductor"}
    if variant == "sliminfer_paper":
        options.update(prune=True, schedule="paper", scorer="tokenunit")
    elif variant.startswith("sliminfer_"):
        options["attention_backend"] = variant.removeprefix("sliminfer_")
    options.update(extra or {})
    return slimpass.compile(model, options=options)


class ReferenceLoop:
    """The plain-PyTorch SlimInfer loop (slimpass.runtime.reference) behind the model-call interface."""

    def __init__(self, model: torch.nn.Module, slim_config: Any) -> None:
        self.model, self.slim_config, self.config = model, slim_config, model.config

    def __call__(self, input_ids: torch.Tensor, **_: Any) -> Any:
        from types import SimpleNamespace

        from slimpass.runtime import reference

        state = reference.prefill(self.model, input_ids, self.slim_config)
        self.keep_tokens = [k.tokens for k in state.keep_sets]
        return SimpleNamespace(logits=state.logits[:, None])


def make_inputs(length: int, vocab: int, args: argparse.Namespace, device: torch.device) -> Inputs:
    """The same prompt in every worker (CPU generator, then moved), plus the all-ones mask unless --no-mask."""
    generator = torch.Generator().manual_seed(args.seed * 1_000_003 + length)
    ids = torch.randint(0, vocab, (1, length), generator=generator).to(device)
    inputs = {"input_ids": ids}
    if not args.no_mask:
        inputs["attention_mask"] = torch.ones_like(ids)
    return inputs


def prefill(model: torch.nn.Module, inputs: Inputs) -> torch.Tensor:
    """One prefill; returns the last token's logits [1, 1, vocab]."""
    with torch.inference_mode():
        return model(**inputs, logits_to_keep=1, use_cache=False).logits


def weights_checksum(model: torch.nn.Module) -> float:
    """Sum of all parameters in float32 (no float32 copies): a cheap check that workers built the same model."""
    with torch.inference_mode():
        return float(sum(p.sum(dtype=torch.float32) for p in model.parameters()))


# --------------------------------------------------------------------------- worker: timing and memory


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gb(device: torch.device) -> float:
    """Peak allocated memory since the last reset (weights included); 0 off CUDA."""
    return torch.cuda.max_memory_allocated(device) / GB if device.type == "cuda" else 0.0


def timed_call(model: torch.nn.Module, inputs: Inputs, device: torch.device) -> tuple[float, torch.Tensor]:
    """Milliseconds of one call: CUDA events on the GPU (no host overhead in between), perf_counter on CPU."""
    if device.type != "cuda":
        start = time.perf_counter()
        logits = prefill(model, inputs)
        return (time.perf_counter() - start) * 1e3, logits
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    logits = prefill(model, inputs)
    end.record()
    end.synchronize()
    return start.elapsed_time(end), logits


def measure(model: torch.nn.Module, inputs: Inputs, args: argparse.Namespace,
            device: torch.device) -> tuple[Result, torch.Tensor]:
    """Warm-up (first call compiles), then timed calls. Returns the measurements and the last logits."""
    reset_peak(device)
    sync(device)
    start = time.perf_counter()
    prefill(model, inputs)
    sync(device)
    first_call_s = time.perf_counter() - start
    for _ in range(args.warmup - 1):
        prefill(model, inputs)
    sync(device)
    warmup_peak = peak_gb(device)
    reset_peak(device)  # the timed peak is the steady state, without compile-time allocations
    times, logits = [], None
    for _ in range(args.repeats):
        logits = None  # drop the previous output before the next call
        ms, logits = timed_call(model, inputs, device)
        times.append(ms)
    timed_peak = peak_gb(device)
    return {
        "status": "ok", "median_ms": statistics.median(times), "times_ms": times, "first_call_s": first_call_s,
        "peak_timed_gb": timed_peak, "peak_overall_gb": max(warmup_peak, timed_peak),
    }, logits


def error_chain(error: BaseException) -> list[BaseException]:
    """`error` and the exceptions it wraps (Dynamo's BackendCompilerFailed keeps one in inner_exception)."""
    chain: list[BaseException] = []
    while error is not None and all(error is not seen for seen in chain):
        chain.append(error)
        error = getattr(error, "inner_exception", None) or error.__cause__ or error.__context__
    return chain


def classify(error: BaseException) -> Result:
    """OOM (also when wrapped by Dynamo/Inductor) or ERROR, with the innermost message (the outer ones
    repeat the backend's repr, model included)."""
    chain = error_chain(error)
    for e in chain:
        if isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower():
            return {"status": "OOM", "detail": str(e).splitlines()[0][:300] if str(e) else ""}
    root = chain[-1]
    return {"status": "ERROR", "error": f"{type(root).__name__}: {root}"[:500]}


# --------------------------------------------------------------------------- worker: main loop


def run_length(model: torch.nn.Module, length: int, args: argparse.Namespace, device: torch.device) -> Result:
    """Measure one length; an OOM or error is recorded and the worker goes on with the next length."""
    vocab = model.config.vocab_size
    try:
        inputs = make_inputs(length, vocab, args, device)
        result, logits = measure(model, inputs, args, device)
        # Logits of every length (0.5 MB each) for the parent's comparison with hf_eager.
        torch.save(logits[0, -1].float().cpu(), args.workdir / f"{args.worker}_{length}.pt")
    except Exception as error:  # noqa: BLE001 - any failure of one length is a result, not a crash
        result = classify(error)
    # Outside the except block, so the traceback (and the activations its frames hold) is already gone.
    inputs = logits = None
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def kept_tokens(model: Any) -> list[int] | None:
    """Tokens kept per pruning stage on the last call (pruning variants only)."""
    if isinstance(model, ReferenceLoop):
        return getattr(model, "keep_tokens", None)
    import slimpass

    keep = slimpass.last_keep_sets(model) if "_slimpass_original_forward" in model.__dict__ else None
    return None if keep is None else [k.tokens for k in keep]


def slimpass_graphs(model: torch.nn.Module) -> list[dict[str, Any]]:
    """What sliminfer compiled and how often each graph ran rewritten vs fallback (empty for other variants)."""
    if "_slimpass_original_forward" not in model.__dict__:
        return []
    import slimpass

    return [
        {"graph_id": r.graph_id, "kind": r.kind, "layers": r.layers, "calls": dict(r.calls),
         "guards": [g.describe() for g in r.guards], "compile_seconds": r.compile_seconds,
         "passes": [p.line() for p in r.results]}
        for r in slimpass.compiled_graphs(model)
    ]


def worker_main(args: argparse.Namespace) -> None:
    """Run one variant over all lengths, rewriting `<workdir>/<variant>.json` after each length."""
    device = torch.device("cpu" if args.tiny else "cuda")
    # Stock Inductor compiles once per length; keep Dynamo from giving up (and silently running eager).
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 2 * len(args.lengths))
    model = build_model(args, device)
    sync(device)
    report: dict[str, Any] = {
        "variant": args.worker,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "model_gb": torch.cuda.memory_allocated(device) / GB if device.type == "cuda" else 0.0,
        "weights_checksum": weights_checksum(model),
        "lengths": {},
    }
    model = prepare(model, args.worker, args.options)
    for length in args.lengths:
        result = run_length(model, length, args, device)
        # Graphs Dynamo compiled so far: 0 for a compiled variant means it silently ran eager; more
        # than one per length means graph breaks.
        result["dynamo_graphs_total"] = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        result["kept_tokens"] = kept_tokens(model)
        report["lengths"][str(length)] = result
        report["slimpass_graphs"] = slimpass_graphs(model)
        (args.workdir / f"{args.worker}.json").write_text(json.dumps(report, indent=1))
        print(f"[{args.worker}] {length}: {describe(result)}", flush=True)


def describe(result: Result) -> str:
    """One progress line for a length's result."""
    if result["status"] != "ok":
        detail = result.get("error") or result.get("detail")
        return result["status"] + (f" ({detail})" if detail else "")
    return (f"median {result['median_ms']:.1f} ms, peak {result['peak_timed_gb']:.2f} GB timed / "
            f"{result['peak_overall_gb']:.2f} GB overall, first call {result['first_call_s']:.1f} s")


# --------------------------------------------------------------------------- parent: workers


def worker_command(variant: str, args: argparse.Namespace, workdir: Path) -> list[str]:
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", variant, "--workdir", str(workdir),
               "--lengths", ",".join(map(str, args.lengths)), "--warmup", str(args.warmup),
               "--repeats", str(args.repeats), "--seed", str(args.seed), "--shape", args.shape]
    command += ["--options", json.dumps(args.options)]
    return command + (["--tiny"] if args.tiny else []) + (["--no-mask"] if args.no_mask else [])


def run_variant(variant: str, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """Run one worker with a timeout; lengths it did not finish are marked TIMEOUT or CRASH."""
    print(f"== {variant}", flush=True)
    start = time.perf_counter()
    # A new session makes the worker a process group leader, so a timeout also kills Inductor's
    # compile subprocesses instead of leaving them running on the GPU machine.
    process = subprocess.Popen(worker_command(variant, args, workdir), start_new_session=True)
    try:
        rc = process.wait(timeout=args.timeout)
        missing = "CRASH" if rc else "MISSING"
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        rc, missing = process.wait(), "TIMEOUT"
    path = workdir / f"{variant}.json"
    report = json.loads(path.read_text()) if path.exists() else {"variant": variant, "lengths": {}}
    for length in args.lengths:
        report["lengths"].setdefault(str(length), {"status": missing})
    report.update(rc=rc, timed_out=missing == "TIMEOUT", wall_s=time.perf_counter() - start)
    return report


def compare_logits(workdir: Path, variants: list[str], lengths: list[int]) -> dict[str, dict[str, Any]]:
    """Max |logit difference| and top-1 agreement of each variant with hf_eager, per length both finished."""
    comparison: dict[str, dict[str, Any]] = {}
    for variant in variants:
        if variant == "hf_eager":
            continue
        for length in lengths:
            ours, ref = workdir / f"{variant}_{length}.pt", workdir / f"hf_eager_{length}.pt"
            if not (ours.exists() and ref.exists()):
                continue
            got, want = torch.load(ours), torch.load(ref)
            comparison.setdefault(variant, {})[str(length)] = {
                "max_abs_diff": (got - want).abs().max().item(),
                "top1_agree": bool(got.argmax() == want.argmax()),
            }
    # the pruned compiled graph against its oracle, the reference loop with the same schedule
    for length in lengths:
        ours, ref = workdir / f"sliminfer_paper_{length}.pt", workdir / f"reference_paper_{length}.pt"
        if ours.exists() and ref.exists():
            got, want = torch.load(ours), torch.load(ref)
            comparison.setdefault("sliminfer_paper_vs_reference", {})[str(length)] = {
                "max_abs_diff": (got - want).abs().max().item(),
                "top1_agree": bool(got.argmax() == want.argmax()),
            }
    return comparison


# --------------------------------------------------------------------------- parent: report


def environment(reports: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Versions and device. The parent never touches CUDA (its context would take GPU memory from the
    workers), so the device name comes from a worker's report."""
    def version(package: str) -> str | None:
        try:
            return importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            return None

    devices = {r["device"] for r in reports.values() if "device" in r}
    return {
        "device": ", ".join(sorted(devices)) or None, "torch": torch.__version__, "cuda": torch.version.cuda,
        "transformers": version("transformers"), "triton": version("triton") or version("pytorch-triton"),
        "python": sys.version.split()[0],
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def cell(result: Result, tiny: bool) -> str:
    if result["status"] != "ok":
        return result["status"]
    return f"{result['median_ms']:.1f} ms" + ("" if tiny else f" / {result['peak_timed_gb']:.1f} GB")


def ratio_cell(result: Result, base: Result, tiny: bool) -> str:
    """time ratio / peak-memory ratio vs hf_eager (below 1 is better)."""
    if result["status"] != "ok" or base["status"] != "ok":
        return "-"
    text = f"{result['median_ms'] / base['median_ms']:.2f}x"
    return text if tiny else f"{text} / {result['peak_timed_gb'] / base['peak_timed_gb']:.2f}x"


def first_call_cell(result: Result) -> str:
    return f"{result['first_call_s']:.1f} s" if result["status"] == "ok" else "-"


def logits_cell(entry: dict[str, Any] | None) -> str:
    if entry is None:
        return "-"
    return f"{entry['max_abs_diff']:.2e}, top-1 {'same' if entry['top1_agree'] else 'DIFFERS'}"


def grid(lengths: list[int], columns: list[str], fmt: Any) -> str:
    """A Markdown table with one row per length and one column per variant; fmt(variant, length) -> cell."""
    return markdown_table(["length"] + columns, [[str(n)] + [fmt(v, str(n)) for v in columns] for n in lengths])


def tables(results: dict[str, Any], args: argparse.Namespace) -> str:
    """The Markdown report: times and peaks, ratios vs hf_eager, logits vs hf_eager, first-call seconds."""
    variants, lengths, tiny = args.variants, args.lengths, args.tiny
    per = {v: results["results"][v]["lengths"] for v in variants}
    unit = "median ms" if tiny else "median ms / peak GB of the timed calls"
    parts = [f"### Prefill, last-token logits: {unit}", "",
             grid(lengths, variants, lambda v, n: cell(per[v][n], tiny))]
    if "hf_eager" in variants:
        what = "time" if tiny else "time / peak memory"
        others = [v for v in variants if v != "hf_eager"]
        logits = results["logits_vs_hf_eager"]
        parts += ["", f"### vs hf_eager: {what} ratio (below 1 is better)", "",
                  grid(lengths, others, lambda v, n: ratio_cell(per[v][n], per["hf_eager"][n], tiny)),
                  "", "### Last-token logits vs hf_eager: max abs diff, top-1 token", "",
                  grid(lengths, others, lambda v, n: logits_cell(logits.get(v, {}).get(n)))]
    parts += ["", "### First call (compile included)", "",
              grid(lengths, variants, lambda v, n: first_call_cell(per[v][n]))]
    return "\n".join(parts)


def notes(results: dict[str, Any]) -> list[str]:
    """Things that make the numbers suspect: workers with different weights, sliminfer fallbacks, errors."""
    lines = []
    sums = {v: r["weights_checksum"] for v, r in results["results"].items() if "weights_checksum" in r}
    if sums and max(sums.values()) - min(sums.values()) > 1e-3 * max(1.0, abs(max(sums.values()))):
        lines.append(f"workers built different weights (checksums {sums}): logits comparisons are meaningless")
    for variant, report in results["results"].items():
        lines += variant_notes(variant, report)
    return lines


def variant_notes(variant: str, report: dict[str, Any]) -> list[str]:
    """What sliminfer rewrote and how calls were routed; uncompiled 'compiled' variants; errors; kills."""
    lines = []
    for graph in report.get("slimpass_graphs") or []:
        # slimpass counts calls only for guarded graphs; an unguarded graph always runs as rewritten.
        calls = (f"{graph['calls']['rewritten']} calls rewritten, {graph['calls']['fallback']} fallback"
                 if graph["guards"] else "unguarded")
        edits = "; ".join(p for p in graph["passes"] if not p.startswith("find_decoder_layers"))
        lines.append(f"{variant} {graph['graph_id']} ({graph['kind']}): {calls}; {edits}")
    graphs = [r["dynamo_graphs_total"] for r in report["lengths"].values() if r["status"] == "ok"]
    if variant != "hf_eager" and graphs and max(graphs) == 0:
        lines.append(f"{variant}: Dynamo compiled no graph, so it ran eager")
    for length, result in report["lengths"].items():
        detail = result.get("error") or result.get("detail")
        if detail:
            lines.append(f"{variant} at {length}: {result['status']}: {detail}")
    if report.get("timed_out"):
        lines.append(f"{variant}: killed after --timeout ({report['wall_s']:.0f} s)")
    elif report.get("rc"):
        lines.append(f"{variant}: worker exit status {report['rc']} (negative: killed by that signal)")
    return lines


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        worker_main(args)
        return
    with tempfile.TemporaryDirectory(prefix="gpu_prefill_") as tmp:
        reports = {variant: run_variant(variant, args, Path(tmp)) for variant in args.variants}
        comparison = compare_logits(Path(tmp), args.variants, args.lengths)
    results = {
        "environment": environment(reports),
        "settings": {"lengths": args.lengths, "variants": args.variants, "attention_mask": not args.no_mask,
                     "warmup": args.warmup, "repeats": args.repeats, "timeout_s": args.timeout,
                     "seed": args.seed, "options": args.options,
                     "model": f"{args.shape}-shape" + (" (tiny)" if args.tiny else ""),
                     "dtype": "float32" if args.tiny else "bfloat16"},
        "results": reports,
        "logits_vs_hf_eager": comparison,
    }
    results["notes"] = notes(results)
    env = results["environment"]
    print(f"\n## {env['device']}: torch {env['torch']}, transformers {env['transformers']}, "
          f"triton {env['triton']}, mask {'ones' if not args.no_mask else 'none'}\n")
    print(tables(results, args))
    if results["notes"]:
        print("\nNotes:\n" + "\n".join(f"- {line}" for line in results["notes"]))
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))
        print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
