"""Select rows before the work, not after it: move token selections up through row-wise ops.

A selection of token rows (pruning's gather ``take_tokens(x, index, dim)``, or the last-row slice
``x[:, -1:, :]`` that ``logits_to_keep=1`` puts before the LM head) commutes with every op that treats
the rows independently: elementwise ops, ``linear``, reductions over other dimensions, casts,
transposes and reshapes that keep the token dimension. So when every use of ``x = op(a, b, ...)`` is the
same selection, the pass selects the operands instead and runs ``op`` on the selected rows only:

    before                                          after
    h   = add(h_in, o_proj(attn))                   h'  = add(take(h_in), o_proj(take(attn)))
    out = add(h, mlp(norm(h)))                      out = add(h', mlp(norm(h')))
    res = take_tokens(out, index, 1)                # res is out: the selection moved up

It stops at ops it does not know (the attention itself, whose rows mix) and at values used elsewhere
(the layer's keys and values, which every row needs). Effect: the scoring layer of each pruning stage
runs its o_proj and MLP on the kept tokens only, and the last decoder layer on the last token only.
Exact: the same ops on the same rows (the results equal the unsunk graph's up to matmul rounding).
"""

from __future__ import annotations

import dataclasses
import logging
import operator
from collections import Counter
from typing import Any

import torch
import torch.fx

from slimpass.passes.base import GraphPass, PassContext, PassResult
from slimpass.passes.graph_utils import fake, module_path, same_size
from slimpass.runtime import pruning_ops

log = logging.getLogger(__name__)

_FN, _METHOD = "call_function", "call_method"
# How an op treats rows. "elementwise": every tensor operand broadcasts against the output;
# "first": only the first operand carries data (casts: the rest are dtypes or tensors to match).
ROW_WISE: dict[tuple[str, Any], str] = {
    **{(_FN, f): "elementwise" for f in (
        operator.add, operator.sub, operator.mul, operator.truediv, operator.neg, torch.add, torch.sub, torch.mul,
        torch.div, torch.neg, torch.rsqrt, torch.sqrt, torch.exp, torch.tanh, torch.sigmoid, torch.pow,
        torch.nn.functional.silu, torch.nn.functional.gelu, torch.nn.functional.relu)},
    **{(_METHOD, m): "elementwise" for m in (
        "add", "sub", "mul", "div", "neg", "rsqrt", "sqrt", "exp", "tanh", "sigmoid", "pow")},
    **{(_METHOD, m): "first" for m in ("to", "type_as", "float", "half", "bfloat16", "contiguous", "clone")},
    (_FN, torch._C._nn.linear): "linear",
    (_FN, torch.nn.functional.linear): "linear",
    (_METHOD, "mean"): "reduce", (_METHOD, "sum"): "reduce", (_FN, torch.mean): "reduce", (_FN, torch.sum): "reduce",
    (_METHOD, "transpose"): "transpose", (_FN, torch.transpose): "transpose",
    (_METHOD, "reshape"): "reshape", (_METHOD, "view"): "reshape", (_FN, torch.reshape): "reshape",
}


@dataclasses.dataclass(frozen=True)
class Selection:
    """Rows picked along `dim`: by an index tensor (`take_tokens`) or by a slice."""

    dim: int
    index: torch.fx.Node | None = None
    rows: slice | None = None

    def apply(self, graph: torch.fx.Graph, node: torch.fx.Node, dim: int) -> torch.fx.Node:
        if self.index is not None:
            return graph.call_function(pruning_ops.take_tokens, (node, self.index, dim))
        return graph.call_function(operator.getitem, (node, (slice(None),) * dim + (self.rows,)))


