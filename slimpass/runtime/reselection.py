"""Decode-time reselection (paper section 4.3): the runtime ops the `reselect_kv` pass puts in decode graphs.

At a slim layer (one at or after the first pruning stage) the cache holds the prompt tokens that
survived pruning. Each decoding step re-scores their blocks with the step's query through the scorer
registry, against the cached keys (or, with ``reselect_unit = n > 1``, representative keys: the mean of
each n keys, computed once after prefill: what stays on the accelerator when the cache is offloaded),
and attends to the sink
blocks, an *active set* of middle blocks, the last prompt block and every generated token. The active
set follows the step's best blocks only when fewer than `gamma` of those are already active, and
only from the next step on, so consecutive steps mostly reuse the same blocks and a changed set has
a whole step to arrive (what lets an offloading cache hide its copies). `slimpass.runtime.reference`
states the same rule in plain Python (section 5).

State lives in the request's `SlimCache` layer (never module-global): ``active`` [B, m] (the active
middle blocks, cache-order block indices; -1 before the first step), ``stats`` [2] (decoding steps
seen, blocks swapped in after the first step, summed over rows) and ``unit_keys``. `SlimLayer.update`
hands them to the graph through `bind_layer_state`, a marker with no effect that the pass replaces by
a call of `reselect_attention` (or `reselect_attention_offloaded`; plain PyTorch, traced and fused by the compiler) at the layer's
attention call.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from slimpass.runtime import front_events, static_kv  # noqa: F401  (front_events: registers its marks)
from slimpass.runtime.block_index import block_tokens, gather_tokens
from slimpass.runtime.block_layout import BlockLayout
from slimpass.runtime.scoring import ScoreSettings, get_scorer


@dataclasses.dataclass
class ReselectState:
    """A slim layer's reselection state, held by its `SlimLayer` once armed (`SlimCache.record_prefill`)."""

    active: torch.Tensor
    """[B, m] the active middle blocks (cache-order block indices; -1 before the first step)."""
    stats: torch.Tensor
    """[2] decoding steps seen, blocks swapped in after the first step (summed over rows)."""
    unit_keys: torch.Tensor | None = None
    """The keys scored when they are not the cached prompt keys (``reselect_unit > 1``, or offloaded)."""

    def tensors(self) -> tuple[torch.Tensor | None, ...]:
        return self.active, self.stats, self.unit_keys


@torch.library.custom_op("slimpass::bind_layer_state", mutates_args=("active", "stats"))
def bind_layer_state(active: torch.Tensor, stats: torch.Tensor, prompt_positions: torch.Tensor,
                     unit_keys: torch.Tensor | None, layer: int, front_k: torch.Tensor | None = None,
                     front_v: torch.Tensor | None = None, pending: torch.Tensor | None = None) -> None:
    """Marks, in a traced decode step, the reselection state of decoder layer `layer` (with offload, once
    the layer's prompt K/V are on the host: its fronts and the buffer its next active set goes to,
    `slimpass.runtime.offload`). No effect: the `reselect_kv` pass replaces it; in a graph that pass
    declined the layer attends to all its tokens (an offloaded layer cannot: the cache raises). (Declared
    as writing its state so that no compiler drops it before the pass sees it.)"""
    if front_k is not None:
        raise RuntimeError(
            f"slimpass: decoder layer {layer} is offloaded (SlimConfig.offload) but this decoding step ran outside "
            "the sliminfer backend's compiled graph, so it would attend to the layer's last block only. Decode "
            "through the model slimpass.compile returned; if it was, torch._dynamo ran the step eagerly (e.g. it "
            "hit torch._dynamo.config.recompile_limit: raise it); or run with offload=False")


@bind_layer_state.register_fake
def _(active, stats, prompt_positions, unit_keys, layer, front_k=None, front_v=None, pending=None):
    return None


