"""`slimpass::causal_attention`: causal SDPA pinned to one backend (flash, cuDNN, efficient, math).

Used by `rewrite_attention` when ``attention_backend`` is not "auto"; with "auto" the pass emits a
plain `scaled_dot_product_attention(..., is_causal=True)` and PyTorch picks the kernel.
"""

from __future__ import annotations

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

_BACKENDS = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "math": SDPBackend.MATH,
}


def _layout(q: torch.Tensor, v: torch.Tensor) -> tuple[list[int], list[int]]:
    """Output size [B, H, N, Dv] stored as [B, N, H, Dv] (what the fused kernels write)."""
    b, h, n, dv = q.shape[0], q.shape[1], q.shape[2], v.shape[-1]
    return [b, h, n, dv], [n * h * dv, dv, h * dv, 1]


@torch.library.custom_op("slimpass::causal_attention", mutates_args=())
def causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, enable_gqa: bool, backend: str
) -> torch.Tensor:
    """Causal attention of q [B, Hq, N, D] over k, v [B, Hkv, N, D] with the named SDPA backend."""
    if backend not in _BACKENDS:
        raise ValueError(f"slimpass::causal_attention: unknown backend {backend!r}; expected one of {list(_BACKENDS)}")
    with sdpa_kernel([_BACKENDS[backend]]):
        out = torch.nn.functional.scaled_dot_product_attention(
            q, k, v, is_causal=True, scale=scale, enable_gqa=enable_gqa
        )
    size, stride = _layout(q, v)
    if list(out.stride()) == stride:
        return out
    return torch.empty_strided(size, stride, dtype=out.dtype, device=out.device).copy_(out)


@causal_attention.register_fake
def _(q, k, v, scale, enable_gqa, backend):
    size, stride = _layout(q, v)
    return q.new_empty_strided(size, stride)
