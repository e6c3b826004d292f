"""Token indexing by blocks, shared by reselection (which tokens a step attends to) and offload (which
tokens a copy moves)."""

from __future__ import annotations

import torch


def block_tokens(blocks: torch.Tensor, block_size: int) -> torch.Tensor:
    """[B, m * block_size] the token indices of blocks [B, m], block by block."""
    return (blocks[:, :, None] * block_size + torch.arange(block_size, device=blocks.device)).flatten(1)


def gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x [B, H, n, D] at token indices [B, k] (per row) -> [B, H, k, D]."""
    rows = torch.arange(x.shape[0], device=x.device)[:, None]
    return x.transpose(1, 2)[rows, index].transpose(1, 2)
