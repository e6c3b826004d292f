"""Property tests over sequences of calls on one compiled model, against the reference (issue 30).

Each bug the probes found needed a particular history or an edge budget: a short prompt before a long
one (a dense graph reused), a prompt whose last block is partial (a miscompiled index), a budget at or
just above a stage's length (a block dropped). Hypothesis draws those histories: prompt lengths below
and above `min_prompt_len` in any order, budgets around the stage length, sinks, under the eager inner
compiler and under Inductor, and every call is checked for logits, kept positions (in range, sorted,
unique, nested, equal to the reference's) and the absence of errors.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import slimpass
from slimpass.config import SlimConfig
from slimpass.runtime import reference
from tests.conftest import assert_valid_keep_sets, tiny_model, twin

MIN_LEN = 64


def _check_call(model, oracle, ids, config) -> None:
    with torch.no_grad():
        got = model(ids, use_cache=False, logits_to_keep=1).logits[:, -1]
    want = reference.prefill(oracle, ids, config)
    length = ids.shape[1]
    torch.testing.assert_close(got, want.logits, atol=1e-4, rtol=0, msg=f"{length=}")
    kept = slimpass.last_keep_sets(model)
    assert_valid_keep_sets(kept, length)
    assert [k.layer for k in kept] == [k.layer for k in want.keep_sets], f"{length=}"
    for ours, theirs in zip(kept, want.keep_sets):
        assert torch.equal(ours.positions, theirs.positions), f"{length=} layer {ours.layer}"


def _budget_near(anchor: int):
    """A budget at, just below or just above `anchor` tokens, or a ratio near 1."""
    return st.one_of(st.integers(anchor - 17, anchor + 17).map(lambda b: max(b, 1)), st.floats(0.9, 1.0),
                     st.floats(0.1, 0.6))


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_call_sequences_under_the_eager_compiler(data):
    anchor = data.draw(st.integers(MIN_LEN, 400), label="stage length the budgets sit around")
    schedule = {2: data.draw(_budget_near(anchor), label="first budget"),
                5: data.draw(_budget_near(anchor // 2), label="second budget")}
    geometry = dict(block_size=8, unit_size=2, local_window=4, min_prompt_len=MIN_LEN,
                    sink_blocks=data.draw(st.integers(0, 2), label="sinks"))
    lengths = data.draw(st.lists(st.one_of(st.integers(9, MIN_LEN - 1), st.integers(MIN_LEN, 500), st.just(anchor),
                                           st.integers(anchor - 9, anchor + 9)),
                                 min_size=2, max_size=5), label="prompt lengths, in call order")
    model = tiny_model("llama", num_hidden_layers=8, max_position_embeddings=4096, seed=anchor % 3)
    oracle = twin(model)
    slimpass.compile(model, options={"prune": True, "compiler": "eager", "schedule": schedule, **geometry})
    config = SlimConfig(prune=True, schedule=schedule, **geometry)
    for step, length in enumerate(lengths):
        ids = torch.randint(0, 128, (1, length), generator=torch.Generator().manual_seed(length * 7 + step))
        _check_call(model, oracle, ids, config)
    torch._dynamo.reset()


_INDUCTOR: dict[str, object] = {}


@pytest.mark.slow
@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(lengths=st.lists(st.one_of(st.integers(20, MIN_LEN - 1), st.integers(MIN_LEN, 400), st.sampled_from([150, 160, 161])),
                        min_size=2, max_size=4))
def test_call_sequences_under_inductor(lengths):
    """One Inductor-compiled model for every example (its graphs carry over: later examples run on what
    earlier ones compiled, as a server's calls would); budgets at the 150-160 token stage lengths."""
    options = {"prune": True, "compiler": "inductor", "min_prompt_len": MIN_LEN, "schedule": {2: 150, 3: 0.25}}
    if not _INDUCTOR:
        model = tiny_model("llama", num_hidden_layers=4, max_position_embeddings=4096)
        _INDUCTOR.update(oracle=twin(model), model=slimpass.compile(model, options=options))
    config = SlimConfig(**{k: v for k, v in options.items() if k != "compiler"})
    for length in lengths:
        ids = torch.randint(0, 128, (1, length), generator=torch.Generator().manual_seed(length))
        _check_call(_INDUCTOR["model"], _INDUCTOR["oracle"], ids, config)