def selection_of(node: torch.fx.Node) -> tuple[torch.fx.Node, Selection] | None:
    """(source, selection) when `node` selects rows of one dimension of a tensor, else None."""
    if node.op != _FN:
        return None
    if node.target is pruning_ops.take_tokens and len(node.args) == 3 and isinstance(node.args[0], torch.fx.Node):
        return node.args[0], Selection(node.args[2], index=node.args[1])
    if node.target is operator.getitem and isinstance(node.args[0], torch.fx.Node) and isinstance(node.args[1], tuple):
        parts = node.args[1]
        if not all(isinstance(p, slice) for p in parts):
            return None
        picked = [d for d, p in enumerate(parts) if (p.start or 0, p.stop, p.step or 1) != (0, None, 1)]
        bounds = (parts[picked[0]].start, parts[picked[0]].stop, parts[picked[0]].step) if len(picked) == 1 else ()
        if len(picked) == 1 and all(b is None or isinstance(b, int) for b in bounds):
            return node.args[0], Selection(picked[0], rows=parts[picked[0]])
    return None


class SinkSelection(GraphPass):
    """Move row selections above row-wise ops; see the module docstring."""

    name = "sink_selection"

    def run(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        result = PassResult(self.name)
        if not self.config.sink_selection:
            result.declined.append("off (sink_selection=False)")
            return result
        if ctx.layer_map is None or ctx.layer_map.kind != "prefill":
            result.declined.append("not a prefill graph")
            return result
        moved: Counter[tuple[str, str]] = Counter()  # (layer, "matmul" | "op") -> ops moved
        self.layers = ctx.layer_map.layers
        # A node this pass creates has no example value; it stands for the rows of the node it replaced,
        # so it gets that node's (consistent, pre-selection) shape for the later decisions.
        self.virtual: dict[torch.fx.Node, Any] = {}
        renamed: dict[torch.fx.Node, torch.fx.Node] = {}
        moving = True
        while moving:  # one move per scan (any() stops at it): a move erases nodes the scan's list still holds
            moving = any(self._sink(gm.graph, node, *found, moved, renamed) for node in list(gm.graph.nodes)
                         if (found := selection_of(node)) is not None)
        for layer in ctx.layer_map.layers:  # the residual nodes the layer map names may have moved
            layer.input = renamed.get(layer.input, layer.input)
            layer.output = renamed.get(layer.output, layer.output)
        result.replaced = sum(moved.values())
        result.matched = len({where for where, _ in moved})
        if moved:
            result.summary = "on selected rows only: " + "; ".join(
                f"{where}: {moved[where, 'matmul']} matmuls + {moved[where, 'op']} ops"
                for where in sorted({where for where, _ in moved}))
        log.debug("sliminfer: %s: sink_selection moved %s", ctx.graph_id, dict(moved))
        return result

    def _sink(self, graph: torch.fx.Graph, select: torch.fx.Node, source: torch.fx.Node, sel: Selection,
              moved: Counter[tuple[str, str]], renamed: dict[torch.fx.Node, torch.fx.Node]) -> bool:
        """Replace `select(op(a, ...))` by `op(select(a), ...)` if every use of op's result is this selection."""
        kind = ROW_WISE.get((source.op, source.target))
        if kind is None or any(selection_of(user) != (source, sel) for user in source.users):
            return False
        if sel.index is not None:
            order = {node: i for i, node in enumerate(graph.nodes)}
            if order[sel.index] > order[source]:
                return False  # the index is computed after this op (it depends on it): cannot select earlier
        plan = self._plan(source, sel.dim, kind)
        if plan is None:
            return False
        args, kwargs = self._select_operands(graph, source, sel, plan)
        with graph.inserting_before(source):
            new = graph.create_node(source.op, source.target, args, kwargs)
        new.meta = {k: v for k, v in source.meta.items() if k not in ("example_value", "val", "tensor_meta")}
        self.virtual[new] = self._fake(source)
        renamed.update({old: new for old, new_ in renamed.items() if new_ is source})
        renamed[source] = new
        for user in list(source.users):
            user.replace_all_uses_with(new)
            graph.erase_node(user)
        graph.erase_node(source)
        path = module_path(source)
        layer = next((f"layer {info.index}" for info in self.layers if path.startswith(info.path + ".")
                      or path == info.path), path or "model")
        moved[layer, "matmul" if ROW_WISE[(source.op, source.target)] == "linear" else "op"] += 1
        return True

    def _fake(self, node: Any) -> Any:
        return self.virtual[node] if node in self.virtual else fake(node)

    def _plan(self, node: torch.fx.Node, dim: int, kind: str) -> dict[Any, int] | None:
        """{operand position (int index or kwarg name): dimension to select}, or None if rows mix."""
        out = self._fake(node)
        if not isinstance(out, torch.Tensor) or dim >= out.dim():
            return None
        size = out.shape[dim]
        slots = list(enumerate(node.args)) + list(node.kwargs.items())
        if kind in ("first", "reshape", "transpose", "reduce", "linear"):
            source_dim = self._source_dim(node, dim, kind)
            return None if source_dim is None else {0: source_dim}
        plan = {}
        for slot, value in slots:  # elementwise: each operand broadcasts against the output
            operand = self._fake(value) if isinstance(value, torch.fx.Node) else None
            if not isinstance(operand, torch.Tensor):
                if isinstance(value, torch.fx.Node) and not isinstance(operand, (int, float, bool, torch.SymInt,
                                                                                 torch.SymFloat)):
                    return None
                continue
            aligned = dim - (out.dim() - operand.dim())
            if aligned < 0 or operand.shape[aligned] == 1:
                continue  # constant along the selected dimension: every row reads the same values
            if not same_size(operand.shape[aligned], size):
                return None
            plan[slot] = aligned
        return plan

    def _source_dim(self, node: torch.fx.Node, dim: int, kind: str) -> int | None:
        """The dimension of the first operand that the output's `dim` comes from, if rows stay whole."""
        src, out = self._fake(node.args[0]), self._fake(node)
        if not isinstance(src, torch.Tensor):
            return None
        if kind == "first":
            return dim if src.dim() == out.dim() else None
        if kind == "linear":
            return dim if dim < src.dim() - 1 else None
        if kind == "transpose":
            a, b = (d % src.dim() for d in node.args[1:3])
            return {a: b, b: a}.get(dim, dim)
        if kind == "reduce":
            dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
            keep = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
            dims = [dims] if isinstance(dims, int) else dims
            if dims is None or not all(isinstance(d, int) for d in dims):
                return None
            dims = [d % src.dim() for d in dims]
            return dim if (keep or all(d > dim for d in dims)) and dim not in dims else None
        # reshape: the dimensions up to the token one must be the same before and after
        if src.dim() <= dim or not all(same_size(src.shape[d], out.shape[d]) for d in range(dim + 1)):
            return None
        return dim

    def _select_operands(self, graph: torch.fx.Graph, node: torch.fx.Node, sel: Selection,
                         plan: dict[Any, int]) -> tuple[tuple, dict]:
        args, kwargs = list(node.args), dict(node.kwargs)
        with graph.inserting_before(node):
            for slot, dim in plan.items():
                picked = sel.apply(graph, node.args[slot] if isinstance(slot, int) else node.kwargs[slot], dim)
                if isinstance(slot, int):
                    args[slot] = picked
                else:
                    kwargs[slot] = picked
            if ROW_WISE[(node.op, node.target)] == "reshape":
                args = self._reshape_args(graph, args, sel.dim)
        return tuple(args), kwargs

    @staticmethod
    def _reshape_args(graph: torch.fx.Graph, args: list, dim: int) -> list:
        """Reshape's target size at the selected dimension becomes the selected length."""
        length = graph.call_function(torch.ops.aten.sym_size.int, (args[0], dim))
        if len(args) == 2 and isinstance(args[1], (tuple, list)):
            sizes = list(args[1])
            sizes[dim] = length
            return [args[0], type(args[1])(sizes)]
        sizes = list(args[1:])
        sizes[dim] = length
        return [args[0], *sizes]
