"""End to end through Inductor (the default inner compiler), compared with the model's own eager twin.

Slow on CPU: Inductor builds C++ for every graph (10-30 s each), and a rewritten graph with runtime
guards is lowered twice (rewritten + unrewritten fallback). The rest of the suite uses compiler="eager".
"""

from __future__ import annotations

import pytest
import torch

import slimpass

from slimpass.config import SlimConfig
from slimpass.runtime import reference

from .conftest import assert_valid_keep_sets, tiny_model, twin

ATOL = 1e-4
pytestmark = pytest.mark.slow


def test_llama_sdpa_prefill_and_generate():
    """Masked prefill at 3 lengths on one rewritten graph, a padded call on its fallback, 8 greedy tokens."""
    model = tiny_model("llama", "sdpa")
    oracle = twin(model)
    slimpass.compile(model, options={"compiler": "inductor"})
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for length in (17, 64, 65):
            ids = torch.randint(0, 128, (1, length), generator=generator)
            mask = torch.ones_like(ids)
            got, want = model(ids, attention_mask=mask).logits, oracle(ids, attention_mask=mask).logits
            torch.testing.assert_close(got, want, atol=ATOL, rtol=0, msg=f"{length=}")
        mask[0, :5] = 0  # left padding: not causal, must take the unrewritten graph
        got, want = model(ids, attention_mask=mask).logits, oracle(ids, attention_mask=mask).logits
        torch.testing.assert_close(got, want, atol=ATOL, rtol=0, msg="padded")
    (prefill,) = slimpass.compiled_graphs(model)
    # passes: discovery, attention rewrite (2 calls), pruning (off), sink_selection (full logits: nothing),
    # reselect_kv (not a decode graph), fuse_projections (the first graph: stacks the parameters after it)
    assert prefill.kind == "prefill" and [r.replaced for r in prefill.results] == [0, 2, 0, 0, 0, 0]
    assert prefill.calls == {"rewritten": 3, "fallback": 1}

    ids = torch.randint(3, 128, (1, 40), generator=generator)
    settings = dict(max_new_tokens=8, do_sample=False, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        got = model.generate(ids, attention_mask=torch.ones_like(ids), **settings)
        want = oracle.generate(ids, attention_mask=torch.ones_like(ids), **settings)
    assert torch.equal(got.sequences, want.sequences)
    assert len(got.logits) == 8
    for step, (a, b) in enumerate(zip(got.logits, want.logits)):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0, msg=f"{step=}")
    kinds = [r.kind for r in slimpass.compiled_graphs(model)]
    assert kinds.count("prefill") == 2 and "decode" in kinds


def test_mistral_eager_attention_prefill():
    """HF's eager softmax chain, rewritten to causal SDPA under the sliding-window guard; one graph, 2 lengths."""
    model = tiny_model("mistral", "eager")
    oracle = twin(model)
    slimpass.compile(model, options={"compiler": "inductor"})
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for length in (31, 64):
            ids = torch.randint(0, 128, (1, length), generator=generator)
            torch.testing.assert_close(model(ids).logits, oracle(ids).logits, atol=ATOL, rtol=0, msg=f"{length=}")
    (record,) = slimpass.compiled_graphs(model)
    assert record.kind == "prefill" and [r.replaced for r in record.results] == [0, 2, 0, 0, 0, 0]
    assert [(g.role, g.limit) for g in record.guards] == [("max_len", model.config.sliding_window)]
    assert record.calls == {"rewritten": 2, "fallback": 0}


def test_pruned_prefill_reports_the_positions_it_kept():
    """Regression (issue 30, bug 2): through Inductor, `last_keep_sets` held values like 4577402546864978407
    in the last block of a 150- or 300-token prompt while the logits were right: Inductor's C++ code for
    the old index arithmetic never wrote the last partial block (see tests/runtime/test_pruning_ops.py).
    The kept positions now equal the reference's at lengths with a full, a partial and a one-token last block."""
    model = tiny_model("llama", num_hidden_layers=4, max_position_embeddings=4096)
    oracle = twin(model)
    options = {"compiler": "inductor", "prune": True, "min_prompt_len": 64, "schedule": {2: 0.5, 3: 0.25}}
    slimpass.compile(model, options=options)
    config = SlimConfig(**{k: v for k, v in options.items() if k != "compiler"})
    for length in (150, 300, 160, 161):
        ids = torch.randint(0, 128, (1, length), generator=torch.Generator().manual_seed(length))
        # compile caches off: a cache hit replays guards on intermediate sizes that a cold compile never
        # added, which recompiles at other lengths (correct, but not what a fresh machine sees)
        with torch.no_grad(), torch._inductor.config.patch(fx_graph_cache=False), \
                torch._functorch.config.patch(enable_autograd_cache=False):
            got = model(ids, use_cache=False, logits_to_keep=1).logits[:, -1]
        want = reference.prefill(oracle, ids, config)
        torch.testing.assert_close(got, want.logits, atol=ATOL, rtol=0, msg=f"{length=}")
        kept = slimpass.last_keep_sets(model)
        assert_valid_keep_sets(kept, length)
        assert [k.positions.tolist() for k in kept] == [k.positions.tolist() for k in want.keep_sets], f"{length=}"
    assert len(slimpass.compiled_graphs(model)) == 1
