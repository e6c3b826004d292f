"""insert_pruning against the reference loop: logits, kept sets, generate, declines, recompiles.

Tiny 8-layer random models scaled so pruning triggers (block 8, unit 2, prompts 64-1000); the
oracle is `slimpass.runtime.reference`, which shares no code with the pass.
"""

from __future__ import annotations

import logging

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import slimpass
from slimpass.config import ConfigError, SlimConfig
from slimpass.runtime import reference
from tests.conftest import HF_ALWAYS_MASKS, assert_valid_keep_sets, tiny_model, twin

DEPTH = 8
GEOMETRY = dict(block_size=8, unit_size=2, local_window=4, min_prompt_len=64)
SCHEDULES = {
    "tokens": {3: 96, 6: 40},
    "ratios": {2: 0.5, 4: 0.25, 6: 0.125},
    "mixed": {3: (200, 0.5), 5: 0.2},
}
LENGTHS = (64, 71, 100, 128, 163, 200, 257, 333, 480, 641, 800, 1000)


def _model(family="llama", attn="sdpa", seed=0):
    return tiny_model(family, attn, seed=seed, num_hidden_layers=DEPTH, max_position_embeddings=4096)


def _options(schedule, **extra):
    return {"prune": True, "schedule": schedule, "compiler": "eager", **GEOMETRY, **extra}


def _config(schedule, **extra):
    return SlimConfig(prune=True, schedule=schedule, **GEOMETRY, **extra)


def _prefill(model, ids):
    with torch.no_grad():
        return model(ids, use_cache=False, logits_to_keep=1).logits[:, -1]


def _assert_matches_reference(model, oracle, ids, config):
    got = _prefill(model, ids)
    want = reference.prefill(oracle, ids, config)
    torch.testing.assert_close(got, want.logits, atol=1e-4, rtol=0)
    kept = slimpass.last_keep_sets(model)
    assert_valid_keep_sets(kept, ids.shape[1])
    assert [k.layer for k in kept] == [k.layer for k in want.keep_sets]
    for ours, theirs in zip(kept, want.keep_sets):
        assert torch.equal(ours.positions, theirs.positions), f"layer {ours.layer}"
    return want


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
@pytest.mark.parametrize("schedule", sorted(SCHEDULES))
def test_prefill_matches_reference(family, schedule):
    model = _model(family)
    oracle = twin(model)
    slimpass.compile(model, options=_options(SCHEDULES[schedule]))
    pruned_somewhere = False
    for length in LENGTHS:
        ids = torch.randint(0, 128, (1, length), generator=torch.Generator().manual_seed(length))
        want = _assert_matches_reference(model, oracle, ids, _config(SCHEDULES[schedule]))
        pruned_somewhere |= any(k.tokens < length for k in want.keep_sets)
    assert pruned_somewhere


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_batch_two_rows_keep_their_own_blocks(attn):
    model = _model("llama", attn)
    oracle = twin(model)
    slimpass.compile(model, options=_options(SCHEDULES["ratios"]))
    for length in (96, 300, 517):
        ids = torch.randint(0, 128, (2, length), generator=torch.Generator().manual_seed(length))
        want = _assert_matches_reference(model, oracle, ids, _config(SCHEDULES["ratios"]))
    assert not torch.equal(want.keep_sets[-1].positions[0], want.keep_sets[-1].positions[1])


def test_pruning_changes_the_answer_only_as_the_reference_does():
    """Sanity: the pruned logits are not the dense ones (the oracle comparison is not vacuous)."""
    model = _model()
    dense = twin(model)
    slimpass.compile(model, options=_options({2: 0.25}))
    ids = torch.randint(0, 128, (1, 400), generator=torch.Generator().manual_seed(1))
    assert (_prefill(model, ids) - _prefill(dense, ids)).abs().max() > 1e-3
    assert [k.tokens for k in slimpass.last_keep_sets(model)] == [8 + 8 * 10 + 8]  # sink, 10 best, last


