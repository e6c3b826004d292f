"""The reference SlimInfer implementation: a plain PyTorch loop over a Hugging Face decoder's layers.

This is the readable specification of the method and the test oracle of the compiled path. It
shares no code with the graph passes: it runs the model's own submodules (embedding, norms,
projections, MLPs, rotary embedding, LM head) in a loop, computes attention itself, and prunes
with a simple per-row Python selection. With pruning off it equals the model's eager forward.

The method (one pruning point, after layer ``p - 1``, cutting the input of layer ``p``):

1. The current sequence (length ``L``) is cut into blocks of ``block_size`` tokens; the last block
   may be partial. The first ``sink_blocks`` blocks and the last block are always kept.
2. The scorer (``SlimConfig.scorer``) scores every full block from layer ``p - 1``'s post-RoPE
   queries and keys; the middle blocks with the highest scores are kept, as many as the stage's
   budget allows (see `slimpass.schedule`); equal scores prefer the earlier block.
3. The hidden states of the kept tokens, in their original order, continue to layer ``p``; each
   keeps its original position (RoPE is not re-indexed). Later stages cut what survived.
4. Each layer's KV cache holds the tokens that reached it. Decoding appends each new token to every
   layer's cache (generated tokens are never pruned) at position prompt length + step.
5. Decode-time reselection (``SlimConfig.reselect``, paper section 4.3). The slim layers are the
   layers from the first pruning stage on. Each slim layer cuts its cached prompt tokens (in cache
   order) into blocks as in 1. At each decoding step the scorer scores the full blocks from the step's
   query (one query) and the cached prompt keys; with ``reselect_unit = n > 1``, against representative
   keys instead (once after prefill, the mean of each n keys in float32, each one "token", blocks of
   ``block_size // n`` of them: what stays on the accelerator when the cache is offloaded). The best
   ``active_tokens // block_size`` middle blocks are the candidates. The first step's candidates become the layer's active set. The step attends to the
   sink blocks, the active blocks, the last prompt block and every generated token (this step's
   included). After attending, when fewer than ``gamma`` of the candidates are already active, the
   candidates become the active set of the *next* step (one step of lag: an offloading cache copies
   the new blocks while the rest of the step runs).

Use::

    out = reference.prefill(model, input_ids, config)      # last-position logits, keep sets, caches
    tokens = reference.generate(model, input_ids, config, max_new_tokens=32)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F

from slimpass.config import SlimConfig
from slimpass.runtime.keep_sets import KeepSet  # a plain record, shared with the compiled path's report
from slimpass.runtime.scoring import ScoreSettings, get_scorer
from slimpass.schedule import Stage, min_prune_length, resolve_schedule


@dataclasses.dataclass
class ReferenceState:
    """The result of a reference prefill: last-position logits and what decoding needs."""

    logits: torch.Tensor  # [B, V] at the last prompt position
    keep_sets: list[KeepSet]
    keys: list[torch.Tensor]  # per layer [B, Hkv, n_layer, D] (post-RoPE)
    values: list[torch.Tensor]
    prompt_len: int


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


def block_scores(q: torch.Tensor, k: torch.Tensor, config: SlimConfig) -> torch.Tensor:
    """[B, L // block] scores of the configured scorer; for "tokenunit" its torch version (the compiled
    graph may run the Triton kernel; the reference stays plain PyTorch)."""
    name = "tokenunit_torch" if config.scorer == "tokenunit" else config.scorer
    return get_scorer(name)(q, k, ScoreSettings(config.block_size, config.unit_size, config.local_window))


def select_blocks(scores: torch.Tensor, length: int, keep_middle: int, config: SlimConfig) -> list[int]:
    """The kept block indices of one row: sinks, the `keep_middle` best middle blocks, the last block."""
    block, sink = config.block_size, config.sink_blocks
    last = (length - 1) // block
    if last < sink:  # the sinks already cover the whole sequence
        return list(range(last + 1))
    middle = list(range(sink, last))
    ranked = sorted(middle, key=lambda j: (-float(scores[j]), j))  # ties: the earlier block
    chosen = sorted(ranked[: min(keep_middle, len(middle))])
    return list(range(sink)) + chosen + [last]


def middle_blocks(budget: int, length: int, config: SlimConfig) -> int:
    """How many middle blocks a `budget`-token stage keeps of a `length`-token sequence, counted one block
    at a time: the sinks and the last block first, then whole blocks while they fit (and remain)."""
    block, sink = config.block_size, config.sink_blocks
    last = (length - 1) // block
    used = min(sink, last) * block + (length - last * block)
    chosen = 0
    while sink + chosen < last and used + block <= budget:
        used += block
        chosen += 1
    return chosen


def _positions_of(blocks: list[int], length: int, block: int) -> list[int]:
    return [t for j in blocks for t in range(j * block, min((j + 1) * block, length))]


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
def layer_queries_keys(model: torch.nn.Module, input_ids: torch.Tensor) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """(layer index, post-RoPE queries, keys) of every decoder layer of an unpruned forward, in order.

    What a scorer at that layer would see (`slimpass.eval.calibrate` ranks blocks at each layer)."""
    decoder = _decoder(model)
    h = decoder.embed_tokens(input_ids)
    positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand(input_ids.shape[0], -1)
    cos, sin = decoder.rotary_emb(h, positions)
    for index, layer in enumerate(decoder.layers):
        h, q, k, _ = _layer(layer, h, cos, sin, positions, None)
        yield index, q, k


@dataclasses.dataclass
class Reselection:
    """One slim layer's decode-time reselection state (section 5 of the module docstring)."""

    keys: torch.Tensor  # [B, Hkv, n, D] the layer's cached prompt keys
    config: SlimConfig
    active: list[list[int]] | None = None  # per row, the active middle blocks (cache-order block indices)
    swapped_in: int = 0  # blocks that entered an active set after the first step, summed over rows

    def __post_init__(self) -> None:
        batch, heads, n, dim = self.keys.shape
        block, unit = self.config.block_size, self.config.reselect_unit
        full = n // block * block
        self.prompt_tokens = n
        self.unit_keys = None if unit == 1 else \
            self.keys[:, :, :full].float().reshape(batch, heads, full // unit, unit, dim).mean(dim=3)

    def __call__(self, q: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        config, n = self.config, self.prompt_tokens
        block = config.block_size
        if self.unit_keys is None:
            scores = block_scores(q, keys[:, :, :n], config)  # [B, full blocks]
        else:
            name = "tokenunit_torch" if config.scorer == "tokenunit" else config.scorer
            settings = ScoreSettings(block // config.reselect_unit, 1, config.local_window)
            scores = get_scorer(name)(q, self.unit_keys, settings)
        keep_middle = config.active_tokens // block
        candidates = [select_blocks(scores[b], n, keep_middle, config)[config.sink_blocks:-1]
                      for b in range(keys.shape[0])]
        if self.active is None:
            self.active = candidates
        last = (n - 1) // block
        sinks = list(range(min(config.sink_blocks, last)))
        rows = [_positions_of(sinks + active + [last], n, block) + list(range(n, keys.shape[2]))
                for active in self.active]
        for b, (now, new) in enumerate(zip(self.active, candidates)):  # for the next step
            if new and len(set(now) & set(new)) < config.gamma * len(new):
                self.swapped_in += len(set(new) - set(now))
                self.active[b] = new
        return torch.tensor(rows, device=keys.device)


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
