"""sink_selection: row selections move above row-wise ops, never past ops that mix rows; results unchanged.

Oracles: the model's eager forward (pruning off), the reference loop (pruning on), and, for the rule
table, the unedited FX graph on random inputs.
"""

from __future__ import annotations

import operator
from types import SimpleNamespace

import pytest
import torch
import torch.fx
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

import slimpass
from slimpass.config import SlimConfig
from slimpass.passes.base import PassContext
from slimpass.passes.graph_utils import module_path
from slimpass.passes.sink_selection import SinkSelection
from slimpass.runtime import pruning_ops, reference
from tests.conftest import tiny_model, twin

GEOMETRY = dict(block_size=8, unit_size=2, local_window=4, min_prompt_len=64)


def _result(record, name="sink_selection"):
    return next(r for r in record["ctx"].results if r.name == name)


def _linear_inputs(gm: torch.fx.GraphModule, path_prefix: str) -> dict[str, torch.fx.Node]:
    """module path of each linear under `path_prefix` -> its input node."""
    return {module_path(n): n.args[0] for n in gm.graph.nodes
            if n.target is torch._C._nn.linear and module_path(n).startswith(path_prefix)}


def _selected(node: torch.fx.Node) -> bool:
    """Whether `node` reads its rows from a selection (take_tokens or a slice) through row-wise ops."""
    seen, stack = set(), [node]
    while stack:
        n = stack.pop()
        if n in seen or not isinstance(n, torch.fx.Node):
            continue
        seen.add(n)
        rows = n.args[1] if n.target is operator.getitem else None
        if n.target is pruning_ops.take_tokens or (isinstance(rows, tuple) and Ellipsis not in rows
                                                    and any(p != slice(None) for p in rows)):
            return True
        if n.target is torch._C._nn.scaled_dot_product_attention or n.op == "placeholder":
            continue
        stack.extend(n.all_input_nodes)
    return False


@pytest.mark.parametrize("length", [64, 65, 72, 100, 257, 600])
@pytest.mark.parametrize("cut", [3, 5])
def test_pruning_layer_runs_o_proj_and_mlp_on_kept_rows(capture, length, cut):
    """Cut at 3: layer 2 on the kept rows, layer 5 on the logits row. Cut at 5: layer 4 on the kept rows,
    then layer 5 (already on the kept rows) on the logits row: the moves chain."""
    model = tiny_model(num_hidden_layers=6, max_position_embeddings=4096)
    oracle = twin(model)
    schedule = {cut: 0.5}
    backend = capture(prune=True, schedule=schedule, **GEOMETRY)
    ids = torch.randint(0, 128, (1, length), generator=torch.Generator().manual_seed(length))
    torch._dynamo.mark_dynamic(ids, 1)
    with torch.no_grad():
        got = torch.compile(model, backend=backend)(ids, use_cache=False, logits_to_keep=1).logits[:, -1]
    want = reference.prefill(oracle, ids, SlimConfig(prune=True, schedule=schedule, **GEOMETRY))
    torch.testing.assert_close(got, want.logits, atol=1e-4, rtol=0)
    record = backend.graphs[-1]
    result = _result(record)
    scoring = cut - 1
    assert f"layer {scoring}: 4 matmuls" in result.summary and "layer 5: 4 matmuls" in result.summary, result.summary
    inputs = _linear_inputs(record["after"], f"model.layers.{scoring}.")
    assert sorted(p.split(".", 3)[3] for p in inputs) == ["mlp.down_proj", "mlp.gate_proj", "mlp.up_proj",
                                                          "self_attn.k_proj", "self_attn.o_proj",
                                                          "self_attn.q_proj", "self_attn.v_proj"]
    # q/k/v need every row (the keys and values of all tokens, and the scores); the rest only the kept ones
    assert {p.rsplit(".", 1)[1] for p, n in inputs.items() if _selected(n)} == {"o_proj", "gate_proj", "up_proj",
                                                                                "down_proj"}


