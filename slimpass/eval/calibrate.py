"""Which layers can score? Per-layer needle survival on synthetic prompts, and a schedule that follows it.

The first cut must come after the layer where the model starts to look at the facts a question asks
about: on SmolLM2-135M-Instruct the scores of layers up to 13 lose a natural-text needle at a 25% cut
in most prompts, those of layer 14 and most later ones keep it in all of them (docs/QUALITY.md). That
layer differs between models, so this measures it:

    table = calibrate.layer_survival(model, tokenizer, config)     # [layers x ratios] survival fractions
    schedule = calibrate.recommend(table, ratios=(0.5, 0.25))       # {cut layer: ratio}, or None

For every sample the prompt runs unpruned through the model (the reference loop's layers); at each
layer the configured scorer ranks the blocks from that layer's queries and keys, and the selection
rule of the reference keeps the best ones for each keep ratio. A sample counts at (layer, ratio) when
every needle token would be kept. One cut on the whole prompt: a real second stage chooses among the
first stage's survivors, so confirm a recommendation with `slimpass eval` (needle survival per stage).
"""

from __future__ import annotations

import dataclasses
from fractions import Fraction
from typing import Any

import torch

from slimpass.config import SlimConfig
from slimpass.eval import runner, tasks
from slimpass.runtime import reference
from slimpass.schedule import Stage, middle_budget

DEFAULT_TASKS = ("passkey:repeat", "niah_single:natural", "niah_multikey:natural", "qa:natural")


@dataclasses.dataclass
class SurvivalTable:
    """survived[layer][i]: samples whose needle a cut after `layer` at `ratios[i]` would keep, of `samples`
    (every layer but the last, whose scores would cut nothing)."""

    ratios: tuple[float, ...]
    survived: list[list[int]]
    samples: int
    settings: dict[str, Any]

    def fraction(self, layer: int, ratio_index: int) -> float:
        return self.survived[layer][ratio_index] / self.samples

    def to_markdown(self) -> str:
        head = "| scores from layer (cut before) | " + " | ".join(f"keep {r:.0%}" for r in self.ratios) + " |"
        lines = [head, "|---|" + "---|" * len(self.ratios)]
        for layer, row in enumerate(self.survived):
            lines.append(f"| {layer} ({layer + 1}) | " + " | ".join(f"{n}/{self.samples}" for n in row) + " |")
        return "\n".join(lines) + "\n"


@torch.no_grad()
def _needle_kept_per_layer(model, input_ids: torch.Tensor, needle: set[int], config: SlimConfig,
                           ratios: tuple[float, ...]) -> list[list[bool]]:
    """For one prompt: per layer, per ratio, would a single cut scored at that layer keep the needle?"""
    length = input_ids.shape[1]
    needed_blocks = {p // config.block_size for p in needle}
    depth = model.config.num_hidden_layers
    rows = []
    for index, q, k in reference.layer_queries_keys(model, input_ids):
        if index == depth - 1:  # the last layer's scores would cut nothing
            break
        scores = reference.block_scores(q, k, config)[0]
        row = []
        for ratio in ratios:
            keep_middle = middle_budget(Stage(index + 1, None, Fraction(ratio).limit_denominator(1 << 16)), length, config)
            row.append(needed_blocks <= set(reference.select_blocks(scores, length, keep_middle, config)))
        rows.append(row)
    return rows


def layer_survival(model, tokenizer, config: SlimConfig | None = None, task_specs: tuple[str, ...] = DEFAULT_TASKS,
                   length: int = 1024, samples: int = 10, seed: int = 0, ratios: tuple[float, ...] = (0.5, 0.25),
                   progress: bool = False) -> SurvivalTable:
    """Needle survival of a single cut after each layer, over `samples` prompts of each task ("task:haystack")."""
    config = config or SlimConfig(prune=True)
    if not ratios or not all(0.0 < r < 1.0 for r in ratios):
        raise ValueError(f"ratios {ratios}: give keep ratios strictly between 0 and 1")
    device = next(model.parameters()).device
    prompts = []
    for spec in task_specs:
        task, _, haystack = spec.partition(":")
        prompts += tasks.make_samples(task, tokenizer, length, samples, seed=seed, haystack=haystack or "natural")
    total = None
    bar = runner.progress_bar(len(prompts), progress, unit="prompt")
    for sample in prompts:
        needle = sample.needle_positions
        if not needle:
            raise ValueError(f"task {sample.task!r} has no needle to follow; calibrate with needle tasks")
        kept = _needle_kept_per_layer(model, sample.input_ids.to(device), needle, config, ratios)
        counts = [[int(x) for x in row] for row in kept]
        total = counts if total is None else [[a + b for a, b in zip(r, s)] for r, s in zip(total, counts)]
        bar and bar.update()
    bar and bar.close()
    return SurvivalTable(tuple(ratios), total, len(prompts),
                         {"tasks": list(task_specs), "length": length, "samples_per_task": samples, "seed": seed,
                          "scorer": config.scorer, "block_size": config.block_size})


def recommend(table: SurvivalTable, target: float = 0.95, min_gap: int = 1) -> dict[int, float] | None:
    """A schedule {cut layer: ratio}, one stage per ratio (in the table's order): each stage at the earliest
    layer, at least `min_gap` after the previous stage, whose scores keep the needle in >= `target` of the
    samples at that ratio. None when some ratio has no such layer."""
    schedule: dict[int, float] = {}
    earliest = 0
    for index, ratio in enumerate(table.ratios):
        layer = next((l for l in range(earliest, len(table.survived)) if table.fraction(l, index) >= target), None)
        if layer is None:
            return None
        schedule[layer + 1] = ratio  # scores from `layer` cut the input of the next one
        earliest = layer + min_gap
    return schedule
