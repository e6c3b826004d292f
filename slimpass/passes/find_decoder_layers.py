"""Discovery: build the `LayerMap` of a Dynamo graph from module metadata and op identity.

Nothing is matched by FX node name. A decoder layer is the group of nodes whose module stack
contains a ModuleList child (`<...>.<int>`, e.g. ``model.layers.7``); inside it we look for one
attention call (SDPA, or HF's eager softmax(q k^T * s + mask) v chain), walk back from its inputs
through the GQA copy (repeat_kv), the KV-cache write (cat) and RoPE (q*cos + rotate_half(q)*sin).

Before::   graph as Dynamo captured it
After::    same graph; ``ctx.layer_map`` set and ``node.meta["slimpass"] = {"layer": i, "role": ...}``
"""

from __future__ import annotations

import re
from collections import defaultdict

import torch.fx

from slimpass.passes.base import GraphPass, PassContext, PassResult
from slimpass.passes.graph_utils import arg, fake, is_op, module_stack, same_size, shape
from slimpass.passes.layer_map import EagerAttention, LayerInfo, LayerMap

_LAYER_PATH = re.compile(r"^(?P<path>.*\.(?P<index>\d+))$")
_TRIG_WRAPPERS = ("cast", "getitem", "expand", "reshape")
_TRIG_METHODS = ("unsqueeze", "repeat_interleave")  # GLM and ERNIE interleave cos/sin inside the layer


class DiscoveryError(Exception):
    """The graph does not have the structure of a LLaMA-style decoder; the message says what is missing."""


def _layer_of(node: torch.fx.Node) -> tuple[int, str] | None:
    for path, _cls in module_stack(node):
        match = _LAYER_PATH.match(path)
        if match:
            return int(match["index"]), match["path"]
    return None


def group_layers(graph: torch.fx.Graph) -> dict[int, tuple[str, list[torch.fx.Node]]]:
    groups: dict[int, list[torch.fx.Node]] = defaultdict(list)
    paths: dict[int, str] = {}
    for node in graph.nodes:
        if node.op not in ("call_function", "call_method", "call_module"):
            continue
        found = _layer_of(node)
        if found is not None:
            groups[found[0]].append(node)
            paths[found[0]] = found[1]
    return {i: (paths[i], groups[i]) for i in sorted(groups)}


def _unrepeat(node: torch.fx.Node) -> tuple[torch.fx.Node, bool]:
    """HF's repeat_kv: x[:, :, None].expand(b, h, r, n, d).reshape(b, h*r, n, d) -> (x, True)."""
    if is_op(node, "reshape") and is_op(node.args[0], "expand") and is_op(node.args[0].args[0], "getitem"):
        index = node.args[0].args[0].args[1]
        if isinstance(index, tuple) and len(index) >= 3 and index[2] is None:
            return node.args[0].args[0].args[0], True
    return node, False


def _cache_write(full: torch.fx.Node) -> tuple[torch.fx.Node, torch.fx.Node | None]:
    """keys = cat([past, new], dim=-2) or buffer.index_copy_(-2, slot, new) (`SlimCache` under static_decode)
    -> (new, the write node); no cache -> (full, None)."""
    rank = len(shape(full) or ())
    if is_op(full, "cat"):
        tensors, dim = full.args[0], arg(full, 1, "dim", 0)
        if dim in (-2, rank - 2) and isinstance(tensors, (list, tuple)) and tensors:
            return tensors[-1], full
    if is_op(full, "index_copy_") and len(full.args) == 4 and full.args[1] in (-2, rank - 2):
        return full.args[3], full
    return full, None


def _outside(node, members: set):
    """Walk up through view/cast ops (unsqueeze, to, getitem, repeat_interleave, ...) while inside the layer."""
    while isinstance(node, torch.fx.Node) and node in members:
        if not (any(is_op(node, k) for k in _TRIG_WRAPPERS) or (node.op == "call_method" and node.target in _TRIG_METHODS)):
            return None
        node = node.args[0]
    if isinstance(node, torch.fx.Node) and node.op != "placeholder":
        return node
    return None