@pytest.mark.parametrize("family", ["llama", pytest.param("mistral", marks=pytest.mark.skipif(
    HF_ALWAYS_MASKS, reason="sliding-window layers get transformers' cache, whose 5.17 decode masks cover the "
    "full prompt: pruning declines for generate")), "qwen2"])
def test_generate_matches_reference_decode(family):
    model = _model(family)
    oracle = twin(model)
    slimpass.compile(model, options=_options(SCHEDULES["mixed"]))
    for batch, length in ((1, 150), (2, 333), (1, 700)):
        ids = torch.randint(0, 128, (batch, length), generator=torch.Generator().manual_seed(length))
        with torch.no_grad():
            got = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=32, do_sample=False)
        want = reference.generate(oracle, ids, _config(SCHEDULES["mixed"]), max_new_tokens=32)
        assert torch.equal(got, want), (batch, length)
        assert any(k.tokens < length for k in slimpass.last_keep_sets(model))


def test_padded_batch_runs_dense_and_exact():
    """Padding fails the pruned graph's guard: the batch runs the unpruned graph, as HF eager does."""
    model = _model()
    oracle = twin(model)
    slimpass.compile(model, options=_options(SCHEDULES["tokens"]))
    ids = torch.randint(3, 128, (2, 200), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :17] = 0
    with torch.no_grad():
        got = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
        want = oracle.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(got, want)
    assert slimpass.last_keep_sets(model) == []
    assert slimpass.compiled_graphs(model)[0].calls["fallback"] >= 1


def test_short_prompts_run_dense():
    model = _model()
    oracle = twin(model)
    slimpass.compile(model, options=_options(SCHEDULES["tokens"]))
    for length in (200, 30, 63, 64):
        ids = torch.randint(0, 128, (1, length))
        want = _assert_matches_reference(model, oracle, ids, _config(SCHEDULES["tokens"]))
        assert (want.keep_sets == []) == (length < 64)
        if length < 64:
            torch.testing.assert_close(_prefill(model, ids), oracle(ids).logits[:, -1], atol=1e-4, rtol=0)


def test_full_sequence_logits_decline(caplog):
    model = _model()
    oracle = twin(model)
    slimpass.compile(model, options=_options(SCHEDULES["tokens"]))
    ids = torch.randint(0, 128, (1, 300))
    with caplog.at_level(logging.INFO, logger="slimpass"), torch.no_grad():
        got = model(ids, use_cache=False).logits  # logits of every position
    torch.testing.assert_close(got, oracle(ids).logits, atol=1e-4, rtol=0)
    result = slimpass.compiled_graphs(model)[0].results[2]
    assert result.name == "insert_pruning" and not result.changed
    assert "dimension per prompt position" in result.declined[0] and "logits_to_keep=1" in result.declined[0]
    assert any("pruning declined" in r.getMessage() for r in caplog.records)
    assert slimpass.last_keep_sets(model) == []


def test_pruning_off_inserts_nothing():
    model = _model()
    slimpass.compile(model, options={"compiler": "eager", **GEOMETRY})
    _prefill(model, torch.randint(0, 128, (1, 300)))
    result = slimpass.compiled_graphs(model)[0].results[2]
    assert result.declined == ["pruning is off (prune=False)"] and not result.changed
    assert slimpass.last_keep_sets(model) is None


