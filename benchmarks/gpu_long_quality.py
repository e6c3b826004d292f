"""Answer quality at real context lengths (issue 24): RULER-style tasks at 4k-32k on a named model, the
full model and SlimInfer variants side by side, through the reference loop (`slimpass.runtime.reference`).

The reference is the method's oracle (the compiled path equals it; tests check that), and it runs on any
transformers version (the GPU image's 5.17 included). Every sample runs every variant before the next
sample starts, and samples go round the cells (sample i of every length and task before sample i + 1),
so a run stopped by --time-limit leaves every cell with the same number of samples. One JSON line per
(sample, variant) is appended to --out as it finishes.

Variants: ``full`` (no pruning: the model's own forward), ``default`` (prune=True, default schedule),
``paper`` (the paper schedule), ``reselect`` (default schedule, decode with reselect=True, 2048 active
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

import torch
import transformers

from slimpass.config import SlimConfig
from slimpass.eval import baselines, models, report, tasks
from slimpass.runtime import reference

VARIANTS = {
    "full": None,
    "default": {"schedule": "default"},
    "paper": {"schedule": "paper"},
    "reselect": {"schedule": "default", "reselect": True, "active_tokens": 2048},
    # baselines (slimpass.eval.baselines) at the KV budget of the default schedule's last stage, this prompt's
    **{name: name for name in baselines.BASELINES},
}
# answers are short; these cover the longest expected answer of each family with room to spare
NEW_TOKENS = {"passkey": 16, "niah_single": 24, "niah_multikey": 24, "niah_multivalue": 64, "niah_multiquery": 64,
              "variable_tracking": 40, "common_words": 96, "qa": 24}


_TOKENIZER = None


def _init_worker(folder: str) -> None:
    global _TOKENIZER
    torch.set_num_threads(1)
    _TOKENIZER = transformers.AutoTokenizer.from_pretrained(folder)


def _make(task: str, length: int, seed: int, depth: float) -> tasks.Sample:
    return tasks.make_sample(task, _TOKENIZER, length, seed, depth=depth)


def parse_lengths(text: str) -> list[int]:
    return [int(float(t[:-1]) * 1024) if t.lower().endswith("k") else int(t) for t in text.split(",")]


def summarize(rows: list[dict]) -> str:
    """Markdown: the per-length summary, then every cell."""
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
    parser.add_argument("--tasks", default=",".join(tasks.TASKS), help="comma-separated task families")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    parser.add_argument("--samples", type=int, default=50, help="samples per (task, length) cell")
    parser.add_argument("--first-sample", type=int, default=0, help="resume: the first sample index to run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--time-limit", type=float, default=0, help="stop starting samples after this many seconds")
    parser.add_argument("--out", required=True, help="JSON lines, appended")
    args = parser.parse_args(argv)
    chosen = args.variants.split(",")
    unknown = [v for v in chosen if v not in VARIANTS] + [t for t in args.tasks.split(",") if t not in tasks.TASKS]
    if unknown:
        parser.error(f"unknown variant or task {unknown}; variants: {', '.join(VARIANTS)}; tasks: {', '.join(tasks.TASKS)}")
    start = time.perf_counter()
    model, tokenizer = models.load(args.model, dtype=getattr(torch, args.dtype))
    model.config._attn_implementation = "sdpa"
    model.to(args.device)
    context = model.config.max_position_embeddings
    if max(args.lengths) > context:
        parser.error(f"length {max(args.lengths)} exceeds {args.model}'s context of {context} tokens")
    configs = {v: VARIANTS[v] if isinstance(VARIANTS[v], str) or VARIANTS[v] is None
               else SlimConfig(prune=True, **VARIANTS[v]) for v in chosen}
    if any(isinstance(c, str) for c in configs.values()) and "default" not in configs:
        parser.error("the baselines take their KV budget from the default variant: include it in --variants")
    env = {"model": args.model, "dtype": args.dtype, "torch": torch.__version__,
           "transformers": transformers.__version__, "python": platform.python_version(),
           "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.machine(),
           "date": time.strftime("%Y-%m-%d")}
    print(json.dumps(env), flush=True)
    eos = {tokenizer.eos_token_id, *tokenizer.convert_tokens_to_ids([t for t in ("<|im_end|>", "<|endoftext|>")
                                                                    if t in tokenizer.get_vocab()])}
    generation_eos = model.generation_config.eos_token_id
    eos |= set(generation_eos if isinstance(generation_eos, list) else [generation_eos] if generation_eos is not None else [])
    eos_ids = sorted(e for e in eos if e is not None)
    done = 0
    # prompts are built (tokenizer bisection, CPU) by worker processes ahead of the GPU
    jobs = [(index, length, task) for index in range(args.first_sample, args.samples)
            for length in args.lengths for task in args.tasks.split(",")]
    folder = str(models.cache_dir() / args.model) if args.model in models.MODELS else args.model
    pool = concurrent.futures.ProcessPoolExecutor(max(1, min(16, (os.cpu_count() or 2) - 1)),
                                                  initializer=_init_worker, initargs=(folder,))
    def depth_of(index: int) -> float:  # depths spread over [0, 1] as in make_samples, seeds derived the same way
        return index / (args.samples - 1) if args.samples > 1 else 0.5
    pending = [pool.submit(_make, task, length, tasks._derive(args.seed, index), depth_of(index))
               for index, length, task in jobs]
    with open(args.out, "a") as out:
        for (index, length, task), future in zip(jobs, pending):
            if args.time_limit and time.perf_counter() - start > args.time_limit:
                print(f"time limit: stopped before sample {index} ({done} rows)", flush=True)
                break
            sample, depth = future.result(), depth_of(index)
            ids = sample.input_ids.to(args.device)
            budget = None
            for variant, config in configs.items():
                kept: list = []
                if isinstance(config, str) and not budget:
                    continue  # the default schedule did not prune this prompt: no budget to match
                t0 = time.perf_counter()
                if isinstance(config, str):
                    tokens = baselines.generate(config, model, ids, budget, max_new_tokens=NEW_TOKENS[task],
                                                eos_token_id=eos_ids)
                else:
                    tokens = reference.generate(model, ids, config, max_new_tokens=NEW_TOKENS[task],
                                                eos_token_id=eos_ids, keep_sets=kept, last_logits_only=True)
                seconds = time.perf_counter() - t0
                text = tokenizer.decode(tokens[0, ids.shape[1]:], skip_special_tokens=True).strip()
                needed = sample.needle_positions
                row = {"task": task, "length": length, "variant": variant, "sample": index,
                       "seed": sample.seed, "depth": depth, "tokens": int(ids.shape[1]),
                       "score": tasks.score(sample, text), "answer": text[:200],
                       "answers": list(sample.answers), "seconds": round(seconds, 3),
                       "kept": [[k.layer, int(k.positions.shape[1])] for k in kept],
                       "survived": [needed <= set(k.positions[0].tolist()) for k in kept] if needed else None,
                       **env}
                if variant == "default" and kept:
                    budget = int(kept[-1].positions.shape[1])
                if isinstance(config, str):
                    row["budget"] = budget
                out.write(json.dumps(row) + "\n")
                out.flush()
                done += 1
            if (length, task) == (args.lengths[-1], args.tasks.split(",")[-1]):
                print(f"sample {index} done: {done} rows, {time.perf_counter() - start:.0f} s", flush=True)
    pool.shutdown(wait=False, cancel_futures=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
