"""Where offload's extra decode time comes from: one process, one resident model and one offloading model,
the offloading one timed again with parts of the manager's work switched off (the tokens of those runs
are wrong on purpose: they time, they do not decode). By hand on a GPU:

    PYTHONPATH=. python benchmarks/gpu_offload_ablation.py --layers 12 --out ablation.json
    PYTHONPATH=. python benchmarks/gpu_offload_ablation.py --static-decode --rows no-kernel,programs-8 --out a.json
    PYTHONPATH=. python benchmarks/gpu_offload_ablation.py --tiny --length 600 --new-tokens 8 --active-tokens 64  # CPU

Both models are compiled first (shallow copies of one model: the same weights), then timed side by
side: each row is `gpu_decode.measure` over resident and the offloading model (``--repeats`` rounds, the
order rotating), so every offload row has its own resident control from the same minutes; a row gives
end-to-end ms, decode ms per token, the median over rounds of its decode time against resident's in the
same round, and the host time of a decode forward, its parts (the compiled graph's call, what comes before
it, the cache's work after it) and of the whole step (`gpu_decode.host_time`):

- ``resident``: pruning + reselection, resident cache (the baseline);
- ``offload``: ``offload=True`` as shipped;
- ``offload/no-kernel``: the copy kernel's launch replaced by nothing (events, waits and the manager's other
  work stay): what the copies cost on the GPU and the launches on the host;
- ``offload/no-wait``: copies issued as shipped but the compute stream never waits for them: what waiting
  costs (stalls);
- ``offload/no-issue``: no copies after the steps (the fronts keep their first blocks): the graph's
  reads of the fronts and writes of the next sets alone;
- ``offload/timed-steps``: as shipped, with the manager's host time before and after each step's graph
  noted (``manager_us``);
- ``offload/one-group``: as shipped but one copy group of every offloaded layer of a shape (fewer
  launches, copies issued later);
- ``offload/programs-N``: the copy kernel with N programs (shipped: `copy_kernel.COPY_PROGRAMS`);
- ``offload/priority``, ``offload/priority-per-item``: both models decode on a high-priority stream (the
  copies' side stream keeps the default, lowest priority), with the shipped copy layout or one program
  per item (many short programs the block scheduler can put behind the compute's): can the copies be
  kept out of the compute's way by priority rather than by holding few SMs?

``--rows`` picks the rows (default: all).

With ``--launch-times``, after the timing, every kernel call's host time per decoding step for resident
and offload (`gpu_decode.launch_times`: Triton launches, aten ops, Inductor's extern kernels; no profiler),
and the names whose time differs most between them: which launches grow when nothing slows the host.

With ``--spy-seconds S``, after the timing, py-spy samples the host's stacks for S seconds per model
(resident, offload; `host_sampler`): where a step's host time goes,
Python and native, including what torch.profiler does not record.

Last, after all timing (a profiler must not run before anything timed): for resident and shipped
offload the profiler summary of a 16-token generate
(`gpu_decode.profile_overlap`: copy overlap, compute-stream stalls right after a copy, top CPU ops), and
for offload one 4-token generate under ``torch.cuda.set_sync_debug_mode("warn")`` (how many host<->device
synchronisations a call makes, and where the first ones come from).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import json
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gpu_decode import (environment, generate, host_time, launch_times, measure, profile_overlap,  # noqa: E402
                        ratios_by_round, timed)
from gpu_prefill import build_model  # noqa: E402
from host_sampler import HostSampler, summarize  # noqa: E402

import slimpass  # noqa: E402
from slimpass.runtime import offload  # noqa: E402


ROWS = ("no-kernel", "no-wait", "no-issue", "timed-steps", "one-group", "programs-8", "programs-32",
        "priority", "priority-per-item")


@contextlib.contextmanager
def patched(name: str):
    """Switch off or change part of the manager's work for one row (see the module docstring). Yields a
    list the timed-steps row fills with the manager's calls around each step: (what, host seconds)."""
    notes: list[tuple[str, float]] = []
    manager, copy_kernel = offload.OffloadManager, offload._copy_blocks_triton
    replace: list[tuple[object, str, object]] = []
    if name == "one-group":
        add_layers = manager.add_layers

        def one_group(self, layers):
            self.copy_group = len(layers)
            add_layers(self, layers)

        replace.append((manager, "add_layers", one_group))
    elif name == "timed-steps":
        def timed(what, call):
            def run(self, *args):
                start = time.perf_counter()
                try:
                    return call(self, *args)
                finally:
                    notes.append((what, time.perf_counter() - start))
            return run

        replace += [(manager, "before_step", timed("before", manager.before_step)),
                    (manager, "after_step", timed("after", manager.after_step))]
    elif name == "no-kernel":
        replace.append((offload, "_copy_blocks_triton", lambda *args, **kwargs: None))
    elif name == "no-wait":
        replace.append((manager, "before_step", lambda self: None))
    elif name == "no-issue":
        replace.append((manager, "_issue", lambda self, group, step: setattr(group, "issued_for", step)))
    elif name.startswith("programs-"):
        programs = int(name.split("-")[1])
        replace.append((offload, "_copy_blocks_triton", functools.partial(copy_kernel, programs=programs)))
    elif name == "priority-per-item":
        replace.append((offload, "_copy_blocks_triton", functools.partial(copy_kernel, programs=None)))
    with contextlib.ExitStack() as patches:
        for owner, attribute, value in replace:
            patches.enter_context(mock.patch.object(owner, attribute, value))
        yield notes


