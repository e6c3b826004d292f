"""Fuse the linear projections that read one tensor into one matrix multiply (q/k/v, gate/up).

Batch-1 decoding is bound by the host's launches, not by the GPU: on an H200 each cuBLAS call of a decode
step costs ~16 µs of host time, and a LLaMA layer makes seven (q, k, v, o, gate, up, down). The three
attention projections read the same normed hidden states, and so do gate and up; one multiply by their
stacked weights gives the same columns and makes four calls a layer instead of seven.

Before (one layer's attention input)::

    q = torch._C._nn.linear(h, q_weight, q_bias)
    k = torch._C._nn.linear(h, k_weight, k_bias)
    v = torch._C._nn.linear(h, v_weight, v_bias)

After::

    qkv = torch._C._nn.linear(h, self.slimpass_fused_0_weight, self.slimpass_fused_0_bias)
    q, k, v = qkv.narrow(-1, 0, nq), qkv.narrow(-1, nq, nk), qkv.narrow(-1, nq + nk, nv)

The stacked weight is not a copy: the model's parameters of a group move into one tensor, each becoming
a view of its rows (``param.data``; values, shapes and the model's own forward are unchanged, and
`load_state_dict` still writes through). They move once the first graph that meets them is compiled, not
before: AOTAutograd fakifies a graph's inputs as Dynamo saw them, and a parameter whose storage changed
under it fails that. So that first graph (the prefill, as a rule; it is bound by the GPU, where fusing
gains little) keeps separate calls, and the graphs traced after it (decoding) find the parameters stacked
and fuse them. The graph module holds the stacked tensor as a buffer, which AOTAutograd passes to the
compiled graph like a parameter. A runtime guard checks on every call that each parameter still starts
where its rows of the stacked tensor do: a parameter replaced rather than written (``module.weight =
Parameter(...)``, ``load_state_dict(..., assign=True)``) sends the call to the unfused graph.

Declines (and says why) when the weights are not plain 2-D floating parameters of one dtype and device,
when gradients are on (the stacked weight is not a parameter: no gradient would reach the model's), or when
the weights sit in one storage in another layout. Runs last: the passes before it find q, k and v through
the projections' outputs, which this pass replaces.
"""

from __future__ import annotations

import dataclasses
import logging

import torch
import torch.fx

from slimpass.passes.base import GraphPass, PassContext, PassResult
from slimpass.passes.graph_utils import arg
from slimpass.runtime.guards import InputGuard

log = logging.getLogger(__name__)

_LINEAR = (torch._C._nn.linear, torch.nn.functional.linear)


@dataclasses.dataclass
class _Projection:
    node: torch.fx.Node
    weight: torch.Tensor
    bias: torch.Tensor | None
    inputs: tuple[torch.fx.Node, ...] = ()  # the graph inputs that hold `weight` (and `bias`)


