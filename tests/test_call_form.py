"""Calls that mean the same thing reuse one graph (issue 29: a direct `model(ids, attention_mask=...,
logits_to_keep=1)` after `generate` compiled a prefill graph of its own, 12.8 s eager / 324 s Inductor on CPU)."""

from __future__ import annotations

import pytest
import torch

import slimpass
from slimpass.call_form import CallForm
from slimpass.config import SlimConfig
from slimpass.runtime import reference
from tests.conftest import tiny_model, twin

OPTIONS = {"prune": True, "compiler": "eager", "block_size": 8, "unit_size": 2, "local_window": 4,
           "min_prompt_len": 64, "schedule": {1: 0.5, 2: 0.5}}


@pytest.fixture
def form():
    model = tiny_model(num_hidden_layers=2)
    return CallForm(model.forward, model.config)


def test_positional_arguments_become_named(form):
    ids = torch.ones(1, 5, dtype=torch.long)
    args, kwargs = form.canonical((ids,), {"logits_to_keep": 1}, prefill=True)
    assert args == () and set(kwargs) == {"input_ids", "logits_to_keep"} and kwargs["input_ids"] is ids


def test_defaults_and_config_values_are_left_out(form):
    ids = torch.ones(1, 5, dtype=torch.long)
    _, kwargs = form.canonical((), {"input_ids": ids, "attention_mask": None, "use_cache": True, "return_dict": True,
                                    "logits_to_keep": 0, "output_attentions": None}, prefill=True)
    assert set(kwargs) == {"input_ids"}
    _, kwargs = form.canonical((), {"input_ids": ids, "use_cache": False, "return_dict": False, "logits_to_keep": 1},
                               prefill=True)
    assert kwargs["use_cache"] is False and kwargs["return_dict"] is False and kwargs["logits_to_keep"] == 1


@pytest.mark.parametrize("prefill", [True, False])
def test_positions_from_zero_are_left_out_of_an_unpadded_prefill_only(form, prefill):
    ids = torch.ones(2, 6, dtype=torch.long)
    counting = torch.arange(6).expand(2, 6)
    _, kwargs = form.canonical((), {"input_ids": ids, "position_ids": counting}, prefill=prefill)
    assert ("position_ids" in kwargs) is not prefill
    shifted = counting + 1
    _, kwargs = form.canonical((), {"input_ids": ids, "position_ids": shifted}, prefill=True)
    assert torch.equal(kwargs["position_ids"], shifted)
    mask = torch.ones(2, 6, dtype=torch.long)
    _, kwargs = form.canonical((), {"input_ids": ids, "position_ids": counting, "attention_mask": mask}, prefill=True)
    assert "position_ids" in kwargs  # a mask left in (padding): positions are the mask's, kept as given


def test_strides_become_those_of_a_fresh_tensor(form):
    longer = torch.arange(12).view(1, 12)
    _, kwargs = form.canonical((longer[:, :7],), {}, prefill=True)
    assert kwargs["input_ids"].stride() == (7, 1) and torch.equal(kwargs["input_ids"], longer[:, :7])
    fresh = torch.arange(7).view(1, 7)
    assert form.canonical((fresh,), {}, prefill=True)[1]["input_ids"] is fresh  # no copy when already so


def test_calls_the_model_would_refuse_pass_through_unchanged(form):
    ids = torch.ones(1, 5, dtype=torch.long)
    args, kwargs = form.canonical((ids,), {"input_ids": ids}, prefill=True)
    assert args == (ids,) and kwargs == {"input_ids": ids}


def test_a_direct_call_after_generate_reuses_its_prefill_graph():
    """After `generate`, direct calls (positional ids, an all-ones mask, explicit positions 0..N-1, default
    flags spelled out, a slice of a longer tensor, other lengths) compile nothing more, and their logits and
    kept positions are the reference's."""
    model = tiny_model(num_hidden_layers=3, max_position_embeddings=4096)
    oracle = twin(model)
    slimpass.compile(model, options=OPTIONS)
    config = SlimConfig(**OPTIONS)
    ids = torch.randint(4, 120, (1, 400), generator=torch.Generator().manual_seed(0))
    model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False)
    assert [g.kind for g in slimpass.compiled_graphs(model)] == ["prefill", "decode"]
    longer = torch.randint(4, 120, (1, 600), generator=torch.Generator().manual_seed(1))
    calls = [
        ((ids,), {"attention_mask": torch.ones_like(ids), "logits_to_keep": 1}),
        ((), {"input_ids": ids, "position_ids": torch.arange(400)[None], "use_cache": True, "return_dict": True,
              "logits_to_keep": 1}),
        ((longer[:, :333],), {"logits_to_keep": 1}),
        ((longer,), {"logits_to_keep": 1}),
    ]
    for args, kwargs in calls:
        with torch.no_grad():
            got = model(*args, **kwargs).logits[:, -1]
        prompt = args[0] if args else kwargs["input_ids"]
        want = reference.prefill(oracle, prompt, config)
        torch.testing.assert_close(got, want.logits, atol=1e-4, rtol=0)
        kept = slimpass.last_keep_sets(model)
        assert [k.positions.tolist() for k in kept] == [k.positions.tolist() for k in want.keep_sets]
    assert [g.kind for g in slimpass.compiled_graphs(model)] == ["prefill", "decode"]


def test_under_inference_mode_a_tensor_made_outside_it_reuses_generates_graph():
    """Regression: `generate` inside `torch.inference_mode()` clones its inputs into inference tensors; a direct
    call with ids made outside inference mode differed in dispatch keys and compiled a third graph (SmolLM2,
    benchmarks/cpu_compile_time.py)."""
    model = tiny_model(num_hidden_layers=3, max_position_embeddings=4096)
    slimpass.compile(model, options=OPTIONS)
    ids = torch.randint(4, 120, (1, 300), generator=torch.Generator().manual_seed(2))
    assert not ids.is_inference()
    with torch.inference_mode():
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, do_sample=False)
        model(ids, attention_mask=torch.ones_like(ids), logits_to_keep=1)
    assert [g.kind for g in slimpass.compiled_graphs(model)] == ["prefill", "decode"]
