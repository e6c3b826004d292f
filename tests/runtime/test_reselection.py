"""Decode-time reselection: the compiled decode graphs (reselect_kv + reselection.reselect_attention) against
the reference loop's plain-Python rule, with reselection on and off, and the op's pieces on their own."""

from __future__ import annotations

import logging
from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import slimpass
from slimpass.config import SlimConfig
from slimpass.hf_compat import cache_argument
from slimpass.runtime import reference
from slimpass.runtime.reselection import assign_slots, attended_tokens, candidate_blocks
from tests.conftest import tiny_model, twin

GEOMETRY = dict(block_size=8, unit_size=2, min_prompt_len=64)
SCHEDULE = {2: 0.5, 4: 0.25}


def _options(**extra):
    return {"prune": True, "schedule": SCHEDULE, "compiler": "eager", "reselect": True, "active_tokens": 32,
            **GEOMETRY, **extra}


def _config(**extra):
    return SlimConfig(**{**_options(**extra), "compiler": "inductor"})


def _ids(batch, length):
    return torch.randint(0, 128, (batch, length), generator=torch.Generator().manual_seed(length + batch))


def _compiled(family="llama", attn="sdpa", **options):
    """A tiny 6-layer model compiled with reselection (`options` on top) and its uncompiled twin."""
    model = tiny_model(family, attn, num_hidden_layers=6)
    oracle = twin(model)
    slimpass.compile(model, options=_options(**options))
    return model, oracle


def _generate(model, ids, new_tokens=10):
    cache = slimpass.SlimCache(model.config)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False,
                             **{cache_argument(model): cache})
    return out, cache


@pytest.mark.parametrize(("family", "unit"), [("llama", 1), ("qwen2", 1), ("llama", 2)])
def test_compiled_reselection_matches_reference(family, unit):
    """Scoring against the cached keys (reselect_unit=1) or against means of 2 keys."""
    model, oracle = _compiled(family, reselect_unit=unit)
    differs = 0
    for batch, length in ((1, 120), (2, 300), (1, 517), (2, 800)):
        ids = _ids(batch, length)
        got, cache = _generate(model, ids)
        trace = []
        want = reference.generate(oracle, ids, _config(reselect_unit=unit), max_new_tokens=10, trace=trace)
        assert torch.equal(got, want), (batch, length)
        assert all((layer.reselection.unit_keys is None) == (unit == 1) for layer in cache.layers if layer.reselection is not None)
        for index, active in trace[-1].items():  # the reference reselects at every slim layer
            layer = cache.layers[index]
            if layer.reselection is not None:
                assert [sorted(row) for row in layer.reselection.active.tolist()] == active, (length, index)
            else:  # not armed: every middle block of the layer's cached prompt fits the active budget
                last = (layer.prompt_positions.shape[1] - 1) // 8
                assert all(row == list(range(1, last)) for row in active), (length, index)
        assert any(layer.reselection is not None for layer in cache.layers)
        differs += not torch.equal(want, reference.generate(oracle, ids, _config(reselect=False, reselect_unit=unit),
                                                            max_new_tokens=10))
    assert differs  # reselection changed some answer: the comparison above is not the plain decode's


def test_swap_accounting_matches_reference_trace():
    model, oracle = _compiled(gamma=1.0)
    ids = _ids(1, 600)
    _, cache = _generate(model, ids, new_tokens=12)
    trace = []
    reference.generate(oracle, ids, _config(gamma=1.0), max_new_tokens=12, trace=trace)
    report = cache.reselection_report()
    block_bytes = 2 * model.config.num_key_value_heads * 8 * 16 * 4  # K + V, 8 tokens, head dim 16, float32
    for index, row in report.items():
        changes = sum(len(set(now[index][0]) - set(before[index][0])) for before, now in zip(trace, trace[1:]))
        assert row["steps"] == 11 and row["active_blocks"] == 32 // 8
        assert row["swapped_blocks"] == changes
        assert row["bytes_moved"] == changes * block_bytes
    assert any(row["swapped_blocks"] for row in report.values())