def _uncast(node):
    while is_op(node, "cast"):
        node = node.args[0]
    return node


def _is_rotation(node) -> bool:
    """rotate_half(x): cat((-x2, x1), -1) (split halves), or stack((-x2, x1), -1).flatten(-2) (interleaved pairs)."""
    node = _uncast(node)
    if is_op(node, "cat"):
        return True
    return node.op == "call_method" and node.target == "flatten" and isinstance(node.args[0], torch.fx.Node) and \
        (node.args[0].op, node.args[0].target) in (("call_function", torch.stack), ("call_method", "stack"))


def _rope_form(node, members: set) -> tuple[torch.fx.Node, torch.fx.Node] | None:
    """x*cos + rotate_half(x)*sin (either order, either operand order, either rotation of `_is_rotation`)
    -> (cos producer, sin producer) outside the layer; None if `node` is not that form."""
    if not (is_op(node, "add") and all(is_op(a, "mul") for a in node.args[:2])):
        return None
    trig = {}
    for mul in node.args[:2]:
        for operand, other in ((mul.args[1], mul.args[0]), (mul.args[0], mul.args[1])):
            source = _outside(operand, members)
            if source is not None:
                trig["sin" if _is_rotation(other) else "cos"] = source
                break
    return (trig["cos"], trig["sin"]) if set(trig) == {"cos", "sin"} else None


def _rope(node: torch.fx.Node, members: set, index: int, what: str) -> tuple[torch.fx.Node, torch.fx.Node] | None:
    """The shared cos/sin producers of the RoPE that `node` (an attention operand) went through, or None for a
    layer without position embedding (NoPE: only the residual stream reaches the operand from outside the layer).

    The accepted forms: the rotary form of `_rope_form` anywhere upstream of the operand inside the layer, so
    that casts around it (OLMo, Cohere and ERNIE compute RoPE in float32), a partial-rotary concatenation
    ``cat([rope(x[..., :r]), x[..., r:]], -1)`` (GPT-NeoX, Phi, GLM, StableLM) and a per-head norm after it
    (Hunyuan) all pass; pruning does not depend on the form, only on the cos/sin being computed outside the
    layer from the token positions (the pruning pass gathers them at the kept positions). An operand that
    reads anything else from outside the layer (a position-dependent value in a form we do not know) is
    declined by name."""
    seen, frontier = set(), [node]
    while frontier:
        current = frontier.pop()
        if current in seen or not isinstance(current, torch.fx.Node) or current not in members:
            continue
        seen.add(current)
        found = _rope_form(current, members)
        if found is not None:
            return found
        frontier.extend(reversed(current.all_input_nodes))
    foreign = [inp for n in seen for inp in n.all_input_nodes
               if inp not in members and not _is_hidden(inp) and (inp.op != "placeholder" or _is_integer(inp))]
    if foreign:
        raise DiscoveryError(
            f"layer {index}: the {what} reads `{foreign[0].name}` from outside the layer but is not "
            "rotary-embedded in an accepted form (x*cos + rotate_half(x)*sin, rotate_half split or interleaved, with "
            "casts, a partial-rotary concatenation or a norm after it)")
    return None


def _soft_capped(node) -> bool:
    """Whether a tanh lies on the way from the scores to the softmax (Gemma 2, Grok: logit soft-capping)."""
    seen, frontier = 0, [node]
    while frontier and seen < 64:  # breadth first: the scores' chain is short, the mask's may be long
        current = frontier.pop(0)
        seen += 1
        if isinstance(current, torch.fx.Node):
            if current.target in (torch.tanh, "tanh") or getattr(current.target, "__name__", "") == "tanh":
                return True
            if not is_op(current, "matmul"):
                frontier.extend(current.all_input_nodes)
    return False


