"""The evaluation baselines (slimpass.eval.baselines) on tiny random models: what each keeps, and that a
cache cut to fewer slots still decodes at the true positions."""

import pytest
import torch

from slimpass.eval import baselines
from slimpass.runtime import reference
from tests.conftest import tiny_model


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("n", [97, 160])
def test_a_cache_that_keeps_every_slot_decodes_like_the_model(family, n, monkeypatch):
    """streaming with sinks + recent covering the whole prompt minus nothing is the full model: gathering
    every slot and decoding at prompt length + step equals the reference's unpruned greedy decode."""
    model = tiny_model(family)
    ids = torch.randint(0, model.config.vocab_size, (1, n), generator=torch.Generator().manual_seed(n))
    expected = reference.generate(model, ids, None, max_new_tokens=8)
    monkeypatch.setattr(baselines, "_streaming_keep", lambda n_, budget, sinks, device: torch.arange(n_, device=device))
    got = baselines.generate("streaming", model, ids, budget=n - 1, max_new_tokens=8)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("name", baselines.BASELINES)
def test_a_smaller_budget_changes_what_is_kept_and_runs(name):
    model = tiny_model("llama")
    ids = torch.randint(0, model.config.vocab_size, (1, 200), generator=torch.Generator().manual_seed(1))
    out = baselines.generate(name, model, ids, budget=64, max_new_tokens=6)
    assert out.shape == (1, 206) and torch.equal(out[:, :200], ids)


def test_snapkv_keeps_the_window_and_the_most_attended_tokens():
    q = torch.zeros(1, 2, 10, 4)
    k = torch.zeros(1, 1, 10, 4)
    k[0, 0, 3] = 5.0
    q[..., :] = 1.0
    scores = baselines._kv_heads_scores(q, k, window=2)
    assert scores.shape == (1, 1, 8) and int(scores[0, 0].argmax()) == 3


def test_an_unknown_baseline_is_refused():
    with pytest.raises(ValueError, match="unknown baseline 'h2o'; known: streaming, snapkv, gemfilter"):
        baselines.generate("h2o", tiny_model("llama"), torch.zeros(1, 8, dtype=torch.long), budget=4)


@pytest.mark.parametrize("n", [150, 233])
def test_variants_sharing_one_prefill_equal_their_own_calls(n):
    """full, streaming, snapkv and gemfilter from one unpruned prefill (what the quality harness batches)
    give what each gives alone, on a batch of 2 rows."""
    model = tiny_model("llama")
    ids = torch.randint(0, model.config.vocab_size, (2, n), generator=torch.Generator().manual_seed(n))
    names = ["full", *baselines.BASELINES]
    shared = baselines.generate_shared(names, model, ids, budget=96, max_new_tokens=6)
    alone = [reference.generate(model, ids, None, max_new_tokens=6)] + \
        [baselines.generate(name, model, ids, budget=96, max_new_tokens=6) for name in baselines.BASELINES]
    for name, got, expected in zip(names, shared, alone):
        assert torch.equal(got, expected), name
