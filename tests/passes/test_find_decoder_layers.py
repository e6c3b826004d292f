"""Layer discovery on every supported family, attention implementation and graph shape."""

from __future__ import annotations

import logging

import pytest
import torch
import transformers

import slimpass
from slimpass.passes.graph_utils import fake, is_op

from ..conftest import FAMILIES, HF_ALWAYS_MASKS, tiny_model, twin


@pytest.mark.parametrize("with_mask", [False, True])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_layer_map(family, attn, with_mask, capture):
    model = tiny_model(family, attn, num_hidden_layers=3)
    # sink_selection off: it runs the last layer on the logits row only, so its output is one row
    backend = capture(rewrite_attention=False, sink_selection=False)
    compiled = torch.compile(model, backend=backend)
    ids = torch.randint(0, 128, (1, 40))
    with torch.no_grad():
        compiled(ids, attention_mask=torch.ones_like(ids) if with_mask else None)
    (record,) = backend.graphs
    layer_map = record["ctx"].layer_map
    assert layer_map is not None and layer_map.kind == "prefill"
    assert [layer.index for layer in layer_map.layers] == [0, 1, 2]
    for layer in layer_map.layers:
        assert layer.path.endswith(f"layers.{layer.index}")
        assert tuple(fake(layer.q).shape) == (1, 4, 40, 16)
        assert tuple(fake(layer.k).shape) == (1, 2, 40, 16) and tuple(fake(layer.v).shape) == (1, 2, 40, 16)
        assert all(is_op(w, "cat") for w in layer.kv_writes) and len(layer.kv_writes) == 2
        assert layer.kind == attn
        assert is_op(layer.output, "add") and tuple(fake(layer.output).shape) == (1, 40, 64)
    for prev, layer in zip(layer_map.layers, layer_map.layers[1:]):
        assert layer.input is prev.output
    # eager attention always reads a mask; SDPA only when HF built one (an explicit attention_mask, or
    # any prefill under compile with transformers <= 5.17)
    assert bool(layer_map.masks) == (with_mask or attn == "eager" or HF_ALWAYS_MASKS)
    # HF copies KV with repeat_kv whenever a mask is passed to the attention
    assert all(layer.gqa_repeat == bool(layer.mask is not None) for layer in layer_map.layers)
    roles = {n.meta["slimpass"].get("role") for n in record["after"].graph.nodes if "slimpass" in n.meta}
    assert {"q", "k", "v", "attention", "input", "output", "kv_write", "cos", "sin"} <= roles


def test_decode_graph_kind(capture):
    model = tiny_model()
    backend = capture()
    model.forward = torch.compile(model.forward, backend=backend)
    with torch.no_grad():
        model.generate(torch.randint(0, 128, (1, 20)), max_new_tokens=2, do_sample=False)
    kinds = [g["ctx"].layer_map.kind for g in backend.graphs]
    assert kinds[0] == "prefill" and set(kinds[1:]) == {"decode"}


def test_gpt2_warns_and_compiles_plainly(caplog):
    """A non-LLaMA model: one warning naming what was not found, and correct plain compilation."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=256)
    model = transformers.GPT2LMHeadModel(config).eval()
    oracle = twin(model)
    compiled = torch.compile(model, backend="sliminfer", options={"compiler": "eager"})
    ids = torch.randint(0, 128, (1, 30))
    with caplog.at_level(logging.WARNING, logger="slimpass"), torch.no_grad():
        got = compiled(ids).logits
    torch.testing.assert_close(got, oracle(ids).logits, atol=1e-4, rtol=0)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and r.name.startswith("slimpass")]
    assert len(warnings) == 1
    assert "not a RoPE decoder" in warnings[0].getMessage()
    assert "rotary" in warnings[0].getMessage() or "layer 0" in warnings[0].getMessage()
    (record,) = slimpass.compiled_graphs(model)
    assert record.kind == "unrecognised"
