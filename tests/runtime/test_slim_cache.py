"""SlimCache: per-layer kept positions, sequence length, memory report, a clean cache per request.

Oracle: `slimpass.runtime.reference` (its keep sets and greedy decode), which shares no code with the
compiled path or the cache.
"""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

import slimpass
from slimpass.config import SlimConfig
from slimpass.hf_compat import cache_argument
from slimpass.runtime import reference, slim_cache
from tests.conftest import tiny_model, twin

GEOMETRY = dict(block_size=8, unit_size=2, min_prompt_len=64)
SCHEDULE = {2: 0.5, 4: (60, 0.25)}


def _model(family="llama", seed=0):
    return tiny_model(family, seed=seed, num_hidden_layers=6)


def _options(**extra):
    return {"prune": True, "schedule": SCHEDULE, "compiler": "eager", **GEOMETRY, **extra}


def _ids(batch, length, seed=None):
    return torch.randint(0, 128, (batch, length), generator=torch.Generator().manual_seed(seed or length))


def _generate(model, ids, new_tokens=6, cache=None):
    extra = {} if cache is None else {cache_argument(model): cache}
    with torch.no_grad():
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False,
                              **extra)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_generate_with_slim_cache_matches_reference(family):
    model = _model(family)
    oracle = twin(model)
    slimpass.compile(model, options=_options())
    for batch, length in ((1, 64), (2, 150), (1, 333), (2, 517)):
        ids = _ids(batch, length)
        cache = slimpass.SlimCache(model.config)
        got = _generate(model, ids, cache=cache)
        want = reference.generate(oracle, ids, SlimConfig(prune=True, schedule=SCHEDULE, **GEOMETRY), max_new_tokens=6)
        assert torch.equal(got, want), (batch, length)
        assert torch.equal(_generate(model, ids), want)  # the cache generate makes by itself
        ref = reference.prefill(oracle, ids, SlimConfig(prune=True, schedule=SCHEDULE, **GEOMETRY))
        assert cache.prompt_len == length and cache.generated() == 5
        assert cache.get_seq_length() == length + 5
        stages = {k.layer: k.positions for k in ref.keep_sets}
        current = torch.arange(length).expand(batch, -1)
        for index in range(len(cache.layers)):
            current = stages.get(index, current)
            want_positions = torch.cat([current, torch.arange(length, length + 5).expand(batch, -1)], dim=1)
            assert torch.equal(cache.positions(index), want_positions), (length, index)
            assert cache.layers[index].keys.shape[2] == want_positions.shape[1]


def test_memory_report_sums_tensor_sizes():
    model = _model()
    slimpass.compile(model, options=_options())
    cache = slimpass.SlimCache(model.config)
    length = 400
    _generate(model, _ids(2, length), new_tokens=4, cache=cache)
    report = cache.memory_report()
    per_token = 2 * 2 * model.config.num_key_value_heads * (64 // 4) * 4  # K and V, batch 2, float32
    assert [m.tokens for m in report.layers] == [layer.keys.shape[2] for layer in cache.layers]
    assert report.layers[0].tokens == length + 3 and report.layers[-1].tokens < length // 2
    for m, layer in zip(report.layers, cache.layers):
        assert m.cpu_bytes == layer.keys.nbytes + layer.values.nbytes == m.tokens * per_token
        assert m.gpu_bytes == 0
    assert report.total_bytes == sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
    assert report.dense_bytes == len(cache.layers) * (length + 3) * per_token
    assert "of the unpruned cache" in str(report)


def test_unpruned_prompt_records_every_layer_dense():
    model = _model()
    slimpass.compile(model, options=_options())
    cache = slimpass.SlimCache(model.config)
    _generate(model, _ids(1, 40), new_tokens=3, cache=cache)  # shorter than min_prompt_len
    assert cache.prompt_len == 40
    assert all(torch.equal(cache.positions(i), torch.arange(42)[None]) for i in range(len(cache.layers)))
    report = cache.memory_report()
    assert report.total_bytes == report.dense_bytes


def test_sliding_window_models_keep_transformers_cache():
    model = tiny_model("mistral", num_hidden_layers=6, sliding_window=4096)
    assert not slim_cache.supports(model.config)
    with pytest.raises(ValueError, match="sliding_attention layers"):
        slimpass.SlimCache(model.config)
    slimpass.compile(model, options=_options())
    ids = _ids(1, 20)
    assert torch.equal(_generate(model, ids, new_tokens=3), _generate(twin(model), ids, new_tokens=3))


def test_reused_cache_is_refused_at_record():
    cache = slimpass.SlimCache(_model().config)
    keys = torch.zeros(1, 2, 10, 16)
    for layer in cache.layers:
        layer.update(keys, keys)
    with pytest.raises(RuntimeError, match="Pass a new SlimCache"):
        cache.record_prefill(12, [])
    with pytest.raises(ValueError, match="holds no tokens"):
        slimpass.SlimCache(_model().config).positions(0)


def test_two_compiled_models_do_not_share_state():
    first, second = _model(seed=0), _model(seed=1)
    oracles = twin(first), twin(second)
    slimpass.compile(first, options=_options())
    slimpass.compile(second, options=_options(schedule={3: 0.25}))
    configs = (SlimConfig(prune=True, schedule=SCHEDULE, **GEOMETRY), SlimConfig(prune=True, schedule={3: 0.25}, **GEOMETRY))
    for length in (120, 300):
        ids = _ids(1, length)
        for model, oracle, config in zip((first, second), oracles, configs):
            assert torch.equal(_generate(model, ids), reference.generate(oracle, ids, config, max_new_tokens=6))
        assert [k.layer for k in slimpass.last_keep_sets(first)] == [2, 4]
        assert [k.layer for k in slimpass.last_keep_sets(second)] == [3]


def test_no_growth_across_100_generate_calls():
    """Nothing keeps a request's cache alive, and the number of live tensors does not grow."""
    model = _model()
    slimpass.compile(model, options=_options())
    ids = _ids(1, 100)
    first = _generate(model, ids, new_tokens=3)

    def live_tensors():
        gc.collect()
        return sum(1 for obj in gc.get_objects() if isinstance(obj, torch.Tensor))

    for _ in range(5):  # warm: every graph compiled, lazy state created
        _generate(model, ids, new_tokens=3)
    before = live_tensors()
    caches = []
    for _ in range(100):
        cache = slimpass.SlimCache(model.config)
        assert torch.equal(_generate(model, ids, new_tokens=3, cache=cache), first)
        caches.append(weakref.ref(cache))
        del cache
        _generate(model, ids, new_tokens=3)
    gc.collect()
    assert all(ref() is None for ref in caches)
    assert live_tensors() <= before
