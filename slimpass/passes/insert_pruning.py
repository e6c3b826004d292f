"""Insert SlimInfer token pruning into prefill graphs: score, select, gather, and shrink everything downstream.

For each stage of the schedule (cut the input of layer ``p``), right after layer ``p - 1``:

    scores = score_blocks(q[p-1], k[p-1], scorer, ...)        # [B, L // block]
    keep   = keep_middle(N, tokens, ratio, ...)               # SymInt: middle blocks the budget allows
    index  = select_tokens(scores, L, keep, ...)              # [B, K] sorted, sinks + best + last block
    K      = index.size(1)                                    # the kept length, SymInt arithmetic on L
    h      = take_tokens(h, index, 1)                         # the residual stream of layer p

and every later use of an earlier tensor with a token dimension (cos/sin, position ids, ...) reads
its kept rows instead, every later use of the length ``L`` reads ``K``, and every later use of integer
arithmetic on ``L`` (a mixture of experts' ``tokens * top_k``, shared by Dynamo between layers) is
rebuilt on ``K``. The attention of later
layers runs causal on the kept tokens (kept indices are sorted, so causal order is preserved), and
their KV-cache writes store only kept tokens. The original positions of each stage's kept tokens
become extra graph outputs, which the backend strips and records (`slimpass.last_keep_sets`).

The pass declines (the graph stays dense, one log line says why) when it cannot prove the result
equals the reference: a masked attention left in the graph (padding), a static KV cache, logits or
hidden states of every position in the outputs (``logits_to_keep=0``), a prompt shorter than
`min_prune_length` at compile time, or a transformers version whose decode graphs would mask the
full prompt length against per-layer pruned caches.
"""

from __future__ import annotations

import logging
import operator
from typing import Any

import torch
import torch.fx
from torch.fx.experimental.symbolic_shapes import guard_bool

from slimpass.hf_compat import decode_mask_skipped_under_compile
from slimpass.passes.base import GraphPass, PassContext, PassResult
from slimpass.passes.causal_mask import length_input
from slimpass.passes.graph_utils import arg, fake, is_op, same_size
from slimpass.runtime import pruning_ops
from slimpass.runtime.guards import InputGuard
from slimpass.runtime.scoring import get_scorer
from slimpass.schedule import Stage, min_prune_length, resolve_schedule

log = logging.getLogger(__name__)


class Decline(Exception):
    """The graph does not match what pruning can rewrite exactly; the message says why. A `routine` decline is
    expected in normal use (pruning off, a decode graph, a short or static prompt) and is not warned about."""

    def __init__(self, message: str, routine: bool = False):
        super().__init__(message)
        self.routine = routine


def _token_dims(node: torch.fx.Node, length: Any) -> list[int]:
    value = fake(node)
    if not isinstance(value, torch.Tensor):
        return []
    return [d for d, size in enumerate(value.shape) if same_size(size, length)]


# Integer arithmetic a size can be computed with (Dynamo shares one node for e.g. ``tokens * top_k`` between
# the layers of a mixture of experts): after a cut such a value is rebuilt from the kept length.
_SIZE_ARITHMETIC = frozenset({operator.mul, operator.add, operator.sub, operator.floordiv, operator.mod, operator.neg,
                              torch.sym_max, torch.sym_min})


def _rebuildable(node: Any, length: Any) -> bool:
    """Whether a size made before the cut is integer arithmetic on the length and constants only."""
    if not isinstance(node, torch.fx.Node):
        return isinstance(node, (int, bool))
    value = fake(node)
    if isinstance(value, torch.SymInt) and (same_size(value, length) or not _mentions(value, length)):
        return True
    return (node.op == "call_function" and node.target in _SIZE_ARITHMETIC and not node.kwargs
            and all(_rebuildable(a, length) for a in node.args))


def _is_length(node: Any, length: Any) -> bool:
    value = fake(node)
    return isinstance(value, torch.SymInt) and same_size(value, length)


def _mentions(value: Any, length: Any) -> bool:
    """Whether a SymInt (or a tensor's sizes) depends on the symbols of `length`."""
    if not isinstance(length, torch.SymInt):
        return False
    symbols = length.node.expr.free_symbols
    sizes = value.shape if isinstance(value, torch.Tensor) else [value]
    return any(isinstance(s, torch.SymInt) and s.node.expr.free_symbols & symbols for s in sizes)


