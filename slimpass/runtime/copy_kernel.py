"""The copies of an offloading cache (`slimpass.runtime.offload`): the blocks a copy group's layers need,
from their host K/V into their fronts on the accelerator.

On CUDA a Triton kernel reads the changed blocks straight from pinned host memory (mapped into the
device's address space), so only changed blocks cross the bus; it also keeps the slot tables and counts
the copied blocks on the device (no host sync, no extra launches). Elsewhere (CPU, or no Triton) plain
tensor indexing does the same.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from slimpass.runtime.block_index import block_tokens, gather_tokens

try:  # pragma: no cover - depends on the environment
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the environment
    triton = tl = None

if TYPE_CHECKING:
    from slimpass.runtime.offload import CopyGroup


def copy_blocks_torch(group: CopyGroup, first: int, count: int, want: torch.Tensor, step: int,
                       issued: torch.Tensor) -> None:
    want = want.reshape(count, *group.pending.shape[1:])
    for position, sets in zip(range(first, first + count), want):
        tables = group.tables[position]
        if step > 0:
            issued += (sets != tables[(step - 1) % 2]).sum()
        index = block_tokens(sets, group.block_size).to(group.host_k.device)
        for host, front in ((group.host_k, group.front_k), (group.host_v, group.front_v)):
            front[position, :, :, group.sink_tokens:] = gather_tokens(host[position], index).to(front.device,
                                                                                                non_blocking=True)
        tables[step % 2].copy_(sets)


# The copy kernel's layout: a program copies SLOTS_PER_PROGRAM slots (each a block of every token of one
# head) at a time and loops over the (layer, slots, batch row x head) items with a stride of its grid,
# COPY_PROGRAMS programs (None: one per item). Few programs hold few SMs while they wait on the bus; too
# few leave the bus idle. Measured on an H200 (docs/PERF.md): 16 programs of 4 slots copy as fast as one
# program per slot and slow decode-like compute beside them far less.
SLOTS_PER_PROGRAM = 4
COPY_PROGRAMS: int | None = 16
MAX_TILE = 16384  # elements of a program's [slots x block, head dim] tile

if triton is not None:
    @triton.jit(do_not_specialize=["items"])
    def _copy_blocks_kernel(src_k, src_v, dst_k, dst_v, want, tables, issued, heads, src_tokens, dst_tokens,
                            dst_start, slots, block, items, per_layer, src_layer, dst_layer, want_layer, table_layer,
                            now_at, have_at, FULL: tl.constexpr, SLOTS: tl.constexpr, ROWS: tl.constexpr,
                            DIM: tl.constexpr, DIM_P2: tl.constexpr):
        """For each layer (strides `*_layer` apart): copy the blocks of `want` [B, slots] whose slot held
        another block (`tables` at `have_at`; every block with `FULL`) from the host K/V [B, H, P, D] into the
        front [B, H, F, D]; write `want` into `tables` at `now_at`; add the changed blocks to `issued` (not
        with `FULL`)."""
        groups = tl.cdiv(slots, SLOTS)
        r = tl.arange(0, ROWS)  # the tile's rows: SLOTS slots x `block` tokens, padded to a power of two
        token = r % block
        dims = tl.arange(0, DIM_P2)[None, :]
        for item in range(tl.program_id(0), items, tl.num_programs(0)):
            layer = (item // per_layer).to(tl.int64)
            row_head = (item % per_layer // groups).to(tl.int64)
            row = row_head // heads
            slot = (item % groups) * SLOTS + r // block
            inside = (r < SLOTS * block) & (slot < slots)
            blk = tl.load(want + layer * want_layer + row * slots + slot, mask=inside, other=-1)
            table = tables + layer * table_layer + row * slots + slot
            if FULL:
                copy = inside & (blk >= 0)
            else:
                copy = inside & (blk != tl.load(table + have_at, mask=inside, other=-1))
            if row_head % heads == 0:  # one program per (row, slot) keeps the books
                tl.store(table + now_at, blk, mask=inside & (token == 0))
                if not FULL:  # (a one-element block: Triton's interpreter wants one for atomics)
                    one = tl.arange(0, 1)
                    tl.atomic_add(issued + one, tl.sum((copy & (token == 0)).to(tl.int64), axis=0) + one * 0)
            mask = copy[:, None] & (dims < DIM)
            src = layer * src_layer + row_head * src_tokens * DIM + (blk * block + token)[:, None] * DIM + dims
            dst = layer * dst_layer + row_head * dst_tokens * DIM + (dst_start + slot * block + token)[:, None] * DIM + dims
            tl.store(dst_k + dst, tl.load(src_k + src, mask=mask), mask=mask)
            tl.store(dst_v + dst, tl.load(src_v + src, mask=mask), mask=mask)


def copy_blocks_triton(group: CopyGroup, first: int, count: int, want: torch.Tensor, step: int,
                        issued: torch.Tensor, slots_per_program: int = SLOTS_PER_PROGRAM,
                        programs: int | None = COPY_PROGRAMS, num_warps: int = 4) -> None:
    """The kernel reads pinned host memory through its device mapping (unified addressing)."""
    _, batch, heads, tokens, dim = group.host_k.shape
    front_tokens, slots, block = group.front_k.shape[3], group.pending.shape[2], group.block_size
    dim_p2 = triton.next_power_of_2(dim)
    per_program = max(1, min(slots_per_program, MAX_TILE // (triton.next_power_of_2(block) * dim_p2)))
    per_layer = triton.cdiv(slots, per_program) * batch * heads
    items = per_layer * count
    table = batch * slots
    _copy_blocks_kernel[(min(items, programs or items),)](
        group.host_k[first], group.host_v[first], group.front_k[first], group.front_v[first], want,
        group.tables[first], issued, heads, tokens, front_tokens, group.sink_tokens, slots, block, items, per_layer,
        group.host_k[0].numel(), group.front_k[0].numel(), table, 2 * table, step % 2 * table, (step + 1) % 2 * table,
        FULL=step == 0, SLOTS=per_program, ROWS=triton.next_power_of_2(per_program * block), DIM=dim, DIM_P2=dim_p2,
        num_warps=num_warps)