def _eager_attention(softmax: torch.fx.Node, index: int) -> EagerAttention:
    pre = softmax.args[0]
    masked = pre if is_op(pre, "add") else None
    scaled = None
    if masked is not None:
        scaled = next((a for a in masked.args[:2] if is_op(a, "mul") and is_op(a.args[0], "matmul")), None)
    elif is_op(pre, "mul") and is_op(pre.args[0], "matmul"):
        scaled = pre
    if scaled is None or not isinstance(scaled.args[1], (int, float)):
        if _soft_capped(pre):
            raise DiscoveryError(f"layer {index}: attention-logit soft-capping (tanh(scores / cap) * cap before the "
                                 "softmax) is not supported: the rewritten attention would drop it")
        raise DiscoveryError(f"layer {index}: eager attention without the (q @ k^T) * scale pattern")
    probs = softmax
    while len(probs.users) == 1 and any(is_op(next(iter(probs.users)), k) for k in ("cast", "dropout")):
        probs = next(iter(probs.users))
    output = next((u for u in probs.users if is_op(u, "matmul") and u.args[0] is probs), None)
    if output is None:
        raise DiscoveryError(f"layer {index}: eager attention probabilities never meet the values (no probs @ v)")
    return EagerAttention(scaled.args[0], scaled, masked, softmax, probs, output, float(scaled.args[1]))


def _attention(index: int, nodes: list[torch.fx.Node]) -> tuple[torch.fx.Node, str, EagerAttention | None]:
    sdpa = [n for n in nodes if is_op(n, "sdpa")]
    softmax = [n for n in nodes if is_op(n, "softmax")]
    if len(sdpa) == 1:
        return sdpa[0], "sdpa", None
    if not sdpa and len(softmax) == 1:
        eager = _eager_attention(softmax[0], index)
        return eager.output, "eager", eager
    raise DiscoveryError(
        f"layer {index}: expected one attention call, found {len(sdpa)} SDPA and {len(softmax)} softmax nodes"
    )


def _operands(attention: torch.fx.Node, kind: str, eager: EagerAttention | None, index: int):
    if kind == "sdpa":
        return attention.args[0], attention.args[1], attention.args[2], arg(attention, 3, "attn_mask")
    key_t = eager.scores.args[1]
    if not (is_op(key_t, "transpose") and tuple(key_t.args[1:3]) in ((2, 3), (-2, -1), (-1, -2), (3, 2))):
        raise DiscoveryError(f"layer {index}: eager attention scores are not q @ k.transpose(-2, -1)")
    mask = None
    if eager.masked is not None:
        mask = next(a for a in eager.masked.args[:2] if a is not eager.scaled)
    return eager.scores.args[0], key_t.args[0], attention.args[1], mask


def _is_integer(node: torch.fx.Node) -> bool:
    """An integer tensor (position ids, cache positions): never a parameter."""
    value = fake(node)
    return isinstance(value, torch.Tensor) and not value.is_floating_point()


def _is_hidden(node: torch.fx.Node) -> bool:
    value = fake(node)
    return isinstance(value, torch.Tensor) and value.dim() == 3 and value.is_floating_point()


def _residual(index: int, nodes: list[torch.fx.Node], exclude: set) -> tuple[torch.fx.Node, torch.fx.Node]:
    """The residual stream: an input that a residual add of the layer reads directly, and the add
    leaving the layer (``hidden = residual + mlp(...)``), of the same [B, N, hidden] shape."""
    members = set(nodes)
    inputs = []
    for node in nodes:
        for inp in node.all_input_nodes:
            if inp not in members and inp not in exclude and inp not in inputs and _is_hidden(inp):
                if any(is_op(user, "add") and user in members for user in inp.users):
                    inputs.append(inp)
    outputs = [
        n for n in nodes
        if n not in exclude and is_op(n, "add") and _is_hidden(n) and any(u not in members for u in n.users)
    ]
    for out in outputs:
        for inp in inputs:
            if all(same_size(a, b) for a, b in zip(shape(inp), shape(out))):
                return inp, out
    raise DiscoveryError(f"layer {index}: could not identify the residual stream entering and leaving the layer")


