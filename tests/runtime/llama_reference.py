"""The Llama-only reference: a plain PyTorch loop that re-implements a Llama layer by attribute name
(q_proj/k_proj/v_proj/o_proj, input_layernorm, post_attention_layernorm, mlp) and computes attention
itself. It was slimpass's reference before the family-generic one (`slimpass.runtime.reference`, which
runs the model's own modules); the tests keep it as a second, independent oracle of the model computation
for Llama, Mistral and Qwen2 (the block selection rules are shared: they are the method, not the model).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from slimpass.config import SlimConfig
from slimpass.runtime.keep_sets import KeepSet
from slimpass.runtime.reference import (ReferenceState, Reselection, _positions_of, block_scores, middle_blocks,
                                        select_blocks)
from slimpass.schedule import Stage, min_prune_length, resolve_schedule


def _decoder(model: torch.nn.Module) -> torch.nn.Module:
    inner = getattr(model, "model", None)
    if inner is None or not hasattr(inner, "layers") or not hasattr(model, "lm_head"):
        raise TypeError(f"reference: {type(model).__name__} is not a LLaMA-style causal LM (model.model.layers, lm_head)")
    return inner


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, L, D]; cos/sin [B, L, D]."""
    return x * cos[:, None] + _rotate_half(x) * sin[:, None]


