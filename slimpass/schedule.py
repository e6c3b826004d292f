"""Pruning schedules: after which layers the prompt is cut, and to how many tokens.

A schedule maps a layer index ``p`` (the layer whose *input* is cut; scoring uses the queries and
keys of layer ``p - 1``) to a budget:

- ``int``: at most that many tokens;
- ``float`` in (0, 1]: at most that fraction of the *original* prompt length;
- ``(int, float)``: the smaller of the two.

A stage keeps the sink blocks and the last (possibly partial) block, and as many whole middle blocks
as fit in the rest of the budget; it never keeps more than what reached it, so a budget >= the current
length keeps everything, and a budget below the sinks plus the last block keeps just those.

Presets:

- ``"paper"``: the paper's schedule, inputs of layers 10 / 20 / 30 of a 32-layer model cut to
  8192 / 4096 / 2048 tokens; other depths use the same fractions of the depth (rounded).
- ``"default"`` (or ``None``): the paper's layers, each budget the smaller of the paper's tokens and
  1/2, 1/4, 1/8 of the prompt, so prompts shorter than 16k are pruned too. At 16k and longer it
  equals the paper's.

Prompts shorter than ``SlimConfig.min_prompt_len`` are never pruned.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from fractions import Fraction
from typing import Any

from slimpass.config import ConfigError, SlimConfig
from slimpass.runtime.block_layout import BlockLayout

PAPER_DEPTH = 32
PAPER_POINTS = ((10, 8192, Fraction(1, 2)), (20, 4096, Fraction(1, 4)), (30, 2048, Fraction(1, 8)))


@dataclasses.dataclass(frozen=True)
class Stage:
    """One pruning point: cut the input of `layer` to at most min(tokens, ratio * prompt) tokens."""

    layer: int
    tokens: int | None
    ratio: Fraction | None

    def budget(self, prompt_len: int) -> int:
        """The token budget for a prompt of `prompt_len` tokens (plain ints; the pass mirrors this symbolically)."""
        limits = []
        if self.tokens is not None:
            limits.append(self.tokens)
        if self.ratio is not None:
            limits.append(prompt_len * self.ratio.numerator // self.ratio.denominator)
        return min(limits)

    def describe(self) -> str:
        parts = ([f"{self.tokens} tokens"] if self.tokens is not None else []) + (
            [f"{float(self.ratio):g} of the prompt"] if self.ratio is not None else []
        )
        return f"layer {self.layer}: " + " / ".join(parts)


def _scaled_layer(layer: int, depth: int) -> int:
    return max(1, min(depth - 1, round(layer * depth / PAPER_DEPTH)))


def _stage(layer: int, budget: Any) -> Stage:
    if isinstance(budget, tuple):
        return Stage(layer, budget[0], Fraction(budget[1]).limit_denominator(1 << 16))
    if isinstance(budget, float):
        return Stage(layer, None, Fraction(budget).limit_denominator(1 << 16))
    return Stage(layer, int(budget), None)


def resolve_schedule(config: SlimConfig, depth: int) -> list[Stage]:
    """The stages of `config.schedule` for a model with `depth` decoder layers, in layer order.

    Raises `ConfigError` when an explicit schedule names a layer the model does not have.
    """
    schedule = config.schedule
    if isinstance(schedule, Mapping):
        bad = [layer for layer in schedule if layer >= depth]
        if bad:
            raise ConfigError(
                f"SlimConfig.schedule cuts the input of layer(s) {bad}, but the model has {depth} decoder layers "
                f"(valid pruning points: 1..{depth - 1})"
            )
        return [_stage(layer, budget) for layer, budget in sorted(schedule.items())]
    use_ratio = schedule in (None, "default")
    stages: dict[int, Stage] = {}
    for layer, tokens, ratio in PAPER_POINTS:
        at = _scaled_layer(layer, depth)
        if depth > 1 and at not in stages:
            stages[at] = Stage(at, tokens, ratio if use_ratio else None)
    return [stages[k] for k in sorted(stages)]


def min_prune_length(config: SlimConfig) -> int:
    """Shortest prompt that is pruned: `min_prompt_len`, and always more than the sink blocks."""
    return max(config.min_prompt_len, config.sink_blocks * config.block_size + 1)


def middle_budget(stage: Stage, prompt_len: int, config: SlimConfig) -> int:
    """How many blocks between the sink blocks and the last block a stage may keep (before clamping
    to the number available): the whole blocks the budget holds beside the sinks and the last block,
    which holds the prompt's last ``prompt_len - last * block_size`` tokens at every stage."""
    return BlockLayout.of(config).middle_budget(stage.budget(prompt_len), prompt_len)
