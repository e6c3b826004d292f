"""`SlimConfig.static_decode`: decoding on fixed-size K/V buffers, each layer's attention masked to its
written slots.

Oracle: `slimpass.runtime.reference` (pruned prefill, then plain decoding with and without reselection),
which shares no code with the buffers, the slot masks or the passes. The buffers' room is kept small so
that every generate also grows them.
"""

from __future__ import annotations

import logging

import pytest
import torch

import slimpass
from slimpass.config import ConfigError, SlimConfig
from slimpass.hf_compat import cache_argument
from slimpass.runtime import front_events, reference
from tests.conftest import tiny_model, twin
from tests.runtime.test_slim_cache import GEOMETRY, SCHEDULE, _generate, _ids

NEW_TOKENS = 9
ROOM = 4  # so each 9-token generate grows the buffers twice


def _generate_with_logits(model, ids, cache):
    with torch.no_grad():
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False,
                              output_logits=True, return_dict_in_generate=True, **{cache_argument(model): cache})


def _matches_reference(model, oracle, batch, length, **extra):
    """Decode `model` (compiled with static_decode and `extra`) and `oracle` through the reference loop: the same
    tokens and logits (a slot mask that let empty slots in would shift the logits before it changed a token).
    Returns the cache."""
    ids = _ids(batch, length)
    cache = slimpass.SlimCache(model.config)
    got = _generate_with_logits(model, ids, cache)
    logits = []
    want = reference.generate(oracle, ids, SlimConfig(prune=True, schedule=SCHEDULE, **GEOMETRY, **extra),
                              max_new_tokens=NEW_TOKENS, logits=logits)
    assert torch.equal(got.sequences, want), (batch, length)
    torch.testing.assert_close(torch.stack(got.logits), torch.stack(logits), rtol=1e-4, atol=1e-4)
    return cache


def _options(**extra):
    return {"prune": True, "schedule": SCHEDULE, "compiler": "eager", **GEOMETRY, "static_decode": True,
            "decode_capacity": ROOM, **extra}


@pytest.mark.parametrize(("family", "reselect"), [("llama", False), ("llama", True), ("qwen2", True)],
                         ids=["llama-plain", "llama-reselect", "qwen2-reselect"])
def test_static_decode_matches_reference(family, reselect):
    model = tiny_model(family, num_hidden_layers=6)
    oracle = twin(model)
    extra = {"reselect": True, "active_tokens": 16} if reselect else {}
    slimpass.compile(model, options=_options(**extra))
    for batch, length in ((1, 64), (2, 333)):
        cache = _matches_reference(model, oracle, batch, length, **extra)
        # the buffers: room for more, written in place, grown when full; lengths as a growing cache's
        steps = NEW_TOKENS - 1
        assert cache.generated() == steps and cache.get_seq_length() == length + steps
        for layer in cache.layers:
            assert layer.slots.written == int(layer.slots.valid) == layer.get_seq_length()
            assert layer.slots.written <= layer.keys.shape[2] <= layer.slots.written + ROOM
            assert layer.values.shape == layer.keys.shape
        assert [m.tokens for m in cache.memory_report().layers] == [layer.slots.written for layer in cache.layers]
        assert torch.equal(cache.positions(5)[:, -steps:], torch.arange(length, length + steps).expand(batch, -1))


def test_static_decode_compiles_no_more_graphs_than_growing_tensors():
    """One decode graph serves every step and every buffer size (no recompile a step or a growth)."""
    counts = {}
    for static in (False, True):
        model = tiny_model("llama", num_hidden_layers=6)
        slimpass.compile(model, options=_options(static_decode=static, reselect=True, active_tokens=16))
        for length in (150, 333):
            _generate(model, _ids(1, length), NEW_TOKENS)
        counts[static] = [record.kind for record in slimpass.compiled_graphs(model)]
        torch._dynamo.reset()
    assert counts[True] == counts[False]
    assert counts[True].count("decode") <= 2