def _project(attn: torch.nn.Module, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Post-RoPE queries, keys and values of one attention module: [B, H, L, D]."""
    batch, length, _ = h.shape
    dim = attn.head_dim
    q = attn.q_proj(h).view(batch, length, -1, dim).transpose(1, 2)
    k = attn.k_proj(h).view(batch, length, -1, dim).transpose(1, 2)
    v = attn.v_proj(h).view(batch, length, -1, dim).transpose(1, 2)
    if hasattr(attn, "q_norm"):  # Qwen3-style per-head norms before RoPE
        q, k = attn.q_norm(q), attn.k_norm(k)
    return _rope(q, cos, sin), _rope(k, cos, sin), v


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor,
            scale: float) -> torch.Tensor:
    """Attention where query i sees key j iff k_pos[j] <= q_pos[i] (original positions, per row)."""
    if k_pos is q_pos:  # prefill: the same ascending positions on both sides, so that rule is causal order
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    groups = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(groups, dim=1)
    v = v.repeat_interleave(groups, dim=1)
    allowed = k_pos[:, None, None, :] <= q_pos[:, None, :, None]  # [B, 1, Lq, Lk]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale)


def _layer(layer: torch.nn.Module, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, q_pos: torch.Tensor,
           past: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None,
           attend_to: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None):
    """One decoder layer. Returns (new h, q, k, v) with k/v of this step only.

    `attend_to(q, keys)`, if given, returns [B, n] indices of the cached + new keys the step attends to."""
    attn = layer.self_attn
    q, k, v = _project(attn, layer.input_layernorm(h), cos, sin)
    keys, values, k_pos = (k, v, q_pos) if past is None else (
        torch.cat([past[0], k], 2), torch.cat([past[1], v], 2), torch.cat([past[2], q_pos], 1))
    if attend_to is not None:
        index = attend_to(q, keys)
        rows = torch.arange(keys.shape[0], device=keys.device)[:, None]
        keys = keys.transpose(1, 2)[rows, index].transpose(1, 2)
        values = values.transpose(1, 2)[rows, index].transpose(1, 2)
        k_pos = k_pos[rows, index]
    out = _attend(q, keys, values, q_pos, k_pos, attn.scaling)
    out = attn.o_proj(out.transpose(1, 2).reshape(h.shape[0], h.shape[1], -1))
    h = h + out
    h = h + layer.mlp(layer.post_attention_layernorm(h))
    return h, q, k, v


def _stages(model: torch.nn.Module, config: SlimConfig | None, prompt_len: int) -> list[Stage]:
    if config is None or not config.prune or prompt_len < min_prune_length(config):
        return []
    return resolve_schedule(config, len(_decoder(model).layers))


@torch.no_grad()
def prefill(model: torch.nn.Module, input_ids: torch.Tensor, config: SlimConfig | None = None) -> ReferenceState:
    """Run the prompt through the model with SlimInfer pruning as `config` says (None: no pruning)."""
    decoder = _decoder(model)
    batch, prompt_len = input_ids.shape
    window = getattr(model.config, "sliding_window", None)
    if window and prompt_len > window:
        raise NotImplementedError(f"reference: prompt of {prompt_len} tokens exceeds the sliding window ({window})")
    stages = {s.layer: s for s in _stages(model, config, prompt_len)}
    h = decoder.embed_tokens(input_ids)
    positions = torch.arange(prompt_len, device=input_ids.device).expand(batch, prompt_len)
    cos, sin = decoder.rotary_emb(h, positions)
    keep_sets, keys, values = [], [], []
    q = k = None
    for index, layer in enumerate(decoder.layers):
        stage = stages.get(index)
        if stage is not None:
            scores = block_scores(q, k, config)
            length = h.shape[1]
            keep_middle = middle_blocks(stage.budget(prompt_len), length, config)
            rows = [_positions_of(select_blocks(scores[b], length, keep_middle, config), length, config.block_size)
                    for b in range(batch)]
            index_t = torch.tensor(rows, device=h.device)  # [B, K] indices into the current sequence
            h = torch.stack([h[b, index_t[b]] for b in range(batch)])
            positions = torch.stack([positions[b, index_t[b]] for b in range(batch)])
            cos, sin = decoder.rotary_emb(h, positions)  # recomputed from the original positions
            keep_sets.append(KeepSet(index, positions.clone()))
        h, q, k, v = _layer(layer, h, cos, sin, positions, None)
        keys.append(k)
        values.append(v)
    logits = model.lm_head(decoder.norm(h[:, -1:]))[:, 0]
    return ReferenceState(logits, keep_sets, keys, values, prompt_len)


@torch.no_grad()
def generate(model: torch.nn.Module, input_ids: torch.Tensor, config: SlimConfig | None = None,
             max_new_tokens: int = 32, trace: list[dict[int, list[list[int]]]] | None = None,
             logits: list[torch.Tensor] | None = None, forced: torch.Tensor | None = None) -> torch.Tensor:
    """Greedy decoding after a (pruned) prefill: returns [B, prompt + max_new_tokens] token ids.

    With ``config.reselect``, slim layers attend to their reselected blocks (section 5); `trace`, if
    given, receives per decoding step {slim layer: per row its active middle blocks}; `logits`, if given,
    the [B, vocab] logits each new token was chosen from. `forced` ([B, max_new_tokens]), if given, are the
    tokens to feed instead of the greedy ones (to score a sequence another search chose)."""
    decoder = _decoder(model)
    state = prefill(model, input_ids, config)
    batch = input_ids.shape[0]
    # each layer's cache: keys, values and the original positions of its tokens
    caches = []
    stages = {s.layer: s.positions for s in state.keep_sets}
    positions = torch.arange(state.prompt_len, device=input_ids.device).expand(batch, -1)
    for index in range(len(decoder.layers)):
        positions = stages.get(index, positions)
        caches.append((state.keys[index], state.values[index], positions))
    first_slim = state.keep_sets[0].layer if state.keep_sets else len(caches)
    reselect = {index: Reselection(caches[index][0], config)
                for index in range(first_slim, len(caches)) if config is not None and config.reselect}
    def choose(step_logits: torch.Tensor, step: int) -> torch.Tensor:
        return step_logits.argmax(-1, keepdim=True) if forced is None else forced[:, step:step + 1]

    out = [input_ids, choose(state.logits, 0)]
    if logits is not None:
        logits.append(state.logits)
    for step in range(max_new_tokens - 1):
        token = out[-1]
        pos = torch.full((batch, 1), state.prompt_len + step, device=input_ids.device)
        h = decoder.embed_tokens(token)
        cos, sin = decoder.rotary_emb(h, pos)
        for index, layer in enumerate(decoder.layers):
            h, _, k, v = _layer(layer, h, cos, sin, pos, caches[index], reselect.get(index))
            keys, values, kpos = caches[index]
            caches[index] = (torch.cat([keys, k], 2), torch.cat([values, v], 2), torch.cat([kpos, pos], 1))
        if trace is not None:
            trace.append({index: [list(row) for row in r.active] for index, r in reselect.items()})
        step_logits = model.lm_head(decoder.norm(h))
        if logits is not None:
            logits.append(step_logits[:, -1])
        out.append(choose(step_logits[:, -1], step + 1))
    return torch.cat(out, dim=1)
