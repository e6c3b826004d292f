"""The tensor functions `insert_pruning` calls from the graph: score blocks, select, gather kept tokens.

They are plain traceable PyTorch (no data-dependent shapes, no host syncs): AOTAutograd traces
through them when it lowers the edited graph, so Inductor fuses the gathers with their neighbours.
Every size is SymInt arithmetic on the current length, so one graph serves every prompt length.
"""

from __future__ import annotations

import hashlib
import inspect
import sys

import torch

from slimpass.runtime import block_layout
from slimpass.runtime.block_layout import BlockLayout
from slimpass.runtime.scoring import ScoreSettings, get_scorer


def fingerprint(scorer: str) -> str:
    """A hash of the code the pruned graph traces through (this module, `block_layout` and the scorer).

    The pass puts it in the graph as a constant argument: compile caches key on the graph's code,
    which names these functions but does not contain their bodies, so without it an edited scorer
    could be served a stale cached graph.
    """
    digest = hashlib.sha256(inspect.getsource(sys.modules[__name__]).encode())
    digest.update(inspect.getsource(block_layout).encode())
    fn = get_scorer(scorer)
    try:  # the scorer's whole module: it covers helpers the scorer calls and module constants
        digest.update(inspect.getsource(inspect.getmodule(fn) or fn).encode())
    except (OSError, TypeError):
        code = getattr(fn, "__code__", None)
        digest.update(repr((code.co_code, code.co_consts) if code else id(fn)).encode())
    # a scorer made by a factory differs from its siblings only in the values it closed over
    cells = getattr(fn, "__closure__", None) or ()
    digest.update(repr([c.cell_contents for c in cells if isinstance(c.cell_contents, (int, float, str, bool))]).encode())
    return digest.hexdigest()[:16]


def score_blocks(q: torch.Tensor, k: torch.Tensor, scorer: str, block_size: int, unit_size: int,
                 local_window: int, code_version: str = "") -> torch.Tensor:
    """[B, L // block_size] float32 block scores from the registered scorer (`code_version`: see `fingerprint`)."""
    return get_scorer(scorer)(q, k, ScoreSettings(block_size, unit_size, local_window)).float()


def keep_middle(prompt_len: int | torch.SymInt, tokens: int | None, ratio_num: int, ratio_den: int,
                block_size: int, sink_blocks: int) -> int | torch.SymInt:
    """Middle blocks a stage may keep: what the budget holds after the sinks and the last block (the
    pass's mirror of `schedule.middle_budget`). The last block holds the prompt's last
    `prompt_len - last * block_size` tokens at every stage (stages keep whole blocks before it)."""
    budget = tokens
    if ratio_den:
        by_ratio = prompt_len * ratio_num // ratio_den
        budget = by_ratio if budget is None else torch.sym_min(budget, by_ratio)
    return BlockLayout(block_size, sink_blocks).middle_budget(budget, prompt_len)


def select_tokens(scores: torch.Tensor, length: int | torch.SymInt, keep: int | torch.SymInt, block_size: int,
                  sink_blocks: int) -> torch.Tensor:
    """[B, K] sorted indices (into the current sequence) of the kept tokens.

    Kept: the `sink_blocks` first blocks, the `keep` best-scored blocks between them and the last
    block, and the last (possibly partial) block. Ties go to the earlier block (stable sort).
    Requires length > sink_blocks * block_size (the pass guards it).

    Every intermediate is non-empty for every length the pass prunes, and no symbolic size is
    broadcast: an empty tensor or a broadcast size makes the compiler specialise on it being 0 or 1,
    which recompiles the graph when a stage first keeps a middle block. So the sinks and the last
    block enter the ranking forced to the top, the top `sinks + chosen + 1` blocks are taken, and their
    positions (each block expanded to `block_size`) are cut where the last block ends. No index of
    the kept dimension is a division or remainder by the block size: an elementwise form over
    ``arange(K)`` with ``j // block_size`` and ``j % block_size`` was miscompiled by Inductor's C++
    backend (torch 2.13), which tiled the kept dimension as if K were a multiple of the block size
    and left the last partial block's positions unwritten, or read past a buffer (issue 30).
    """
    batch = scores.shape[0]
    last = BlockLayout(block_size, sink_blocks).last(length)  # index of the last block
    chosen = torch.sym_min(keep, last - sink_blocks)
    ranked = scores[:, :last].clamp(max=torch.finfo(scores.dtype).max)  # finite: below the forced blocks
    forced = torch.arange(last, device=scores.device) < sink_blocks
    priority = torch.cat([ranked.masked_fill(forced, float("inf")), ranked.new_full((batch, 1), float("inf"))], dim=1)
    top = torch.argsort(priority, dim=1, descending=True, stable=True)[:, : sink_blocks + chosen + 1]
    blocks = torch.sort(top, dim=1).values  # [B, sinks + chosen + 1] ascending: sinks, the best, the last
    offsets = torch.arange(block_size, device=scores.device)
    index = (blocks[:, :, None] * block_size + offsets).reshape(batch, (sink_blocks + chosen + 1) * block_size)
    return index[:, : (sink_blocks + chosen) * block_size + length - last * block_size]  # the last block ends at L


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
