"""The reference loop: equals HF eager with pruning off; its selection follows the rules it documents."""

from __future__ import annotations

import pytest
import torch

from slimpass.config import SlimConfig
from slimpass.runtime import reference
from tests.conftest import assert_valid_keep_sets, tiny_model

GEOMETRY = dict(block_size=8, unit_size=2, local_window=4, min_prompt_len=64)


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_unpruned_reference_is_the_model(family):
    model = tiny_model(family, "sdpa", num_hidden_layers=4)
    for batch, length in ((1, 17), (2, 100), (1, 333)):
        ids = torch.randint(0, 128, (batch, length), generator=torch.Generator().manual_seed(length))
        state = reference.prefill(model, ids)
        with torch.no_grad():
            torch.testing.assert_close(state.logits, model(ids).logits[:, -1], atol=1e-4, rtol=0)
            hf = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False)
        assert state.keep_sets == []
        assert torch.equal(reference.generate(model, ids, None, max_new_tokens=16), hf)


def test_select_blocks_rules():
    config = SlimConfig(block_size=8, sink_blocks=1)
    scores = torch.tensor([0.0, 5.0, 1.0, 5.0, 3.0, 9.0, 0.0])  # 7 full blocks; length 60 -> last block 7
    assert reference.select_blocks(scores, 60, 3, config) == [0, 1, 3, 5, 7]  # tie 1 vs 3: both kept
    assert reference.select_blocks(scores, 60, 2, config) == [0, 1, 5, 7]  # tie broken to the earlier block
    assert reference.select_blocks(scores, 60, 0, config) == [0, 7]
    assert reference.select_blocks(scores, 60, 99, config) == list(range(8))
    assert reference.select_blocks(scores, 56, 1, config) == [0, 5, 6]  # 56 tokens: block 6 is the last
    assert reference.select_blocks(scores, 5, 1, config) == [0]  # the sink is the whole prompt


def test_pruned_prefill_keeps_original_positions():
    model = tiny_model("llama", "sdpa", num_hidden_layers=6)
    config = SlimConfig(prune=True, schedule={2: 0.5, 4: 40}, **GEOMETRY)
    ids = torch.randint(0, 128, (2, 203), generator=torch.Generator().manual_seed(3))
    state = reference.prefill(model, ids, config)
    first, second = state.keep_sets
    assert (first.layer, first.tokens, second.layer, second.tokens) == (2, 8 + 11 * 8 + 3, 4, 8 + 3 * 8 + 3)
    for keep in state.keep_sets:
        rows = keep.positions
        assert torch.equal(rows, rows.sort(dim=1).values)  # sorted: causal order kept
        assert (rows[:, :8] == torch.arange(8)).all() and (rows[:, -3:] == torch.arange(200, 203)).all()
    assert set(second.positions[0].tolist()) <= set(first.positions[0].tolist())  # cumulative
    assert [k.shape[2] for k in state.keys] == [203, 203, 99, 99, 35, 35]  # each layer caches what reached it


def test_layer_queries_keys_are_the_unpruned_prefill_keys():
    model = tiny_model("llama")
    ids = torch.randint(0, 128, (1, 96), generator=torch.Generator().manual_seed(3))
    state = reference.prefill(model, ids)
    seen = list(reference.layer_queries_keys(model, ids))
    assert [index for index, _, _ in seen] == list(range(len(state.keys)))
    for (index, q, k), keys in zip(seen, state.keys):
        torch.testing.assert_close(k, keys)
        assert q.shape[2] == 96 and q.shape[1] == model.config.num_attention_heads


def _kept_from_first_principles(budget: int, length: int, block: int, sinks: int) -> int:
    """The sinks and the last block always; then whole middle blocks: the largest such count within
    the budget (all of them when the budget covers the sequence)."""
    last = (length - 1) // block
    sizes = [sinks * block + (length - last * block) + k * block for k in range(last - sinks + 1)]
    return max([n for n in sizes if n <= budget], default=sizes[0])