def unit_keys(keys: torch.Tensor, block_size: int, unit_size: int) -> torch.Tensor:
    """[B, Hkv, units, D] float32 representative keys of the full blocks of `keys` [B, Hkv, n, D]."""
    batch, heads, n, dim = keys.shape
    full = n // block_size * block_size
    return keys[:, :, :full].float().reshape(batch, heads, full // unit_size, unit_size, dim).mean(dim=3)


def candidate_blocks(scores: torch.Tensor, prompt_tokens: int, count: int, block_size: int,
                     sink_blocks: int) -> torch.Tensor:
    """[B, count] ascending indices of the best-scored middle blocks (between the sinks and the last
    prompt block; ties to the earlier block)."""
    layout = BlockLayout(block_size, sink_blocks)
    last, sinks = layout.last(prompt_tokens), layout.sinks(prompt_tokens)
    order = torch.argsort(scores[:, sinks:last], dim=1, descending=True, stable=True)[:, :count]
    return torch.sort(order, dim=1).values + sinks


def attended_tokens(active: torch.Tensor, prompt_tokens: int, length: int, block_size: int,
                    sink_blocks: int) -> torch.Tensor:
    """[B, n] indices into a layer's cache of what a step attends to: sinks, active blocks, the last
    prompt block, then every token after the prompt."""
    batch, device = active.shape[0], active.device
    layout = BlockLayout(block_size, sink_blocks)
    sinks = torch.arange(layout.sink_tokens(prompt_tokens), device=device).expand(batch, -1)
    inner = block_tokens(active, block_size)
    tail = torch.arange(layout.tail_start(prompt_tokens), length, device=device).expand(batch, -1)
    return torch.cat([sinks, inner, tail], dim=1)


def assign_slots(active: torch.Tensor, best: torch.Tensor) -> torch.Tensor:
    """[B, m] the next active set `best` laid out in the slots of `active`: a block that stays keeps its
    slot, the new ones fill the freed slots in ascending order (so an offloading cache rewrites only the
    slots whose block changed)."""
    stays = (active[:, :, None] == best[:, None, :]).any(dim=2)  # per slot
    fresh = ~(best[:, :, None] == active[:, None, :]).any(dim=2)  # per candidate
    freed = torch.argsort(stays.to(torch.int8), dim=1, stable=True)  # freed slots first
    entering = torch.argsort((~fresh).to(torch.int8), dim=1, stable=True)  # new blocks first
    rank = torch.arange(active.shape[1], device=active.device)
    values = torch.where(rank < (~stays).sum(dim=1, keepdim=True), best.gather(1, entering), active.gather(1, freed))
    return active.scatter(1, freed, values)


class ReselectSettings(NamedTuple):
    """The config a reselecting step reads, as one constant of the decode graph (`SlimConfig` fields)."""

    scorer: str
    block_size: int
    unit_size: int
    local_window: int
    sink_blocks: int
    gamma: float
    reselect_unit: int

    @classmethod
    def of(cls, config: Any) -> ReselectSettings:
        return cls(config.scorer, config.block_size, config.unit_size, config.local_window, config.sink_blocks,
                   config.gamma, config.reselect_unit)


def _choose(q: torch.Tensor, k: torch.Tensor, state: tuple, settings: ReselectSettings):
    """This step's active blocks `now` [B, m] and the next step's `upcoming`, from the scores of the step's query
    (the rule of the module docstring); plus what `_count` needs."""
    active, stats, prompt_positions, unit_keys = state
    prompt_tokens = prompt_positions.shape[1]
    name = "tokenunit_torch" if settings.scorer == "tokenunit" else settings.scorer  # the Triton kernel wants a window
    scored = k[:, :, :prompt_tokens] if unit_keys is None else unit_keys
    if settings.reselect_unit == 1:  # the cached prompt keys themselves
        scoring = ScoreSettings(settings.block_size, settings.unit_size, settings.local_window)
    else:  # one representative key per unit
        scoring = ScoreSettings(settings.block_size // settings.reselect_unit, 1, settings.local_window)
    scores = get_scorer(name)(q, scored, scoring)
    count = active.shape[1]
    best = candidate_blocks(scores.float(), prompt_tokens, count, settings.block_size, settings.sink_blocks)
    first = stats[0] == 0
    now = torch.where(first, best, active)
    # for the next step: follow the candidates where too few of them are active
    shared = (best[:, :, None] == now[:, None, :]).any(dim=2).sum(dim=1)  # [B]
    swap = ~first & (shared < settings.gamma * count)
    upcoming = torch.where(swap[:, None], assign_slots(now, best), now)
    return now, upcoming, (swap, shared, count)


def _count(state: tuple, upcoming: torch.Tensor, counts: tuple) -> None:
    """Keep the next step's set and count the step (and the blocks it swapped in) in `stats`."""
    active, stats = state[:2]
    swap, shared, count = counts
    active.copy_(upcoming)
    stats.add_(torch.stack([torch.ones_like(stats[0]), torch.where(swap, count - shared, 0).sum()]))


def _attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None,
            scale: float) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scale,
                                          enable_gqa=q.shape[1] != keys.shape[1])


