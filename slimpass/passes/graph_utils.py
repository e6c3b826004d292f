"""Small helpers over Dynamo FX graphs: op identity tables, module paths, fake shapes, a networkx view."""

from __future__ import annotations

import operator
import re
from collections.abc import Callable
from typing import Any

import networkx as nx
import torch
import torch.fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

# Op identity: a Dynamo graph calls torch-level functions and tensor methods. One table, no if/elif chains.
OPS: dict[str, frozenset] = {
    "sdpa": frozenset(
        {
            ("call_function", torch._C._nn.scaled_dot_product_attention),
            ("call_function", torch.nn.functional.scaled_dot_product_attention),
        }
    ),
    "softmax": frozenset(
        {
            ("call_function", torch.softmax),
            ("call_function", torch.nn.functional.softmax),
            ("call_method", "softmax"),
        }
    ),
    "matmul": frozenset({("call_function", torch.matmul), ("call_function", operator.matmul), ("call_method", "matmul")}),
    "add": frozenset({("call_function", operator.add), ("call_function", torch.add), ("call_method", "add")}),
    "mul": frozenset({("call_function", operator.mul), ("call_function", torch.mul), ("call_method", "mul")}),
    "cat": frozenset({("call_function", torch.cat), ("call_function", torch.concat), ("call_function", torch.concatenate)}),
    "index_copy_": frozenset({("call_method", "index_copy_")}),  # SlimLayer's in-place write (static_decode)
    "dropout": frozenset({("call_function", torch.nn.functional.dropout), ("call_function", torch.dropout)}),
    "transpose": frozenset({("call_method", "transpose"), ("call_function", torch.transpose)}),
    "expand": frozenset({("call_method", "expand")}),
    "reshape": frozenset({("call_method", "reshape"), ("call_function", torch.reshape), ("call_method", "view")}),
    "getitem": frozenset({("call_function", operator.getitem)}),
    "cast": frozenset({("call_method", "to"), ("call_method", "type_as"), ("call_method", "float")}),
    "shape_query": frozenset(
        {
            ("call_method", "size"),
            ("call_method", "dim"),
            ("call_function", torch.ops.aten.sym_size.int),
            ("call_function", getattr),
        }
    ),
}


def is_op(node: Any, kind: str) -> bool:
    """Whether `node` is an FX node calling an op of class `kind` (a key of `OPS`)."""
    return isinstance(node, torch.fx.Node) and (node.op, node.target) in OPS[kind]


def arg(node: torch.fx.Node, index: int, name: str, default: Any = None) -> Any:
    """The argument given positionally at `index` or by keyword `name`."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


_INDEX = re.compile(r"\[['\"]?([^'\"\]]+)['\"]?\]")


# The local that holds the compiled module: `L['self']`, or `L['args'][0]` when a decorator wraps
# forward in `wrapped_func(*args, **kwargs)` (transformers 5.24's deprecate_kwarg), or `L['model']`.
_ROOT = re.compile(r"^L\[['\"]?\w+['\"]?\](\[\d+\])?")


def normalize_path(raw: str) -> str:
    """Module path relative to the compiled module: `L['self'].model.layers[0]._modules['mlp']` and
    `L['args'][0].model.layers[0].mlp` -> `model.layers.0.mlp`."""
    path = _INDEX.sub(r".\1", _ROOT.sub("", raw))
    parts = [p for p in path.split(".") if p and p not in ("_modules", "_parameters", "_buffers")]
    return ".".join(parts)


def module_stack(node: torch.fx.Node) -> list[tuple[str, type]]:
    """The node's module stack, outermost first, as (normalized path, module class)."""
    stack = node.meta.get("nn_module_stack") or {}
    out = []
    for value in stack.values():
        path, cls = value[0], value[1]
        out.append((normalize_path(path), cls if isinstance(cls, type) else type(cls)))
    return out


def module_path(node: torch.fx.Node) -> str:
    stack = module_stack(node)
    return stack[-1][0] if stack else ""


def input_source(node: torch.fx.Node) -> str:
    """Dynamo's source name of a placeholder (e.g. `L['kwargs']['attention_mask']`), or ''."""
    grapharg = node.meta.get("grapharg")
    source = getattr(grapharg, "source", None)
    if source is None:
        return ""
    name = source.name
    return name() if callable(name) else str(name)


def fake(node: Any) -> Any:
    """The example (fake) value Dynamo recorded for a node."""
    if not isinstance(node, torch.fx.Node):
        return node
    return node.meta.get("example_value", node.meta.get("val"))


def shape(node: Any) -> tuple | None:
    value = fake(node)
    return tuple(value.shape) if isinstance(value, torch.Tensor) else None


def same_size(a: Any, b: Any) -> bool:
    """Sizes (ints or SymInts) provably equal for every input the graph accepts."""
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    try:
        return bool(statically_known_true(a == b))
    except Exception:  # noqa: BLE001 - an undecidable comparison is simply "not proven"
        return False


def shape_str(node: torch.fx.Node, value: Any = None, size: Callable[[Any], str] = str) -> str:
    """`float32[1, s81, 64]` for a tensor, `SymInt(s81)` for a size: of `value`, else the node's traced value;
    `size` prints each size."""
    value = fake(node) if value is None else value
    if isinstance(value, torch.Tensor):
        dtype = str(value.dtype).replace("torch.", "")
        return f"{dtype}[{', '.join(size(s) for s in value.shape)}]"
    if isinstance(value, (torch.SymInt, int, float, bool)):
        return f"{type(value).__name__}({size(value)})"
    return ""


def nx_view(graph: torch.fx.Graph) -> nx.DiGraph:
    """A networkx DiGraph over the FX nodes (edges producer -> consumer), for structural queries."""
    view = nx.DiGraph()
    for node in graph.nodes:
        view.add_node(node)
        for inp in node.all_input_nodes:
            view.add_edge(inp, node)
    return view


def strip(node: Any, kinds: tuple[str, ...]) -> Any:
    """Walk up through single-input ops of the given kinds (e.g. casts) to the producing node."""
    while isinstance(node, torch.fx.Node) and any(is_op(node, k) for k in kinds):
        node = node.args[0]
    return node