class Inserter:
    """Appends call_function nodes one after another, starting after `anchor`, tagged with the stage's layer."""

    def __init__(self, graph: torch.fx.Graph, anchor: torch.fx.Node, layer: int) -> None:
        self.graph, self.anchor, self.layer = graph, anchor, layer
        self.nodes: list[torch.fx.Node] = []

    def add(self, target: Any, *args: Any) -> torch.fx.Node:
        with self.graph.inserting_after(self.nodes[-1] if self.nodes else self.anchor):
            node = self.graph.call_function(target, args)
        node.meta["slimpass"] = {"layer": self.layer, "role": "pruning"}
        self.nodes.append(node)
        return node


class InsertPruning(GraphPass):
    """SlimInfer pruning as graph edits; see the module docstring."""

    name = "insert_pruning"

    def run(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        result = PassResult(self.name)
        try:
            stages, length = self._check(gm, ctx)
        except Decline as why:
            result.declined.append(str(why))
            if self.config.prune:
                log.info("sliminfer: %s: pruning declined: %s", ctx.graph_id, why)
                if not why.routine and ctx.layer_map is not None:  # no layer map: the backend warns about discovery
                    result.unmet.append(str(why))
            return result
        if length is None:
            return result
        self._rewrite(gm, ctx, stages, length, result)
        return result

    # -- what must hold -------------------------------------------------------------------------

    def _check(self, gm: torch.fx.GraphModule, ctx: PassContext) -> tuple[list[Stage], Any]:
        config, layer_map = self.config, ctx.layer_map
        if not config.prune:
            raise Decline("pruning is off (prune=False)", routine=True)
        if layer_map is None:
            raise Decline("no layer map (discovery declined)")
        if layer_map.kind != "prefill":
            raise Decline(f"{layer_map.kind} graph: only prefill graphs are pruned", routine=True)
        get_scorer(config.scorer)  # an unknown scorer is a configuration error, not a decline
        stages = resolve_schedule(config, len(layer_map.layers))
        if not stages:
            raise Decline("the schedule has no pruning point for a model this shallow")
        for layer in layer_map.layers:
            if layer.kind != "sdpa" or layer.mask is not None or not arg(layer.attention, 5, "is_causal", False):
                raise Decline(f"layer {layer.index} attention keeps a mask (padding, or not proven causal): "
                              "pruning needs mask-free causal attention")
            if any(not is_op(w, "cat") for w in layer.kv_writes):
                raise Decline(f"layer {layer.index} writes a static KV cache (index_copy_ at cache positions); "
                              "pruned layers need a growing cache (DynamicCache)")
        eager = [layer.index for layer in layer_map.layers if layer.found_kind != "sdpa"]
        if any(layer.kv_writes for layer in layer_map.layers) and eager:
            raise Decline(f"layers {eager} use eager attention, whose decode steps build a mask over the full prompt "
                          "length, which per-layer pruned caches cannot match; use attn_implementation='sdpa' "
                          "for generate, or use_cache=False for prefill only")
        if any(layer.kv_writes for layer in layer_map.layers) and not (decode_mask_skipped_under_compile()
                                                                       or ctx.slim_cache):
            import transformers

            raise Decline(f"transformers {transformers.__version__} masks decode steps over the full prompt length "
                          "under torch.compile, which per-layer pruned caches cannot match; use slimpass.compile "
                          "(it decodes with a SlimCache, whose masks fit), transformers >= 5.23, or use_cache=False "
                          "for prefill only")
        first = layer_map.layers[stages[0].layer].input
        length = fake(first).shape[1]
        if not isinstance(length, torch.SymInt):
            raise Decline(f"the prompt length is static in this graph ({length} tokens; torch.compile's first call "
                          "without dynamic shapes): pruning rewrites shapes symbolically. Use slimpass.compile (it "
                          "marks the length dynamic) or torch._dynamo.mark_dynamic(input_ids, 1); with "
                          "torch.compile the next prompt length recompiles dynamic and is pruned", routine=True)
        self._check_outputs(gm, ctx, stages, length)
        for stage in stages:
            self._check_crossings(gm, layer_map.layers[stage.layer].input, length)
        threshold = min_prune_length(config)
        hint = length.node.hint
        if hint is not None and hint < threshold:
            self._only_below(length, threshold)
            raise Decline(f"prompt of {hint} tokens is shorter than {threshold} (min_prompt_len, or one block past "
                          "the sinks): compiled dense", routine=True)
        return stages, length

    def _check_outputs(self, gm: torch.fx.GraphModule, ctx: PassContext, stages: list[Stage], length: Any) -> None:
        order = {node: i for i, node in enumerate(gm.graph.nodes)}
        first = ctx.layer_map.layers[stages[0].layer].input
        kv_writes = {w for layer in ctx.layer_map.layers for w in layer.kv_writes}
        output = next(n for n in gm.graph.nodes if n.op == "output")
        for value in output.all_input_nodes:
            if order[value] <= order[first] or value in kv_writes:
                continue
            if is_op(value, "getitem") and value.args[0] in kv_writes:
                continue  # a sliding-window cache keeps the last window - 1 entries of the write
            if not isinstance(fake(value), torch.Tensor):
                continue  # cache bookkeeping (tokens seen = the original prompt length): stays as it is
            if _token_dims(value, length) or _mentions(fake(value), length):
                raise Decline(f"the graph returns `{value.name}` with a dimension per prompt position (logits or hidden "
                              "states of every token, e.g. logits_to_keep=0 or labels=); pass logits_to_keep=1 "
                              "(generate does) to prune")

    def _check_crossings(self, gm: torch.fx.GraphModule, cut: torch.fx.Node, length: Any) -> None:
        """Every value made before the cut and read after it must be the length itself, or have at most
        one token dimension and otherwise not depend on the length (then it can be gathered)."""
        nodes = list(gm.graph.nodes)
        start = nodes.index(cut)
        before = set(nodes[: start + 1])
        for node in nodes[start + 1 :]:
            if node.op == "output":
                continue
            for inp in node.all_input_nodes:
                if inp not in before or inp is cut:
                    continue
                value = fake(inp)
                if isinstance(value, torch.SymInt):
                    if not same_size(value, length) and _mentions(value, length) and not _rebuildable(inp, length):
                        raise Decline(f"`{node.name}` reads `{inp.name}` = {value}, a function of the prompt length "
                                      "computed before the cut by more than integer arithmetic: not supported")
                elif isinstance(value, torch.Tensor):
                    dims = _token_dims(inp, length)
                    if len(dims) > 1:
                        raise Decline(f"`{node.name}` reads `{inp.name}` with {len(dims)} prompt-length dimensions "
                                      "(an N x N mask?) after the cut")
                    others = [s for d, s in enumerate(value.shape) if d not in dims]
                    if any(_mentions(s, length) for s in others):
                        raise Decline(f"`{node.name}` reads `{inp.name}` {tuple(value.shape)}, shaped by the prompt "
                                      "length other than as a token dimension, after the cut")

    @staticmethod
    def _only_below(length: torch.SymInt, threshold: int) -> None:
        """Make this dense graph serve only prompts below the pruning threshold, so that a later long prompt
        compiles the pruned graph instead of reusing this one.

        Evaluating the comparison on Dynamo's symbolic length records ``length < threshold`` in its shape
        environment, and Dynamo turns the shape environment into the graph's guards after the backend
        returns: a longer prompt misses this graph and recompiles, whatever the inner compiler. (A
        ``torch._check`` in the graph became a guard only when Inductor re-traced it; under the eager
        compiler it stayed a run-time assert that failed every later long prompt.)"""
        guard_bool(length < threshold)  # true (the hint is below the threshold); the point is the guard it records

    # -- the rewrite ----------------------------------------------------------------------------

    def _rewrite(self, gm: torch.fx.GraphModule, ctx: PassContext, stages: list[Stage], length: Any,
                 result: PassResult) -> None:
        graph, config, layers = gm.graph, self.config, ctx.layer_map.layers
        tracked: dict[torch.fx.Node, int] = {}  # inserted tensors with a token dimension -> that dim
        prompt_len = previous = positions = None
        keep_outputs = []
        code_version = pruning_ops.fingerprint(config.scorer)
        for stage in stages:
            residual = layers[stage.layer].input
            q, k = layers[stage.layer - 1].q, layers[stage.layer - 1].k
            # The selection goes right after the scoring layer's q and k, not after its output, so that a
            # later pass (sink_selection) can run that layer's attention output, o_proj and MLP on the
            # kept rows only; the gathers of what crosses the cut go after the residual.
            order = {node: i for i, node in enumerate(graph.nodes)}
            selection = Inserter(graph, max(q, k, key=order.get), stage.layer)  # earlier stages come before
            gathers = Inserter(graph, residual, stage.layer)
            if previous is None:
                current = selection.add(torch.ops.aten.sym_size.int, q, 2)  # [B, H, N, D]: the prompt length
                prompt_len = current
                threshold = min_prune_length(config)
                selection.add(torch._check, selection.add(operator.ge, current, threshold))
            else:
                current = previous
            ratio = stage.ratio
            keep = selection.add(pruning_ops.keep_middle, prompt_len, stage.tokens, ratio.numerator if ratio else 0,
                                 ratio.denominator if ratio else 0, config.block_size, config.sink_blocks)
            scores = selection.add(pruning_ops.score_blocks, q, k, config.scorer, config.block_size, config.unit_size,
                                   config.local_window, code_version)
            index = selection.add(pruning_ops.select_tokens, scores, current, keep, config.block_size,
                                  config.sink_blocks)
            kept = selection.add(torch.ops.aten.sym_size.int, index, 1)
            positions = index if positions is None else selection.add(pruning_ops.take_tokens, positions, index, 1)
            keep_outputs.append(stage.layer)
            self._redirect(graph, residual, index, current, kept, length, tracked, gathers, previous is None)
            previous = kept
            result.matched += 1
            result.inserted += len(selection.nodes) + len(gathers.nodes)
            self._keep_output(graph, positions)
        ctx.keep_layers = keep_outputs
        where = length_input(gm, length)
        if where is not None:
            ctx.guards.append(InputGuard(where[0], "min_len", where[1], min_prune_length(config)))
        result.summary = f"{len(stages)} pruning stage(s): " + "; ".join(s.describe() for s in stages)

    def _redirect(self, graph, residual, index, current, kept, length, tracked, gathers, first_stage) -> None:
        """Point every use after the cut at the kept tokens: the residual, token-indexed tensors, lengths.

        The selection nodes sit before the residual, and the gathers added here are not in `nodes`
        (listed before they exist), so the walk below sees neither."""
        nodes = list(graph.nodes)
        start = nodes.index(residual)
        before = set(nodes[: start + 1])
        replaced: dict[torch.fx.Node, torch.fx.Node] = {}
        add = gathers.add
        gathered_residual = add(pruning_ops.take_tokens, residual, index, 1)
        tracked[gathered_residual] = 1

        def substitute(node: torch.fx.Node) -> torch.fx.Node | None:
            if node is residual:
                return gathered_residual
            if node in replaced:
                return replaced[node]
            if node is current or (first_stage and _is_length(node, length)):
                replaced[node] = kept
                return kept
            if node.op == "call_function" and node.target in _SIZE_ARITHMETIC and not isinstance(fake(node), torch.Tensor):
                args = [substitute(a) or a if isinstance(a, torch.fx.Node) else a for a in node.args]
                if any(new is not old for new, old in zip(args, node.args)):  # a size computed from the length
                    replaced[node] = add(node.target, *args)
                    return replaced[node]
                return None
            dims = [tracked[node]] if node in tracked else _token_dims(node, length)
            if not dims:
                return None
            new = add(pruning_ops.take_tokens, node, index, dims[0])  # one dim: `_crossings` checked
            tracked[new] = dims[0]
            replaced[node] = new
            return new

        for node in nodes[start + 1 :]:
            if node.op == "output" or node in tracked:
                continue
            if not isinstance(fake(node), torch.Tensor) and all(user.op == "output" for user in node.users):
                continue  # a count returned to the cache (tokens seen): the original length, not the kept one
            for inp in list(node.all_input_nodes):
                if inp not in before or inp.op == "get_attr":
                    continue
                new = substitute(inp)
                if new is not None:
                    node.replace_input_with(inp, new)

    def _keep_output(self, graph: torch.fx.Graph, positions: torch.fx.Node) -> None:
        output = next(n for n in graph.nodes if n.op == "output")
        values = output.args[0]
        if isinstance(values, (tuple, list)):
            output.args = (type(values)([*values, positions]),)
        else:
            output.args = ((values, positions),)
