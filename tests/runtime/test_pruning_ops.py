"""pruning_ops.select_tokens against a from-first-principles list of kept positions, eager and Inductor.

The kept set of one row: the sink blocks, the `keep` best-scored middle blocks (ties to the earlier
block), the last (possibly partial) block, ascending.
"""

from __future__ import annotations

import pytest
import torch

from slimpass.runtime.pruning_ops import keep_middle, select_tokens, take_tokens


def _first_principles(scores: torch.Tensor, length: int, keep: int, block: int, sinks: int) -> list[list[int]]:
    last = (length - 1) // block
    rows = []
    for row in scores.tolist():
        middle = sorted(range(sinks, last), key=lambda b: (-row[b], b))[:keep]
        blocks = list(range(sinks)) + sorted(middle)
        rows.append([b * block + i for b in blocks for i in range(block)] + list(range(last * block, length)))
    return rows


def _case(length: int, block: int, batch: int = 2) -> torch.Tensor:
    generator = torch.Generator().manual_seed(length * 31 + block)
    return torch.randint(0, 5, (batch, length // block), generator=generator).float()  # ties on purpose


def _chain(hidden: torch.Tensor, positions: torch.Tensor, block: int, sinks: int):
    """The shape of a pruning stage in the graph: block scores from the hidden states, the budget from
    the length (half the blocks), select, gather the hidden states and positions (Inductor fuses these)."""
    length = hidden.shape[1]
    blocks = length // block
    scores = hidden[:, : blocks * block].reshape(hidden.shape[0], blocks, block, -1).float().sum((2, 3))
    keep = keep_middle(length, None, 1, 2, block, sinks)
    index = select_tokens(scores, length, keep, block, sinks)
    return scores, keep, take_tokens(hidden, index, 1), take_tokens(positions, index, 1)


@pytest.mark.parametrize("sinks", [0, 1, 2])
@pytest.mark.parametrize("block", [8, 16])
def test_eager_matches_first_principles(block, sinks):
    for length in range(sinks * block + 1, 12 * block + 3):
        scores = _case(length, block)
        for keep in (0, 1, 3, 100):
            got = select_tokens(scores, length, keep, block, sinks)
            assert got.tolist() == _first_principles(scores, length, keep, block, sinks), f"{length=} {keep=}"


@pytest.mark.slow
@pytest.mark.parametrize("batch", [1, 2])
def test_inductor_matches_first_principles_at_every_length(batch):
    """Regression (issue 30, bug 2): Inductor's C++ backend (torch 2.13) tiled the kept dimension of the
    old elementwise index (`j // block`, `j % block` over `arange(K)`) as if K were a multiple of the
    block size, so the last partial block's positions were never written: kept positions like
    4577402546864978407 came back, or an index past the buffer was read. One dynamic graph, many
    lengths (most with a partial last block), against the first-principles list."""
    block, sinks = 16, 1
    # block and sinks are literals, constants in the graph as in the pass's (Dynamo makes int arguments and
    # closed-over ints symbolic under dynamic=True); tiny lengths recompile (sizes 0 and 1 specialise)
    compiled = torch.compile(lambda hidden, positions: _chain(hidden, positions, 16, 1), backend="inductor",
                             dynamic=True)
    for length in (40, 47, 48, 49, 63, 64, 65, 103, 150, 152, 159, 160, 161, 300):
        hidden = torch.randn(batch, length, 8, generator=torch.Generator().manual_seed(length))
        positions = torch.arange(length).expand(batch, length)
        scores, keep, states, kept = compiled(hidden, positions)
        want = _first_principles(scores, length, int(keep), block, sinks)
        assert kept.tolist() == want, f"{length=}"
        torch.testing.assert_close(states, torch.stack([hidden[b, want[b]] for b in range(batch)]), atol=0, rtol=0)


def test_keep_middle_mirrors_the_schedule():
    """The graph's budget arithmetic (`keep_middle`) equals `schedule.middle_budget` on plain ints."""
    from fractions import Fraction

    from slimpass.config import SlimConfig
    from slimpass.schedule import Stage, middle_budget

    for block, sinks in ((8, 0), (16, 1), (16, 2)):
        config = SlimConfig(block_size=block, sink_blocks=sinks)
        for prompt_len in (33, 64, 65, 150, 159, 160, 161, 1000):
            for tokens, ratio in ((None, Fraction(1, 2)), (150, None), (40, Fraction(1, 4)), (None, Fraction(1)), (7, None)):
                want = middle_budget(Stage(2, tokens, ratio), prompt_len, config)
                got = keep_middle(prompt_len, tokens, ratio.numerator if ratio else 0, ratio.denominator if ratio else 0,
                                  block, sinks)
                assert got == want, (block, sinks, prompt_len, tokens, ratio)