class _StaticInputs(logging.Handler):
    """What AOTAutograd logs about each graph input: static (a parameter, a ``mark_static_address`` tensor;
    CUDA graphs use it in place) or not (copied into graph memory at every replay)."""

    LOGGER = "torch._functorch._aot_autograd.frontend_utils.__cudagraph_static_inputs"

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.static, self.moving = set(), set()

    def emit(self, record):
        message = record.getMessage()
        source = message.partition(" for source ")[2]
        if message.startswith("Adding static input pos"):
            self.static.add(source)
        elif message.startswith("Non-static input pos"):
            self.moving.add(source)

    def __enter__(self):
        torch._logging.set_logs(cudagraph_static_inputs=True)
        logging.getLogger(self.LOGGER).addHandler(self)
        return self

    def __exit__(self, *exc):
        logging.getLogger(self.LOGGER).removeHandler(self)
        torch._logging.set_logs()


def test_static_decode_under_inductor_matches_reference():
    """Also: Inductor sees the weights and the buffers as static inputs (a CUDA-graph replay uses them in
    place and may write to them), and only the step's own tensors as moving.

    Regression: the backend's edited copy of Dynamo's graph lost the metadata AOTAutograd reads static inputs
    from, so no input was static and Inductor skipped the CUDA graphs ("mutated inputs") on the GPU."""
    model = tiny_model("llama", num_hidden_layers=6)
    oracle = twin(model)
    slimpass.compile(model, options=_options(compiler="inductor", reselect=True, active_tokens=16))
    ids = _ids(1, 150)
    want = reference.generate(oracle, ids, SlimConfig(prune=True, schedule=SCHEDULE, reselect=True, active_tokens=16,
                                                      **GEOMETRY), max_new_tokens=NEW_TOKENS)
    with _StaticInputs() as inputs:
        assert torch.equal(_generate(model, ids, NEW_TOKENS), want)
    tensors = {s for s in inputs.moving if ".size()" not in s and ".stride()" not in s}
    assert tensors and all("input_ids" in s or "position_ids" in s for s in tensors), sorted(tensors)
    for name in ("keys", "values", "slots.valid"):
        assert any(f".layers[5].{name}" in s for s in inputs.static), (name, sorted(inputs.static))
    assert any("q_proj" in s for s in inputs.static), sorted(inputs.static)
    decode = [r for r in slimpass.compiled_graphs(model) if r.kind == "decode"]
    summaries = [next(p.summary for p in r.results if p.name == "rewrite_attention") for r in decode]
    assert summaries and all("6 masked to their written slots" in s for s in summaries), summaries


def test_short_prompt_keeps_growing_tensors():
    """A prompt under min_prompt_len is not pruned: transformers' own layout, no buffers."""
    model = tiny_model("llama", num_hidden_layers=6)
    oracle = twin(model)
    slimpass.compile(model, options=_options())
    ids = _ids(1, 40)
    cache = slimpass.SlimCache(model.config)
    with torch.no_grad():
        want = oracle.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False)
    assert torch.equal(_generate(model, ids, NEW_TOKENS, cache), want)
    assert cache.room == 0 and all(layer.slots is None for layer in cache.layers)


@pytest.mark.parametrize("options, fragment", [
    ({"prune": False}, "needs prune=True"),
    ({"rewrite_attention": False}, "needs rewrite_attention=True"),
    ({"decode_capacity": 0}, "decode_capacity"),
])
def test_bad_static_decode_options(options, fragment):
    with pytest.raises(ConfigError, match=fragment):
        SlimConfig(**{**_options(), **options})


def test_buffers_refuse_what_they_cannot_do():
    model = tiny_model("llama", num_hidden_layers=6)
    slimpass.compile(model, options=_options())
    cache = slimpass.SlimCache(model.config)
    _generate(model, _ids(1, 150), 3, cache)
    layer = cache.layers[3]
    with pytest.raises(NotImplementedError, match="static_decode"):
        cache.crop(100)
    with pytest.raises(NotImplementedError, match="one token a step, not 2"):
        layer.update(torch.zeros(1, 2, 2, 16), torch.zeros(1, 2, 2, 16))
    # a step outside the compiled graph would attend to empty slots: the marker says so
    with pytest.raises(RuntimeError, match="not masked to the written slots"):
        torch.ops.slimpass.bind_static_kv(layer.slots.valid, 3)
    # an offload mark handed fronts that no manager set up (a compiler's copy) cannot order the step: it says so
    with pytest.raises(RuntimeError, match="no offload manager set up.*static_decode=False"):
        torch.ops.slimpass.wait_front(torch.zeros(1, 2, 8, 16), torch.zeros(1, 2, 8, 16), torch.zeros(1), 3)