def test_custom_scorer_reaches_graph_and_reference():
    calls = []

    @slimpass.register_scorer("test_last_query")
    def last_query(q, k, settings):
        calls.append(q.shape)
        batch, heads, length, _ = q.shape
        full = (length // settings.block_size) * settings.block_size
        keys = k[:, :, :full].repeat_interleave(heads // k.shape[1], dim=1)
        scores = (q[:, :, -1:] @ keys.transpose(-1, -2)).abs().amax(dim=(1, 2))
        return scores.view(batch, -1, settings.block_size).amax(-1)

    model = _model()
    oracle = twin(model)
    slimpass.compile(model, options=_options(SCHEDULES["ratios"], scorer="test_last_query"))
    config = _config(SCHEDULES["ratios"], scorer="test_last_query")
    for length in (120, 450):
        ids = torch.randint(0, 128, (1, length), generator=torch.Generator().manual_seed(length))
        _assert_matches_reference(model, oracle, ids, config)
    tokenunit = reference.prefill(oracle, ids, _config(SCHEDULES["ratios"]))
    ours = reference.prefill(oracle, ids, config)
    assert any(not torch.equal(a.positions, b.positions) for a, b in zip(ours.keep_sets, tokenunit.keep_sets))
    assert calls


@pytest.mark.parametrize("scorer", ["tokenunit_torch", "window_attention"])
def test_builtin_scorers_compiled_match_reference(scorer):
    """Every builtin scorer: the compiled pruned path and the reference keep the same tokens and logits."""
    model = _model("llama")
    oracle = twin(model)
    slimpass.compile(model, options=_options(SCHEDULES["ratios"], scorer=scorer))
    for length in (64, 100, 257, 480):
        ids = torch.randint(0, 128, (1, length), generator=torch.Generator().manual_seed(length))
        _assert_matches_reference(model, oracle, ids, _config(SCHEDULES["ratios"], scorer=scorer))


def test_unknown_scorer_is_a_config_error():
    model = _model()
    slimpass.compile(model, options=_options(SCHEDULES["ratios"], scorer="nope"))
    with pytest.raises(Exception, match="SlimConfig.scorer='nope' is not a registered scorer; known: .*tokenunit"):
        _prefill(model, torch.randint(0, 128, (1, 300)))


def test_schedule_layer_beyond_depth_is_a_config_error():
    """Regression (issue 30, bug 7): a schedule layer beyond the model's depth failed only at the first call,
    inside a BackendCompilerFailed whose message began with the model's repr; `slimpass.compile` knows the
    depth. Through torch.compile(backend="sliminfer") the first call still names the problem."""
    model = _model()
    with pytest.raises(ConfigError, match=r"cuts the input of layer\(s\) \[8\], but the model has 8 decoder layers"):
        slimpass.compile(model, options=_options({8: 64}))
    compiled = torch.compile(model, backend="sliminfer", dynamic=True, options=_options({8: 64}))
    with pytest.raises(Exception, match=r"cuts the input of layer\(s\) \[8\], but the model has 8 decoder layers"):
        _prefill(compiled, torch.randint(0, 128, (1, 300)))


def test_keep_sets_heat_map(tmp_path):
    pytest.importorskip("matplotlib")
    model = _model()
    slimpass.compile(model, options=_options(SCHEDULES["ratios"], dump_dir=str(tmp_path)))
    _prefill(model, torch.randint(0, 128, (1, 500)))
    kept = slimpass.last_keep_sets(model)
    # 500 tokens (the last block holds 4): budgets 250, 125, 62 keep the sinks, the last block and 29, 14, 6 blocks
    assert [k.layer for k in kept] == [2, 4, 6] and [k.tokens for k in kept] == [8 + 29 * 8 + 4, 8 + 14 * 8 + 4, 8 + 6 * 8 + 4]
    assert kept[0].blocks(8)[0][0] == 0 and kept[0].blocks(8)[0][-1] == 62  # sink and last block
    png = tmp_path / slimpass.compiled_graphs(model)[0].graph_id / "keep_sets.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = slimpass.plot_keep_sets(kept, str(tmp_path / "mine.png"), block_size=8, prompt_len=500, depth=DEPTH)
    assert (tmp_path / "mine.png").stat().st_size > 1000 and out.endswith("mine.png")


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**16),
    length=st.integers(64, 700),
    points=st.lists(st.integers(1, DEPTH - 1), min_size=1, max_size=3, unique=True),
    budgets=st.lists(st.one_of(st.integers(8, 600), st.floats(0.05, 1.0)), min_size=3, max_size=3),
    sink=st.integers(0, 2),
)
def test_random_schedules_match_reference(seed, length, points, budgets, sink):
    schedule = dict(zip(sorted(points), budgets))
    model = _model(seed=seed % 3)
    oracle = twin(model)
    slimpass.compile(model, options=_options(schedule, sink_blocks=sink))
    ids = torch.randint(0, 128, (1, length), generator=torch.Generator().manual_seed(seed))
    _assert_matches_reference(model, oracle, ids, _config(schedule, sink_blocks=sink))
    torch._dynamo.reset()