def timings(models: dict, ids, args, device) -> dict:
    """`gpu_decode.measure` over resident and one offload row, side by side (rounds, rotating order), and
    each offload row's decode time against resident's in the same round."""
    rows = measure(models, ids, args, device)
    for name, row in rows.items():
        row["vs_resident_by_round"] = [ratio - 1 for ratio in ratios_by_round(row, rows["resident"])]
        row["vs_resident"] = statistics.median(row["vs_resident_by_round"])
        steps = ratios_by_round(row, rows["resident"], "step_all_ms")
        row["step_vs_resident_by_round"] = [ratio - 1 for ratio in steps]
        row["step_vs_resident"] = statistics.median(row["step_vs_resident_by_round"])
        row["host"] = host_time(models[name], lambda: generate(models[name], ids, args.new_tokens), device)
    return rows


def step_notes(notes: list[tuple[str, float]]) -> dict:
    """The timed-steps row's notes: the manager's host time before and after a step's graph, medians in µs."""
    return {what: statistics.median(seconds * 1e6 for kind, seconds in notes if kind == what)
            if any(kind == what for kind, _ in notes) else None for what in ("before", "after")}


def host_samples(models: dict, ids, args) -> dict:
    """py-spy's samples of the host while each model decodes (`host_sampler`), resident and offload, each
    for ``--spy-seconds``: per model the shares of where the host was (a generate's prefill included) and
    the host time per generate."""
    raw = Path(tempfile.gettempdir()) / "slimpass_host_samples.txt"
    calls = {}
    try:
        with HostSampler(raw) as sampler:
            for name, model in models.items():
                calls[name] = sampler.sample(name, lambda: generate(model, ids, args.new_tokens), args.spy_seconds)
    except RuntimeError as error:
        return {"error": str(error)}
    summary = summarize(raw.read_text(), sampler.markers, sampler.rate)
    for name, row in summary.items():
        row["generates"] = calls[name]
        row["sampled_ms_per_generate"] = row["seconds"] * 1e3 / calls[name]
    return summary


def launch_difference(resident: dict, offload: dict, top: int = 30) -> dict:
    """Offload's kernel calls against resident's (`gpu_decode.launch_times`, per decoding step): the total
    host µs of each, and the names whose host µs differ most (Inductor names its Triton kernels after what
    they fuse, so a kernel of one graph may have no namesake in the other)."""
    names = set(resident["rows"]) | set(offload["rows"])
    us = {name: (resident["rows"].get(name, {}).get("us", 0.0), offload["rows"].get(name, {}).get("us", 0.0))
          for name in names}
    largest = sorted(us, key=lambda name: -abs(us[name][1] - us[name][0]))[:top]
    return {"total_us": {"resident": resident["total_us"], "offload": offload["total_us"]},
            "total_calls": {"resident": resident.get("total_calls"), "offload": offload.get("total_calls")},
            "rows": {name: {"resident_us": us[name][0], "offload_us": us[name][1]} for name in largest}}


