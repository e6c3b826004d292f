"""Next-token fidelity of pruning schedules on natural text (plain-PyTorch reference loop, prefill only).

    PYTHONPATH=. python benchmarks/fidelity_study.py --length 1024 --samples 17 --seeds 1,2,3 \\
        --schedules 15:0.5,19:0.25 17:0.5,21:0.25 --recent 0,64 [--device cuda] [--out rows.json]

For each prompt (the same natural-text prompts as `slimpass eval --fidelity-samples`: seed * 7919 + i)
the unpruned and the pruned reference give the next-token distribution at the last position;
printed per schedule: top-1 agreement and mean KL(full || pruned). `--recent R` (R > 0) adds a variant
whose scorer also protects the last R tokens (the default scorer's scores plus a constant above any
attention weight on the blocks that hold them): does a protected recent window help fidelity?
"""

from __future__ import annotations

import argparse
import json

import torch

import slimpass
from slimpass.config import SlimConfig
from slimpass.eval import fidelity, models, tasks
from slimpass.runtime import reference, scoring


def protect_recent(recent: int) -> scoring.Scorer:
    """The default scorer, plus 10 (softmax weights are <= 1) on the blocks holding the last `recent` tokens."""
    base = scoring.get_scorer("window_attention")

    def scorer(q: torch.Tensor, k: torch.Tensor, settings: scoring.ScoreSettings) -> torch.Tensor:
        scores = base(q, k, settings)
        first = max(0, (k.shape[2] - recent) // settings.block_size)
        return torch.cat([scores[:, :first], scores[:, first:] + 10.0], dim=1)

    return scorer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--samples", type=int, default=17, help="prompts per seed")
    parser.add_argument("--seeds", default="1,2,3")
    parser.add_argument("--schedules", nargs="+", default=["15:0.5,19:0.25"])
    parser.add_argument("--recent", default="0", help="comma-separated protected recent windows (0: none)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out")
    args = parser.parse_args()
    variants = {}
    for text in args.schedules:
        schedule = {int(layer): float(ratio) for layer, ratio in (part.split(":") for part in text.split(","))}
        for recent in map(int, args.recent.split(",")):
            scorer = "window_attention"
            if recent:
                scorer = f"window_attention_recent{recent}"
                slimpass.register_scorer(scorer)(protect_recent(recent))
            variants[f"{text} recent={recent}"] = SlimConfig(prune=True, schedule=schedule, scorer=scorer,
                                                              min_prompt_len=256)
    model, tokenizer = models.load()
    model.to(args.device)
    natural = tokenizer(tasks.haystack_text("natural"), add_special_tokens=False).input_ids
    rows = []
    for seed in map(int, args.seeds.split(",")):
        for i in range(args.samples):
            ids = fidelity.natural_prompt(natural, args.length, seed * 7919 + i).to(args.device)
            full = fidelity.Continuation(torch.log_softmax(reference.prefill(model, ids).logits[0].float(), -1), ())
            for name, config in variants.items():
                logits = reference.prefill(model, ids, config).logits[0].float()
                pruned = fidelity.Continuation(torch.log_softmax(logits, -1), ())
                metrics = fidelity.compare(full, pruned)
                rows.append({"variant": name, "seed": seed, "sample": i, "top1": metrics["top1"], "kl": metrics["kl"]})
    for name in variants:
        mine = [r for r in rows if r["variant"] == name]
        top1 = sum(r["top1"] for r in mine)
        print(f"{name:32s} top-1 {top1:.0f}/{len(mine)} ({top1 / len(mine):.0%})  "
              f"mean KL {sum(r['kl'] for r in mine) / len(mine):.4f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"length": args.length, "environment": {"torch": torch.__version__}, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
