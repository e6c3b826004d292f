"""`rewrite_attention`: masked prefill attention becomes mask-free causal attention, and stays exact.

Every family x attention implementation is compiled through the `capture` backend (compiler
"eager"), so each test reads the graph after the passes and the pass's own `PassResult`. The
structural checks are derived from the graph, not from the pass: no N x N tensor reaches an
attention call, and keys/values enter it with `num_key_value_heads` heads (no repeat_kv copy).
"""

from __future__ import annotations

import functools

import networkx as nx
import pytest
import torch
import torch.fx

import slimpass
import slimpass.runtime.attention  # noqa: F401  (registers slimpass::causal_attention)
from slimpass.passes.graph_utils import arg, fake, input_source, is_op, nx_view, same_size

from ..conftest import FAMILIES, tiny_model, twin

# 2: a static graph of a tiny prompt; 17 makes Dynamo recompile with a symbolic length that 65 (one
# token over a 64-token block) reuses. None of them equals head_dim (16) or hidden_size (64), so an
# N x N shape cannot be confused with a weight.
LENGTHS = (2, 17, 65)
ATOL = 1e-4
LAYERS = 2
KV_HEADS = 2


CAUSAL = torch.ops.slimpass.causal_attention.default


def _attention_calls(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    """SDPA calls, eager softmax nodes and slimpass causal-attention calls, in graph order."""
    return [
        n for n in gm.graph.nodes
        if is_op(n, "sdpa") or is_op(n, "softmax") or (n.op == "call_function" and n.target is CAUSAL)
    ]


def _square(node: torch.fx.Node, n) -> bool:
    """Whether `node` is a tensor whose two trailing dims are both the sequence length `n`."""
    value = fake(node)
    return (
        isinstance(value, torch.Tensor) and value.dim() >= 2
        and same_size(value.shape[-1], n) and same_size(value.shape[-2], n)
    )


def _seq_len(gm: torch.fx.GraphModule):
    """The query length of a graph (int or SymInt), read off its first attention call."""
    return fake(_attention_calls(gm)[0].args[0]).shape[-2]


def _square_into_attention(gm: torch.fx.GraphModule) -> list[str]:
    """Names of N x N tensors that an attention call reads, directly or through other nodes."""
    n, view = _seq_len(gm), nx_view(gm.graph)
    found = set()
    for call in _attention_calls(gm):
        found |= {node.name for node in nx.ancestors(view, call) if _square(node, n)}
    return sorted(found)


def _kv_inputs(call: torch.fx.Node) -> tuple[torch.fx.Node, torch.fx.Node]:
    if call.target is CAUSAL:
        return call.args[1], call.args[2]
    return arg(call, 1, "key"), arg(call, 2, "value")


def _repeat_kv_copies(gm: torch.fx.GraphModule) -> list[str]:
    """5-D expands (HF's repeat_kv: x[:, :, None].expand(b, h, r, n, d)) that feed an attention call."""
    view = nx_view(gm.graph)
    hits = set()
    for call in _attention_calls(gm):
        hits |= {a.name for a in nx.ancestors(view, call) if is_op(a, "expand") and fake(a).dim() == 5}
    return sorted(hits)


def _compile(model: torch.nn.Module, capture, **options):
    """torch.compile through the capture backend, passing the model so its config and records are used.
    Without `fuse_projections`: its guards (on the parameters of graphs after the first) would mix with the
    ones these tests count."""
    backend = capture(**{"fuse_projections": False, **options})
    return torch.compile(model, backend=functools.partial(backend, model=model)), backend


def _result(graph: dict):
    return next(r for r in graph["ctx"].results if r.name == "rewrite_attention")


def _sources(graph: dict) -> list[str]:
    """Dynamo's source name of each graph input, by input index (what a guard's index refers to)."""
    return [input_source(n) for n in graph["before"].graph.nodes if n.op == "placeholder"]


def _has_mask_input(graph: dict) -> bool:
    return any(source.endswith("['attention_mask']") for source in _sources(graph))


def _needs_rewrite(gm: torch.fx.GraphModule) -> int:
    """Attention calls that are not already mask-free causal SDPA on un-repeated KV (read off the graph)."""
    count = 0
    for call in _attention_calls(gm):
        if is_op(call, "softmax"):
            count += 1
        elif is_op(call, "sdpa"):
            key = _kv_inputs(call)[0]
            count += arg(call, 3, "attn_mask") is not None or fake(key).shape[1] != KV_HEADS
    return count


def _run(compiled, oracle, ids, mask):
    with torch.no_grad():
        got = compiled(ids, attention_mask=mask).logits
        want = oracle(ids, attention_mask=mask).logits
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0, msg=f"length={ids.shape[-1]} mask={mask is not None}")


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_prefill_rewritten_and_exact(family, attn, capture):
    model = tiny_model(family, attn)
    oracle = twin(model)
    compiled, backend = _compile(model, capture)
    generator = torch.Generator().manual_seed(0)
    for length in LENGTHS:
        ids = torch.randint(0, 128, (1, length), generator=generator)
        for mask in (torch.ones_like(ids), None):
            _run(compiled, oracle, ids, mask)
    # static and symbolic length x mask / no mask
    assert len(backend.graphs) == 4
    for graph in backend.graphs:
        before, after, result = graph["before"], graph["after"], _result(graph)
        assert graph["ctx"].layer_map.kind == "prefill"
        expected = _needs_rewrite(before)
        if _has_mask_input(graph):
            # the checks below are not vacuous: HF's masked graph feeds an N x N mask and repeated KV
            assert expected == LAYERS and _square_into_attention(before) and _repeat_kv_copies(before)
        assert result.replaced == expected and result.matched == LAYERS and not result.declined, result.line()
        rewritten = [n for n in after.graph.nodes if n.meta.get("slimpass", {}).get("rewritten")]
        assert len(rewritten) == expected
        assert f"{expected} of {LAYERS} attention calls rewritten" in result.summary
        calls = _attention_calls(after)
        assert len(calls) == LAYERS and all(is_op(c, "sdpa") for c in calls)
        assert _square_into_attention(after) == []
        assert _repeat_kv_copies(after) == []
        for call in calls:
            assert arg(call, 3, "attn_mask") is None and arg(call, 5, "is_causal") is True
            key, value = _kv_inputs(call)
            assert fake(key).shape[1] == fake(value).shape[1] == KV_HEADS
    # every call ran the rewritten graph: a guard that failed would have counted a fallback
    records = slimpass.compiled_graphs(model)
    assert len(records) == 4 and all(r.calls["fallback"] == 0 for r in records)


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_guards_of_masked_graphs(family, capture):
    """The proof assumed an all-ones attention_mask (of the prompt's length) and, for a sliding-window
    model, a prompt no longer than the window: both become runtime guards of the rewritten graph."""
    model = tiny_model(family, "sdpa")
    compiled, backend = _compile(model, capture)
    with torch.no_grad():
        for length in (17, 40):
            ids = torch.randint(0, 128, (1, length))
            compiled(ids, attention_mask=torch.ones_like(ids))
    static, symbolic = backend.graphs
    for graph in (static, symbolic):
        sources = _sources(graph)
        guards = {g.role: g for g in graph["ctx"].guards}
        assert sources[guards["attention_mask"].index] == "L['kwargs']['attention_mask']"
    # a static graph serves one length, so neither a length binding nor a window limit is needed
    assert len(static["ctx"].guards) == 1 and static["ctx"].guards[0].length_of is None
    sources, guards = _sources(symbolic), {g.role: g for g in symbolic["ctx"].guards}
    ids_index, ids_dim = guards["attention_mask"].length_of
    # input_ids is the first positional argument; when a decorator wraps forward as
    # wrapped_func(*args, **kwargs) (transformers >= 5.24), the model itself is args[0]
    wrapped = type(model).forward.__code__.co_argcount == 0
    assert sources[ids_index] == f"L['args'][{1 if wrapped else 0}]" and ids_dim == 1
    window = getattr(model.config, "sliding_window", None)
    if window:
        assert (guards["max_len"].index, guards["max_len"].dim, guards["max_len"].limit) == (ids_index, 1, window)
    else:
        assert set(guards) == {"attention_mask"}