def test_gamma_zero_keeps_the_first_active_set():
    model, oracle = _compiled(gamma=0.0)
    ids = _ids(2, 400)
    got, cache = _generate(model, ids)
    trace = []
    assert torch.equal(got, reference.generate(oracle, ids, _config(gamma=0.0), max_new_tokens=10, trace=trace))
    assert all(step == trace[0] for step in trace)
    assert all(row["swapped_blocks"] == 0 for row in cache.reselection_report().values())


def test_large_active_budget_changes_nothing():
    """A layer whose cached prompt fits in active_tokens is not armed; the answer is the plain decode's."""
    model, oracle = _compiled(active_tokens=4096)
    ids = _ids(1, 300)
    got, cache = _generate(model, ids)
    assert cache.reselection_report() == {}
    assert torch.equal(got, reference.generate(oracle, ids, _config(active_tokens=4096), max_new_tokens=10))
    assert torch.equal(got, reference.generate(oracle, ids, _config(reselect=False), max_new_tokens=10))


def test_eager_attention_declines_and_decodes_as_the_model(caplog):
    """Eager attention: pruning declines for generate, so no layer is armed and reselection says so."""
    model, oracle = _compiled("llama", "eager")
    ids = _ids(1, 300)
    with caplog.at_level(logging.INFO, logger="slimpass"):
        got, cache = _generate(model, ids)
    with torch.no_grad():
        want = oracle.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False)
    assert torch.equal(got, want)
    assert cache.reselection_report() == {}
    decode = [g for g in slimpass.compiled_graphs(model) if g.kind == "decode"]
    declined = [d for g in decode for r in g.results if r.name == "reselect_kv" for d in r.declined]
    assert declined and all("no armed SlimCache layers" in d for d in declined)


def test_candidate_blocks_prefer_earlier_on_ties_and_skip_sinks_and_last():
    scores = torch.tensor([[9.0, 1.0, 5.0, 5.0, 0.0, 5.0, 9.0]])  # 7 full blocks of 4; prompt 28 tokens
    assert candidate_blocks(scores, 28, 2, 4, 1).tolist() == [[2, 3]]  # block 0 sink, block 6 last
    assert candidate_blocks(scores, 28, 3, 4, 1).tolist() == [[2, 3, 5]]
    assert candidate_blocks(scores, 30, 3, 4, 2).tolist() == [[2, 3, 6]]  # last block 7 (partial): 6 competes


def test_attended_tokens_layout():
    active = torch.tensor([[2, 5], [1, 3]])
    index = attended_tokens(active, prompt_tokens=30, length=33, block_size=4, sink_blocks=1)
    assert index.tolist() == [
        [0, 1, 2, 3, 8, 9, 10, 11, 20, 21, 22, 23, 28, 29, 30, 31, 32],
        [0, 1, 2, 3, 4, 5, 6, 7, 12, 13, 14, 15, 28, 29, 30, 31, 32],
    ]


def _slots_oracle(active: list[int], best: list[int]) -> list[int]:
    """assign_slots in plain Python: staying blocks keep their slots; the freed slots, in ascending order,
    take the entering blocks in ascending order."""
    entering = iter(sorted(set(best) - set(active)))
    return [block if block in best else next(entering) for block in active]


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_assign_slots_keeps_staying_blocks_in_place(data):
    """Checked against the plain-Python rule, batched, on random active sets and candidate sets of every
    overlap (all new, none new, some)."""
    count = data.draw(st.integers(1, 12), label="count")
    blocks = data.draw(st.integers(count, 3 * count), label="blocks")
    rows = data.draw(st.integers(1, 3), label="rows")
    actives, bests = [], []
    for _ in range(rows):
        actives.append(data.draw(st.permutations(range(blocks)))[:count])  # slots hold blocks in any order
        bests.append(sorted(data.draw(st.permutations(range(blocks)))[:count]))  # candidates ascending
    got = assign_slots(torch.tensor(actives), torch.tensor(bests))
    assert got.tolist() == [_slots_oracle(a, b) for a, b in zip(actives, bests)]


@pytest.mark.parametrize("extra", [{"reselect": False}, {}, {"static_decode": True, "decode_capacity": 4}],
                         ids=["pruned", "reselect", "reselect-static"])
