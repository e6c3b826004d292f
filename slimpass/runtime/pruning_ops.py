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

from slimpass.runtime.scoring import ScoreSettings, get_scorer


def fingerprint(scorer: str) -> str:
    """A hash of the code the pruned graph traces through (this module and the scorer).

    The pass puts it in the graph as a constant argument: compile caches key on the graph's code,
    which names these functions but does not contain their bodies, so without it an edited scorer
    could be served a stale cached graph.
    """
    digest = hashlib.sha256(inspect.getsource(sys.modules[__name__]).encode())
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

    The index is computed elementwise over ``arange(K)`` rather than by concatenating and
    broadcasting pieces, so no size (e.g. a one-token last block) is ever broadcast: broadcasting a
    symbolic size makes the compiler guard on it being 1, which would recompile for some lengths.
    """
    batch = scores.shape[0]
    last = (length - 1) // block_size  # index of the last block
    middle = scores[:, sink_blocks:last]  # [B, last - sinks]
    chosen = torch.sym_min(keep, last - sink_blocks)
    order = torch.argsort(middle, dim=1, descending=True, stable=True)[:, :chosen]
    blocks = torch.sort(order, dim=1).values + sink_blocks  # [B, chosen], ascending
    blocks = torch.cat([blocks, blocks.new_zeros(batch, 1)], dim=1)  # a spare column: never empty
    sinks = sink_blocks * block_size
    kept = sinks + chosen * block_size + (length - last * block_size)
    j = torch.arange(kept, device=scores.device)
    rel = j - sinks
    slot = (rel // block_size).clamp(min=0, max=chosen)
    inner = torch.gather(blocks, 1, slot.expand(batch, kept)) * block_size + rel % block_size
    tail = rel + (last * block_size - chosen * block_size)
    return torch.where(j < sinks, j, torch.where(rel < chosen * block_size, inner, tail))


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
