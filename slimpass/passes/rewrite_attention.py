"""Replace masked attention by mask-free causal attention where the mask is provably causal.

In prefill graphs (queries and keys have the same, possibly symbolic, length) each distinct mask
producer is proven causal by `causal_mask.prove_causal`; then every attention that reads it (SDPA
with ``attn_mask=``, or HF's eager softmax chain) becomes one SDPA call with ``is_causal=True`` and
no mask, on the un-repeated GQA keys and values (``enable_gqa=True``) where HF copied them with
repeat_kv. The mask subgraph then has no users and is removed. What the proof assumed about the
inputs (an all-ones attention_mask, ...) becomes runtime guards; padded batches fail them and run
the unrewritten graph.

In decode graphs (one query per row) a mask is dropped when `causal_mask.prove_all_true` shows it hides
no key (transformers <= 5.17 builds one for every step under torch.compile), and repeat_kv copies are
replaced by ``enable_gqa=True``: every step otherwise copies each layer's whole cache several times.
Models with a sliding window are left alone there (their masks hide keys once the cache outgrows it).
With fixed-size buffers (``SlimConfig.static_decode``) each layer's attention gets the mask of its written
slots (`slimpass.runtime.static_kv`); a layer it cannot rewrite fails the compile, since it would attend
to empty slots.

Before::
    mask = <N x N causal-and-padding mask from attention_mask>
    key = keys[:, :, None].expand(1, 2, 2, s0, 16).reshape(1, 4, s0, 16)      # repeat_kv
    out = scaled_dot_product_attention(q, key, value, attn_mask=mask, scale=0.25)
After::
    out = scaled_dot_product_attention(q, keys, values, attn_mask=None, is_causal=True,
                                       scale=0.25, enable_gqa=True)
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import torch
import torch.fx

from slimpass.passes.base import GraphPass, PassContext, PassResult
from slimpass.passes.causal_mask import NotCausal, empty_mask_reason, length_input, prove_causal
from slimpass.passes.graph_utils import arg, fake
from slimpass.passes.layer_map import LayerInfo
from slimpass.runtime import attention as _attention  # noqa: F401  (registers slimpass::causal_attention)
from slimpass.runtime import static_kv
from slimpass.runtime.guards import InputGuard

log = logging.getLogger(__name__)


def sliding_window(model_config: Any) -> int | None:
    """The attention window of a model config, or None when every layer attends to the full prefix."""
    window = getattr(model_config, "sliding_window", None)
    if not window:
        return None
    layer_types = getattr(model_config, "layer_types", None)
    if layer_types and not any("sliding" in str(t) for t in layer_types):
        return None
    return int(window)


def _static_markers(graph: torch.fx.Graph) -> dict[int, torch.fx.Node]:
    op = torch.ops.slimpass.bind_static_kv
    return {n.args[1]: n for n in graph.nodes if n.op == "call_function" and n.target in (op, op.default)}


def _undeclinable(layer: LayerInfo) -> str | None:
    """Why this layer's attention cannot be replaced, or None."""
    node = layer.attention
    if layer.kind == "sdpa":
        if arg(node, 4, "dropout_p", 0.0) not in (0, 0.0):
            return f"layer {layer.index}: attention dropout is on"
        if layer.mask is None and not arg(node, 5, "is_causal", False):
            return f"layer {layer.index}: mask-free attention that is not causal"
        return None
    eager = layer.eager
    if layer.mask is None:
        return f"layer {layer.index}: eager attention without a mask is not causal"
    chain = [eager.softmax]
    while chain[-1] is not eager.probs:
        chain.append(next(iter(chain[-1].users)))
    if any(len(n.users) != 1 for n in chain) or len(eager.scores.users) != 1 or len(eager.scaled.users) != 1:
        return f"layer {layer.index}: attention weights are used elsewhere (output_attentions?)"
    dropout = [n for n in chain if n.target is torch.nn.functional.dropout]
    if any(arg(n, 1, "p", 0.5) not in (0, 0.0) and arg(n, 2, "training", True) for n in dropout):
        return f"layer {layer.index}: attention dropout is on"
    return None


