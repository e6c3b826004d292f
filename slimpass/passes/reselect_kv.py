"""Decode-time reselection in decode graphs: slim layers attend to their reselected blocks.

When a decoding step runs on a `SlimCache` armed for reselection (``SlimConfig.reselect``), each armed
layer's cache update leaves a `slimpass::bind_layer_state` marker in the traced graph carrying the
layer's state tensors. For each marker this pass replaces the layer's attention call

    out = scaled_dot_product_attention(q, k_all, v_all, scale=s)          # every cached token

by

    out = reselection.reselect_attention(q, k_full, v_full, (active, stats, prompt_positions, unit_keys), s,
                                         ReselectSettings(scorer, block_size, ...), valid)

(`reselect_attention_offloaded`, with the layer's fronts, at an offloaded layer)
(k_full / v_full: the cache after this step's write, before any GQA copy) and removes the marker.
The op re-scores the cached prompt blocks with the step's query and attends to the active set; see
`slimpass.runtime.reselection`. A mask on the attention is dropped when it is proven to hide nothing
(transformers <= 5.17 builds one for every decoding step; `SlimCache` sizes it to one all-true
column): the mask subgraph is evaluated at several cache lengths, as `causal_mask` does for prefill,
and what the proof assumed about the inputs becomes runtime guards. It declines a layer (its attention
stays over every token, one log line says why) whose attention is not SDPA on a one-token query
without a provably empty mask: the only shape it can prove equal to the reference's rule.
"""

from __future__ import annotations

import logging

import torch
import torch.fx

from slimpass.passes.base import GraphPass, PassContext, PassResult
from slimpass.passes.causal_mask import empty_mask_reason
from slimpass.passes.graph_utils import arg
from slimpass.runtime import reselection

log = logging.getLogger(__name__)


def _markers(graph: torch.fx.Graph) -> list[torch.fx.Node]:
    op = torch.ops.slimpass.bind_layer_state
    return [n for n in graph.nodes if n.op == "call_function" and n.target in (op, op.default)]


class ReselectKV(GraphPass):
    """Replace the attention of armed slim layers in decode graphs; see the module docstring."""

    name = "reselect_kv"

    def run(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        result = PassResult(self.name)
        markers = _markers(gm.graph)
        if not markers:
            if self.config.reselect and ctx.layer_map is not None and ctx.layer_map.kind == "decode":
                result.declined.append("no armed SlimCache layers in this decode step (no pruned prompt, "
                                       "or a cache that is not a SlimCache)")
            return result
        layers = {layer.index: layer for layer in ctx.layer_map.layers} if ctx.layer_map is not None else {}
        config = self.config
        proven: dict[torch.fx.Node, str] = {}  # mask producer -> "" (hides nothing) or why not
        for marker in markers:
            active, stats, positions, units, index = marker.args[:5]
            fronts = [marker.args[i] if len(marker.args) > i else marker.kwargs.get(name)
                      for i, name in enumerate(("front_k", "front_v", "pending"), start=5)]
            layer = layers.get(index)
            reason = self._why_not(layer, ctx) or self._mask_reason(gm, layer, ctx, proven)
            if reason and fronts[0] is not None:
                raise RuntimeError(f"reselect_kv: layer {index} is offloaded (SlimConfig.offload) and holds only its "
                                   f"last prompt block on the accelerator, but its attention cannot be rewritten: "
                                   f"{reason}. Run with offload=False")
            if reason:
                result.declined.append(f"layer {index}: {reason}")
                log.info("sliminfer: %s: reselect_kv declined layer %s: %s", ctx.graph_id, index, reason)
                gm.graph.erase_node(marker)
                continue
            attention = layer.attention
            scale = arg(attention, 6, "scale")
            if scale is None:  # SDPA's default
                scale = int(layer.q.meta["example_value"].shape[-1]) ** -0.5
            state, settings = (active, stats, positions, units), reselection.ReselectSettings.of(config)
            with gm.graph.inserting_before(attention):
                if fronts[0] is None:
                    node = gm.graph.call_function(reselection.reselect_attention, (
                        layer.q, layer.k_full, layer.v_full, state, float(scale), settings, layer.static_valid))
                else:
                    node = gm.graph.call_function(reselection.reselect_attention_offloaded, (
                        layer.q, layer.k_full, layer.v_full, state, float(scale), settings, tuple(fronts),
                        layer.static_valid, index))
            node.meta["slimpass"] = {"layer": index, "role": "reselect"}
            attention.replace_all_uses_with(node)
            gm.graph.erase_node(attention)
            gm.graph.erase_node(marker)
            layer.attention = node
            result.matched += 1
            result.replaced += 1
        unmet: dict[str, list[str]] = {}
        for line in result.declined:  # "layer i: reason", grouped by reason: one warning, not one per layer
            index, _, reason = line.partition(": ")
            unmet.setdefault(reason, []).append(index.removeprefix("layer "))
        result.unmet += [f"{reason} (slim layer(s) {', '.join(indices)} decode attending every cached token)"
                         for reason, indices in unmet.items()]
        if result.replaced:
            dropped = sum(1 for why in proven.values() if not why)
            result.summary = f"reselected attention at {result.replaced} slim layer(s)" + (
                f"; {dropped} decode mask(s) proven to hide nothing, dropped" if dropped else "")
        return result

    @staticmethod
    def _mask_reason(gm: torch.fx.GraphModule, layer, ctx: PassContext, proven: dict) -> str:
        """"" when the layer's attention has no mask or one proven to hide nothing (its guards recorded)."""
        if layer.mask is None:
            return ""
        why = empty_mask_reason(gm, layer.mask, ctx, proven)
        return f"the attention has a mask that may hide keys ({why})" if why else ""

    @staticmethod
    def _why_not(layer, ctx: PassContext) -> str:
        if layer is None:
            return "no decoder layer with this index in the graph"
        if ctx.layer_map.kind != "decode":
            return f"a {ctx.layer_map.kind} graph, not a one-token decoding step"
        if layer.kind != "sdpa":
            return "eager attention (reselection rewrites SDPA calls)"
        if arg(layer.attention, 5, "is_causal"):
            return "is_causal=True on a decoding step"
        if arg(layer.attention, 4, "dropout_p"):
            return "attention dropout"
        return ""