def _layer(index: int, path: str, nodes: list[torch.fx.Node]) -> tuple[LayerInfo, torch.fx.Node, torch.fx.Node]:
    members = set(nodes)
    attention, kind, eager = _attention(index, nodes)
    q, k_attn, v_attn, mask = _operands(attention, kind, eager, index)
    k_full, k_rep = _unrepeat(k_attn)
    v_full, v_rep = _unrepeat(v_attn)
    k, k_write = _cache_write(k_full)
    v, v_write = _cache_write(v_full)
    trig = _rope(q, members, index, "query")
    if _rope(k, members, index, "key") != trig:
        raise DiscoveryError(f"layer {index}: query and key use different cos/sin producers (or only one is rotary-embedded)")
    writes = tuple(w for w in (k_write, v_write) if w is not None)
    exclude = set(writes) | set(trig or ()) | ({mask} if mask is not None else set())
    if eager is not None:
        exclude |= {eager.probs, eager.softmax}
    res_in, res_out = _residual(index, nodes, exclude)
    info = LayerInfo(
        index, path, res_in, res_out, q, k, v, k_attn, v_attn, k_full, v_full, attention, kind, mask, writes,
        k_rep and v_rep, eager,
    )
    return info, trig


def _graph_kind(layers: list[LayerInfo]) -> str:
    if all(same_size(layer.q_len, layer.kv_len) for layer in layers):
        return "prefill"
    if all(isinstance(layer.q_len, int) and layer.q_len == 1 for layer in layers):
        return "decode"
    return "extend"


def discover(graph: torch.fx.Graph) -> LayerMap:
    """Build the LayerMap of `graph`; raise `DiscoveryError` naming what is missing."""
    groups = group_layers(graph)
    if not groups:
        raise DiscoveryError("no decoder layers (no module path ending in a layer index, such as model.layers.0)")
    if sorted(groups) != list(range(len(groups))):
        raise DiscoveryError(f"decoder layer indices are not contiguous: {sorted(groups)}")
    layers, trig = [], set()
    for index, (path, nodes) in groups.items():
        info, rope = _layer(index, path, nodes)
        layers.append(info)
        if rope is not None:
            trig.add(rope)
    if not trig:
        raise DiscoveryError("no decoder layer is rotary-embedded (x*cos + rotate_half(x)*sin): not a RoPE decoder")
    # several producers: per-layer-type RoPE (local and global rotary bases, OLMo 3, ModernBERT); pruning gathers
    # each of them at the kept positions like any other tensor with a token dimension
    for prev, layer in zip(layers, layers[1:]):
        if layer.input is not prev.output:
            raise DiscoveryError(f"residual stream broken between layers {prev.index} and {layer.index}")
    for layer in layers:
        if fake(layer.q) is None or fake(layer.k_attn) is None:
            raise DiscoveryError(f"layer {layer.index}: no shape metadata on q/k")
    masks = tuple(dict.fromkeys(layer.mask for layer in layers if layer.mask is not None))
    cos, sin = trig.pop() if len(trig) == 1 else sorted(trig, key=lambda pair: pair[0].name)[0]
    return LayerMap(layers, cos, sin, masks, _graph_kind(layers))


def annotate(layer_map: LayerMap) -> None:
    """Record layer membership and roles in ``node.meta["slimpass"]`` for later passes and dumps."""
    for layer in layer_map.layers:
        roles = {
            "input": layer.input, "output": layer.output, "q": layer.q, "k": layer.k, "v": layer.v,
            "attention": layer.attention,
        }
        for role, node in roles.items():
            node.meta.setdefault("slimpass", {}).update(layer=layer.index, role=role)
        for node in layer.kv_writes:
            node.meta.setdefault("slimpass", {}).update(layer=layer.index, role="kv_write")
    for role, node in (("cos", layer_map.cos), ("sin", layer_map.sin)):
        node.meta.setdefault("slimpass", {}).update(role=role)
    for node in layer_map.masks:
        node.meta.setdefault("slimpass", {}).update(role="mask")


class FindDecoderLayers(GraphPass):
    """Discovery pass: fills `ctx.layer_map`, or leaves it None and says what it did not find."""

    name = "find_decoder_layers"

    def run(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        try:
            layer_map = discover(gm.graph)
        except DiscoveryError as err:
            ctx.layer_map = None
            return PassResult(self.name, declined=[str(err)])
        annotate(layer_map)
        ctx.layer_map = layer_map
        return PassResult(self.name, matched=len(layer_map.layers), summary=layer_map.describe())
