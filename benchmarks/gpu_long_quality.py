"""Answer quality at real context lengths (issue 24): RULER-style tasks at 4k-32k on a named model, the
full model and SlimInfer variants side by side, through the reference loop (`slimpass.runtime.reference`).

The reference is the method's oracle (the compiled path equals it; tests check that), and it runs on any
transformers version (the GPU image's 5.17 included). Samples go round the cells in chunks (samples
i..i+chunk-1 of every length and task before the next chunk; a chunk starts only if it should end within
--time-limit), so a stopped run leaves every cell with the same number of samples. Prompts are exactly
their length (`tasks.make_sample(exact=True)`: the few tokens the fit leaves short are the haystack's
continuation; --no-exact keeps the fitted prompts), and within a cell the chunk's prompts of equal token
count run as one batch (no padding: each row is what it would be alone, up to the rounding of batched
kernels), and variants that share a prefill run from one: ``default`` and
``reselect``, and ``full`` with the baselines. One JSON line per (sample, variant) is appended to --out
as each batch finishes; ``seconds`` is the batch's call time over its rows (``call`` names the variants
that shared it).

Variants: ``full`` (no pruning: the model's own forward), ``default`` (prune=True, default schedule),
``paper`` (the paper schedule), ``ratios`` (the default's layers and fractions without its token caps,
a study, not in the default --variants), ``reselect`` (default schedule, decode with reselect=True, 2048 active
tokens), and the baselines of `slimpass.eval.baselines` (``streaming``, ``snapkv``, ``gemfilter``) at the
KV budget of the default schedule's last stage on the same prompt (skipped where the default does not
prune). Greedy answers, stopped at EOS.

    PYTHONPATH=. python benchmarks/gpu_long_quality.py --model qwen2.5-coder-0.5b-instruct \
        --lengths 4k,8k,16k,32k --samples 50 --out quality.jsonl --time-limit 550
    PYTHONPATH=. python benchmarks/gpu_long_quality.py --device cpu --dtype float32 --lengths 1k \
        --samples 1 --tasks passkey --out /tmp/q.jsonl        # the script itself, on the default model
    python benchmarks/gpu_long_quality.py --summarize quality.jsonl   # the markdown tables

Summary: per (task, length, variant) n, accuracy with a 95% interval (Wilson for 0/1 scores), retention
(variant / full) and needle survival through every stage; per (length, variant) the mean over families of
the cells whose full-model accuracy is >= 80% (the issue's acceptance rule) and over all cells.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import platform
import sys
import time
from typing import Any

import torch
import transformers

from slimpass.config import SlimConfig
from slimpass.eval import baselines, fidelity, models, prose, report, runner, tasks
from slimpass.runtime import reference
from slimpass.schedule import resolve_schedule

VARIANTS = {
    "full": None,
    "default": {"schedule": "default"},
    "paper": {"schedule": "paper"},
    "reselect": {"schedule": "default", "reselect": True, "active_tokens": 2048},
    "ratios": {"schedule": "ratios"},  # the default's layers and fractions without its token caps (a study)
    # baselines (slimpass.eval.baselines) at the KV budget of the default schedule's last stage, this prompt's
    **{name: name for name in baselines.BASELINES},
}
FIDELITY_TOKENS = 32  # the greedy continuation compared token by token
# answers are short; these cover the longest expected answer of each family with room to spare
NEW_TOKENS = {"passkey": 16, "niah_single": 24, "niah_multikey": 24, "niah_multivalue": 64, "niah_multiquery": 64,
              "variable_tracking": 40, "common_words": 96, "qa": 24}


_TOKENIZER = None


def _init_worker(folder: str) -> None:
    global _TOKENIZER
    torch.set_num_threads(1)
    _TOKENIZER = transformers.AutoTokenizer.from_pretrained(folder)


def _make(task: str, length: int, seed: int, depth: float, index: int, exact: bool) -> tuple[int, tasks.Sample]:
    return index, tasks.make_sample(task, _TOKENIZER, length, seed, depth=depth, exact=exact)


def parse_lengths(text: str) -> list[int]:
    return [int(float(t[:-1]) * 1024) if t.lower().endswith("k") else int(t) for t in text.split(",")]


def fidelity_rows(model, prose_ids: list[int], length: int, count: int, configs: dict, batch_tokens: int,
                  env: dict) -> list[dict]:
    """Natural-text fidelity of each SlimInfer variant against the full model on `count` prompts of exactly
    `length` tokens cut from `prose_ids` (no template): top-1 agreement and KL of the next token, and the
    32-token greedy continuation (`slimpass.eval.fidelity.compare`), batched like the tasks."""
    prompts = [fidelity.natural_prompt(prose_ids, length, seed=i) for i in range(count)]
    per_batch = max(1, batch_tokens // length)
    rows = []
    for first in range(0, count, per_batch):
        ids = torch.cat(prompts[first:first + per_batch]).to(model.device)
        views = {}
        for variant, config in configs.items():
            if isinstance(config, str):
                continue  # the baselines: fidelity measures SlimInfer against the full model
            t0, logits = time.perf_counter(), []
            tokens = reference.generate(model, ids, config, max_new_tokens=FIDELITY_TOKENS, logits=logits,
                                        last_logits_only=True)
            seconds = (time.perf_counter() - t0) / ids.shape[0]
            views[variant] = [(fidelity.Continuation(torch.log_softmax(logits[0][b].float(), -1).cpu(),
                                                     tuple(tokens[b, length:].tolist())), seconds)
                              for b in range(ids.shape[0])]
        for variant, view in views.items():
            if variant == "full":
                continue
            for b, (pruned, seconds) in enumerate(view):
                rows.append({"task": "fidelity", "length": length, "variant": variant, "sample": first + b,
                             **fidelity.compare(views["full"][b][0], pruned), "seconds": round(seconds, 3),
                             "batch": ids.shape[0], **env})
    return rows


def fidelity_table(rows: list[dict]) -> str:
    cells: dict[tuple, list[dict]] = {}
    for row in rows:
        cells.setdefault((row["length"], row["variant"]), []).append(row)
    lines = ["| length | variant | n | top-1 agreement [95% CI] | mean KL (nats) | 32-token match | mean matching prefix |",
             "|---|---|---|---|---|---|---|"]
    for (length, variant), group in sorted(cells.items(), key=lambda item: (item[0][0], list(VARIANTS).index(item[0][1]))):
        m, low, high = report.interval([r["top1"] for r in group])
        n = len(group)
        lines.append(f"| {length} | {variant} | {n} | {100 * m:.0f}% [{100 * low:.0f}, {100 * high:.0f}] "
                     f"| {sum(r['kl'] for r in group) / n:.4f} | {100 * sum(r['exact'] for r in group) / n:.0f}% "
                     f"| {sum(r['prefix'] for r in group) / n:.1f} |")
    return "\n".join(lines)


def summarize(rows: list[dict]) -> str:
    """Markdown: the per-length summary, then every cell; the fidelity table if there are fidelity rows."""
    fid = [row for row in rows if row["task"] == "fidelity"]
    rows = [row for row in rows if row["task"] != "fidelity"]
    if fid:
        return fidelity_table(fid) + ("\n\n" + summarize(rows) if rows else "")
    cells: dict[tuple, list[dict]] = {}
    for row in rows:
        cells.setdefault((row["task"], row["length"], row["variant"]), []).append(row)
    variants = [v for v in VARIANTS if any(key[2] == v for key in cells)]
    lengths = sorted({key[1] for key in cells})
    families = [t for t in tasks.TASKS if any(key[0] == t for key in cells)]
    mean = {key: sum(r["score"] for r in group) / len(group) for key, group in cells.items()}
    lines = ["| length | variant | families (n each) | accuracy, all | retention, all | accuracy, full >= 80% "
             "| retention, full >= 80% | min retention, full >= 80% |", "|---|---|---|---|---|---|---|---|"]
    for length in lengths:
        for variant in variants:
            have = [t for t in families if (t, length, variant) in cells and (t, length, "full") in cells]
            if not have:
                continue
            n = min(len(cells[t, length, variant]) for t in have)
            good = [t for t in have if mean[t, length, "full"] >= 0.8]
            acc = sum(mean[t, length, variant] for t in have) / len(have)
            full = sum(mean[t, length, "full"] for t in have) / len(have)
            g_acc = sum(mean[t, length, variant] for t in good) / len(good) if good else None
            g_full = sum(mean[t, length, "full"] for t in good) / len(good) if good else None
            worst = min((mean[t, length, variant] / mean[t, length, "full"] for t in good), default=None)
            pct = lambda x: "-" if x is None else f"{100 * x:.1f}%"
            lines.append(f"| {length} | {variant} | {len(have)} ({n}) | {pct(acc)} | {pct(acc / full if full else None)} "
                         f"| {pct(g_acc)} ({len(good)} fam.) | {pct(g_acc / g_full if g_full else None)} | {pct(worst)} |")
    lines += ["", "| task | length | variant | n | accuracy [95% CI] | retention | needle survived all stages "
              "| median s |", "|---|---|---|---|---|---|---|---|"]
    for task in families:
        for length in lengths:
            for variant in variants:
                group = cells.get((task, length, variant))
                if not group:
                    continue
                m, low, high = report.interval([r["score"] for r in group])
                full = mean.get((task, length, "full"))
                survived = [all(r["survived"]) for r in group if r["survived"]]
                lines.append(f"| {task} | {length} | {variant} | {len(group)} | {100 * m:.0f}% [{100 * low:.0f}, "
                             f"{100 * high:.0f}] | {'-' if variant == 'full' or not full else f'{100 * m / full:.0f}%'} "
                             f"| {f'{sum(survived)}/{len(survived)}' if survived else '-'} "
                             f"| {sorted(r['seconds'] for r in group)[len(group) // 2]:.2f} |")
    return "\n".join(lines)


def batches(samples: list[tuple[int, tasks.Sample]], batch_tokens: int) -> list[list[tuple[int, tasks.Sample]]]:
    """The (sample index, sample) pairs in groups of equal prompt length (rows of one batch need no
    padding), at most `batch_tokens` tokens each (one row at least)."""
    by_length: dict[int, list] = {}
    for i, sample in samples:
        by_length.setdefault(int(sample.input_ids.shape[1]), []).append((i, sample))
    groups = []
    for n, group in sorted(by_length.items()):
        rows = max(1, batch_tokens // n)
        groups += [group[k:k + rows] for k in range(0, len(group), rows)]
    return groups


def answer_text(tokenizer, tokens: torch.Tensor, eos_ids: list[int]) -> str:
    """The answer of one row, cut at its first end-of-sequence token (other rows may have decoded on)."""
    new = tokens.tolist()
    stop = next((i for i, t in enumerate(new) if t in eos_ids), len(new))
    return tokenizer.decode(new[:stop], skip_special_tokens=True).strip()


def run_group(model, tokenizer, group, task: str, length: int, configs: dict, eos_ids: list[int], depth_of,
              env: dict) -> list[dict]:
    """Every variant on one batch of equal-length prompts; one row per (sample, variant). Variants that
    share a prefill run from one: default and reselect (`reference.generate_shared`), full and the
    baselines (`baselines.generate_shared`, at the default's last-stage KV budget)."""
    ids = torch.cat([sample.input_ids for _i, sample in group]).to(next(model.parameters()).device)
    n, new_tokens = ids.shape[1], NEW_TOKENS[task]
    calls: list[tuple[list[str], Any]] = []
    decode_only = [v for v in ("default", "reselect") if v in configs]
    calls += [(decode_only, None)] if decode_only else []
    calls += [([v], None) for v in configs if not isinstance(configs[v], str) and configs[v] is not None
              and v not in decode_only]
    unpruned = [v for v in configs if configs[v] is None or isinstance(configs[v], str)]
    calls += [(unpruned, "unpruned")] if unpruned else []
    results: dict[str, tuple] = {}
    budget = None
    for names, kind in calls:
        kept: list = []
        if kind == "unpruned":
            names = [v for v in names if v == "full" or budget]  # a baseline needs the default's budget
            if not names:
                continue
        t0 = time.perf_counter()
        if kind == "unpruned":
            outs = baselines.generate_shared(names, model, ids, budget or n, max_new_tokens=new_tokens,
                                             eos_token_id=eos_ids)
        else:
            outs = reference.generate_shared(model, ids, [configs[v] for v in names], max_new_tokens=new_tokens,
                                             eos_token_id=eos_ids, keep_sets=kept, last_logits_only=True)
        if ids.is_cuda:
            torch.cuda.synchronize()
        seconds = (time.perf_counter() - t0) / len(group)
        for name, tokens in zip(names, outs):
            results[name] = (tokens, kept, seconds, budget if isinstance(configs[name], str) else None, names)
        if "default" in names and kept:
            budget = int(kept[-1].positions.shape[1])
    rows = []
    for variant in configs:
        if variant not in results:
            continue  # a baseline where the default schedule did not prune this prompt: no budget to match
        tokens, kept, seconds, row_budget, shared = results[variant]
        for b, (index, sample) in enumerate(group):
            text = answer_text(tokenizer, tokens[b, n:], eos_ids)
            needed = sample.needle_positions
            rows.append({"task": task, "length": length, "variant": variant, "sample": index,
                         "seed": sample.seed, "depth": depth_of(index), "tokens": n,
                         "topped_up": sample.info["topped_up"],
                         "score": tasks.score(sample, text), "answer": text[:200], "answers": list(sample.answers),
                         "seconds": round(seconds, 3), "batch": len(group), "call": shared,
                         "kept": [[k.layer, int(k.positions.shape[1])] for k in kept],
                         "survived": [needed <= set(k.positions[b].tolist()) for k in kept] if needed else None,
                         **({"budget": row_budget} if row_budget is not None else {}), **env})
    return rows


def main(argv: list[str] | None = None) -> int:
    if argv is None and sys.argv[1:2] == ["--summarize"]:
        rows = [json.loads(line) for path in sys.argv[2:] for line in open(path) if line.strip()]
        print(summarize(rows))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen2.5-coder-0.5b-instruct", help=f"one of {', '.join(models.MODELS)}")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--lengths", type=parse_lengths, default=parse_lengths("4k,8k,16k,32k"),
                        help="prompt lengths in tokens (4k = 4096)")
    parser.add_argument("--tasks", default=",".join(tasks.TASKS), help="comma-separated task families, or none")
    parser.add_argument("--variants", default=",".join(v for v in VARIANTS if v != "ratios"), help=f"comma-separated, of {', '.join(VARIANTS)}")
    parser.add_argument("--samples", type=int, default=50, help="samples per (task, length) cell")
    parser.add_argument("--first-sample", type=int, default=0, help="resume: the first sample index to run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--time-limit", type=float, default=0, help="stop starting samples after this many seconds")
    parser.add_argument("--chunk", type=int, default=10,
                        help="samples of a cell run together (batched where their prompt lengths are equal)")
    parser.add_argument("--exact", action=argparse.BooleanOptionalAction, default=True,
                        help="prompts of exactly each length (topped up with the haystack's continuation)")
    parser.add_argument("--fidelity", type=int, default=0, metavar="N",
                        help="first, N natural-text prompts per length for fidelity (top-1, KL, 32-token match)")
    parser.add_argument("--fidelity-text", default="eb1911", choices=("natural", *prose.TEXTS),
                        help="the prose fidelity prompts are cut from (eb1911: ~80k tokens; make text-eb1911)")
    parser.add_argument("--batch-tokens", type=int, default=262144, help="at most this many prompt tokens a batch")
    parser.add_argument("--out", required=True, help="JSON lines, appended")
    args = parser.parse_args(argv)
    chosen = args.variants.split(",")
    task_names = [] if args.tasks == "none" else args.tasks.split(",")
    unknown = [v for v in chosen if v not in VARIANTS] + [t for t in task_names if t not in tasks.TASKS]
    if unknown:
        parser.error(f"unknown variant or task {unknown}; variants: {', '.join(VARIANTS)}; tasks: {', '.join(tasks.TASKS)}")
    start = time.perf_counter()
    model, tokenizer = models.load(args.model, dtype=getattr(torch, args.dtype))
    model.config._attn_implementation = "sdpa"
    model.to(args.device)
    context = model.config.max_position_embeddings
    if max(args.lengths) > context:
        parser.error(f"length {max(args.lengths)} exceeds {args.model}'s context of {context} tokens")
    depth = model.config.get_text_config().num_hidden_layers
    ratios = {stage.layer: float(stage.ratio) for stage in resolve_schedule(SlimConfig(prune=True), depth)}
    configs = {v: VARIANTS[v] if isinstance(VARIANTS[v], str) or VARIANTS[v] is None
               else SlimConfig(prune=True, **{**VARIANTS[v], **({"schedule": ratios} if v == "ratios" else {})})
               for v in chosen}
    if any(isinstance(c, str) for c in configs.values()) and "default" not in configs:
        parser.error("the baselines take their KV budget from the default variant: include it in --variants")
    env = {"model": args.model, "dtype": args.dtype, "torch": torch.__version__,
           "transformers": transformers.__version__, "python": platform.python_version(),
           "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.machine(),
           "date": time.strftime("%Y-%m-%d")}
    print(json.dumps(env), flush=True)
    if args.fidelity:
        prose_ids = tokenizer(runner.fidelity_text(args.fidelity_text), add_special_tokens=False).input_ids
        env = {**env, "text": args.fidelity_text, "text_tokens": len(prose_ids)}
        with open(args.out, "a") as out:
            for length in args.lengths:
                for row in fidelity_rows(model, prose_ids, length, args.fidelity, configs, args.batch_tokens, env):
                    out.write(json.dumps(row) + "\n")
                out.flush()
                print(f"fidelity at {length} done, {time.perf_counter() - start:.0f} s", flush=True)
        env = {k: v for k, v in env.items() if k not in ("text", "text_tokens")}
    eos = {tokenizer.eos_token_id, *tokenizer.convert_tokens_to_ids([t for t in ("<|im_end|>", "<|endoftext|>")
                                                                    if t in tokenizer.get_vocab()])}
    generation_eos = model.generation_config.eos_token_id
    eos |= set(generation_eos if isinstance(generation_eos, list) else [generation_eos] if generation_eos is not None else [])
    eos_ids = sorted(e for e in eos if e is not None)
    # prompts are built (tokenizer bisection, CPU) by worker processes ahead of the GPU
    tasks_ = task_names
    chunks = [range(c, min(c + args.chunk, args.samples)) for c in range(args.first_sample, args.samples, args.chunk)]
    units = [(chunk, length, task) for chunk in chunks for length in args.lengths for task in tasks_]
    folder = str(models.cache_dir() / args.model) if args.model in models.MODELS else args.model
    pool = concurrent.futures.ProcessPoolExecutor(max(1, min(16, (os.cpu_count() or 2) - 1)),
                                                  initializer=_init_worker, initargs=(folder,))
    def depth_of(index: int) -> float:  # depths spread over [0, 1] as in make_samples, seeds derived the same way
        return index / (args.samples - 1) if args.samples > 1 else 0.5
    pending = [[pool.submit(_make, task, length, tasks._derive(args.seed, i), depth_of(i), i, args.exact) for i in chunk]
               for chunk, length, task in units]
    done, chunk_start, chunk_seconds = 0, time.perf_counter(), 0.0
    with open(args.out, "a") as out:
        for (chunk, length, task), futures in zip(units, pending):
            now = time.perf_counter()
            first_of_chunk = (length, task) == (args.lengths[0], tasks_[0])
            if first_of_chunk:  # a chunk starts only if it should end before the limit (as long as the last one)
                chunk_seconds, chunk_start = (now - chunk_start if chunk.start > args.first_sample else 0.0), now
            if args.time_limit and (now - start > args.time_limit
                                    or first_of_chunk and now - start + chunk_seconds > args.time_limit):
                print(f"time limit: stopped before samples {chunk.start}-{chunk.stop - 1} of {task} at {length} "
                      f"({done} rows)", flush=True)
                break
            samples = [f.result() for f in futures]
            for group in batches(samples, args.batch_tokens):
                for row in run_group(model, tokenizer, group, task, length, configs, eos_ids, depth_of, env):
                    out.write(json.dumps(row) + "\n")
                    done += 1
                out.flush()
            if (length, task) == (args.lengths[-1], tasks_[-1]):
                print(f"samples {chunk.start}-{chunk.stop - 1} done: {done} rows, "
                      f"{time.perf_counter() - start:.0f} s", flush=True)
    pool.shutdown(wait=False, cancel_futures=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