@pytest.mark.parametrize("length", [150, 153, 160, 161])
def test_budgets_around_the_stage_length(length):
    """Regression (issue 30, bug 3): a budget at or above the stage's length dropped a middle block when
    the last block was partial (150 tokens, budget 150-159 or 1.0 kept 134), because the budget was
    counted in whole blocks with the last block as a full one; the reference shared that rounding."""
    model = tiny_model("llama", "sdpa", num_hidden_layers=4)
    ids = torch.randint(0, 128, (1, length), generator=torch.Generator().manual_seed(length))
    for sinks in (0, 1, 2):
        budgets = sorted({length - 9, length - 8, length - 1, length, length + 1, length + 9, 40, 1, 1.0, 0.999})
        for budget in budgets:
            config = SlimConfig(prune=True, schedule={2: budget}, sink_blocks=sinks, **GEOMETRY)
            tokens = budget if isinstance(budget, int) else int(length * budget)
            (keep,) = reference.prefill(model, ids, config).keep_sets
            assert keep.tokens == _kept_from_first_principles(tokens, length, 8, sinks), (sinks, budget)
            assert_valid_keep_sets([keep], length)
            if tokens >= length:
                assert torch.equal(keep.positions[0], torch.arange(length))
    # a second stage whose budget covers what reached it keeps all of it
    config = SlimConfig(prune=True, schedule={1: 0.5, 3: length}, **GEOMETRY)
    first, second = reference.prefill(model, ids, config).keep_sets
    assert torch.equal(first.positions, second.positions)


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_generic_reference_agrees_with_the_llama_reference(family):
    """The family-generic reference (the model's own modules, pruning from hooks and the attention
    interface) against the Llama-only re-implementation: the same kept positions, logits, caches and
    reselecting decode, over several lengths, batch rows and schedules."""
    from tests.runtime import llama_reference

    model = tiny_model(family, "sdpa", num_hidden_layers=5)
    configs = [SlimConfig(prune=True, schedule={2: 0.5, 4: 0.25}, **GEOMETRY),
               SlimConfig(prune=True, schedule={1: 40}, sink_blocks=2, reselect=True, active_tokens=24, **GEOMETRY),
               SlimConfig(prune=True, schedule={3: 1.0}, reselect=True, reselect_unit=2, active_tokens=16, **GEOMETRY)]
    for config, (batch, length) in zip(configs, ((2, 150), (1, 97), (2, 203))):
        ids = torch.randint(0, 128, (batch, length), generator=torch.Generator().manual_seed(length))
        generic, llama = reference.prefill(model, ids, config), llama_reference.prefill(model, ids, config)
        assert [k.layer for k in generic.keep_sets] == [k.layer for k in llama.keep_sets]
        for a, b in zip(generic.keep_sets, llama.keep_sets):
            assert torch.equal(a.positions, b.positions)
        assert_valid_keep_sets(generic.keep_sets, length)
        torch.testing.assert_close(generic.logits, llama.logits, atol=1e-5, rtol=0)
        for ka, kb in zip(generic.keys, llama.keys):
            torch.testing.assert_close(ka, kb, atol=1e-5, rtol=0)
        trace_a, trace_b = [], []
        tokens = reference.generate(model, ids, config, max_new_tokens=10, trace=trace_a)
        assert torch.equal(tokens, llama_reference.generate(model, ids, config, max_new_tokens=10, trace=trace_b))
        assert trace_a == trace_b


def test_reference_refuses_what_it_cannot_run():
    """An attention that never reaches transformers' attention interface (a family that computes it inline)
    is refused by name, not silently run unpruned; so is an attention implementation it cannot wrap."""
    model = tiny_model("llama", "sdpa", num_hidden_layers=3)
    attn = model.model.layers[1].self_attn
    attn.forward = lambda hidden_states, **kwargs: (attn.o_proj(torch.zeros_like(hidden_states)), None)
    ids = torch.randint(0, 128, (1, 20))
    with pytest.raises(reference.ReferenceError, match=r"does not go through transformers' attention interface "
                                                       r"once per decoder layer \(layers \[1\]"):
        reference.prefill(model, ids)
    other = tiny_model("llama", "sdpa")
    other.config._attn_implementation = "flex_attention"
    with pytest.raises(reference.ReferenceError, match="attention implementation 'flex_attention'"):
        reference.prefill(other, ids)


@pytest.mark.parametrize("n", [300, 517])
def test_generate_shared_decodes_each_config_from_one_prefill(n):
    """default and reselect decoding after one pruned prefill equal two separate generate calls; configs
    that prefill differently are refused."""
    model = tiny_model("llama")
    ids = torch.randint(0, model.config.vocab_size, (2, n), generator=torch.Generator().manual_seed(n))
    plain = SlimConfig(prune=True, schedule={1: 0.5}, min_prompt_len=64, block_size=16)
    reselecting = SlimConfig(prune=True, schedule={1: 0.5}, min_prompt_len=64, block_size=16, reselect=True,
                             active_tokens=64)
    kept = []
    shared = reference.generate_shared(model, ids, [plain, reselecting], max_new_tokens=8, keep_sets=kept)
    assert torch.equal(shared[0], reference.generate(model, ids, plain, max_new_tokens=8))
    assert torch.equal(shared[1], reference.generate(model, ids, reselecting, max_new_tokens=8))
    assert len(kept) == 1 and kept[0].positions.shape[0] == 2
    with pytest.raises(ValueError, match="prefill differently"):
        reference.generate_shared(model, ids, [plain, SlimConfig(prune=True, schedule={2: 0.5}, min_prompt_len=64)])
