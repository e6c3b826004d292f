"""Needle survival per pruning stage for several scorers and schedules (plain-PyTorch reference loop).

    PYTHONPATH=. python benchmarks/scorer_study.py --lengths 1000,2000 --samples 20 --seeds 1,2,3 \\
        --tasks passkey:repeat,niah_single:natural --schedules 9:0.5,19:0.25 15:0.5,19:0.25 \\
        --scorers tokenunit,window_attention --block-sizes 16,64 [--device cuda] [--out rows.json]

The primary metric of the scorer study (docs/QUALITY.md): for each sample, does every token of the
needle sentence reach the layer after each cut? It measures the scorer even where the small model
could not answer. Besides the registered scorers, `window_attention_w<N>_p<P>` variants (observation
window N, max-pool radius P) are registered here for the sweep.
"""

from __future__ import annotations

import argparse
import itertools
import json

import torch

import slimpass
from slimpass.config import SlimConfig
from slimpass.eval import models, runner, tasks
from slimpass.runtime import reference, scoring


def parse_schedule(text: str) -> dict[int, float]:
    return {int(layer): float(ratio) for layer, ratio in (part.split(":") for part in text.split(","))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--length", "--lengths", default="1000", help="prompt tokens, comma-separated")
    parser.add_argument("--samples", type=int, default=20)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--tasks", default="passkey:repeat,niah_single:natural")
    parser.add_argument("--schedules", nargs="+", default=["9:0.5,19:0.25"])
    parser.add_argument("--scorers", default="tokenunit,window_attention_w16_p0,window_attention")
    parser.add_argument("--block-size", "--block-sizes", default="64", help="tokens per block, comma-separated")
    parser.add_argument("--unit-size", type=int, default=8)
    parser.add_argument("--seeds", help="comma-separated seeds (overrides --seed); samples are per seed")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out")
    args = parser.parse_args()
    for window in (8, 16, 32, 64):
        for pool in (0, 4, 8, 16, 32):
            slimpass.register_scorer(f"window_attention_w{window}_p{pool}")(scoring.make_window_attention(window, pool))
    torch.set_num_threads(max(1, torch.get_num_threads()))
    model, tokenizer = models.load()
    model.to(args.device)
    seeds = [int(x) for x in args.seeds.split(",")] if args.seeds else [args.seed]
    rows = []
    for length, spec in ((int(n), spec) for n in args.length.split(",") for spec in args.tasks.split(",")):
        task, haystack = spec.split(":")
        samples = [s for seed in seeds
                   for s in tasks.make_samples(task, tokenizer, length, args.samples, seed=seed, haystack=haystack)]
        for schedule_text, scorer, block in itertools.product(args.schedules, args.scorers.split(","),
                                                              map(int, args.block_size.split(","))):
            config = SlimConfig(prune=True, schedule=parse_schedule(schedule_text), min_prompt_len=256,
                                scorer=scorer, block_size=block, unit_size=min(args.unit_size, block))
            survived = None
            for sample in samples:
                with torch.inference_mode():
                    state = reference.prefill(model, sample.input_ids.to(args.device), config)
                got = runner.survival(sample, state.keep_sets)
                if got is None:
                    raise SystemExit(f"task {task!r} has no needle to follow; study needle tasks")
                survived = [int(g) for g in got] if survived is None else [a + b for a, b in zip(survived, got)]
            rows.append({"task": task, "haystack": haystack, "length": length, "schedule": schedule_text,
                         "block_size": block,
                         "scorer": scorer, "samples": len(samples), "seeds": seeds, "survived_per_stage": survived})
            print(f"{task:12s} {haystack:8s} {length:5d} {schedule_text:16s} {scorer:22s} b{block:<3d} "
                  + " / ".join(f"{s}/{len(samples)}" for s in survived), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
