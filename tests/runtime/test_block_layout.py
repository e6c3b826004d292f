"""`BlockLayout`, the block arithmetic of the passes and the runtime, against blocks counted one by one and
against the reference's own rules (the oracle keeps its copy)."""

from __future__ import annotations

from hypothesis import assume, given
from hypothesis import strategies as st

from slimpass.config import SlimConfig
from slimpass.runtime import reference
from slimpass.runtime.block_layout import BlockLayout

layouts = st.builds(BlockLayout, st.sampled_from([1, 2, 8, 16, 64]), st.integers(0, 4))


@given(layout=layouts, tokens=st.integers(1, 3000))
def test_blocks_counted_one_by_one(layout, tokens):
    blocks = [p // layout.block_size for p in range(tokens)]
    last = blocks[-1]
    assert layout.last(tokens) == last
    assert layout.tail(tokens) == blocks.count(last) and layout.tail_start(tokens) == blocks.index(last)
    sinks = [b for b in range(layout.sink_blocks) if b < last]  # a sink is never the last block
    assert layout.sinks(tokens) == len(sinks) and layout.sink_tokens(tokens) == len(sinks) * layout.block_size
    assert layout.middle(tokens) == len(set(blocks) - set(sinks) - {last})


@given(layout=layouts, tokens=st.integers(1, 3000), budget=st.integers(1, 3000))
def test_middle_budget_is_the_references_count_of_blocks_that_fit(layout, tokens, budget):
    assume(layout.sink_blocks <= layout.last(tokens))  # the pass never prunes a prompt its sinks cover
    config = SlimConfig(block_size=layout.block_size, unit_size=1, sink_blocks=layout.sink_blocks)
    held = min(layout.middle_budget(budget, tokens), layout.middle(tokens))
    assert held == reference.middle_blocks(budget, tokens, config)