def test_pruning_off_last_layer_runs_on_the_logits_row(capture):
    model = tiny_model(num_hidden_layers=3)
    oracle = twin(model)
    backend = capture(fuse_projections=False)  # the recompiled graphs would fuse gate/up: one linear fewer
    compiled = torch.compile(model, backend=backend)
    for length in (1, 2, 9, 40):
        ids = torch.randint(0, 128, (1, length), generator=torch.Generator().manual_seed(length))
        with torch.no_grad():
            got = compiled(ids, logits_to_keep=1).logits
            want = oracle(ids, logits_to_keep=1).logits
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    record = backend.graphs[-1]
    assert "layer 2: 4 matmuls" in _result(record).summary
    inputs = _linear_inputs(record["after"], "model.layers.")
    assert {p for p, n in inputs.items() if _selected(n)} == {
        "model.layers.2.self_attn.o_proj", "model.layers.2.mlp.gate_proj", "model.layers.2.mlp.up_proj",
        "model.layers.2.mlp.down_proj"}


def test_full_logits_and_hidden_states_outputs_stop_the_sinking(capture):
    """Logits of every position (logits_to_keep=0 slices `0:`, which selects nothing): no move. Hidden
    states returned: the body graph returns the last layer's output, so it stays whole."""
    model = tiny_model(num_hidden_layers=2)
    oracle = twin(model)
    ids = torch.randint(0, 128, (1, 24))
    for kwargs in ({"logits_to_keep": 0}, {"logits_to_keep": 1, "output_hidden_states": True}):
        torch._dynamo.reset()
        backend = capture()
        with torch.no_grad():
            got = torch.compile(model, backend=backend)(ids, **kwargs)
            want = oracle(ids, **kwargs)
        torch.testing.assert_close(got.logits, want.logits, atol=1e-5, rtol=0)
        if "output_hidden_states" in kwargs:
            for ours, theirs in zip(got.hidden_states, want.hidden_states, strict=True):
                torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
        decoder = [g for g in backend.graphs if g.get("ctx") and g["ctx"].layer_map is not None]
        assert decoder and all(_result(g).replaced == 0 for g in decoder), [_result(g).summary for g in decoder]


def test_option_off(capture):
    backend = capture(sink_selection=False)
    with torch.no_grad():
        torch.compile(tiny_model(), backend=backend)(torch.randint(0, 128, (1, 16)))
    result = _result(backend.graphs[-1])
    assert result.replaced == 0 and result.declined == ["off (sink_selection=False)"]


# -- the rule table on small FX graphs --------------------------------------------------------------


def _run_pass(fn, *inputs):
    """Trace `fn`, record fake values, run the pass; returns (graph module, pass result)."""
    gm = torch.fx.symbolic_trace(fn)
    FakeTensorProp(gm).propagate(*inputs)
    ctx = PassContext(SlimConfig(), list(inputs), layer_map=SimpleNamespace(kind="prefill", layers=[]))
    result = SinkSelection(SlimConfig())(gm, ctx)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm, result


@pytest.mark.parametrize("case", ["row_wise", "token_reduction", "softmax_over_tokens", "used_twice"])
def test_rules(case):
    def row_wise(x, w):
        y = torch.nn.functional.linear(x, w)
        z = y.to(torch.float32).pow(2).mean(-1, keepdim=True)
        out = (y * torch.rsqrt(z + 1e-6)).transpose(0, 1).contiguous().transpose(0, 1)
        return out[:, -3:, :]

    def token_reduction(x, w):
        y = torch.nn.functional.linear(x, w)
        return (y - y.mean(1, keepdim=True))[:, -3:, :]  # every row reads all rows

    def softmax_over_tokens(x, w):
        return torch.softmax(torch.nn.functional.linear(x, w), dim=1)[:, -3:, :]

    def used_twice(x, w):
        y = torch.nn.functional.linear(x, w) * 2
        return y[:, -3:, :], y.sum()

    fn = {"row_wise": row_wise, "token_reduction": token_reduction, "softmax_over_tokens": softmax_over_tokens,
          "used_twice": used_twice}[case]
    x, w = torch.randn(2, 16, 8), torch.randn(5, 8)
    want = fn(x, w)
    gm, result = _run_pass(fn, x, w)
    got = gm(x, w)
    torch.testing.assert_close(got, want)
    linear = next(n for n in gm.graph.nodes if n.target is torch.nn.functional.linear)
    assert _selected(linear.args[0]) is (case == "row_wise"), gm.code
    if case == "row_wise":
        assert result.replaced == 10  # linear, to, pow, mean, add, rsqrt, mul, transpose, contiguous, transpose
    elif case == "token_reduction":
        assert result.replaced == 1  # the subtraction moves; the mean over tokens does not
    else:
        assert result.replaced == 0