def test_beam_search_scores_match_the_reference(extra):
    """Beam search reorders the cache every step; each beam's active sets (and, with static_decode, its rows
    of the buffers, in place) must move with its K/V. Oracle: the reference loop fed each returned beam's
    tokens scores them as beam search did (sum of log-probs).

    Regression: `SlimLayer.reorder_cache` reordered K/V only, so a beam kept its own stale active set after
    taking another beam's history (scores off by 0.03 here), and static_decode refused beam search."""
    model, oracle = _compiled(active_tokens=16, **extra)
    ids, beams, new = _ids(2, 300), 3, 8  # two prompts: beams reorder within each
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                             num_beams=beams, num_return_sequences=beams, length_penalty=0.0, do_sample=False,
                             output_scores=True, return_dict_in_generate=True,
                             **{cache_argument(model): slimpass.SlimCache(model.config)})
    config = SlimConfig(**{**_options(active_tokens=16, **extra), "compiler": "inductor"})
    for index, (row, score) in enumerate(zip(out.sequences, out.sequences_scores)):
        tokens = row[None, ids.shape[1]:]
        logits = []
        prompt = ids[index // beams][None]
        reference.generate(oracle, prompt, config, max_new_tokens=new, logits=logits, forced=tokens)
        logprobs = torch.stack(logits, 1).log_softmax(-1).gather(-1, tokens[..., None])
        torch.testing.assert_close(logprobs.sum(), score, rtol=1e-4, atol=1e-4)


def _reselection_oracle(scores: list[list[float]], n: int, total: int, config: SlimConfig) -> tuple[list, list, int]:
    """The reference's reselection rule in plain Python, one row at a time, for one step from no active set
    and one more step: (attended positions of both steps, active sets after them, blocks swapped in)."""
    block, sink = config.block_size, config.sink_blocks
    last = (n - 1) // block

    def candidates(row):
        middle = sorted(range(sink, last), key=lambda j: (-row[j], j))[:config.active_tokens // block]
        return sorted(middle)
    steps, swapped = [], 0
    active = [candidates(row) for row in scores[0]]
    for step_scores in scores:
        rows = []
        for b, row in enumerate(step_scores):
            blocks = list(range(min(sink, last))) + active[b]
            rows.append([t for j in blocks for t in range(j * block, (j + 1) * block)] + list(range(last * block, total)))
            new = candidates(row)
            if new and len(set(active[b]) & set(new)) < config.gamma * len(new):
                swapped += len(set(new) - set(active[b]))
                active[b] = new
        steps.append(rows)
    return steps, active, swapped


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_batched_reselection_matches_the_per_row_rule(data):
    """reference.Reselection (batched tensors) against the per-row rule above: random scores with ties
    (few distinct values), prompts with and without a partial last block, every gamma."""
    block = data.draw(st.sampled_from([2, 4]), label="block")
    n = data.draw(st.integers(block, 12 * block), label="n")
    config = SlimConfig(prune=True, reselect=True, block_size=block, unit_size=block, local_window=block,
                        sink_blocks=data.draw(st.integers(0, 2), label="sinks"),
                        active_tokens=block * data.draw(st.integers(1, 6), label="active"),
                        gamma=data.draw(st.sampled_from([0.0, 0.5, 0.75, 1.0]), label="gamma"))
    rows, heads, dim = data.draw(st.integers(1, 3), label="rows"), 1, 2
    scores = [[[float(data.draw(st.integers(0, 3))) for _ in range(n // block)] for _ in range(rows)]
              for _ in range(2)]
    reselection = reference.Reselection(torch.zeros(rows, heads, n, dim), config)
    keys = torch.zeros(rows, heads, n + 3, dim)
    got = []
    for step in scores:  # the scorer is replaced by the drawn scores
        with mock.patch.object(reference, "block_scores", lambda q, k, c, s=step: torch.tensor(s)):
            got.append(reselection(torch.zeros(rows, heads * 2, 1, dim), keys).tolist())
    want, active, swapped = _reselection_oracle(scores, n, n + 3, config)
    assert got == want
    assert reselection.active == active and reselection.swapped_in == swapped
