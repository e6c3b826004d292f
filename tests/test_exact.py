"""With pruning off, sliminfer is exact: compiled logits equal the model's own eager logits.

Every family x attention implementation, batch 1 and 2, 11 prompt lengths from 17 to 1000, with and
without an explicit attention_mask (the in-graph N x N mask vs none), prefill and 16 greedy decode
steps through `generate`. One prefill graph serves every length.
"""

from __future__ import annotations

import pytest
import torch

import slimpass

from .conftest import FAMILIES, HF_ALWAYS_MASKS, tiny_model, twin

LENGTHS = (17, 31, 64, 65, 100, 128, 255, 333, 512, 777, 1000)
ATOL = 1e-4


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_prefill_exact_one_graph(family, attn):
    model = tiny_model(family, attn)
    oracle = twin(model)
    slimpass.compile(model, options={"compiler": "eager"})
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for batch in (1, 2):
            for length in LENGTHS:
                ids = torch.randint(0, 128, (batch, length), generator=generator)
                for mask in (None, torch.ones_like(ids)):
                    got = model(ids, attention_mask=mask).logits
                    want = oracle(ids, attention_mask=mask).logits
                    torch.testing.assert_close(got, want, atol=ATOL, rtol=0, msg=f"{batch=} {length=} {mask=}")
    records = slimpass.compiled_graphs(model)
    assert all(r.kind == "prefill" for r in records)
    # batch 1/2 x mask/no mask: four input signatures, each compiled once for all 11 lengths
    assert len(records) == 4, [r.graph_id for r in records]
    # guards of the attention rewrite (the graphs after the first also guard their fused projections'
    # parameters, `data_ptr`)
    masked = [r for r in records if any(g.role != "data_ptr" for g in r.guards)]
    assert all(r.results[1].replaced == 2 for r in masked), "masked graphs were not rewritten"
    # every masked call took the rewritten graph (mistral's sliding-window guard covers all four graphs)
    assert all(r.calls["fallback"] == 0 for r in records)
    # mistral's max_len guard also covers its no-mask graphs when they carry a mask (eager attention,
    # or SDPA with transformers <= 5.17); other models' no-mask graphs need no guard.
    unmasked_guarded = family == "mistral" and (attn == "eager" or HF_ALWAYS_MASKS)
    assert sum(r.calls["rewritten"] for r in masked) == (4 if unmasked_guarded else 2) * len(LENGTHS)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_generate_exact(family, attn):
    """16 greedy decode steps: per-step logits within 1e-4 and identical tokens, batch 1 and padded batch 2."""
    model = tiny_model(family, attn)
    oracle = twin(model)
    slimpass.compile(model, options={"compiler": "eager"})
    generator = torch.Generator().manual_seed(2)
    settings = dict(max_new_tokens=16, do_sample=False, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        for batch, length, pad in ((1, 40, 0), (1, 97, 0), (2, 57, 0), (2, 57, 9)):
            ids = torch.randint(3, 128, (batch, length), generator=generator)
            mask = torch.ones_like(ids)
            mask[0, :pad] = 0
            got = model.generate(ids, attention_mask=mask, **settings)
            want = oracle.generate(ids, attention_mask=mask, **settings)
            assert torch.equal(got.sequences, want.sequences), f"{batch=} {length=} {pad=}"
            for step, (a, b) in enumerate(zip(got.logits, want.logits)):
                torch.testing.assert_close(a, b, atol=ATOL, rtol=0, msg=f"{batch=} {length=} {pad=} {step=}")
    kinds = [r.kind for r in slimpass.compiled_graphs(model)]
    assert "decode" in kinds and "prefill" in kinds


def test_padded_batch_runs_unrewritten_graph():
    """Regression: a left-padded batch must not take the causal fast path (its mask is not causal)."""
    model = tiny_model("llama", "sdpa")
    oracle = twin(model)
    slimpass.compile(model, options={"compiler": "eager"})
    ids = torch.randint(0, 128, (2, 48))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        model(ids, attention_mask=mask)
        mask[1, :7] = 0
        torch.testing.assert_close(
            model(ids, attention_mask=mask).logits, oracle(ids, attention_mask=mask).logits, atol=ATOL, rtol=0
        )
    (record,) = slimpass.compiled_graphs(model)
    assert record.calls == {"rewritten": 1, "fallback": 1}