@pytest.mark.slow
def test_one_inductor_graph_for_all_lengths():
    """Inductor (which adds shape guards while lowering): six lengths in one schedule regime, one graph.

    Regression: the scorer viewed the keys sliced to whole blocks, and with a cold compile cache
    Inductor guarded on `length % block_size`, recompiling at 512 (compile caches off here, so the
    test sees what a fresh machine sees)."""
    model = _model()
    oracle = twin(model)
    schedule = {3: 0.5, 6: 0.25}
    slimpass.compile(model, options={**_options(schedule), "compiler": "inductor"})
    lengths = (300, 417, 512, 561, 701, 1000)
    with torch._inductor.config.patch(fx_graph_cache=False), torch._functorch.config.patch(enable_autograd_cache=False):
        for length in lengths:
            ids = torch.randint(0, 128, (1, length), generator=torch.Generator().manual_seed(length))
            _assert_matches_reference(model, oracle, ids, _config(schedule))
    records = slimpass.compiled_graphs(model)
    assert len(records) == 1 and records[0].calls["rewritten"] == len(lengths)


@pytest.mark.skipif(not HF_ALWAYS_MASKS, reason="only transformers that mask decode steps over the full prompt")
def test_plain_torch_compile_declines_where_decode_masks_cover_the_full_prompt():
    """transformers 5.17, torch.compile(backend="sliminfer") with a cache: the caller may decode with any
    cache, whose masks would cover the full prompt, so the prefill is not pruned (said in the record)."""
    model = _model()
    oracle = twin(model)
    compiled = torch.compile(model, backend="sliminfer", dynamic=True, options=_options(SCHEDULES["mixed"]))
    ids = torch.randint(0, 128, (1, 300), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = compiled(ids, logits_to_keep=1).logits[:, -1]
        want = oracle(ids, logits_to_keep=1).logits[:, -1]
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    declined = slimpass.compiled_graphs(model)[0].results[2].declined
    assert "masks decode steps over the full prompt length" in declined[0] and "slimpass.compile" in declined[0]
    assert slimpass.last_keep_sets(model) == []


def test_generate_with_eager_attention_declines_and_stays_exact():
    """HF's eager attention builds a decode mask over the full prompt: generate's prefill stays dense."""
    model = _model("qwen2", "eager")
    oracle = twin(model)
    slimpass.compile(model, options=_options(SCHEDULES["mixed"]))
    ids = torch.randint(0, 128, (1, 300), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
        want = oracle.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
    assert torch.equal(got, want)
    declined = slimpass.compiled_graphs(model)[0].results[2].declined
    assert "use eager attention" in declined[0] and "attn_implementation='sdpa'" in declined[0]
    # prefill alone (no cache writes) is pruned with eager attention too
    _assert_matches_reference(model, oracle, ids, _config(SCHEDULES["mixed"]))


def test_torch_compile_backend_by_name_prunes_once_the_length_is_dynamic():
    """torch.compile's first graph has a static length: declined (dense, exact); the next is dynamic and pruned."""
    model = _model()
    oracle = twin(model)
    compiled = torch.compile(model, backend="sliminfer", options=_options({3: 0.5}))
    first = torch.randint(0, 128, (1, 100))
    with torch.no_grad():
        torch.testing.assert_close(compiled(first, use_cache=False, logits_to_keep=1).logits,
                                   oracle(first, use_cache=False, logits_to_keep=1).logits, atol=1e-4, rtol=0)
    assert slimpass.last_keep_sets(model) == []
    assert "the prompt length is static in this graph" in slimpass.compiled_graphs(model)[0].results[2].declined[0]
    for length in (200, 333):
        ids = torch.randint(0, 128, (1, length), generator=torch.Generator().manual_seed(length))
        with torch.no_grad():
            got = compiled(ids, use_cache=False, logits_to_keep=1).logits[:, -1]
        want = reference.prefill(oracle, ids, _config({3: 0.5}))
        torch.testing.assert_close(got, want.logits, atol=1e-4, rtol=0)
        assert [k.tokens for k in slimpass.last_keep_sets(model)] == [k.tokens for k in want.keep_sets]


@pytest.mark.parametrize("route", ["slimpass.compile", "torch.compile"])
def test_a_short_prompt_first_does_not_break_later_long_prompts(route):
    """Regression (issue 30, bug 1): under the eager inner compiler, a short prompt's dense graph carried a
    `torch._check(length < min_prompt_len)` that became a guard only when Inductor re-traced it: every
    later long prompt reused the dense graph and failed "Expected cond to be True" until `restore`. The
    dense graph now guards on the length through Dynamo's shape environment, so long prompts recompile pruned."""
    model = _model()
    oracle = twin(model)
    schedule = SCHEDULES["ratios"]
    if route == "slimpass.compile":
        slimpass.compile(model, options=_options(schedule))
        run = model
    else:
        run = torch.compile(model, backend="sliminfer", dynamic=True, options=_options(schedule))
    for length in (20, 30, 300, 25, 500, 63, 64):
        ids = torch.randint(0, 128, (1, length), generator=torch.Generator().manual_seed(length))
        with torch.no_grad():
            got = run(ids, use_cache=False, logits_to_keep=1).logits[:, -1]
        want = reference.prefill(oracle, ids, _config(schedule))
        torch.testing.assert_close(got, want.logits, atol=1e-4, rtol=0, msg=f"{length=}")
        kept = slimpass.last_keep_sets(model)
        assert [k.tokens for k in kept] == [k.tokens for k in want.keep_sets], f"{length=}"
        assert_valid_keep_sets(kept, length)
        for ours, theirs in zip(kept, want.keep_sets):
            assert torch.equal(ours.positions, theirs.positions), f"{length=} layer {ours.layer}"
    kinds = [(r.kind, r.calls) for r in slimpass.compiled_graphs(model)]
    assert len(kinds) == 2, kinds  # one dense graph (below 64), one pruned (from 64)


@pytest.mark.parametrize("budget", [1.0, 150, 155, 159])
def test_a_budget_covering_the_prompt_keeps_every_token(budget):
    """Regression (issue 30, bug 3): `schedule={2: 1.0}` (or an int 150-159) on a 150-token prompt kept 134
    tokens (a middle block gone, logits 2.4e-2 off dense): the budget was counted in whole blocks with
    the partial last block as a full one. Default geometry (16-token blocks, one sink)."""
    model = tiny_model("llama", num_hidden_layers=4)
    oracle = twin(model)
    slimpass.compile(model, options={"prune": True, "compiler": "eager", "min_prompt_len": 64, "schedule": {2: budget}})
    ids = torch.randint(0, 128, (1, 150), generator=torch.Generator().manual_seed(0))
    got = _prefill(model, ids)
    with torch.no_grad():
        want = oracle(ids, use_cache=False, logits_to_keep=1).logits[:, -1]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    (kept,) = slimpass.last_keep_sets(model)
    assert torch.equal(kept.positions[0], torch.arange(150))
