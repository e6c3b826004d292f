"""Facts about the installed transformers that change what the traced graphs look like."""

from __future__ import annotations

import functools
import inspect


@functools.cache
def decode_mask_skipped_under_compile() -> bool:
    """Whether transformers skips the all-true SDPA mask under Dynamo when no attention_mask is passed.

    transformers <= 5.17 never skips it while tracing (`is_tracing(padding_mask)` is true under Dynamo
    even with no padding mask): its SDPA graphs then carry an N x N prefill mask and a 1 x (N + t)
    decode mask built for the full prompt length, which per-layer pruned caches cannot match. Later
    versions skip it unless an attention_mask is passed.
    """
    from transformers import masking_utils

    return "padding_mask is not None and is_tracing" in inspect.getsource(masking_utils._ignore_causal_mask_sdpa)


def cache_argument(model) -> str:
    """The name under which `forward` and `generate` take the KV cache: "cache" from transformers 5.24,
    "past_key_values" before (5.24 still accepts it, with a deprecation warning)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def context_length(config) -> int | None:
    """The positions a model was trained on (``config.max_position_embeddings``), or None when its config
    does not say."""
    context = getattr(config, "max_position_embeddings", None)
    return context if isinstance(context, int) and context > 0 else None
