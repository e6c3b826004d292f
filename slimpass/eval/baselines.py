"""Evaluation baselines at a given KV budget, beside SlimInfer, plainly, on the model's own forward.

    tokens = baselines.generate("snapkv", model, input_ids, budget=4096, max_new_tokens=24, eos_token_id=[...])

- ``streaming`` (StreamingLLM-style): full prefill; every layer keeps the KV of the first `sinks` tokens
  and the most recent ``budget - sinks``; decoding attends to those and the generated tokens.
- ``snapkv`` (SnapKV-style): full prefill; per layer and KV head, the prompt tokens are scored by the
  softmax attention of the last `window` queries (the observation window, causal within it; summed over
  the window and over the query heads of the KV head's group), average-pooled over `kernel` neighbours;
  the best ``budget - window`` positions and the window itself are kept.
- ``gemfilter`` (GemFilter-style): the prompt runs to layer `layer` (scaled from the paper's layer 13 of
  32), the last query's attention (summed over heads) picks the best `budget` tokens, and the model
  answers from a new prompt of those tokens in their order (positions re-indexed, as GemFilter does).

The first answer token of ``streaming`` and ``snapkv`` comes from the full prefill (as in their papers'
long-context evaluations): they save KV memory at decode, not prefill compute. Generated tokens keep
their true positions (prompt length + step) while the cache holds fewer slots.
"""

from __future__ import annotations

import inspect
import math

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from slimpass.hf_compat import cache_argument
from slimpass.runtime import reference

BASELINES = ("streaming", "snapkv", "gemfilter")