def sync_count(model, ids) -> dict:
    """Host<->device synchronisations `torch.cuda.set_sync_debug_mode` sees in a 4- and an 8-token
    generate; the difference over 4 is the count per decoding step."""
    counts, first = [], []
    for tokens in (4, 8):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                generate(model, ids, tokens)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        messages = [str(w.message) for w in caught if "synchroniz" in str(w.message)]
        counts.append(len(messages))
        first = first or messages[:6]
    return {"syncs_4_tokens": counts[0], "syncs_8_tokens": counts[1], "per_step": (counts[1] - counts[0]) / 4,
            "first": first}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--length", type=int, default=32768)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=3, help="rounds")
    parser.add_argument("--active-tokens", type=int, default=2048)
    parser.add_argument("--copy-group", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tiny", action="store_true", help="tiny float32 model on CPU: test this script")
    parser.add_argument("--rows", default=",".join(ROWS), help="the offload rows after the shipped one, "
                        f"comma-separated, '' for none (default: all of {', '.join(ROWS)})")
    parser.add_argument("--spy-seconds", type=float, default=0.0, help="after the timing, sample the host "
                        "with py-spy ($PY_SPY or on PATH) this long per model (benchmarks/host_sampler.py)")
    parser.add_argument("--launch-times", action="store_true", help="after the timing, each kernel call's host "
                        "time per decoding step, resident and offload, without a profiler (gpu_decode.launch_times)")
    parser.add_argument("--static-decode", action="store_true",
                        help="both models with static_decode=True (CUDA graphs; the offloading one orders its copies from "
                             "inside the graph, so the host-side no-wait row changes nothing there)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    device = torch.device("cpu" if args.tiny else "cuda:0")
    if not args.tiny:
        torch.cuda.set_device(device)
    base_model = build_model(args, device)
    ids = torch.randint(0, base_model.config.vocab_size, (1, args.length),
                        generator=torch.Generator().manual_seed(args.seed * 1_000_003 + args.length)).to(device)
    base = {"prune": True, "reselect": True, "active_tokens": args.active_tokens}
    if args.tiny:
        base.update(compiler="eager", min_prompt_len=64)
    if args.static_decode:
        base.update(static_decode=True)
    result = {"args": {k: str(v) for k, v in vars(args).items()}, "environment": environment(device), "rows": {}}

    def record(name, row):
        result["rows"][name] = row
        shown = {k: v for k, v in row.items() if k not in ("tokens", "step_series_ms")}
        print(name, json.dumps(shown, default=str), flush=True)
        if args.out:
            args.out.write_text(json.dumps(result, indent=1, default=str))

    models = {}
    for name, options in (("resident", base), ("offload", {**base, "offload": True, "copy_group": args.copy_group})):
        model = slimpass.compile(copy.copy(base_model), options=options)  # the same weights; both stay compiled
        first_s, out = timed(lambda: generate(model, ids, args.new_tokens), device)
        generate(model, ids, 1)
        models[name] = model
        result["rows"][f"{name}/first_call"] = {"first_call_s": first_s / 1e3, "tokens": out[0, ids.shape[1]:].tolist()}
    result["tokens_equal"] = result["rows"]["offload/first_call"]["tokens"] == result["rows"]["resident/first_call"]["tokens"]
    for name, row in timings(models, ids, args, device).items():
        record(name, row)
    for ablation in filter(None, args.rows.split(",")):
        if ablation not in ROWS:
            raise SystemExit(f"--rows: unknown row {ablation!r}; choose from {', '.join(ROWS)}")
        stream = torch.cuda.Stream(device, priority=-5) if ablation.startswith("priority") and not args.tiny else None
        on_stream = torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()
        with patched(ablation) as notes, on_stream:
            if stream is not None:
                stream.wait_stream(torch.cuda.default_stream(device))
            rows = timings(models, ids, args, device)
        if ablation == "timed-steps":
            rows["offload"]["manager_us"] = step_notes(notes)
        record(f"resident (beside {ablation})", rows["resident"])
        record(f"offload/{ablation}", rows["offload"])
    if args.launch_times:
        for name, model in models.items():
            record(f"{name}/launch_times", launch_times(model, lambda: generate(model, ids, args.new_tokens), device))
        record("launch_times_difference", launch_difference(result["rows"]["resident/launch_times"],
                                                            result["rows"]["offload/launch_times"]))
    if args.spy_seconds:
        record("host_samples", host_samples(models, ids, args))
    if not args.tiny:  # last: nothing is timed after these
        for name, model in models.items():
            record(f"{name}/sync_debug", sync_count(model, ids))
        for name, model in models.items():  # the same profiles for both: top CPU ops side by side
            record(f"{name}/profile", profile_overlap(lambda: generate(model, ids, 16), device))
            record(f"{name}/profile_gpu_only", profile_overlap(lambda: generate(model, ids, 16), device, cpu=False))
    print(f"offload's tokens equal resident's: {result['tokens_equal']}")
    for name, row in result["rows"].items():
        if "decode_ms_per_token" in row:
            parts = row["host"]["forward_parts_ms"]
            print(f"{name:28s} decode {row['decode_ms_per_token']:6.2f} ms/token (vs resident, median of rounds "
                  f"{row['vs_resident']:+.1%}); median step {row['step_ms']:.2f} ms ({row['step_vs_resident']:+.1%})  "
                  f"forward host {row['host']['forward_host_ms']:.2f} ms (graph {_ms(parts['graph'])}, "
                  f"before it {_ms(parts['before_graph'])}, after_step {_ms(parts['cache_after_step'])})  "
                  f"step {row['host']['step_ms']:.2f} ms")


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} ms"


if __name__ == "__main__":
    main()
