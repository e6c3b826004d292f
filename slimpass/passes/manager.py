"""The pass manager: the one ordered list of builtin passes, user passes at their points, checks between."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.fx

from slimpass.config import SlimConfig
from slimpass.passes.base import GraphPass, PassContext, PassResult
from slimpass.passes.dump import GraphDumper
from slimpass.passes.find_decoder_layers import FindDecoderLayers
from slimpass.passes.fuse_projections import FuseProjections
from slimpass.passes.insert_pruning import InsertPruning
from slimpass.passes.reselect_kv import ReselectKV
from slimpass.passes.rewrite_attention import RewriteAttention
from slimpass.passes.sink_selection import SinkSelection
from slimpass.registry import REGISTRY

log = logging.getLogger(__name__)

# The pipeline, in order.
BUILTIN_PASSES: tuple[type[GraphPass], ...] = (
    # Discovery first: every later pass reads ctx.layer_map and node.meta["slimpass"].
    FindDecoderLayers,
    # Before pruning: pruning needs the mask-free causal attention calls this pass creates.
    RewriteAttention,
    # Scoring, selection and gathers after the schedule's layers; shrinks everything downstream.
    InsertPruning,
    # After pruning: moves its gathers (and the logits_to_keep slice) above the row-wise ops that feed them.
    SinkSelection,
    # Decode graphs on an armed SlimCache: slim layers attend to their reselected blocks.
    ReselectKV,
    # Last: the passes above find q, k and v through the projections' outputs, which this one replaces.
    FuseProjections,
)


class PassError(RuntimeError):
    """A pass raised; the message names it and the passes that ran before it."""


_INPLACE_OPERATORS = {
    "iadd", "isub", "imul", "imatmul", "itruediv", "ifloordiv", "imod", "ipow", "ilshift", "irshift",
    "iand", "ior", "ixor", "iconcat", "setitem", "delitem",
}


def _impure(node: torch.fx.Node) -> bool:
    """Never drop in-place updates (cache writes) or calls with side effects, whatever their users."""
    if node.is_impure() or node.target is torch._check:  # torch._check: a shape fact / guard, no users
        return True
    if node.op == "call_method":
        return str(node.target).endswith("_")
    if node.op == "call_function":
        target = node.target
        if isinstance(target, torch._ops.OpOverloadPacket):  # Dynamo graphs call packets: resolve the overload
            target = getattr(target, "default", target)
        schema = getattr(target, "_schema", None)
        if schema is not None:  # an ATen/custom op says whether it writes its inputs
            return schema.is_mutable
        if getattr(node.target, "__module__", None) == "_operator":
            return node.target.__name__ in _INPLACE_OPERATORS  # operator.and_ (HF's mask `&`) is pure
        name = getattr(node.target, "__name__", "")
        return name.endswith("_") and not name.startswith("_")  # torch.Tensor.index_copy_ and friends
    return False


def _as_result(name: str, value: Any) -> PassResult:
    if isinstance(value, PassResult):
        return value
    if value is None:
        return PassResult(name)
    if isinstance(value, int):
        return PassResult(name, replaced=value)
    raise PassError(f"pass {name!r} returned {type(value).__name__}; expected a PassResult, an int or None")


class PassManager:
    """Runs the builtin passes and registered user passes on one graph, linting after each."""

    def __init__(self, config: SlimConfig) -> None:
        self.config = config
        self.passes = [cls(config) for cls in BUILTIN_PASSES]

    def uuid(self) -> str:
        return "-".join(p.uuid() for p in self.passes)

    def run(self, gm: torch.fx.GraphModule, ctx: PassContext, dumper: GraphDumper) -> list[PassResult]:
        steps: list[tuple[str, Callable[..., Any]]] = [(p.name, p.fn) for p in REGISTRY.passes_after("start")]
        for graph_pass in self.passes:
            steps.append((graph_pass.name, graph_pass))
            steps.extend((p.name, p.fn) for p in REGISTRY.passes_after(graph_pass.name))
        steps.extend((p.name, p.fn) for p in REGISTRY.passes_after("end"))
        dumper.write_input(gm)
        for step, (name, fn) in enumerate(steps, start=1):
            ctx.results.append(self._run_one(step, name, fn, gm, ctx, dumper))
        dumper.write_final()
        return ctx.results

    def _run_one(self, step: int, name: str, fn: Callable[..., Any], gm, ctx: PassContext, dumper) -> PassResult:
        start = time.perf_counter()
        try:
            result = _as_result(name, fn(gm, ctx))
            gm.graph.eliminate_dead_code(is_impure_node=_impure)
            gm.graph.lint()
            gm.recompile()
        except PassError:
            raise
        except Exception as err:
            before = [r.name for r in ctx.results] or ["none"]
            raise PassError(
                f"slimpass pass {name!r} failed on graph {ctx.graph_id} (passes run before it: "
                f"{', '.join(before)}): {type(err).__name__}: {err}"
            ) from err
        result.seconds = time.perf_counter() - start
        log.debug("%s: %s in %.3f s", ctx.graph_id, result.line(), result.seconds)
        dumper.write_pass(step, name, gm)
        return result
