"""End-to-end generation benchmark on one CUDA GPU: long prompt + N generated tokens, HF eager vs sliminfer.

    PYTHONPATH=. python benchmarks/gpu_decode.py --length 32768 --new-tokens 128 --out results.json
    PYTHONPATH=. python benchmarks/gpu_decode.py --tiny --length 300 --new-tokens 8   # CPU dry run

Model: the Llama-3.1-8B-shaped LlamaForCausalLM of `gpu_prefill.py` (random bf16 weights built on the
GPU). Workload: batch-1 greedy ``generate(ids, max_new_tokens=N, min_new_tokens=N)``. Variants, all in
this process (the weights are built once and shared):

- ``hf_eager``: the model's own generate;
- ``hf_static``: the model's own generate with ``cache_implementation="static"``: transformers' fast path, a
  fixed-size cache whose decoding step transformers compiles (on a GPU, ``mode="reduce-overhead"``: one
  CUDA graph a step; the prefill stays eager). The baseline a user gets without slimpass;
- ``sliminfer_dense``: `slimpass.compile`, pruning off (what compilation alone gives);
- ``sliminfer``: pruning on, defaults (resident `SlimCache`);
- ``sliminfer_reselect``: pruning and decode-time reselection (``active_tokens`` per slim layer);
- ``sliminfer_offload``: the same with ``offload=True``: slim layers' prompt K/V in pinned host memory,
  their changed blocks copied on a side stream a step ahead (``--copy-group`` layers a launch);
- ``sliminfer_reselect_cg``: ``sliminfer_reselect`` with Inductor's CUDA graphs around the parts of each
  graph whose shapes do not change from step to step;
- ``sliminfer_reselect_static``: ``sliminfer_reselect`` with ``static_decode=True``: fixed-size K/V buffers, so
  the decoding step has no changing size and runs as CUDA graphs;
- ``sliminfer_offload_static``: ``sliminfer_offload`` with ``static_decode=True`` (compared with
  ``sliminfer_reselect_static``, as ``sliminfer_offload`` is with ``sliminfer_reselect``).

Every variant is compiled first (its first generate, timed as ``first_call_s``), each in its own shallow
copy of the model (the same weights), so all stay compiled; then ``--repeats`` rounds each time every
variant once, the order rotating (drift in the machine falls on all alike; `measure`): an N-token generate
and a 1-token one (time to first token). Reported: median end-to-end latency, median time to first token,
decode time per token = (end-to-end - TTFT) / (N - 1) (also round by round, and offload against
sliminfer_reselect round by round), peak memory; then, untimed, the host time of a decoding step
(`host_time`) and the KV cache's bytes (`SlimCache.memory_report`: prompt KV against an unpruned cache of
the same length), with reselection the blocks and bytes swapped per step, with offload the KV bytes on the
GPU against an unpruned cache, the scored keys kept there and the host->device bytes per step. Last, after
all timing, (``--profile``) a profiler summary of one short generate: the side stream's copy kernels and
how much of their time overlapped kernels on the compute stream. Tokens are compared with hf_eager's
(random weights: pruning may change them; the prefix that agrees is reported), and offload's with
sliminfer_reselect's (they must be equal).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import importlib.metadata
import inspect
import json
import os
import statistics
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_prefill import build_model  # noqa: E402 - the same model as the prefill benchmark

VARIANTS = ("hf_eager", "hf_static", "sliminfer_dense", "sliminfer", "sliminfer_reselect", "sliminfer_offload",
            "sliminfer_reselect_cg", "sliminfer_reselect_static", "sliminfer_offload_static")
# sliminfer_reselect_cg: sliminfer_reselect with Inductor's CUDA graphs around the parts of each graph whose
# shapes do not change from step to step (graph partitions split off the ops that use a dynamic size)
CUDA_GRAPHS = {"triton.cudagraphs": True, "triton.cudagraph_skip_dynamic_graphs": True}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--length", type=int, default=32768, help="prompt tokens")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--active-tokens", type=int, default=2048, help="per slim layer, with reselection")
    parser.add_argument("--copy-group", type=int, default=4, help="with offload: SlimConfig.copy_group")
    parser.add_argument("--profile", action="store_true",
                        help="with reselection / offload: profile one 16-token generate (copy overlap, GPU busy share)")
    parser.add_argument("--options", type=json.loads, default={}, help="more slimpass options, as JSON")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--layers", type=int, help="decoder layers (default: the model's 32; the schedule scales)")
    parser.add_argument("--tiny", action="store_true", help="tiny float32 model on CPU: test this script")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    unknown = [v for v in args.variants.split(",") if v not in VARIANTS]
    if unknown:
        parser.error(f"--variants: unknown {unknown}; known: {', '.join(VARIANTS)}")
    return args


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StaticCacheGenerate:
    """`model`'s generate with ``cache_implementation="static"`` (the ``hf_static`` variant). transformers
    compiles the decoding step of such a generate itself, on a GPU (not on the CPU), and keeps it on the model."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model, self.config = model, model.config

    def generate(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.model.generate(*args, cache_implementation="static", **kwargs)


def options_for(variant: str, args: argparse.Namespace) -> dict[str, Any] | None:
    if variant in ("hf_eager", "hf_static"):
        return None
    options: dict[str, Any] = {"compiler": "eager" if args.tiny else "inductor", "prune": variant != "sliminfer_dense"}
    if args.tiny:
        options.update(min_prompt_len=64)
    if variant in ("sliminfer_reselect", "sliminfer_offload", "sliminfer_reselect_cg", "sliminfer_reselect_static",
                   "sliminfer_offload_static"):
        options.update(reselect=True, active_tokens=args.active_tokens)
    if variant.endswith("_static") and variant != "hf_static":
        options.update(static_decode=True)
    if variant == "sliminfer_reselect_cg" and not args.tiny:
        options.update(inductor_options=CUDA_GRAPHS)
    if variant in ("sliminfer_offload", "sliminfer_offload_static"):
        options.update(offload=True, copy_group=args.copy_group)
    return {**options, **args.options}


class StepClock:
    """A `generate` streamer that notes the host's clock as each token arrives. generate hands every token to
    the streamer (copied to the host: a wait for the GPU) before it starts the next step, so the gaps after
    the first token are the decoding steps' times, one by one: unlike (end to end - TTFT) / (N - 1), their
    median is not moved by a few slow steps, and a drift of the host's speed inside one generate shows."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value) -> None:  # first the prompt, then each new token
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass

    def steps_ms(self) -> list[float]:
        """The decoding steps' times: the gaps between tokens after the first (the prefill's)."""
        return [(b - a) * 1e3 for a, b in zip(self.times[1:], self.times[2:])]


def generate(model: torch.nn.Module, ids: torch.Tensor, new_tokens: int, cache: Any = None,
             streamer: StepClock | None = None) -> torch.Tensor:
    extra = {} if streamer is None else {"streamer": streamer}
    if cache is not None:
        from slimpass.hf_compat import cache_argument

        extra[cache_argument(model)] = cache
    with torch.inference_mode():
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                              min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, **extra)


def timed(fn, device: torch.device) -> tuple[float, Any]:
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return (time.perf_counter() - start) * 1e3, out


def compile_phases(since: dict[str, float] | None = None, top: int = 12) -> dict[str, float]:
    """Seconds torch.compile spent per phase so far (`torch._dynamo.utils.compile_times`, summed over
    graphs); with `since` (an earlier reading) the `top` phases of the time in between, longest first:
    where a first call's minutes go (Dynamo's tracing, AOTAutograd, Inductor's lowering, Triton's
    compiles, `async_compile.wait`, autotuning)."""
    from torch._dynamo.utils import compile_times

    names, values = compile_times(repr="csv", aggregate=True)
    now = {name: float(value) for name, value in zip(names, values)}
    if since is None:
        return now
    spent = {name: round(seconds - since.get(name, 0.0), 3) for name, seconds in now.items()}
    return dict(sorted(((n, v) for n, v in spent.items() if v > 0), key=lambda item: -item[1])[:top])


def variant_model(base: torch.nn.Module, variant: str, args: argparse.Namespace) -> tuple[torch.nn.Module, dict | None]:
    """`variant`'s model: `base` itself for hf_eager, else a shallow copy of it (the same weights) that
    `slimpass.compile` compiles in place, so every variant stays compiled side by side."""
    import slimpass

    options = options_for(variant, args)
    if variant == "hf_static":
        return StaticCacheGenerate(base), None
    if options is None:
        return base, None
    return slimpass.compile(copy.copy(base), options=options), options


def measure(models: dict[str, torch.nn.Module], ids: torch.Tensor, args: argparse.Namespace,
            device: torch.device, after_round: Callable[[int, dict], None] | None = None) -> dict[str, dict[str, Any]]:
    """`--repeats` rounds; a round times every variant once (an N-token generate, then a 1-token one, the
    time to first token), its order rotated by one each round, so that drift in the machine (clocks, other
    load on the host's CPUs) falls on every variant alike. Peak memory: the most any of a variant's
    generates allocated. Before each generate, `host_probe` times a fixed pure-Python loop: the GPU
    machine's host runs at two speeds (PERF, eighth round), and this shows which one a round met.
    `after_round(rounds done, raw rows)`, if given, is called after each round."""
    names = list(models)
    rows = {name: {"e2e_all_ms": [], "ttft_all_ms": [], "step_all_ms": [], "step_p90_all_ms": [], "step_series_ms": [],
                   "host_probe_all_ms": [], "peak_gb": 0.0} for name in names}
    for round_ in range(args.repeats):
        for name in names[round_ % len(names):] + names[:round_ % len(names)]:
            model, row = models[name], rows[name]
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            row["host_probe_all_ms"].append(host_probe())
            clock = StepClock()
            ms, out = timed(lambda: generate(model, ids, args.new_tokens, streamer=clock), device)
            row["e2e_all_ms"].append(ms)
            steps = clock.steps_ms()
            if steps:
                row["step_series_ms"].append([round(step, 3) for step in steps])
                row["step_all_ms"].append(statistics.median(steps))
                row["step_p90_all_ms"].append(statistics.quantiles(steps, n=10)[-1] if len(steps) > 1 else steps[0])
            row["ttft_all_ms"].append(timed(lambda: generate(model, ids, 1), device)[0])
            if device.type == "cuda":
                row["peak_gb"] = max(row["peak_gb"], torch.cuda.max_memory_allocated(device) / 2**30)
            row["tokens"] = out[0, ids.shape[1]:].tolist()
        if after_round is not None:
            after_round(round_ + 1, rows)
    for row in rows.values():
        row["e2e_ms"], row["ttft_ms"] = statistics.median(row["e2e_all_ms"]), statistics.median(row["ttft_all_ms"])
        row["decode_all_ms_per_token"] = [(e - t) / max(args.new_tokens - 1, 1)
                                          for e, t in zip(row["e2e_all_ms"], row["ttft_all_ms"])]
        row["decode_ms_per_token"] = (row["e2e_ms"] - row["ttft_ms"]) / max(args.new_tokens - 1, 1)
        row["step_ms"] = statistics.median(row["step_all_ms"]) if row["step_all_ms"] else None
    return rows


def host_probe() -> float:
    """Milliseconds of a fixed pure-Python loop (no GPU, no allocation): the host's speed right now."""
    start = time.perf_counter()
    total = 0
    for i in range(200_000):
        total += i * i
    return (time.perf_counter() - start) * 1e3


def ratios_by_round(row: dict[str, Any], base: dict[str, Any], key: str = "decode_all_ms_per_token") -> list[float]:
    """`row`'s decode time per token over `base`'s in the same round (`measure`); ``key="step_all_ms"``:
    the ratio of the median decoding steps (`StepClock`)."""
    return [a / b for a, b in zip(row[key], base[key])]


def reports(model: torch.nn.Module, ids: torch.Tensor, args: argparse.Namespace) -> dict[str, Any]:
    """One more generate on a cache we keep, for its reports: KV bytes against an unpruned cache,
    reselection's swaps, offload's copies, the compiled graphs."""
    import slimpass

    cache = slimpass.SlimCache(model.config)
    cache.new_tokens = args.new_tokens  # what slimpass.compile's generate tells the caches it makes (the timed ones)
    generate(model, ids, args.new_tokens, cache)
    report, generated = cache.memory_report(), cache.generated()
    per_token = [(m.gpu_bytes + m.cpu_bytes) // m.tokens for m in report.layers]
    if cache.room:  # static_decode: the buffers have room for more tokens than they hold
        per_token = [2 * layer.keys[:, :, :1].nbytes for layer in cache.layers]
    prompt_bytes = sum(b * (m.tokens - generated) for b, m in zip(per_token, report.layers))
    dense_prompt = sum(b * cache.prompt_len for b in per_token)
    return dict(
        kv_bytes=report.total_bytes, kv_dense_bytes=report.dense_bytes,
        kv_share=report.total_bytes / report.dense_bytes if report.dense_bytes else None,
        prompt_kv_bytes=prompt_bytes, prompt_kv_share=prompt_bytes / dense_prompt if dense_prompt else None,
        kept_per_layer=[m.tokens for m in report.layers],
        reselection=cache.reselection_report(),
        gpu_kv_bytes=report.gpu_bytes, gpu_kv_share=report.gpu_bytes / report.dense_bytes,
        score_bytes=report.score_bytes, score_share=report.score_bytes / report.dense_bytes,
        offload=cache.offload_report(),
        graphs=[{"kind": g.kind, "passes": [r.line() for r in g.results]} for g in slimpass.compiled_graphs(model)],
    )


@contextlib.contextmanager
def _timed_parts():
    """Notes (part, host start, host seconds) of every call of Inductor's compiled graphs and of
    `SlimCache.before_step` / `after_step` while open."""
    from torch._inductor.output_code import CompiledFxGraph

    from slimpass.runtime.slim_cache import SlimCache

    notes: list[tuple[str, float, float]] = []

    def timed(call, part):
        def run(*args, **kwargs):
            start = time.perf_counter()
            try:
                return call(*args, **kwargs)
            finally:
                notes.append((part, start, time.perf_counter() - start))
        return run

    with contextlib.ExitStack() as patches:
        for owner, name, part in ((CompiledFxGraph, "__call__", "graph"),
                                  (SlimCache, "before_step", "cache_before_step"),
                                  (SlimCache, "after_step", "cache_after_step")):
            patches.enter_context(mock.patch.object(owner, name, timed(getattr(owner, name), part)))
        yield notes


@contextlib.contextmanager
def _forward_hooks(model: torch.nn.Module, before, after):
    """`before` and `after` hooked around each forward of `model` while open."""
    handles = [model.register_forward_pre_hook(before), model.register_forward_hook(after)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def host_time(model: torch.nn.Module, fn, device: torch.device) -> dict[str, Any]:
    """Per decoding step of one call (model forwards after the prefill's): the host time of the forward
    (hooks around it; no sync inside unless the forward syncs) and the time from one forward's start to the
    next's (the whole step: the forward, then generate's own work and its sync), medians in ms. On a GPU
    also how far the GPU trails the host at each forward's end: an event recorded by the hook, timed from
    one recorded while the GPU was idle at the call's start, against the host's clock. Near zero: the GPU
    keeps up and waits for the host's launches (the step is host-bound); milliseconds: work is queued (the
    GPU is the bound, or the host raced ahead of it).

    `forward_parts_ms`, where a decoding forward's host time goes (medians, ms): ``graph``, the call of
    Inductor's compiled graph (its launches; None under another inner compiler); ``before_graph``, from the
    forward's start to that call (slimpass' wrapper, `SlimCache.before_step`, Dynamo's guards, AOTAutograd's
    wrappers); ``cache_before_step`` and ``cache_after_step``, `SlimCache`'s work around the graph (under
    offload the manager's waits and copies)."""
    starts, hosts, ends = [], [], []
    cuda = device.type == "cuda"

    def before(*_):
        starts.append(time.perf_counter())

    def after(*_):
        now = time.perf_counter()
        hosts.append(now - starts[-1])
        if cuda:
            ends.append((now, torch.cuda.Event(enable_timing=True)))
            ends[-1][1].record()

    with _forward_hooks(model, before, after), _timed_parts() as notes:
        sync(device)
        if cuda:
            origin = torch.cuda.Event(enable_timing=True)
            origin.record()
        zero = time.perf_counter()
        fn()
        sync(device)
    steps = [b - a for a, b in zip(starts[1:], starts[2:])]
    lags = [origin.elapsed_time(event) - (host - zero) * 1e3 for host, event in ends[1:]]
    return {"forward_host_ms": statistics.median(hosts[1:]) * 1e3 if len(hosts) > 1 else None,
            "step_ms": statistics.median(steps) * 1e3 if steps else None,
            "gpu_lag_at_forward_end_ms": statistics.median(lags) if lags else None,
            "forward_parts_ms": forward_parts(notes, starts[1:], hosts[1:])}


def forward_parts(notes: list[tuple[str, float, float]], starts: list[float], hosts: list[float]) -> dict[str, Any]:
    """`host_time`'s `forward_parts_ms` from `_timed_parts`' notes and the decoding forwards' starts and host
    times (s): each part's median over the forwards of its summed time inside each forward."""
    parts: dict[str, list[float]] = {"graph": [], "before_graph": [], "cache_before_step": [], "cache_after_step": []}
    for start, host in zip(starts, hosts):
        inside = [(part, begin, seconds) for part, begin, seconds in notes if start <= begin <= start + host]
        for part in ("graph", "cache_before_step", "cache_after_step"):
            if any(kind == part for kind, _, _ in inside):
                parts[part].append(sum(seconds for kind, _, seconds in inside if kind == part))
        graphs = [begin for kind, begin, _ in inside if kind == "graph"]
        if graphs:
            parts["before_graph"].append(min(graphs) - start)
    return {part: statistics.median(values) * 1e3 if values else None for part, values in parts.items()}


class LaunchTimes:
    """While open (and `recording`): per call that Inductor's code makes to run a kernel, its host time,
    without a profiler: Triton kernels by name (`CachingAutotuner.run`; ``static`` counts those launched
    by Inductor's static launcher), aten ops called from Python by overload (`OpOverload.__call__`:
    Inductor's fallbacks such as ``aten.sort.stable``) and Inductor's `extern_kernels` (``extern:mm``, ...).
    A call made inside another noted call is noted too (its time is in both)."""

    def __init__(self) -> None:
        self.calls: Counter = Counter()
        self.static: Counter = Counter()
        self.seconds: defaultdict = defaultdict(float)
        self.recording = True
        self._patches = contextlib.ExitStack()
        self._static_launch = False

    def _timed(self, call, name_of):
        def run(*args, **kwargs):
            if not self.recording:
                return call(*args, **kwargs)
            name, self._static_launch = name_of(args), False
            start = time.perf_counter()
            try:
                return call(*args, **kwargs)
            finally:
                self.seconds[name] += time.perf_counter() - start
                self.calls[name] += 1
                self.static[name] += self._static_launch
        return run

    def _patch(self, owner: Any, name: str, value: Any) -> None:
        self._patches.enter_context(mock.patch.object(owner, name, value))

    def __enter__(self) -> LaunchTimes:
        self._patch(torch._ops.OpOverload, "__call__",
                    self._timed(torch._ops.OpOverload.__call__, lambda args: str(args[0])))
        try:
            from torch._inductor.select_algorithm import extern_kernels
        except ImportError:
            extern_kernels = None
        for name, call in list(vars(extern_kernels).items()) if extern_kernels is not None else ():
            if callable(call):
                self._patch(extern_kernels, name, self._timed(call, lambda args, name=name: f"extern:{name}"))
        try:
            from torch._inductor.runtime import static_triton_launcher, triton_heuristics
        except ImportError:  # no Triton: Inductor launches nothing through these
            return self
        run = triton_heuristics.CachingAutotuner.run
        self._patch(triton_heuristics.CachingAutotuner, "run",
                    self._timed(run, lambda args: getattr(args[0].fn, "__name__", "triton")))
        for kernel in vars(static_triton_launcher).values():  # its own launcher classes, not the ones it imports
            if (isinstance(kernel, type) and kernel.__module__ == static_triton_launcher.__name__
                    and inspect.isfunction(vars(kernel).get("run"))):
                def static_run(launcher, *args, _run=vars(kernel)["run"], **kwargs):
                    self._static_launch = True
                    return _run(launcher, *args, **kwargs)
                self._patch(kernel, "run", static_run)
        return self

    def __exit__(self, *exc) -> None:
        self._patches.close()

    def clear(self) -> None:
        self.calls.clear(), self.static.clear(), self.seconds.clear()

    def summary(self, per: int, top: int = 60) -> dict[str, Any]:
        """Per name, divided by `per` (steps, calls): calls, host µs, µs a call, the static launcher's share
        of its calls; the `top` costliest names and the total over all."""
        rows = {name: {"calls": self.calls[name] / per, "us": self.seconds[name] * 1e6 / per,
                       "us_per_call": self.seconds[name] * 1e6 / self.calls[name],
                       "static_share": self.static[name] / self.calls[name]}
                for name in sorted(self.calls, key=lambda name: -self.seconds[name])[:top]}
        return {"per": per, "total_us": sum(self.seconds.values()) * 1e6 / per,
                "total_calls": sum(self.calls.values()) / per, "rows": rows}


def launch_times(model: torch.nn.Module, fn, device: torch.device) -> dict[str, Any]:
    """`LaunchTimes` over the decoding forwards of one call (`fn`, a generate of `model`; the prefill's
    forward is left out): per decoding step, each kernel call's host time. Plain runs, no profiler: what
    torch.profiler or a sampler would slow down (a launch that waits for the GPU) shows here."""
    forwards = [0]
    with LaunchTimes() as notes:
        def before(*_):
            notes.recording = forwards[0] >= 1
            forwards[0] += 1

        def after(*_):
            notes.recording = False

        notes.recording = False
        with _forward_hooks(model, before, after):
            sync(device)
            fn()
            sync(device)
    return notes.summary(max(forwards[0] - 1, 1))


def profile_overlap(fn, device: torch.device, cpu: bool = True) -> dict[str, Any]:
    """Kernels of one call under the profiler: the offload copy kernels on the side stream and the share of
    their time during which a kernel ran on the compute stream (the stream with the most other kernel time).
    ``cpu=False`` traces only the GPU's activity (less host time added; no CPU ops listed)."""
    import tempfile

    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA] if cpu else [ProfilerActivity.CUDA]
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        fn()
        sync(device)
        wall = (time.perf_counter() - start) * 1e6
    with tempfile.NamedTemporaryFile(suffix=".json") as trace:
        prof.export_chrome_trace(trace.name)
        events = json.load(open(trace.name))["traceEvents"]
    kernels = [(e["ts"], e["ts"] + e["dur"], e["args"].get("stream"), e["name"]) for e in events
               if e.get("cat") == "kernel" and "dur" in e]
    busy_by_stream: dict[Any, float] = {}
    for start, end, stream, name in kernels:
        if "copy_blocks" not in name:
            busy_by_stream[stream] = busy_by_stream.get(stream, 0.0) + end - start
    compute = max(busy_by_stream, key=busy_by_stream.get) if busy_by_stream else None
    # the first step's copies run on the compute stream (they cannot be hidden): count the side stream's
    copies = [k for k in kernels if "copy_blocks" in k[3] and k[2] != compute]
    side = {k[2] for k in copies}
    others = sorted((start, end) for start, end, stream, _ in kernels if stream == compute)
    merged: list[list[float]] = []
    for start, end in others:
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    # the compute stream waiting for a copy: an idle gap on it that ends right after a copy kernel ends
    stalls = [b_start - a_end for (_, a_end), (b_start, _) in zip(merged, merged[1:])
              if any(a_end <= c_end <= b_start <= c_end + 30 for _, c_end, _, _ in copies)]
    covered = 0.0
    for start, end, _, _ in copies:
        covered += sum(max(0.0, min(end, b) - max(start, a)) for a, b in merged if a < end and b > start)
    busy = sum(end - start for start, end, _, _ in copies)
    return {"copy_kernels": len(copies), "copy_streams": sorted(map(str, side)), "compute_stream": str(compute),
            "copy_us": busy,
            "overlapped_us": covered, "overlap_share": covered / busy if busy else None,
            "compute_kernel_us": sum(b - a for a, b in merged), "wall_us": wall,
            "stalls": len(stalls), "stall_us": sum(stalls),
            "compute_busy_share": sum(b - a for a, b in merged) / wall,
            "top_cpu_ops": [(e.key, e.count, round(e.self_cpu_time_total)) for e in
                            sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:40]]}


def agreement(row: dict[str, Any], base: dict[str, Any]) -> int:
    prefix = 0
    for a, b in zip(row["tokens"], base["tokens"]):
        if a != b:
            break
        prefix += 1
    return prefix


def environment(device: torch.device) -> dict[str, Any]:
    def version(package: str) -> str | None:
        try:
            return importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            return None

    return {"torch": torch.__version__, "transformers": version("transformers"), "triton": version("triton"),
            "python": sys.version.split()[0], "device": torch.cuda.get_device_name(device) if device.type == "cuda"
            else "cpu", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            **host_facts(device)}


def host_facts(device: torch.device) -> dict[str, Any]:
    """What decoding (host-bound at batch 1) and host->device copies depend on: the CPUs this process may
    use, the load on them, the NUMA nodes and the GPU's (pinned memory on the far node is read slower)."""
    facts: dict[str, Any] = {"cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
                             "load_avg": os.getloadavg() if hasattr(os, "getloadavg") else None}
    nodes = Path("/sys/devices/system/node")
    facts["numa_nodes"] = len(list(nodes.glob("node[0-9]*"))) if nodes.exists() else None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        try:
            bus = f"{props.pci_domain_id:04x}:{props.pci_bus_id:02x}:{props.pci_device_id:02x}.0"
            facts["gpu_numa_node"] = int(Path(f"/sys/bus/pci/devices/{bus}/numa_node").read_text())
        except (AttributeError, OSError, ValueError):
            facts["gpu_numa_node"] = None
    return facts


def save_partial(args: argparse.Namespace, device: torch.device, progress: dict[str, Any]) -> None:
    """What is done so far, into ``--out`` (``"partial": true``): a run cut short by its time limit on a lent
    GPU keeps its compiles and rounds. The finished run overwrites it."""
    if args.out:
        args.out.write_text(json.dumps({"partial": True, "length": args.length, "new_tokens": args.new_tokens,
                                        "environment": environment(device), **progress}, indent=1, default=str))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = torch.device("cpu" if args.tiny else "cuda:0")
    if not args.tiny:
        torch.cuda.set_device(device)
    base_model = build_model(args, device)
    generator = torch.Generator().manual_seed(args.seed * 1_000_003 + args.length)
    ids = torch.randint(0, base_model.config.vocab_size, (1, args.length), generator=generator).to(device)
    models, first_calls, failed = {}, {}, {}
    for variant in args.variants.split(","):  # compile each (its first generate), then time them side by side
        try:
            model, options = variant_model(base_model, variant, args)
            phases = compile_phases()
            first_calls[variant] = {"options": options, "first_call_s": timed(
                lambda: generate(model, ids, args.new_tokens), device)[0] / 1e3}
            first_calls[variant]["compile_phases_s"] = compile_phases(since=phases)
            first_calls[variant]["cudagraph_counters"] = {
                k: v for k, v in torch._dynamo.utils.counters["inductor"].items() if "cudagraph" in k}
            generate(model, ids, 1)  # warm the one-token path too
            models[variant] = model
        except torch.cuda.OutOfMemoryError as err:
            failed[variant] = f"OOM: {str(err).splitlines()[0]}"
        if device.type == "cuda":
            torch.cuda.empty_cache()
        print(variant, json.dumps(first_calls.get(variant) or failed[variant], default=str), flush=True)
        save_partial(args, device, {"compiled": first_calls, "failed": failed})

    def after_round(done: int, raw: dict) -> None:
        save_partial(args, device, {"compiled": first_calls, "failed": failed, "rounds_done": done, "raw": raw})

    measured = measure(models, ids, args, device, after_round)
    rows = []
    for variant in args.variants.split(","):
        if variant in failed:
            rows.append({"variant": variant, "status": failed[variant]})
            continue
        row = {"variant": variant, **first_calls[variant], **measured[variant]}
        if variant != "hf_static":  # (its forward hooks would land inside transformers' compiled step)
            row["decode_host"] = host_time(models[variant], lambda: generate(models[variant], ids, args.new_tokens),
                                           device)
        if row["options"] is not None:
            row.update(reports(models[variant], ids, args))
        rows.append(row)
        shown = {k: v for k, v in row.items() if k not in ("tokens", "graphs", "step_series_ms")}
        print(json.dumps(shown, default=str), flush=True)
    if args.profile and device.type == "cuda":  # last: nothing is timed after the profiler ran
        for row in rows:
            if row["variant"] in ("sliminfer_reselect", "sliminfer_offload", "sliminfer_offload_static") and \
                    row["variant"] in models:
                model = models[row["variant"]]
                row["profile"] = profile_overlap(lambda: generate(model, ids, 16), device)
    base = next((r for r in rows if r["variant"] == "hf_eager" and "e2e_ms" in r), None)
    print(f"\n{args.length}-token prompt + {args.new_tokens} tokens, batch 1")
    print("| variant | end-to-end ms | vs hf_eager | TTFT ms | decode ms/token | peak GB | KV vs dense | tokens = hf_eager |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        if "e2e_ms" not in row:
            print(f"| {row['variant']} | {row.get('status')} | | | | | | |")
            continue
        speed = f"{base['e2e_ms'] / row['e2e_ms']:.2f}x" if base else "-"
        share = f"{row['prompt_kv_share']:.1%}" if row.get("prompt_kv_share") else "100%"
        if row.get("offload"):  # fronts copy host tokens: what counts is what stays on the GPU
            share = f"{row['gpu_kv_share']:.1%} on GPU"
        same = f"{agreement(row, base)}/{args.new_tokens}" if base else "-"
        print(f"| {row['variant']} | {row['e2e_ms']:.1f} | {speed} | {row['ttft_ms']:.1f} | "
              f"{row['decode_ms_per_token']:.2f} | {row['peak_gb']:.1f} | {share} | {same} |")
    if base:
        for row in rows:
            if row is not base and "e2e_ms" in row:
                row["e2e_speedup_by_round"] = ratios_by_round(base, row, "e2e_all_ms")
                print(f"{row['variant']}: speed-up over hf_eager round by round "
                      f"{', '.join(f'{r:.2f}x' for r in row['e2e_speedup_by_round'])} (median "
                      f"{statistics.median(row['e2e_speedup_by_round']):.2f}x); host probe ms (hf_eager / this) "
                      f"{', '.join(f'{a:.1f}/{b:.1f}' for a, b in zip(base['host_probe_all_ms'], row['host_probe_all_ms']))}")
    resident = next((r for r in rows if r["variant"] == "sliminfer_reselect" and "e2e_ms" in r), None)
    for name in ("sliminfer_reselect_cg", "sliminfer_reselect_static"):
        graphed = next((r for r in rows if r["variant"] == name and "e2e_ms" in r), None)
        if resident and graphed:
            steps = ratios_by_round(graphed, resident, "step_all_ms")
            print(f"{name}: median step {graphed['step_ms']:.2f} ms vs sliminfer_reselect's "
                  f"{resident['step_ms']:.2f} ms (round by round {', '.join(f'{r - 1:+.1%}' for r in steps)}); "
                  f"tokens equal to sliminfer_reselect's: {graphed['tokens'] == resident['tokens']}")
    resident_static = next((r for r in rows if r["variant"] == "sliminfer_reselect_static" and "e2e_ms" in r), None)
    for row in rows:
        if row.get("offload"):
            print(f"\n{row['variant']}: KV on the GPU {row['gpu_kv_share']:.1%} of an unpruned cache "
                  f"(+ scored keys {row['score_share']:.1%}); host->device {row['offload']['h2d_bytes_per_step'] / 2**20:.2f} "
                  f"MiB per step after the first")
            # its resident counterpart: the same decoding without offload (static buffers or not)
            against = resident_static if row["variant"] == "sliminfer_offload_static" else resident
            if against:
                name = against["variant"]
                ratios = row["decode_vs_resident_by_round"] = ratios_by_round(row, against)
                steps = row["step_vs_resident_by_round"] = ratios_by_round(row, against, "step_all_ms")
                print(f"decode per token {row['decode_ms_per_token']:.2f} ms vs {name} "
                      f"{against['decode_ms_per_token']:.2f} ms "
                      f"({row['decode_ms_per_token'] / against['decode_ms_per_token'] - 1:+.1%}; round by round "
                      f"{', '.join(f'{r - 1:+.1%}' for r in ratios)}); median step {row['step_ms']:.2f} ms vs "
                      f"{against['step_ms']:.2f} ms (round by round {', '.join(f'{r - 1:+.1%}' for r in steps)}); "
                      f"tokens equal to {name}'s: {row['tokens'] == against['tokens']}")
            if row.get("profile"):
                p = row["profile"]
                print(f"profile (16 tokens): {p['copy_kernels']} copy kernels on stream(s) {p['copy_streams']}, "
                      f"{p['copy_us']:.0f} us, {p['overlap_share']:.1%} of it overlapped compute kernels")
    if args.out:
        args.out.write_text(json.dumps({"length": args.length, "new_tokens": args.new_tokens,
                                        "environment": environment(device), "rows": rows}, indent=1, default=str))


if __name__ == "__main__":
    main()
