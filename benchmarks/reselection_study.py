"""Decode-time reselection on the real model: answers and how often the active blocks change (reference loop).

    PYTHONPATH=. python benchmarks/reselection_study.py --task qa:natural --length 1024 --samples 10 \\
        --active 128 --units 1,8 [--gamma 0.9] [--schedule 15:0.5,19:0.25] [--out rows.json]

For each prompt: greedy answers (16 tokens) of the unpruned model, of the pruned one, and of the pruned
one with reselection for each representative-key size in `--units` (`reselect_unit`: 1 = the cached
keys). Scored by the task's string match; for reselection also the mean number of blocks per slim layer
that entered the active set per step (after the first), against the active set's size.
"""

from __future__ import annotations

import argparse
import json

import torch

from slimpass.config import SlimConfig
from slimpass.eval import models, tasks
from slimpass.runtime import reference


def swaps_per_step(trace: list[dict[int, list[list[int]]]]) -> tuple[float, int]:
    """Mean blocks entering a row-0 active set per step and slim layer, and the active set's size."""
    if len(trace) < 2 or not trace[0]:
        return 0.0, 0
    layers = list(trace[0])
    moved = [len(set(now[layer][0]) - set(before[layer][0])) for before, now in zip(trace, trace[1:]) for layer in layers]
    return sum(moved) / len(moved), len(trace[0][layers[0]][0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", default="qa:natural", help="task:haystack")
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--samples", type=int, default=10)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--schedule", default="15:0.5,19:0.25")
    parser.add_argument("--active", type=int, default=128, help="active_tokens")
    parser.add_argument("--units", default="1,8", help="reselect_unit values")
    parser.add_argument("--gamma", type=float, default=0.9)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--out")
    args = parser.parse_args()
    schedule = {int(layer): float(ratio) for layer, ratio in (part.split(":") for part in args.schedule.split(","))}
    pruned = dict(prune=True, schedule=schedule, min_prompt_len=256)
    variants: dict[str, SlimConfig | None] = {"full": None, "pruned": SlimConfig(**pruned)}
    for unit in map(int, args.units.split(",")):
        variants[f"reselect_unit{unit}"] = SlimConfig(**pruned, reselect=True, active_tokens=args.active,
                                                      reselect_unit=unit, gamma=args.gamma)
    model, tokenizer = models.load()
    task, haystack = args.task.split(":")
    rows = []
    for sample in tasks.make_samples(task, tokenizer, args.length, args.samples, seed=args.seed, haystack=haystack):
        for name, config in variants.items():
            trace: list = []
            with torch.inference_mode():
                out = reference.generate(model, sample.input_ids, config, max_new_tokens=args.new_tokens, trace=trace)
            text = tokenizer.decode(out[0, sample.input_ids.shape[1]:], skip_special_tokens=True)
            moved, size = swaps_per_step(trace)
            rows.append({"variant": name, "score": tasks.score(sample, text), "answer": text,
                         "swapped_per_step": moved, "active_blocks": size})
    for name in variants:
        mine = [r for r in rows if r["variant"] == name]
        line = f"{name:18s} {sum(r['score'] for r in mine):.0f}/{len(mine)}"
        if name.startswith("reselect"):
            line += (f"  blocks swapped per step and slim layer {sum(r['swapped_per_step'] for r in mine) / len(mine):.2f}"
                     f" of {mine[0]['active_blocks']}")
        print(line)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "torch": torch.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