def _scale(layer: LayerInfo) -> float | None:
    if layer.kind == "eager":
        return layer.eager.scale
    return arg(layer.attention, 6, "scale", None)


def _kv(layer: LayerInfo) -> tuple[torch.fx.Node, torch.fx.Node, bool]:
    """Keys/values for the causal call: the un-repeated ones where HF copied them for GQA."""
    k, v = (layer.k_full, layer.v_full) if layer.gqa_repeat else (layer.k_attn, layer.v_attn)
    heads_q, heads_kv = fake(layer.q).shape[1], fake(k).shape[1]
    return k, v, heads_q != heads_kv


def _already_causal(layer: LayerInfo) -> bool:
    """SDPA without a mask and without KV copies: already the fused causal call this pass emits."""
    return layer.kind == "sdpa" and layer.mask is None and not layer.gqa_repeat


class RewriteAttention(GraphPass):
    """Mask-free causal attention in prefill graphs; see the module docstring."""

    name = "rewrite_attention"

    def run(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        result = PassResult(self.name)
        layer_map = ctx.layer_map
        if not self.config.rewrite_attention:
            result.declined.append("disabled by config (rewrite_attention=False)")
        elif layer_map is None:
            result.declined.append("no layer map (discovery declined)")
        elif layer_map.kind == "decode":
            return self._decode(gm, ctx, result)
        elif layer_map.kind != "prefill":
            result.declined.append(f"{layer_map.kind} graph: only prefill and one-token decode attention is rewritten")
        if result.declined:
            return result
        proofs = {}
        for mask in layer_map.masks:
            try:
                proofs[mask] = prove_causal(gm, mask, layer_map.layers[0].q_len, ctx.example_inputs)
            except NotCausal as err:
                result.declined.append(f"mask {mask.name}: {err}")
        masks = {layer.index: layer.mask for layer in layer_map.layers}
        done = [layer for layer in layer_map.layers if self._rewrite(gm, layer, proofs, result)]
        used = {masks[layer.index] for layer in done} - {None}
        if done:
            ctx.guards.extend(self._guards(gm, ctx, [proofs[mask] for mask in used]))
        already = sum(1 for layer in layer_map.layers if _already_causal(layer))
        result.summary = (
            f"{len(done)} of {len(layer_map.layers)} attention calls rewritten to mask-free causal attention"
            + (f", {already} already were" if already else "")
        )
        return result

    def _rewrite(self, gm: torch.fx.GraphModule, layer: LayerInfo, proofs: dict, result: PassResult) -> bool:
        result.matched += 1
        reason = _undeclinable(layer)
        if reason is None and layer.mask is not None and layer.mask not in proofs:
            reason = f"layer {layer.index}: mask not proven causal"
        if reason is not None:
            result.declined.append(reason)
            return False
        if _already_causal(layer):
            return False  # nothing to gain
        k, v, gqa = _kv(layer)
        old = layer.attention
        with gm.graph.inserting_before(old):
            if self.config.attention_backend == "auto":
                new = gm.graph.call_function(
                    torch._C._nn.scaled_dot_product_attention,
                    (layer.q, k, v),
                    {"attn_mask": None, "dropout_p": 0.0, "is_causal": True, "scale": _scale(layer), "enable_gqa": gqa},
                )
            else:
                scale = _scale(layer) if _scale(layer) is not None else fake(layer.q).shape[-1] ** -0.5
                new = gm.graph.call_function(
                    torch.ops.slimpass.causal_attention.default,
                    (layer.q, k, v, float(scale), gqa, self.config.attention_backend),
                )
        new.meta.update({key: val for key, val in old.meta.items() if key in ("nn_module_stack", "example_value", "stack_trace")})
        new.meta["slimpass"] = {"layer": layer.index, "role": "attention", "rewritten": True}
        old.replace_all_uses_with(new)
        gm.graph.erase_node(old)
        layer.attention, layer.kind, layer.eager, layer.mask = new, "sdpa", None, None
        result.replaced += 1
        return True

    def _decode(self, gm: torch.fx.GraphModule, ctx: PassContext, result: PassResult) -> PassResult:
        """Decode graphs: SDPA without provably empty masks and without repeat_kv copies."""
        if sliding_window(ctx.model_config) is not None or ctx.model_config is None:
            result.declined.append("decode graph of a model with a sliding window (or an unknown config): its "
                                   "masks hide keys once the cache outgrows the window")
            return result
        proven: dict[torch.fx.Node, str] = {}  # mask producer -> "" (hides nothing) or why not
        slots = _static_markers(gm.graph)  # layer index -> its bind_static_kv marker (static_decode)
        for layer in ctx.layer_map.layers:
            result.matched += 1
            node = layer.attention
            marker = slots.get(layer.index)
            if layer.kind != "sdpa" or arg(node, 4, "dropout_p", 0.0) not in (0, 0.0) or arg(node, 5, "is_causal"):
                result.declined.append(f"layer {layer.index}: not plain SDPA (eager attention, dropout or is_causal)")
                continue
            if layer.mask is None and not layer.gqa_repeat and marker is None:
                continue  # nothing to gain
            why = empty_mask_reason(gm, layer.mask, ctx, proven) if layer.mask is not None else ""
            if why:
                result.declined.append(f"layer {layer.index}: decode mask not proven empty ({why})")
                continue
            k, v, gqa = _kv(layer)
            with gm.graph.inserting_before(node):
                mask = None
                if marker is not None:  # fixed-size buffers: attend to the written slots only
                    mask = gm.graph.call_function(static_kv.slot_mask, (layer.k_full, marker.args[0]))
                    layer.static_valid = marker.args[0]
                new = gm.graph.call_function(
                    torch._C._nn.scaled_dot_product_attention, (layer.q, k, v),
                    {"attn_mask": mask, "dropout_p": 0.0, "is_causal": False, "scale": _scale(layer), "enable_gqa": gqa})
            new.meta.update({key: val for key, val in node.meta.items() if key in ("nn_module_stack", "example_value", "stack_trace")})
            new.meta["slimpass"] = {"layer": layer.index, "role": "attention", "rewritten": True}
            node.replace_all_uses_with(new)
            gm.graph.erase_node(node)
            layer.attention, layer.mask, layer.k_attn, layer.v_attn, layer.gqa_repeat = new, None, k, v, False
            if marker is not None:
                gm.graph.erase_node(slots.pop(layer.index))
            result.replaced += 1
        if slots:  # a layer whose buffers hold empty slots would attend to them
            raise RuntimeError(
                f"rewrite_attention: SlimConfig.static_decode: the attention of layer(s) {sorted(slots)} could not be "
                f"masked to their written slots ({'; '.join(result.declined) or 'no attention found for them'}); "
                "run with static_decode=False")
        dropped = sum(1 for why in proven.values() if not why)
        result.summary = (f"decode: {result.replaced} of {len(ctx.layer_map.layers)} attention calls without "
                          f"mask / KV copies ({dropped} mask producer(s) proven to hide nothing)")
        masked = sum(1 for layer in ctx.layer_map.layers if layer.static_valid is not None)
        if masked:
            result.summary += f"; {masked} masked to their written slots (static_decode)"
        return result

    def _guards(self, gm: torch.fx.GraphModule, ctx: PassContext, proofs: list) -> list[InputGuard]:
        q_len = ctx.layer_map.layers[0].q_len
        where = length_input(gm, q_len)
        guards = {dataclasses.replace(g, length_of=where) for proof in proofs for g in proof.guards}
        if where is not None and proofs:
            window = sliding_window(ctx.model_config)
            if ctx.model_config is None:
                # Without the model config a sliding window longer than the probed lengths is invisible.
                limit = max(max(p.lengths) for p in proofs)
                ctx.notes.append(f"model config unknown: causal rewrite guarded to prompts <= {limit} tokens")
                guards.add(InputGuard(where[0], "max_len", where[1], limit))
            elif window is not None:
                guards.add(InputGuard(where[0], "max_len", where[1], window))
        return sorted(guards, key=lambda g: (g.index, g.role))
