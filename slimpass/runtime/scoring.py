"""Block scorers: which prompt blocks matter, judged from one layer's post-RoPE queries and keys.

A scorer is a function ``fn(q, k, settings) -> scores`` registered under a name with
`register_scorer`; ``SlimConfig.scorer`` picks one by name. The contract:

- ``k``: ``[B, Hkv, L, D]`` keys after RoPE; ``q``: ``[B, Hq, Lq, D]`` the queries of the *last* ``Lq``
  positions after RoPE: ``Lq = L`` at a pruning stage, ``Lq = 1`` when a decoding step reselects
  (`slimpass.runtime.reselection`; its query comes after every key); ``Hq % Hkv == 0``
  (grouped-query attention: query head ``h`` reads key head ``h // (Hq // Hkv)``);
- ``settings``: a `ScoreSettings` (block size, unit size, local window);
- returns ``[B, L // block_size]`` float32 scores, one per *full* block, higher = more important.
  The selection never asks a scorer about the last block (it is always kept, and may be partial).

Both the compiled graph (through the ``slimpass::score_blocks`` op) and the reference loop call
the registered function, so every scorer is checked against the reference the same way.

The paper's scorer, ``"tokenunit"``: local query = mean of the last ``local_window`` queries (per
head); per unit of ``unit_size`` keys, the representative key = their mean (per KV head); unit
score = mean over query heads of ``|q_local . k_unit|``; block score = max over its units.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable

import torch

from slimpass.config import ConfigError
from slimpass.registry import REGISTRY


@dataclasses.dataclass(frozen=True)
class ScoreSettings:
    """The geometry a scorer needs: tokens per block, per scoring unit, and the local-query window."""

    block_size: int
    unit_size: int
    local_window: int


Scorer = Callable[[torch.Tensor, torch.Tensor, ScoreSettings], torch.Tensor]



def register_scorer(name: str, /) -> Callable[[Scorer], Scorer]:
    """Register a block scorer under `name` (then ``options={"scorer": name}`` selects it).

    Example::

        @slimpass.register_scorer("last_query_max_heads")
        def last_query(q, k, settings):
            b, hq, n, d = q.shape
            full = (n // settings.block_size) * settings.block_size
            kk = k[:, :, :full].repeat_interleave(hq // k.shape[1], dim=1)
            s = (q[:, :, -1:].float() @ kk.float().transpose(-1, -2)).abs().amax(1)   # [B, 1, full]
            return s.view(b, -1, settings.block_size).amax(-1)

    The function must be traceable by torch (it runs inside the compiled prefill graph): no data-
    dependent Python control flow, no host syncs. Re-registering a name replaces it.
    """
    if not isinstance(name, str) or not name:
        raise ConfigError(f"register_scorer({name!r}): a scorer needs a non-empty string name")

    def add(fn: Scorer) -> Scorer:
        if not callable(fn):
            raise ConfigError(f"register_scorer({name!r}): {fn!r} is not callable")
        REGISTRY.scorers[name] = fn
        return fn

    return add


def get_scorer(name: str) -> Scorer:
    """The scorer registered under `name`; an unknown name raises `ConfigError` listing the known ones."""
    try:
        return REGISTRY.scorers[name]
    except KeyError:
        raise ConfigError(
            f"SlimConfig.scorer={name!r} is not a registered scorer; known: {', '.join(sorted(REGISTRY.scorers))} "
            "(add one with @slimpass.register_scorer(name))"
        ) from None


def scorer_names() -> list[str]:
    return sorted(REGISTRY.scorers)


def tokenunit_torch(q: torch.Tensor, k: torch.Tensor, settings: ScoreSettings) -> torch.Tensor:
    """The paper's TokenUnit scorer in plain PyTorch (the specification the Triton kernel must match)."""
    batch, heads_q, queries, dim = q.shape
    heads_kv, length = k.shape[1], k.shape[2]
    blocks = length // settings.block_size
    units_per_block = settings.block_size // settings.unit_size
    local = q[:, :, queries - settings.local_window :].float().mean(dim=2)  # [B, Hq, D] (as the kernel reads it)
    # A copy, not a view: viewing the slice lets the tracer choose its layout by whether the length is a
    # multiple of the block size (in float32 `.float()` is a no-op), a shape guard that recompiled the
    # prefill graph under Inductor each time that flipped; see test_one_inductor_graph_for_all_lengths.
    keys = k[:, :, : blocks * settings.block_size].clone(memory_format=torch.contiguous_format).float()
    unit_keys = keys.reshape(batch, heads_kv, blocks * units_per_block, settings.unit_size, dim).mean(dim=3)
    local = local.view(batch, heads_kv, heads_q // heads_kv, dim)
    unit_scores = torch.einsum("bhgd,bhud->bhgu", local, unit_keys).abs()  # [B, Hkv, G, units]
    unit_scores = unit_scores.mean(dim=(1, 2))  # mean over all query heads
    return unit_scores.view(batch, blocks, units_per_block).amax(dim=-1)


@register_scorer("tokenunit")
def tokenunit(q: torch.Tensor, k: torch.Tensor, settings: ScoreSettings) -> torch.Tensor:
    """TokenUnit (paper): the fused Triton kernel on CUDA when available, else `tokenunit_torch`."""
    if q.is_cuda and os.environ.get("SLIMPASS_TRITON_SCORING", "1") != "0":
        kernel = _kernel()
        if kernel is not None:
            return kernel.tokenunit_scores(q, k, settings.block_size, settings.unit_size, settings.local_window)
    return tokenunit_torch(q, k, settings)


@functools.cache
def _kernel():
    """The Triton kernel module when triton is usable here, else None (the torch version runs)."""
    try:
        from slimpass.runtime import tokenunit_kernel
    except ImportError:
        return None
    return tokenunit_kernel if tokenunit_kernel.available() else None


register_scorer("tokenunit_torch")(tokenunit_torch)

# The observation window (SnapKV uses 32): the last queries whose attention decides what is kept.
# 16 kept the needle more often than 8, 32 or 64 on SmolLM2 (docs/QUALITY.md).
OBSERVATION_WINDOW = 16
# Each token's score becomes the max over the tokens within this distance (SnapKV pools too): the key
# of a fact draws the attention, and pooling carries it to the value written beside it, so a needle
# that straddles a block boundary keeps both blocks. 16 held every needle from layer 14 of SmolLM2 on,
# without pooling 45-70% at a 25% cut (docs/QUALITY.md).
POOL_RADIUS = 16


def _shifted(x: torch.Tensor, by: int) -> torch.Tensor:
    """x moved `by` places along its last dim (right for by > 0, left for by < 0), zeros filling in.

    Pad-then-slice rather than a slice of `x` itself: with a symbolic length `L - by` could turn
    negative, and the tracer would guard on it (one compiled graph per length range)."""
    length = x.shape[-1]
    if by > 0:
        return torch.nn.functional.pad(x, (by, 0))[..., :length]
    return torch.nn.functional.pad(x, (0, -by))[..., -by:]


def _one_sided_max(x: torch.Tensor, radius: int, sign: int) -> torch.Tensor:
    """out[i] = max(x[i], x[i - sign], ..., x[i - sign * radius]), by doubling spans."""
    spans = {1: x}  # spans[w][i] = max(x[i], ..., x[i - sign * (w - 1)])
    width = 1
    while 2 * width <= radius + 1:
        spans[2 * width] = torch.maximum(spans[width], _shifted(spans[width], sign * width))
        width *= 2
    out, covered = None, 0
    for w in sorted(spans, reverse=True):  # the widest spans first, laid end to end
        while covered + w <= radius + 1:
            part = _shifted(spans[w], sign * covered) if covered else spans[w]
            out = part if out is None else torch.maximum(out, part)
            covered += w
    return out


def sliding_max(x: torch.Tensor, radius: int) -> torch.Tensor:
    """out[..., i] = max(x[..., i - radius : i + radius + 1]) for x >= 0 (zeros beyond the ends).

    Built from shifts and maxima by doubling (about 4 log2(radius) ops), not `max_pool1d`: Inductor's
    pooling lowering specialises on the sequence length, recompiling the prefill graph for each prompt
    length (test_one_inductor_graph_for_all_lengths)."""
    return torch.maximum(_one_sided_max(x, radius, 1), _one_sided_max(x, radius, -1))


def make_window_attention(window: int = OBSERVATION_WINDOW, pool_radius: int = POOL_RADIUS) -> Scorer:
    """A SnapKV-style scorer: softmax attention of the last `window` queries (causal among themselves),
    averaged over those queries, the max over query heads, max-pooled over +-`pool_radius` tokens, the
    max over each block's tokens.

    Unlike TokenUnit it normalises per query (softmax), so a block is important when some head
    attends to it, rather than when its mean-pooled RoPE'd keys have a large dot product with a mean
    query (which decays with distance). `settings.local_window` is not used.
    """
    if window < 1 or pool_radius < 0:
        raise ConfigError(f"make_window_attention: window={window} must be >= 1 and pool_radius={pool_radius} >= 0")

    def window_attention(q: torch.Tensor, k: torch.Tensor, settings: ScoreSettings) -> torch.Tensor:
        batch, heads_q, count, dim = q.shape
        heads_kv, length = k.shape[1], k.shape[2]
        seen = min(window, count)
        queries = q[:, :, count - seen :].float().view(batch, heads_kv, heads_q // heads_kv, seen, dim)
        logits = torch.einsum("bhgwd,bhnd->bhgwn", queries, k.float()) * dim**-0.5  # [B, Hkv, G, W, L]
        keys_at = torch.arange(length, device=q.device)
        query_at = torch.arange(length - seen, length, device=q.device)  # the last queries of the sequence
        logits = logits.masked_fill(keys_at[None, :] > query_at[:, None], float("-inf"))
        per_token = logits.softmax(dim=-1).mean(dim=3).amax(dim=(1, 2))  # [B, L]
        if pool_radius:
            per_token = sliding_max(per_token, pool_radius)
        blocks = length // settings.block_size
        full = per_token[:, : blocks * settings.block_size].clone(memory_format=torch.contiguous_format)  # as above
        return full.view(batch, blocks, settings.block_size).amax(dim=-1)

    window_attention.__qualname__ = window_attention.__name__ = f"window_attention_w{window}_pool{pool_radius}"
    return window_attention


window_attention = register_scorer("window_attention")(make_window_attention())
