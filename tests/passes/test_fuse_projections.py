"""fuse_projections: q/k/v and gate/up become one linear call each; outputs unchanged; parameters re-homed
into one stacked tensor without a copy left behind.

Oracles: the model's own eager forward (an independent twin), and the unedited graph's structure.
"""

from __future__ import annotations

import pytest
import torch

import slimpass
from slimpass.config import ConfigError, SlimConfig
from slimpass.passes.fuse_projections import _Projection, _unfusable
from slimpass.passes.graph_utils import module_path
from tests.conftest import tiny_model, twin

LAYERS = 3


def _result(record):
    return next(r for r in record["ctx"].results if r.name == "fuse_projections")


def _linears(gm) -> int:
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target is torch._C._nn.linear)


def _compiled(capture, family, **options):
    """A model whose first compiled graph stacked its parameters, compiled afresh (the graphs that fuse)."""
    model = tiny_model(family, num_hidden_layers=LAYERS)
    oracle = twin(model)
    first = capture(**options)
    with torch.no_grad():
        torch.compile(model, backend=first)(torch.randint(0, 128, (1, 5)))
    torch._dynamo.reset()
    backend = capture(**options)
    return model, oracle, backend, torch.compile(model, backend=backend)


def test_first_graph_stacks_the_parameters_and_stays_unfused(capture):
    """AOTAutograd fakifies inputs as Dynamo saw them: the parameters move only after the first graph."""
    model = tiny_model("llama", num_hidden_layers=LAYERS)
    oracle, backend = twin(model), capture()
    ids = torch.randint(0, 128, (2, 33), generator=torch.Generator().manual_seed(0))
    attention = model.model.layers[0].self_attn
    with torch.no_grad():
        got = torch.compile(model, backend=backend)(ids).logits
        torch.testing.assert_close(got, oracle(ids).logits, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model(ids).logits, oracle(ids).logits, atol=1e-5, rtol=1e-5)
    result = _result(backend.graphs[0])
    assert (result.matched, result.replaced) == (2 * LAYERS, 0)
    assert "6 groups stacked after this graph" in result.summary
    assert _linears(backend.graphs[0]["after"]) == 7 * LAYERS + 1
    assert attention.k_proj.weight.untyped_storage().data_ptr() == attention.q_proj.weight.untyped_storage().data_ptr()


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])  # qwen2: q/k/v with biases
def test_fused_forward_matches_eager(capture, family):
    """Lengths 1, 7, 64 and 300 (a static graph, then the dynamic one), batch 2: logits equal eager's."""
    model, oracle, backend, compiled = _compiled(capture, family)
    for length in (1, 7, 64, 300):
        ids = torch.randint(0, 128, (2, length), generator=torch.Generator().manual_seed(length))
        with torch.no_grad():
            got, want = compiled(ids).logits, oracle(ids).logits
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=f"{length=}")
    assert backend.graphs
    for record in backend.graphs:
        result = _result(record)
        assert (result.matched, result.replaced, result.inserted) == (2 * LAYERS, 5 * LAYERS, 4 * LAYERS)
        assert result.declined == []
        assert _linears(record["before"]) == 7 * LAYERS + 1  # + lm_head
        assert _linears(record["after"]) == 4 * LAYERS + 1
        fused = sorted(module_path(n) for n in record["after"].graph.nodes
                       if n.target is torch._C._nn.linear and str(n.args[1].target).startswith("slimpass_fused_"))
        assert fused == sorted(f"model.layers.{i}.{part}" for i in range(LAYERS) for part in ("mlp", "self_attn"))


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_parameters_become_rows_of_one_tensor(capture, family):
    """The model's parameters move into the stacked tensors (no second copy of the weights), the eager
    forward of the same model object is unchanged, and load_state_dict still writes through to the graph."""
    model, oracle, backend, compiled = _compiled(capture, family)
    ids = torch.randint(0, 128, (1, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        compiled(ids)
        attention = model.model.layers[1].self_attn
        parts = [attention.q_proj.weight, attention.k_proj.weight, attention.v_proj.weight]
        storage = {p.untyped_storage().data_ptr() for p in parts}
        assert len(storage) == 1
        assert [p.storage_offset() for p in parts] == [0, parts[0].numel(), parts[0].numel() + parts[1].numel()]
        if family == "qwen2":
            biases = [attention.q_proj.bias, attention.k_proj.bias, attention.v_proj.bias]
            assert len({b.untyped_storage().data_ptr() for b in biases}) == 1
        mlp = model.model.layers[0].mlp
        assert mlp.gate_proj.weight.untyped_storage().data_ptr() == mlp.up_proj.weight.untyped_storage().data_ptr()
        assert isinstance(attention.q_proj.weight, torch.nn.Parameter)
        torch.testing.assert_close(model(ids).logits, oracle(ids).logits, atol=1e-5, rtol=1e-5)

        for name, tensor in oracle.named_parameters():  # new weights, written through load_state_dict
            tensor.mul_(1.5 if "proj" in name else 1.0)
        model.load_state_dict(oracle.state_dict())
        torch.testing.assert_close(compiled(ids).logits, oracle(ids).logits, atol=1e-5, rtol=1e-5)
    assert len(backend.graphs) == 1  # no recompile: the weights only changed values
    assert _result(backend.graphs[0]).replaced == 5 * LAYERS


def test_decode_graph_fuses_with_the_parameters_stacked_by_the_prefill(capture):
    """generate: the prefill graph stacks the parameters, the decode graph fuses them, reading their storage."""
    model = tiny_model("llama", num_hidden_layers=LAYERS)
    oracle, backend = twin(model), capture()
    model.forward = torch.compile(model.forward, backend=backend)
    ids = torch.randint(0, 128, (1, 30), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        got = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False)
        want = oracle.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False)
    assert torch.equal(got, want)
    assert len(backend.graphs) >= 2
    assert _result(backend.graphs[0]).replaced == 0
    for record in backend.graphs[1:]:
        assert _result(record).replaced == 5 * LAYERS
        buffers = dict(record["after"].named_buffers())
        attention = model.model.layers[0].self_attn
        assert buffers["slimpass_fused_0_weight"].data_ptr() == attention.q_proj.weight.data_ptr()
        assert buffers["slimpass_fused_0_weight"].shape == (64 + 32 + 32, 64)


def test_declines_under_gradients(capture):
    """With gradients on, a stacked weight would cut the parameters out of the backward: the pass declines."""
    model = tiny_model("llama", num_hidden_layers=LAYERS)
    backend = capture()
    ids = torch.randint(0, 128, (1, 20), generator=torch.Generator().manual_seed(3))
    torch.compile(model, backend=backend)(ids).logits.sum().backward()
    result = _result(backend.graphs[0])
    assert result.replaced == 0 and "gradients are enabled" in result.declined[0]
    assert model.model.layers[0].self_attn.q_proj.weight.grad is not None
    assert _linears(backend.graphs[0]["after"]) == 7 * LAYERS + 1


def test_off_by_config(capture):
    model, oracle, backend, compiled = _compiled(capture, "llama", fuse_projections=False)
    ids = torch.randint(0, 128, (1, 20), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids).logits, oracle(ids).logits)
    assert _result(backend.graphs[0]).replaced == 0
    assert _linears(backend.graphs[0]["after"]) == 7 * LAYERS + 1