def test_sliding_window_shorter_than_prompt_declined(capture):
    """With a window of 8 the mask of a longer prompt is banded, not causal: no proof, no rewrite, exact."""
    model = tiny_model("mistral", "eager", sliding_window=8)
    oracle = twin(model)
    compiled, backend = _compile(model, capture)
    for length in (6, 17, 40):
        ids = torch.randint(0, 128, (1, length))
        _run(compiled, oracle, ids, torch.ones_like(ids))
    static, symbolic = backend.graphs
    assert _result(static).replaced == LAYERS  # 6 tokens fit in the window
    result = _result(symbolic)
    assert result.replaced == 0 and not symbolic["ctx"].guards
    assert any("not the causal mask at prompt length 17" in reason for reason in result.declined)
    assert _square_into_attention(symbolic["after"])


def test_mask_subgraph_removed(capture):
    """After the rewrite no N x N tensor is computed at all: the mask subgraph is dead and removed.

    (Regression: dead-code elimination once kept it, taking HF's `operator.and_` for an in-place op.)
    """
    model = tiny_model("llama", "sdpa")
    compiled, backend = _compile(model, capture)
    with torch.no_grad():
        for length in (17, 40):
            ids = torch.randint(0, 128, (1, length))
            compiled(ids, attention_mask=torch.ones_like(ids))
    after = backend.graphs[-1]["after"]
    n = _seq_len(after)
    assert [node.name for node in after.graph.nodes if _square(node, n)] == []