def reselect_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state: tuple, scale: float,
                       settings: ReselectSettings, valid: torch.Tensor | None = None) -> torch.Tensor:
    """One decoding step's attention at a resident slim layer: q [B, Hq, 1, D] over the active part of k, v
    [B, Hkv, n, D] (the layer's cache including this step). `state` is the layer's reselection state
    ``(active, stats, prompt_positions, unit_keys)``; `active` (for the next step) and `stats` are updated.
    With `valid` (fixed-size buffers, `slimpass.runtime.static_kv`) k, v have empty slots from ``valid`` on,
    which the attention masks out.

    Plain traceable PyTorch (no host syncs, sizes symbolic in the cache length): the pass calls it from the
    decode graph, AOTAutograd traces through it (the writes to `active` and `stats` become the graph's
    input mutations) and Inductor fuses it with its neighbours."""
    now, upcoming, counts = _choose(q, k, state, settings)
    index = attended_tokens(now, state[2].shape[1], k.shape[2], settings.block_size, settings.sink_blocks)
    mask = None if valid is None else (index < valid)[:, None, None, :]
    out = _attend(q, gather_tokens(k, index), gather_tokens(v, index), mask, scale)
    _count(state, upcoming, counts)
    return out


def reselect_attention_offloaded(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state: tuple, scale: float,
                                 settings: ReselectSettings, fronts: tuple, valid: torch.Tensor | None,
                                 layer: int) -> torch.Tensor:
    """`reselect_attention` at an offloaded slim layer (`slimpass.runtime.offload`): k, v hold only the last
    prompt block and the generated tokens, ``state``'s unit keys the keys scored, and ``fronts = (front_k,
    front_v, pending)``: the sink and active blocks (the manager copied this step's set into them, slot by
    slot, after the step before) and the buffer the next step's set is written to, where the manager's copy
    after this step reads it. No first step here: it runs resident. With `valid` (static buffers) the tail has
    empty slots from ``valid`` on, and layer `layer` orders its reads of the fronts after their copy and marks
    when it is done with them (`slimpass.runtime.front_events`)."""
    front_k, front_v, pending = fronts
    _, upcoming, counts = _choose(q, k, state, settings)
    if valid is not None:
        torch.ops.slimpass.wait_front(front_k, front_v, q, layer)
    keys, values = torch.cat([front_k, k], dim=2), torch.cat([front_v, v], dim=2)
    if valid is None:
        pending.copy_(upcoming)
        out = _attend(q, keys, values, None, scale)
    else:  # the tail's empty slots; the next set goes to `pending` with the mark that fronts are read
        out = _attend(q, keys, values, static_kv.slot_mask(keys, front_k.shape[2] + valid), scale)
        out = torch.ops.slimpass.front_done(front_k, front_v, pending, upcoming, out, layer)
    _count(state, upcoming, counts)
    return out