def test_static_decode_with_offload_matches_reference():
    """Offloaded layers decode from the manager's fronts and a fixed-size tail: the reference's tokens and
    logits, and the tail is a buffer masked to its written slots (room 4 for 9 tokens: it grows)."""
    options = dict(reselect=True, active_tokens=16, offload=True, copy_group=2)
    model = tiny_model("llama", num_hidden_layers=6)
    oracle = twin(model)
    slimpass.compile(model, options=_options(**options))
    for batch, length in ((1, 150), (2, 333)):
        cache = _matches_reference(model, oracle, batch, length, **options)
        assert cache.offload.layers, "nothing was offloaded"
        for index in cache.offload.layers:
            layer = cache.layers[index]
            prompt = layer.prompt_positions.shape[1]
            tail = prompt - (prompt - 1) // GEOMETRY["block_size"] * GEOMETRY["block_size"]
            assert layer.slots.written == int(layer.slots.valid) == tail + NEW_TOKENS - 1, index
            assert layer.keys.shape[2] >= layer.slots.written
        assert cache.offload_report()["blocks"] > 0


def test_offload_marks_sit_in_their_layers_under_inductor(monkeypatch):
    """Under Inductor each offloaded layer waits for its fronts' copy just before its attention and marks them
    read just after it (`slimpass.runtime.front_events`), on the fronts themselves: so a layer's copy for the
    next step can run beside the rest of this step. Inductor does not keep the traced order of ops without
    data dependencies: without the marks' extra inputs and output it hoisted every wait to the top of the graph
    and sank every mark to its end (the copies could then only run between steps); and a traced write of
    `pending` landed at the graph's end, after the mark the side stream waits for."""
    options = dict(reselect=True, active_tokens=16, offload=True, copy_group=2)
    model = tiny_model("llama", num_hidden_layers=6)
    oracle = twin(model)
    slimpass.compile(model, options=_options(compiler="inductor", **options))
    calls, lookup = [], front_events._lookup

    def logged(front_k, layer, mark):
        events = lookup(front_k, layer, mark)  # raises for a copy of the fronts
        calls.append((mark, layer))
        return events

    monkeypatch.setattr(front_events, "_lookup", logged)
    cache = _matches_reference(model, oracle, 1, 150, **options)
    layers = sorted(cache.offload.layers)
    step = [(mark, layer) for layer in layers for mark in ("wait_front", "front_done")]
    assert len(layers) >= 2 and calls and calls == step * (len(calls) // len(step)), calls
    assert len(calls) // len(step) == NEW_TOKENS - 2  # every step after the first, which runs resident


def test_generate_gives_a_request_no_more_room_than_it_asks_for():
    """`slimpass.compile`'s generate tells the cache the request's max_new_tokens: with the default room (256)
    a 9-token request's buffers end full (8 tokens written after the prompt, no empty slots), and the tokens
    are the reference's."""
    model = tiny_model("llama", num_hidden_layers=6)
    oracle = twin(model)
    slimpass.compile(model, options={**_options(reselect=True, active_tokens=16), "decode_capacity": 256})
    ids = _ids(1, 150)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False,
                             return_dict_in_generate=True)
    want = reference.generate(oracle, ids, SlimConfig(prune=True, schedule=SCHEDULE, reselect=True, active_tokens=16,
                                                      **GEOMETRY), max_new_tokens=NEW_TOKENS)
    assert torch.equal(out.sequences, want)
    cache = out.past_key_values
    assert isinstance(cache, slimpass.SlimCache) and cache.new_tokens == NEW_TOKENS and cache.generated() == NEW_TOKENS - 1
    assert all(layer.slots.written == layer.keys.shape[2] for layer in cache.layers)
