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
a call of `reselect_attention` (plain PyTorch, traced and fused by the compiler) at the layer's
attention call.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from slimpass.runtime.scoring import ScoreSettings, get_scorer


@torch.library.custom_op("slimpass::bind_layer_state", mutates_args=("active", "stats"))
def bind_layer_state(active: torch.Tensor, stats: torch.Tensor, prompt_positions: torch.Tensor,
                     unit_keys: torch.Tensor | None, layer: int) -> None:
    """Marks, in a traced decode step, the reselection state of decoder layer `layer`. No effect: the
    `reselect_kv` pass replaces it; in a graph that pass declined the layer attends to all its tokens.
    (Declared as writing its state so that no compiler drops it before the pass sees it.)"""


@bind_layer_state.register_fake
def _(active, stats, prompt_positions, unit_keys, layer):
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
    last = (prompt_tokens - 1) // block_size
    sinks = min(sink_blocks, last)
    order = torch.argsort(scores[:, sinks:last], dim=1, descending=True, stable=True)[:, :count]
    return torch.sort(order, dim=1).values + sinks


def attended_tokens(active: torch.Tensor, prompt_tokens: int, length: int, block_size: int,
                    sink_blocks: int) -> torch.Tensor:
    """[B, n] indices into a layer's cache of what a step attends to: sinks, active blocks, the last
    prompt block, then every token after the prompt."""
    batch, device = active.shape[0], active.device
    last = (prompt_tokens - 1) // block_size
    sinks = torch.arange(min(sink_blocks, last) * block_size, device=device).expand(batch, -1)
    inner = (active[:, :, None] * block_size + torch.arange(block_size, device=device)).flatten(1)
    tail = torch.arange(last * block_size, length, device=device).expand(batch, -1)
    return torch.cat([sinks, inner, tail], dim=1)


def reselect_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, active: torch.Tensor, stats: torch.Tensor,
                       prompt_positions: torch.Tensor, unit_keys: torch.Tensor | None, scale: float, scorer: str,
                       block_size: int, unit_size: int, local_window: int, sink_blocks: int,
                       gamma: float, reselect_unit: int = 1) -> torch.Tensor:
    """One decoding step's attention at a slim layer: q [B, Hq, 1, D] over the active part of k, v
    [B, Hkv, n, D] (the layer's cache including this step). Updates `active` (for the next step) and `stats`.

    Plain traceable PyTorch (no host syncs, sizes symbolic in the cache length): the pass calls it from the
    decode graph, AOTAutograd traces through it (the writes to `active` and `stats` become the graph's
    input mutations) and Inductor fuses it with its neighbours."""
    prompt_tokens = prompt_positions.shape[1]
    name = "tokenunit_torch" if scorer == "tokenunit" else scorer  # one query: the Triton kernel wants a window
    if unit_keys is None:  # the cached prompt keys themselves
        scores = get_scorer(name)(q, k[:, :, :prompt_tokens], ScoreSettings(block_size, unit_size, local_window))
    else:
        scores = get_scorer(name)(q, unit_keys, ScoreSettings(block_size // reselect_unit, 1, local_window))
    count = active.shape[1]
    best = candidate_blocks(scores.float(), prompt_tokens, count, block_size, sink_blocks)
    first = stats[0] == 0
    active.copy_(torch.where(first, best, active))
    index = attended_tokens(active, prompt_tokens, k.shape[2], block_size, sink_blocks)
    rows = torch.arange(k.shape[0], device=k.device)[:, None]
    keys = k.transpose(1, 2)[rows, index].transpose(1, 2)
    values = v.transpose(1, 2)[rows, index].transpose(1, 2)
    out = F.scaled_dot_product_attention(q, keys, values, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    # for the next step: follow the candidates where too few of them are active
    shared = (best[:, :, None] == active[:, None, :]).any(dim=2).sum(dim=1)  # [B]
    swap = ~first & (shared < gamma * count)
    active.copy_(torch.where(swap[:, None], best, active))
    stats.add_(torch.stack([torch.ones_like(stats[0]), torch.where(swap, count - shared, 0).sum()]))
    return out
