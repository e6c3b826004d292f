"""Offload mode (``SlimConfig.offload``): slim layers' prompt K/V in host memory, active blocks on the accelerator.

After a pruned prefill with reselection armed, `SlimCache.record_prefill` hands every armed slim layer
to an `OffloadManager`. Per such layer it keeps

- on the host (pinned on CUDA): the K/V of every cached prompt token, ``[B, Hkv, P, D]``;
- on the accelerator: a *front* buffer ``[B, Hkv, S + m * block, D]`` (the S sink tokens, then m slots
  of one block each: the active blocks) and, as the layer's ordinary cache tensors, the *tail* (the last
  prompt block and every generated token, which each step attends to anyway, so they are never moved);
  plus the keys reselection scores against (`SlimLayer.unit_keys`).

A decoding step at such a layer attends to ``cat(front, tail)``: the same tokens in the same order as
the resident path's gather (`reselection.attended_tokens`), so offload on and off give the same tokens.
Reselection keeps a block in its slot while it stays active (`reselection.assign_slots`), so a swap
rewrites only the slots whose block changed.

The decode graph calls one op per such layer, ``slimpass::offload_kv``, before the attention
(`reselection.reselect_attention` puts it there, with the layer's active set for this step and, decided
by this step's query before the attention, the one for its next step: the one-step lag of reselection).
It makes the front hold this step's active blocks (on the first step it copies them all, on the compute
stream; later the compute stream waits on the event of the copy issued earlier, or copies inline when
none was), returns ``cat(front, tail)``, then stores the next active set in a buffer the manager owns
and records an event: from there the side stream may rewrite this layer's front. Last it issues the
copies of the next `prefetch_depth` offloaded layers (cyclically: past the last one, the next step's
first ones) on the side stream, each waiting on that layer's event.

The side stream reads and writes only buffers the manager owns (host K/V, fronts, slot tables), never
one the compiler allocated. On CUDA the copy is one Triton kernel per layer that reads the changed
blocks straight from pinned host memory (mapped into the device's address space), so only changed
blocks cross the bus, and it also keeps the slot tables and counts the copied blocks on the device (no
host sync, no extra launches); elsewhere it is plain tensor indexing.

The ops get tensors only; a request's manager is found through its ``handle`` (a CPU int64 scalar held
by the cache) in a weak registry, so every cache has its own state and dropping the cache frees it.
"""

from __future__ import annotations

import dataclasses
import weakref
from typing import Any

import torch

from slimpass.runtime.block_index import block_tokens, gather_tokens

try:  # pragma: no cover - depends on the environment
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the environment
    triton = tl = None

_MANAGERS: weakref.WeakValueDictionary[int, OffloadManager] = weakref.WeakValueDictionary()


class OffloadMemoryError(MemoryError):
    """Host memory for the offloaded K/V could not be allocated (pinned)."""


def host_buffer(like: torch.Tensor, pin: bool, what: str) -> torch.Tensor:
    """An empty host tensor shaped as `like` (page-locked when `pin`), or `OffloadMemoryError` naming the size."""
    size = like.nbytes
    try:
        return torch.empty(like.shape, dtype=like.dtype, device="cpu", pin_memory=pin)
    except RuntimeError as error:
        kind = "pinned (page-locked) " if pin else ""
        raise OffloadMemoryError(
            f"slimpass offload: could not allocate {size / 2**20:.1f} MiB of {kind}host memory for {what} ({error}). "
            "Free host memory, raise the locked-memory limit (ulimit -l) or run with offload=False") from error


@dataclasses.dataclass(eq=False)
class OffloadedLayer:
    """One slim layer's offloaded prompt: host K/V, the accelerator's front buffer and slot tables."""

    index: int
    host_k: torch.Tensor
    host_v: torch.Tensor
    front_k: torch.Tensor
    front_v: torch.Tensor
    sink_tokens: int
    block_size: int
    tables: torch.Tensor  # [2, B, m] the block in each front slot after the copy for an even / odd step
    pending: torch.Tensor  # [B, m] the next step's active blocks (written at this step)
    steps: int = 0  # decoding steps seen (offload_kv calls)
    decided: int = 0  # `pending` holds the set for step `decided`
    prefetched_for: int = -1  # the step whose copy has been issued on the side stream
    copied_for: int = -1  # the step of the last copy issued (`tables[copied_for % 2]` is its slot table)
    ready: Any = None  # torch.cuda.Event of the side stream's copy
    done: Any = None  # torch.cuda.Event recorded once the step no longer reads the front

    @property
    def current(self) -> torch.Tensor:
        """[B, m] the block in each front slot once the last copy issued has run (-1: none yet)."""
        return self.tables[max(self.copied_for, 0) % 2]


