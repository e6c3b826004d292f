"""Needle survival per pruning stage for several scorers and schedules (plain-PyTorch reference loop).

    PYTHONPATH=. python benchmarks/scorer_study.py --length 1000 --samples 20 \\
        --tasks passkey:repeat,niah_single:natural --schedules 9:0.5,19:0.25 12:0.5,20:0.25

The primary metric of the scorer study (docs/QUALITY.md): for each sample, does every token of the
needle sentence reach the layer after each cut? It measures the scorer even where the small model
could not answer. Besides the registered scorers, `window_attention_w<N>` variants (observation
window N) are registered here for the sweep.
"""

from __future__ import annotations

import argparse
import json

import torch

import slimpass
from slimpass.config import SlimConfig
from slimpass.eval import models, tasks
from slimpass.runtime import reference, scoring


def windowed(window: int):
    def score(q, k, settings):
        saved = scoring.OBSERVATION_WINDOW
        scoring.OBSERVATION_WINDOW = window
        try:
            return scoring.window_attention(q, k, settings)
        finally:
            scoring.OBSERVATION_WINDOW = saved
    return score


def parse_schedule(text: str) -> dict[int, float]:
    return {int(layer): float(ratio) for layer, ratio in (part.split(":") for part in text.split(","))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--length", type=int, default=1000)
    parser.add_argument("--samples", type=int, default=20)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--tasks", default="passkey:repeat,niah_single:natural")
    parser.add_argument("--schedules", nargs="+", default=["9:0.5,19:0.25"])
    parser.add_argument("--scorers", default="tokenunit,window_attention_w8,window_attention_w16,window_attention_w32")
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--unit-size", type=int, default=8)
    parser.add_argument("--out")
    args = parser.parse_args()
    for window in (8, 16, 32, 64):
        slimpass.register_scorer(f"window_attention_w{window}")(windowed(window))
    torch.set_num_threads(max(1, torch.get_num_threads()))
    model, tokenizer = models.load()
    rows = []
    for spec in args.tasks.split(","):
        task, haystack = spec.split(":")
        samples = tasks.make_samples(task, tokenizer, args.length, args.samples, seed=args.seed, haystack=haystack)
        for schedule_text in args.schedules:
            for scorer in args.scorers.split(","):
                config = SlimConfig(prune=True, schedule=parse_schedule(schedule_text), min_prompt_len=256,
                                    scorer=scorer, block_size=args.block_size,
                                    unit_size=min(args.unit_size, args.block_size))
                survived = None
                for sample in samples:
                    needle = {p for start, end in sample.needle_spans for p in range(start, end)}
                    with torch.inference_mode():
                        state = reference.prefill(model, sample.input_ids, config)
                    got = [needle <= set(k.positions[0].tolist()) for k in state.keep_sets]
                    survived = got if survived is None else [a + b for a, b in zip(survived, got)]
                rows.append({"task": task, "haystack": haystack, "length": args.length, "schedule": schedule_text,
                             "block_size": args.block_size,
                             "scorer": scorer, "samples": args.samples, "survived_per_stage": survived})
                print(f"{task:12s} {haystack:8s} {args.length:5d} {schedule_text:16s} {scorer:22s} "
                      + " / ".join(f"{s}/{args.samples}" for s in survived), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