@pytest.mark.parametrize("with_mask", [False, True])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_decode_graphs_drop_empty_masks_and_kv_copies(attn, with_mask, capture):
    """Decode steps (one query over the cache): SDPA loses masks proven to hide nothing and repeat_kv copies
    (the transformers 5.17 shapes); eager attention is left alone; generate stays token-identical."""
    model = tiny_model("llama", attn)
    oracle = twin(model)
    backend = capture(fuse_projections=False)  # its guards would mix with the mask's, counted below
    model.forward = torch.compile(model.forward, backend=functools.partial(backend, model=model))
    ids = torch.randint(3, 128, (1, 20))
    settings = dict(max_new_tokens=3, do_sample=False, output_logits=True, return_dict_in_generate=True)
    if with_mask:
        settings["attention_mask"] = torch.ones_like(ids)
    with torch.no_grad():
        got = model.generate(ids, **settings)
        want = oracle.generate(ids, **settings)
    assert torch.equal(got.sequences, want.sequences)
    for step, (a, b) in enumerate(zip(got.logits, want.logits)):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0, msg=f"{step=}")
    kinds = [g["ctx"].layer_map.kind for g in backend.graphs]
    assert kinds[0] == "prefill" and kinds[1:] and set(kinds[1:]) == {"decode"}
    for graph in backend.graphs[1:]:
        result = _result(graph)
        if attn == "eager":
            assert result.replaced == 0 and all("not plain SDPA" in reason for reason in result.declined)
            continue
        before = _attention_calls(graph["before"])
        wanted = sum(arg(c, 3, "attn_mask") is not None or fake(_kv_inputs(c)[0]).shape[1] != KV_HEADS for c in before)
        assert result.replaced == wanted and not result.declined
        after = _attention_calls(graph["after"])
        assert len(after) == LAYERS
        assert all(arg(c, 3, "attn_mask") is None and fake(_kv_inputs(c)[0]).shape[1] == KV_HEADS for c in after)
        assert _has_mask_input(graph) == bool(graph["ctx"].guards)  # the mask's contents are guarded


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_padded_mask_falls_back(family, attn, capture):
    """A mask with zeros fails the guard: the unrewritten graph (which keeps the mask) runs, exactly."""
    model = tiny_model(family, attn)
    oracle = twin(model)
    compiled, backend = _compile(model, capture)
    ids = torch.randint(3, 128, (2, 24))
    padded = torch.ones_like(ids)
    padded[0, :5] = 0
    other = torch.ones_like(ids)
    other[1, :11] = 0
    # compiled on a padded example first: the proof uses canonical values, never the example's
    for mask in (padded, torch.ones_like(ids), other):
        _run(compiled, oracle, ids, mask)
    (graph,) = backend.graphs
    assert _result(graph).replaced == LAYERS
    assert any(g.role == "attention_mask" for g in graph["ctx"].guards)
    (record,) = slimpass.compiled_graphs(model)
    assert record.calls == {"rewritten": 1, "fallback": 2}


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_disabled_by_config(attn, capture):
    model = tiny_model("llama", attn)
    oracle = twin(model)
    compiled, backend = _compile(model, capture, rewrite_attention=False)
    for length in (17, 40):
        ids = torch.randint(0, 128, (1, length))
        _run(compiled, oracle, ids, torch.ones_like(ids))
    for graph in backend.graphs:
        result = _result(graph)
        assert result.replaced == 0 and result.matched == 0 and not graph["ctx"].guards
        assert result.declined == ["disabled by config (rewrite_attention=False)"]
        assert [n.name for n in _attention_calls(graph["after"])] == [n.name for n in _attention_calls(graph["before"])]
        assert _square_into_attention(graph["after"]), "the mask should still reach the attention"
        assert not any(n.target is CAUSAL for n in graph["after"].graph.nodes)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_math_backend_emits_custom_op(attn, capture):
    model = tiny_model("qwen2", attn)
    oracle = twin(model)
    compiled, backend = _compile(model, capture, attention_backend="math")
    for length in (17, 40):
        ids = torch.randint(0, 128, (1, length))
        _run(compiled, oracle, ids, torch.ones_like(ids))
    assert len(backend.graphs) == 2
    for graph in backend.graphs:
        after = graph["after"]
        assert _result(graph).replaced == LAYERS
        calls = _attention_calls(after)
        assert len(calls) == LAYERS and all(c.target is CAUSAL for c in calls)
        for call in calls:
            _q, _k, _v, scale, gqa, name = call.args
            assert scale == pytest.approx(16 ** -0.5) and gqa is True and name == "math"
        assert _square_into_attention(after) == [] and _repeat_kv_copies(after) == []
    assert all(r.calls["fallback"] == 0 for r in slimpass.compiled_graphs(model))