class FuseProjections(GraphPass):
    """One linear call per group of projections of one input; see the module docstring."""

    name = "fuse_projections"

    def run(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        result = PassResult(self.name)
        if not self.config.fuse_projections:
            return result
        if ctx.layer_map is None:
            result.declined.append("no decoder layers found")
            return result
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        inputs = dict(zip(placeholders, ctx.example_inputs))
        positions = {node: index for index, node in enumerate(placeholders)}
        groups: dict[torch.fx.Node, list[_Projection]] = {}
        stacking = 0
        for node in gm.graph.nodes:
            if node.op == "call_function" and node.target in _LINEAR:
                projection = self._projection(node, inputs)
                if projection is not None:
                    groups.setdefault(arg(node, 0, "input"), []).append(projection)
        for group in groups.values():
            if len(group) < 2:
                continue
            result.matched += 1
            reason = _unfusable(group)
            if reason is not None:
                if reason not in result.declined:
                    result.declined.append(reason)
            elif _stacked_already(group):
                for projection in group:  # a parameter replaced, not written through: run the unfused graph
                    for node in projection.inputs:
                        ctx.guards.append(InputGuard(positions[node], "data_ptr", limit=inputs[node].data_ptr()))
                self._fuse(gm, group, result)
            else:
                ctx.after_lower.append(lambda group=group: _stack(group))
                stacking += 1
        fused = result.replaced
        result.summary = ", ".join(filter(None, (
            f"{fused} projections in {result.inserted // 2} calls" if fused else "",
            f"{stacking} groups stacked after this graph, fused in the graphs after it" if stacking else "")))
        return result

    @staticmethod
    def _projection(node: torch.fx.Node, inputs: dict) -> _Projection | None:
        weight, bias = arg(node, 1, "weight"), arg(node, 2, "bias")
        if not isinstance(weight, torch.fx.Node) or weight not in inputs:
            return None
        if bias is not None and (not isinstance(bias, torch.fx.Node) or bias not in inputs):
            return None
        return _Projection(node, inputs[weight], inputs[bias] if bias is not None else None,
                           (weight,) if bias is None else (weight, bias))

    def _fuse(self, gm: torch.fx.GraphModule, group: list[_Projection], result: PassResult) -> None:
        index = sum(1 for name, _ in gm.named_buffers()  # groups fused so far: names their buffers
                    if name.startswith("slimpass_fused_") and name.endswith("_weight"))
        first = group[0].node
        weight = _stacked([p.weight for p in group])
        gm.register_buffer(f"slimpass_fused_{index}_weight", weight)
        bias = None
        if group[0].bias is not None:
            gm.register_buffer(f"slimpass_fused_{index}_bias", _stacked([p.bias for p in group]))
        with gm.graph.inserting_before(first):
            weight_node = gm.graph.get_attr(f"slimpass_fused_{index}_weight")
            if group[0].bias is not None:
                bias = gm.graph.get_attr(f"slimpass_fused_{index}_bias")
            fused = gm.graph.call_function(torch._C._nn.linear, (arg(first, 0, "input"), weight_node, bias))
            stack = first.meta.get("nn_module_stack")
            if stack and len(stack) > 1:  # the call belongs to the projections' parent (self_attn, mlp)
                fused.meta["nn_module_stack"] = dict(list(stack.items())[:-1])
            parts, start = [], 0
            for projection in group:
                parts.append(gm.graph.call_method("narrow", (fused, -1, start, projection.weight.shape[0])))
                start += projection.weight.shape[0]
        for projection, part in zip(group, parts):  # erased only now: `first` is where the nodes above go
            part.meta.update(projection.node.meta)
            projection.node.replace_all_uses_with(part)
            gm.graph.erase_node(projection.node)
        result.inserted += 2  # the fused call and its weight (the narrows stand in for the calls they replace)
        result.replaced += len(group)
        log.debug("fuse_projections: %s -> one linear of %d rows", [p.node.name for p in group], weight.shape[0])


def _unfusable(group: list[_Projection]) -> str | None:
    """Why these projections cannot share one call (None: they can)."""
    tensors = [p.weight for p in group] + [p.bias for p in group if p.bias is not None]
    weight = group[0].weight
    if len({id(p.weight) for p in group}) < len(group):
        return "a weight is used twice"
    if any(type(t) is not torch.nn.Parameter or not t.is_floating_point() or t.is_meta for t in tensors):
        return "a projection's weight or bias is not a plain floating-point parameter"
    if any(p.weight.dim() != 2 or not p.weight.is_contiguous() for p in group):
        return "a projection's weight is not a contiguous matrix"
    if any(p.weight.shape[1] != weight.shape[1] for p in group):
        return "the projections' weights have different input widths"
    if len({(t.dtype, t.device) for t in tensors}) > 1:
        return "the projections' weights differ in dtype or device"
    if len({p.bias is None for p in group}) > 1:
        return "some projections have a bias and some do not"
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return "gradients are enabled (the stacked weight is not a parameter: no gradient would reach the model's)"
    if any(p.bias is not None and (p.bias.dim() != 1 or p.bias.shape[0] != p.weight.shape[0]) for p in group):
        return "a projection's bias does not match its weight"
    for parts in ([p.weight for p in group], [p.bias for p in group if p.bias is not None]):
        shared = {t.untyped_storage().data_ptr() for t in parts}
        if parts and len(shared) < len(parts) and not _consecutive(parts):
            return "the projections' weights share storage in another layout"
    return None


def _consecutive(parts: list[torch.Tensor]) -> bool:
    """The tensors are consecutive rows of one storage, in this order."""
    storage = parts[0].untyped_storage().data_ptr()
    offset = parts[0].storage_offset()
    for tensor in parts:
        if tensor.untyped_storage().data_ptr() != storage or tensor.storage_offset() != offset:
            return False
        if not tensor.is_contiguous():
            return False
        offset += tensor.numel()
    return True


def _stacked_already(group: list[_Projection]) -> bool:
    return _consecutive([p.weight for p in group]) and (
        group[0].bias is None or _consecutive([p.bias for p in group]))


def _stacked(parts: list[torch.Tensor]) -> torch.Tensor:
    """The tensor whose rows are `parts` (consecutive rows of one storage), sharing their storage."""
    first = parts[0]
    rows = sum(t.shape[0] for t in parts)
    return torch.empty(0, dtype=first.dtype, device=first.device).set_(
        first.untyped_storage(), first.storage_offset(), (rows, *first.shape[1:]), first.stride())


def _stack(group: list[_Projection]) -> None:
    """Move the group's parameters into one new tensor each (weights, biases), each parameter becoming a view
    of its rows: values unchanged, one group's extra memory while it moves."""
    for parts in ([p.weight for p in group], [p.bias for p in group if p.bias is not None]):
        if not parts or _consecutive(parts):
            continue
        with torch.no_grad():
            stacked = torch.cat([t.detach() for t in parts])
            start = 0
            for tensor in parts:
                tensor.data = stacked[start:start + tensor.shape[0]]
                start += tensor.shape[0]