def _kv_heads_scores(q: torch.Tensor, k: torch.Tensor, window: int) -> torch.Tensor:
    """[B, Hkv, N - window] SnapKV scores of the prompt before the window, from q [B, H, N, D], k [B, Hkv, N, D]."""
    batch, heads, n, dim = q.shape
    kv_heads = k.shape[1]
    obs = q[:, :, -window:].float()
    keys = k.float().repeat_interleave(heads // kv_heads, dim=1)
    logits = obs @ keys.transpose(-1, -2) / math.sqrt(dim)  # [B, H, w, N]
    causal = torch.ones(window, window, dtype=torch.bool, device=q.device).tril()
    logits[..., -window:] = logits[..., -window:].masked_fill(~causal, float("-inf"))
    weights = logits.softmax(-1)[..., : n - window].sum(2)  # [B, H, N - w]
    return weights.view(batch, kv_heads, heads // kv_heads, -1).sum(2)


def _streaming_keep(n: int, budget: int, sinks: int, device: torch.device) -> torch.Tensor:
    return torch.cat([torch.arange(sinks, device=device), torch.arange(n - (budget - sinks), n, device=device)])


def _gather_cache(cache: DynamicCache, layer: int, index: torch.Tensor) -> None:
    """Keep cache slots `index` ([B, Hkv, K]) of one layer."""
    entry = cache.layers[layer]
    expand = (*index.shape, entry.keys.shape[-1])
    entry.keys = entry.keys.gather(2, index[..., None].expand(expand))
    entry.values = entry.values.gather(2, index[..., None].expand(expand))


def _decode(model, cache: DynamicCache, first: torch.Tensor, prompt_len: int, max_new_tokens: int,
            eos: torch.Tensor | None) -> list[torch.Tensor]:
    out = [first]
    for step in range(max_new_tokens - 1):
        if eos is not None and bool(torch.isin(torch.cat(out, 1), eos).any(1).all()):
            break
        slots = cache.get_seq_length()
        position = torch.full_like(first, prompt_len + step)
        extra = {"cache_position": torch.tensor([slots], device=first.device)} \
            if "cache_position" in inspect.signature(model.forward).parameters else {}  # transformers < 5.24
        logits = model(out[-1], **{cache_argument(model): cache}, use_cache=True, position_ids=position,
                       logits_to_keep=1, **extra).logits[:, -1]
        out.append(logits.argmax(-1, keepdim=True))
    return out


@torch.no_grad()
def generate(name: str, model: torch.nn.Module, input_ids: torch.Tensor, budget: int, max_new_tokens: int = 32,
             eos_token_id: list[int] | None = None, **options) -> torch.Tensor:
    """Greedy decoding under baseline `name` keeping `budget` prompt tokens: [B, prompt + new] token ids
    (fewer new ones when every row stopped at EOS). `options`: sinks=4, window=32, kernel=7, layer (see
    `generate_shared`)."""
    if name not in BASELINES:
        raise ValueError(f"unknown baseline {name!r}; known: {', '.join(BASELINES)}")
    return generate_shared([name], model, input_ids, budget, max_new_tokens, eos_token_id, **options)[0]


@torch.no_grad()
def generate_shared(names: list[str], model: torch.nn.Module, input_ids: torch.Tensor, budget: int,
                    max_new_tokens: int = 32, eos_token_id: list[int] | None = None, sinks: int = 4,
                    window: int = 32, kernel: int = 7, layer: int | None = None) -> list[torch.Tensor]:
    """`generate` of each of `names` (baselines, and "full": the model's own greedy decode) from one
    unpruned prefill of the prompt: each result equals its own `generate` call. `layer`: GemFilter's
    selection layer (default: the paper's 13 of 32, scaled to the model's depth)."""
    unknown = [name for name in names if name not in ("full", *BASELINES)]
    if unknown:
        raise ValueError(f"unknown baseline(s) {unknown}; known: full, {', '.join(BASELINES)}")
    batch, n = input_ids.shape
    device = input_ids.device
    eos = None if eos_token_id is None else torch.tensor(eos_token_id, device=device)
    # one unpruned forward fills the cache (and, for snapkv and gemfilter, records every layer's queries and keys)
    record = budget < n and bool({"snapkv", "gemfilter"} & set(names))
    run, cache, logits = reference._prefill(model, input_ids, None, record_all=record, last_logits_only=True)
    kv_heads = cache.layers[0].keys.shape[1]
    rewind = reference.cache_rewinder(cache)
    results = []
    for name in names:
        if name == "gemfilter" and budget < n:
            results.append(_gemfilter(model, input_ids, run.recorded, budget, max_new_tokens, eos_token_id, layer))
            continue
        rewind()
        for index in range(len(cache.layers)) if name in ("streaming", "snapkv") and budget < n else ():
            if name == "streaming":
                keep = _streaming_keep(n, budget, sinks, device).expand(batch, kv_heads, -1)
            else:
                q, k = run.recorded[index]
                scores = _kv_heads_scores(q, k, window)
                scores = F.avg_pool1d(scores.flatten(0, 1)[:, None], kernel, stride=1, padding=kernel // 2)[:, 0]
                scores = scores.view(batch, kv_heads, -1)
                top = scores.topk(budget - window, dim=-1).indices
                keep = torch.cat([top, torch.arange(n - window, n, device=device).expand(batch, kv_heads, -1)], dim=-1)
                keep = keep.sort(dim=-1).values
            _gather_cache(cache, index, keep)
        out = _decode(model, cache, logits.argmax(-1, keepdim=True), n, max_new_tokens, eos)
        results.append(torch.cat([input_ids, *out], dim=1))
    return results


def _gemfilter(model, input_ids: torch.Tensor, recorded: dict, budget: int, max_new_tokens: int,
               eos_token_id: list[int] | None, layer: int | None) -> torch.Tensor:
    """GemFilter: the last query's attention at `layer` picks `budget` tokens; the model answers from them."""
    depth = len(reference.decoder_layers(model))
    q, k = recorded[round(13 / 32 * depth) if layer is None else layer]
    heads, kv_heads = q.shape[1], k.shape[1]
    keys = k.float().repeat_interleave(heads // kv_heads, dim=1)
    scores = (q[:, :, -1:].float() @ keys.transpose(-1, -2)).div(math.sqrt(q.shape[-1])).softmax(-1).sum((1, 2))
    scores[:, -1] = float("inf")  # the last token (the question's end) stays
    chosen = scores.topk(budget, dim=-1).indices.sort(dim=-1).values
    short = input_ids.gather(1, chosen)
    tokens = reference.generate(model, short, None, max_new_tokens=max_new_tokens, eos_token_id=eos_token_id,
                                last_logits_only=True)
    return torch.cat([input_ids, tokens[:, short.shape[1]:]], dim=1)
