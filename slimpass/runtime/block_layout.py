"""How a prompt splits into blocks: the one place for the block arithmetic of the passes and the runtime.

A prompt of ``n`` tokens is ``ceil(n / block_size)`` blocks: the first `sink_blocks` (always kept, the
attention sink), the middle blocks (kept or dropped by pruning, chosen among by reselection) and the last
block (always kept; it holds the prompt's last ``n - last * block_size`` tokens, a partial block when
``block_size`` does not divide ``n``). The sinks never reach into the last block: a prompt of at most
`sink_blocks` blocks has fewer sinks. `slimpass.runtime.reference` keeps its own copy of these rules on
purpose: it is the oracle they are checked against.

Every method takes ints or symbolic sizes (``torch.SymInt`` in a traced graph) alike.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

Size = Any  # int | torch.SymInt


@dataclasses.dataclass(frozen=True)
class BlockLayout:
    """Blocks of `block_size` tokens, the first `sink_blocks` of them sinks."""

    block_size: int
    sink_blocks: int

    @classmethod
    def of(cls, config: Any) -> BlockLayout:
        """The layout a `SlimConfig` (or anything with `block_size` and `sink_blocks`) sets."""
        return cls(config.block_size, config.sink_blocks)

    def last(self, tokens: Size) -> Size:
        """Index of the last block of `tokens` tokens."""
        return (tokens - 1) // self.block_size

    def tail_start(self, tokens: Size) -> Size:
        """Position where the last block begins."""
        return self.last(tokens) * self.block_size

    def tail(self, tokens: Size) -> Size:
        """Tokens in the last block (1..block_size)."""
        return tokens - self.tail_start(tokens)

    def sinks(self, tokens: Size) -> Size:
        """Sink blocks of a prompt of `tokens`: `sink_blocks`, fewer when the prompt has no more blocks
        before its last."""
        return min(self.sink_blocks, self.last(tokens))

    def sink_tokens(self, tokens: Size) -> Size:
        return self.sinks(tokens) * self.block_size

    def middle(self, tokens: Size) -> Size:
        """Blocks between the sinks and the last block."""
        return self.last(tokens) - self.sinks(tokens)

    def middle_budget(self, budget: Size, tokens: Size) -> Size:
        """Middle blocks a budget of `budget` tokens holds beside the sinks and the last block (before clamping
        to `middle`), for a prompt of `tokens`."""
        return torch.sym_max((budget - self.sink_blocks * self.block_size - self.tail(tokens)) // self.block_size, 0)
