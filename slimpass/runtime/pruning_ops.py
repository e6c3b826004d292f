"""The tensor functions `insert_pruning` calls from the graph: score blocks, select, gather kept tokens.

They are plain traceable PyTorch (no data-dependent shapes, no host syncs): AOTAutograd traces
through them when it lowers the edited graph, so Inductor fuses the gathers with their neighbours.
Every size is SymInt arithmetic on the current length, so one graph serves every prompt length.
"""

from __future__ import annotations

import torch

from slimpass.runtime.scoring import ScoreSettings, get_scorer


def score_blocks(q: torch.Tensor, k: torch.Tensor, scorer: str, block_size: int, unit_size: int,
                 local_window: int) -> torch.Tensor:
    """[B, L // block_size] float32 block scores from the registered scorer."""
    return get_scorer(scorer)(q, k, ScoreSettings(block_size, unit_size, local_window)).float()


def keep_middle(prompt_len: int | torch.SymInt, tokens: int | None, ratio_num: int, ratio_den: int,
                block_size: int, sink_blocks: int) -> int | torch.SymInt:
    """Middle blocks a stage may keep: budget // block - sinks - last (the pass's mirror of `Stage.budget`)."""
    budget = tokens
    if ratio_den:
        by_ratio = prompt_len * ratio_num // ratio_den
        budget = by_ratio if budget is None else torch.sym_min(budget, by_ratio)
    return torch.sym_max(budget // block_size - sink_blocks - 1, 0)


def select_tokens(scores: torch.Tensor, length: int | torch.SymInt, keep: int | torch.SymInt, block_size: int,
                  sink_blocks: int) -> torch.Tensor:
    """[B, K] sorted indices (into the current sequence) of the kept tokens.

    Kept: the `sink_blocks` first blocks, the `keep` best-scored blocks between them and the last
    block, and the last (possibly partial) block. Ties go to the earlier block (stable sort).
    Requires length > sink_blocks * block_size (the pass guards it).
    """
    batch = scores.shape[0]
    last = (length - 1) // block_size  # index of the last block
    middle = scores[:, sink_blocks:last]  # [B, last - sinks]
    chosen = torch.sym_min(keep, last - sink_blocks)
    order = torch.argsort(middle, dim=1, descending=True, stable=True)[:, :chosen]
    blocks = torch.sort(order, dim=1).values + sink_blocks  # [B, chosen]
    offsets = torch.arange(block_size, device=scores.device)
    inner = (blocks[:, :, None] * block_size + offsets).flatten(1)
    positions = torch.arange(length, device=scores.device)
    head = positions[: sink_blocks * block_size].expand(batch, -1)
    tail = positions[last * block_size :].expand(batch, -1)
    return torch.cat([head, inner, tail], dim=1)


def take_tokens(x: torch.Tensor, index: torch.Tensor, dim: int) -> torch.Tensor:
    """Gather positions `index` ([B, K]) along the token dimension `dim` of `x` ([B or 1, ...])."""
    if index.shape[0] == 1 and x.shape[0] == 1:
        return x.index_select(dim, index[0])
    x = x.expand(index.shape[0], *x.shape[1:])
    view = [index.shape[0]] + [1] * (x.dim() - 1)
    view[dim] = index.shape[1]
    sizes = list(x.shape)
    sizes[dim] = index.shape[1]
    return torch.gather(x, dim, index.view(view).expand(sizes))