class OffloadManager:
    """The offloaded slim layers of one `SlimCache` and the side stream that refreshes their fronts."""

    def __init__(self, device: torch.device, prefetch_depth: int) -> None:
        self.device = torch.device(device)
        self.prefetch_depth = prefetch_depth
        self.cuda = self.device.type == "cuda"
        self.stream = torch.cuda.Stream(self.device) if self.cuda else None
        self.layers: dict[int, OffloadedLayer] = {}
        self.order: list[int] = []
        self.issued = torch.zeros((), dtype=torch.long, device=self.device)  # blocks copied after the first step
        self.first_fetched = 0
        self.handle = torch.tensor(id(self), dtype=torch.long)
        _MANAGERS[id(self)] = self
        if self.cuda:  # the side stream may still read host memory that dies with the manager
            weakref.finalize(self, self.stream.synchronize)

    # --- set-up, after the prefill -------------------------------------------------------------------
    def add_layer(self, index: int, keys: torch.Tensor, values: torch.Tensor, active_blocks: int, sink_tokens: int,
                  block_size: int) -> None:
        """Move a slim layer's cached prompt K/V ``[B, Hkv, P, D]`` to the host; make its front buffer."""
        host_k = host_buffer(keys, self.cuda, f"layer {index}'s keys")
        host_v = host_buffer(values, self.cuda, f"layer {index}'s values")
        host_k.copy_(keys, non_blocking=self.cuda)  # ordered before any read of it on the compute stream
        host_v.copy_(values, non_blocking=self.cuda)
        batch, heads, _, dim = keys.shape
        front = (batch, heads, sink_tokens + active_blocks * block_size, dim)
        front_k, front_v = keys.new_empty(front), values.new_empty(front)
        front_k[:, :, :sink_tokens] = keys[:, :, :sink_tokens]
        front_v[:, :, :sink_tokens] = values[:, :, :sink_tokens]
        tables = torch.full((2, batch, active_blocks), -1, dtype=torch.long, device=keys.device)
        layer = OffloadedLayer(index, host_k, host_v, front_k, front_v, sink_tokens, block_size, tables,
                               tables[0].clone())
        if self.cuda:
            for tensor in (front_k, front_v, layer.tables, layer.pending, self.issued):
                tensor.record_stream(self.stream)
            layer.ready, layer.done = torch.cuda.Event(), torch.cuda.Event()
        self.layers[index] = layer
        self.order = sorted(self.layers)

    # --- what the op does ----------------------------------------------------------------------------
    def attend_kv(self, index: int, active: torch.Tensor, upcoming: torch.Tensor, k: torch.Tensor,
                  v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        layer = self.layers[index]
        step, layer.steps = layer.steps, layer.steps + 1
        if step == 0:  # the first step's active set was chosen by this step's query: copy it now
            self._copy(layer, active, step)
            self.first_fetched += active.numel()
        elif layer.prefetched_for != step:  # no copy was issued ahead (one offloaded layer only): copy now
            self._copy(layer, active, step)
        elif self.cuda:
            torch.cuda.current_stream(self.device).wait_event(layer.ready)
        keys, values = torch.cat([layer.front_k, k], dim=2), torch.cat([layer.front_v, v], dim=2)
        layer.pending.copy_(upcoming)
        layer.decided += 1
        if self.cuda:  # from here the side stream may rewrite this layer's front for its next step
            layer.done.record(torch.cuda.current_stream(self.device))
        self._prefetch_after(index)
        return keys, values

    def _prefetch_after(self, index: int) -> None:
        """Issue the side-stream copies of the next `prefetch_depth` offloaded layers, when their next
        active set is decided (at their previous step) and not yet on its way."""
        count = len(self.order)
        here = self.order.index(index)
        for ahead in range(1, min(self.prefetch_depth, count - 1) + 1):
            layer = self.layers[self.order[(here + ahead) % count]]
            step = layer.steps  # the step that layer runs next
            if step == 0 or layer.prefetched_for == step or layer.decided != step:
                continue
            if self.cuda:
                with torch.cuda.stream(self.stream):
                    self.stream.wait_event(layer.done)
                    self._copy(layer, layer.pending, step)
                    layer.ready.record(self.stream)
            else:
                self._copy(layer, layer.pending, step)
            layer.prefetched_for = step

    def _copy(self, layer: OffloadedLayer, want: torch.Tensor, step: int) -> None:
        """Make the front's slots hold the blocks `want` [B, m] for decoding step `step`: all of them on the
        first step, afterwards only the slots whose block changed (counted in `issued`)."""
        if self.cuda and triton is not None:
            _copy_blocks_triton(layer, want, step, self.issued)
        else:
            _copy_blocks_torch(layer, want, step, self.issued)
        layer.copied_for = step

    # --- reports -------------------------------------------------------------------------------------
    def report(self) -> dict[str, float]:
        """Blocks copied host -> accelerator: on the first step (all active blocks) and after it (changed
        ones, counted when used: a copy issued for a step that never ran is not), their bytes, and the
        bytes per step after the first (waits for the side stream)."""
        if not self.layers:
            return {}
        if self.cuda:
            self.stream.synchronize()
        fetched = int(self.issued)
        for layer in self.layers.values():
            step = layer.steps
            if layer.prefetched_for == step:  # issued ahead for a step that has not run
                fetched -= int((layer.tables[step % 2] != layer.tables[(step - 1) % 2]).sum())
        layer = next(iter(self.layers.values()))
        block_bytes = 2 * layer.host_k[0, :, :layer.block_size].nbytes
        steps = max(layer.steps for layer in self.layers.values())
        return {"layers": len(self.layers), "steps": steps, "first_step_blocks": self.first_fetched,
                "blocks": fetched, "h2d_bytes": fetched * block_bytes,
                "h2d_bytes_per_step": fetched * block_bytes / max(steps - 1, 1)}


def manager(handle: torch.Tensor) -> OffloadManager:
    found = _MANAGERS.get(int(handle))
    if found is None:
        raise RuntimeError("slimpass offload: this decoding step's SlimCache is gone (the compiled graph was called "
                           "with a cache whose manager was freed); pass the live cache")
    return found


def _copy_blocks_torch(layer: OffloadedLayer, want: torch.Tensor, step: int, issued: torch.Tensor) -> None:
    if step > 0:
        issued += (want != layer.tables[(step - 1) % 2]).sum()
    index = block_tokens(want, layer.block_size).to(layer.host_k.device)
    for host, front in ((layer.host_k, layer.front_k), (layer.host_v, layer.front_v)):
        front[:, :, layer.sink_tokens:] = gather_tokens(host, index).to(front.device, non_blocking=True)
    layer.tables[step % 2].copy_(want)


# The copy kernel's layout: a program copies SLOTS_PER_PROGRAM slots (each a block of every token of one
# head) at a time and loops over the (slots, batch row x head) items with a stride of its grid, COPY_PROGRAMS
# programs (None: one per item, the layout measured first in docs/PERF.md). Few programs hold few SMs
# while they wait on the bus; too few leave the bus idle.
SLOTS_PER_PROGRAM = 1
COPY_PROGRAMS: int | None = None
MAX_TILE = 16384  # elements of a program's [slots x block, head dim] tile

if triton is not None:
    @triton.jit(do_not_specialize=["items"])
    def _copy_blocks_kernel(src_k, src_v, dst_k, dst_v, want, tables, issued, heads, src_tokens, dst_tokens,
                            dst_start, slots, block, items, now_at, have_at, FULL: tl.constexpr, SLOTS: tl.constexpr,
                            ROWS: tl.constexpr, DIM: tl.constexpr, DIM_P2: tl.constexpr):
        """Copy the blocks of `want` [B, slots] whose slot held another block (`tables` at `have_at`; every
        block with `FULL`) from the host K/V [B, H, P, D] into the front [B, H, F, D]; write `want` into
        `tables` at `now_at` and add the changed blocks to `issued` (not with `FULL`)."""
        groups = tl.cdiv(slots, SLOTS)
        r = tl.arange(0, ROWS)  # the tile's rows: SLOTS slots x `block` tokens, padded to a power of two
        token = r % block
        dims = tl.arange(0, DIM_P2)[None, :]
        for item in range(tl.program_id(0), items, tl.num_programs(0)):
            row_head = (item // groups).to(tl.int64)
            row = row_head // heads
            slot = (item % groups) * SLOTS + r // block
            inside = (r < SLOTS * block) & (slot < slots)
            blk = tl.load(want + row * slots + slot, mask=inside, other=-1)
            if FULL:
                copy = inside & (blk >= 0)
            else:
                copy = inside & (blk != tl.load(tables + have_at + row * slots + slot, mask=inside, other=-1))
            if row_head % heads == 0:  # one program per (row, slot) keeps the books
                tl.store(tables + now_at + row * slots + slot, blk, mask=inside & (token == 0))
                if not FULL:  # (a one-element block: Triton's interpreter wants one for atomics)
                    one = tl.arange(0, 1)
                    tl.atomic_add(issued + one, tl.sum((copy & (token == 0)).to(tl.int64), axis=0) + one * 0)
            mask = copy[:, None] & (dims < DIM)
            src = row_head * src_tokens * DIM + (blk * block + token)[:, None] * DIM + dims
            dst = row_head * dst_tokens * DIM + (dst_start + slot * block + token)[:, None] * DIM + dims
            tl.store(dst_k + dst, tl.load(src_k + src, mask=mask), mask=mask)
            tl.store(dst_v + dst, tl.load(src_v + src, mask=mask), mask=mask)


def _copy_blocks_triton(layer: OffloadedLayer, want: torch.Tensor, step: int, issued: torch.Tensor,
                        slots_per_program: int = SLOTS_PER_PROGRAM, programs: int | None = COPY_PROGRAMS,
                        num_warps: int = 4) -> None:
    """The kernel reads pinned host memory through its device mapping (unified addressing)."""
    batch, heads, tokens, dim = layer.host_k.shape
    slots, block = want.shape[1], layer.block_size
    dim_p2 = triton.next_power_of_2(dim)
    per_program = max(1, min(slots_per_program, MAX_TILE // (triton.next_power_of_2(block) * dim_p2)))
    items = triton.cdiv(slots, per_program) * batch * heads
    table = batch * slots
    _copy_blocks_kernel[(min(items, programs or items),)](
        layer.host_k, layer.host_v, layer.front_k, layer.front_v, want, layer.tables, issued, heads, tokens,
        layer.front_k.shape[2], layer.sink_tokens, slots, block, items, step % 2 * table, (step + 1) % 2 * table,
        FULL=step == 0, SLOTS=per_program, ROWS=triton.next_power_of_2(per_program * block), DIM=dim, DIM_P2=dim_p2,
        num_warps=num_warps)


# --- the op -------------------------------------------------------------------------------------------
@torch.library.custom_op("slimpass::offload_kv", mutates_args=())
def offload_kv(handle: torch.Tensor, layer: int, active: torch.Tensor, upcoming: torch.Tensor, k: torch.Tensor,
               v: torch.Tensor, front_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """K/V a decoding step at offloaded slim layer `layer` attends to: ``cat(front, k)``, ``cat(front, v)``
    (k, v: the layer's resident tail), the front holding the blocks of `active` [B, m]; `upcoming` [B, m]
    is the layer's active set for its next step, which the side stream may fetch from here on. Waits for
    / issues the copies (module docstring)."""
    return manager(handle).attend_kv(layer, active, upcoming, k, v)


@offload_kv.register_fake
def _offload_kv_fake(handle, layer, active, upcoming, k, v, front_tokens):
    shape = (k.shape[0], k.shape[1], front_tokens + k.shape[2], k.shape[3])
    return k.new_empty(shape), v.new_empty(shape)