def test_unfusable_names_each_reason():
    """The checks that keep a group apart, each with its reason (weights as the graph's inputs would be)."""
    def projection(rows=4, width=8, dtype=torch.float32, bias=False, parameter=True):
        weight = torch.randn(rows, width, dtype=dtype)
        make = torch.nn.Parameter if parameter else (lambda t, requires_grad=False: t)
        return _Projection(None, make(weight, requires_grad=False),
                           make(torch.randn(rows, dtype=dtype), requires_grad=False) if bias else None)

    a = projection()
    assert _unfusable([projection(), projection()]) is None
    assert "used twice" in _unfusable([a, _Projection(None, a.weight, None)])
    assert "plain floating-point parameter" in _unfusable([projection(), projection(parameter=False)])
    assert "input widths" in _unfusable([projection(), projection(width=16)])
    assert "dtype or device" in _unfusable([projection(), projection(dtype=torch.float64)])
    assert "bias and some do not" in _unfusable([projection(), projection(bias=True)])
    base = torch.nn.Parameter(torch.randn(8, 8), requires_grad=False)
    swapped = [_Projection(None, torch.nn.Parameter(base[4:], requires_grad=False), None),
               _Projection(None, torch.nn.Parameter(base[:4], requires_grad=False), None)]
    assert "another layout" in _unfusable(swapped)
    with torch.enable_grad():
        trained = [_Projection(None, torch.nn.Parameter(torch.randn(4, 8)), None) for _ in range(2)]
        assert "gradients are enabled" in _unfusable(trained)


def test_pruned_reselecting_generate_matches_the_unfused_one():
    """End to end with pruning and reselection: fusing changes nothing in the tokens."""
    model = tiny_model("llama", num_hidden_layers=6)
    other = twin(model)
    options = dict(compiler="eager", prune=True, reselect=True, active_tokens=32, block_size=8, unit_size=2,
                   min_prompt_len=64)
    slimpass.compile(model, options=options)
    slimpass.compile(other, options={**options, "fuse_projections": False})
    ids = torch.randint(0, 128, (1, 300), generator=torch.Generator().manual_seed(5))
    outs = []
    for m in (model, other):
        cache = slimpass.SlimCache(m.config)
        with torch.no_grad():
            outs.append(m.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                                   past_key_values=cache))
    assert torch.equal(outs[0], outs[1])
    fused = [r.replaced for g in slimpass.compiled_graphs(model) for r in g.results if r.name == "fuse_projections"]
    assert fused[0] == 0 and fused[1:] and all(n == 5 * 6 for n in fused[1:])  # the prefill graph stacks


def test_config_checks_the_flag():
    with pytest.raises(ConfigError, match="fuse_projections"):
        SlimConfig(fuse_projections="yes")


def test_replaced_parameter_runs_the_unfused_graph(capture):
    """A parameter replaced (not written through) leaves the stacked tensor stale: the runtime guard sends the
    call to the unfused graph, whose output follows the new weight."""
    model, oracle, backend, compiled = _compiled(capture, "llama")
    ids = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids).logits, oracle(ids).logits, atol=1e-5, rtol=1e-5)
        record = backend.graphs[0]
        assert sum(1 for g in record["ctx"].guards if g.role == "data_ptr") == 5 * LAYERS
        fresh = torch.randn_like(oracle.model.layers[1].self_attn.k_proj.weight)
        oracle.model.layers[1].self_attn.k_proj.weight.copy_(fresh)
        model.model.layers[1].self_attn.k_proj.weight = torch.nn.Parameter(fresh.clone())
        torch.testing.assert_close(compiled(ids).logits, oracle(ids).logits, atol=1e-5, rtol=1e-5)
    assert len(backend.graphs) == 1  # no recompile: the fused graph's guard chose its unfused twin
    stacked = dict(record["after"].named_buffers())["slimpass_fused_2_weight"]  # layer 1's q/k/v
    q_rows = model.config.num_attention_heads * (model.config.hidden_size // model.config.num_attention_heads)
    assert not torch.equal(stacked[q_rows:q_rows + fresh.shape[0]], fresh)  # the fused path would read stale k
