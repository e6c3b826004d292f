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

The decode graph calls two ops per layer (`reselection.reselect_attention` puts them there):

- ``slimpass::offload_gather`` before the attention: makes the front hold this step's active blocks
  (on the first step it copies them all, on the compute stream; later, the compute stream waits on the
  event of the copy issued earlier, or copies inline when none was), returns ``cat(front, tail)``, and
  issues the copies of the next `prefetch_depth` offloaded layers (cyclically: past the last one, the
  next step's first ones) on a side stream;
- ``slimpass::offload_done`` after it: copies the layer's next active set (decided this step: the
  one-step lag of reselection) into a buffer the manager owns and records an event, which the side
  stream waits on before it rewrites that layer's slots.

The side stream reads and writes only buffers the manager owns (host K/V, fronts, slot tables), never
one the compiler allocated. On CUDA the copy is one Triton kernel per layer that reads the changed
blocks straight from pinned host memory (mapped into the device's address space), so only changed
blocks cross the bus; elsewhere it is plain tensor indexing.

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
    current: torch.Tensor  # [B, m] the block in each front slot
    pending: torch.Tensor  # [B, m] the next step's active blocks (written by offload_done)
    changed: torch.Tensor  # () blocks the last copy rewrote
    steps: int = 0  # offload_gather calls seen (decoding steps)
    decided: int = 0  # offload_done calls seen: `pending` holds the set for step `decided`
    prefetched_for: int = -1  # the step whose copy has been issued on the side stream
    ready: Any = None  # torch.cuda.Event of that copy
    done: Any = None  # torch.cuda.Event recorded by offload_done


class OffloadManager:
    """The offloaded slim layers of one `SlimCache` and the side stream that refreshes their fronts."""

    def __init__(self, device: torch.device, prefetch_depth: int) -> None:
        self.device = torch.device(device)
        self.prefetch_depth = prefetch_depth
        self.cuda = self.device.type == "cuda"
        self.stream = torch.cuda.Stream(self.device) if self.cuda else None
        self.layers: dict[int, OffloadedLayer] = {}
        self.order: list[int] = []
        self.fetched = torch.zeros((), dtype=torch.long, device=self.device)  # blocks copied for steps after the first
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
        slots = torch.full((batch, active_blocks), -1, dtype=torch.long, device=keys.device)
        layer = OffloadedLayer(index, host_k, host_v, front_k, front_v, sink_tokens, block_size, slots, slots.clone(),
                               torch.zeros((), dtype=torch.long, device=keys.device))
        if self.cuda:
            for tensor in (front_k, front_v, layer.current, layer.pending, layer.changed):
                tensor.record_stream(self.stream)
            layer.ready, layer.done = torch.cuda.Event(), torch.cuda.Event()
        self.layers[index] = layer
        self.order = sorted(self.layers)

    # --- what the ops do -----------------------------------------------------------------------------
    def gather(self, index: int, active: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        layer = self.layers[index]
        step, layer.steps = layer.steps, layer.steps + 1
        if step == 0:  # the first step's active set was chosen by this step's query: copy it now
            self._copy(layer, active, full=True)
            self.first_fetched += active.numel()
        else:
            if layer.prefetched_for != step:  # no copy was issued ahead (one offloaded layer only): copy now
                self._copy(layer, active, full=False)
            elif self.cuda:
                torch.cuda.current_stream(self.device).wait_event(layer.ready)
            self.fetched += layer.changed  # counted when used: a copy for a step that never runs is not
        self._prefetch_after(index)
        return torch.cat([layer.front_k, k], dim=2), torch.cat([layer.front_v, v], dim=2)

    def done(self, index: int, active: torch.Tensor) -> None:
        layer = self.layers[index]
        layer.pending.copy_(active)
        layer.decided += 1
        if self.cuda:
            layer.done.record(torch.cuda.current_stream(self.device))

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
                    self._copy(layer, layer.pending, full=False)
                    layer.ready.record(self.stream)
            else:
                self._copy(layer, layer.pending, full=False)
            layer.prefetched_for = step

    def _copy(self, layer: OffloadedLayer, want: torch.Tensor, full: bool) -> None:
        """Make the front's slots hold the blocks `want` [B, m] (only the changed ones unless `full`)."""
        if not full:
            layer.changed.copy_((want != layer.current).sum())
        if self.cuda and triton is not None:
            _copy_blocks_triton(layer, want, full)
        else:
            _copy_blocks_torch(layer, want)
        layer.current.copy_(want)

    # --- reports -------------------------------------------------------------------------------------
    def report(self) -> dict[str, float]:
        """Blocks copied host -> accelerator: on the first step (all active blocks) and after it (changed
        ones), their bytes, and the bytes per step after the first (reads one device counter)."""
        if not self.layers:
            return {}
        layer = next(iter(self.layers.values()))
        block_bytes = 2 * layer.host_k[0, :, :layer.block_size].nbytes
        fetched = int(self.fetched)
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


def _copy_blocks_torch(layer: OffloadedLayer, want: torch.Tensor) -> None:
    index = block_tokens(want, layer.block_size).to(layer.host_k.device)
    for host, front in ((layer.host_k, layer.front_k), (layer.host_v, layer.front_v)):
        front[:, :, layer.sink_tokens:] = gather_tokens(host, index).to(front.device, non_blocking=True)


# A program copies this many slots (each a block of every token of one head): more bytes in flight per
# program, fewer programs holding SMs while they wait on the bus. 1 = one program per (slot, row x head),
# the layout measured in docs/PERF.md.
SLOTS_PER_PROGRAM = 1
MAX_TILE = 16384  # elements of a program's [slots x block, head dim] tile

if triton is not None:
    @triton.jit
    def _copy_blocks_kernel(src_k, src_v, dst_k, dst_v, want, have, heads, src_tokens, dst_tokens, dst_start,
                            slots, block, FULL: tl.constexpr, SLOTS: tl.constexpr, ROWS: tl.constexpr,
                            DIM: tl.constexpr, DIM_P2: tl.constexpr):
        """One program per (SLOTS slots, batch row x head): copy the blocks of its slots that changed (or
        all of them with `FULL`) from the host K/V [B, H, P, D] into the front [B, H, F, D]."""
        row_head = tl.program_id(1).to(tl.int64)
        row = row_head // heads
        r = tl.arange(0, ROWS)  # the tile's rows: SLOTS slots x `block` tokens, padded to a power of two
        slot = tl.program_id(0) * SLOTS + r // block
        token = r % block
        inside = (r < SLOTS * block) & (slot < slots)
        blk = tl.load(want + row * slots + slot, mask=inside, other=-1)
        if FULL:
            copy = inside & (blk >= 0)
        else:
            copy = inside & (blk != tl.load(have + row * slots + slot, mask=inside, other=-1))
        dims = tl.arange(0, DIM_P2)[None, :]
        mask = copy[:, None] & (dims < DIM)
        src = row_head * src_tokens * DIM + (blk * block + token)[:, None] * DIM + dims
        dst = row_head * dst_tokens * DIM + (dst_start + slot * block + token)[:, None] * DIM + dims
        tl.store(dst_k + dst, tl.load(src_k + src, mask=mask), mask=mask)
        tl.store(dst_v + dst, tl.load(src_v + src, mask=mask), mask=mask)


def _copy_blocks_triton(layer: OffloadedLayer, want: torch.Tensor, full: bool,
                        slots_per_program: int = SLOTS_PER_PROGRAM, num_warps: int = 4) -> None:
    """The kernel reads pinned host memory through its device mapping (unified addressing)."""
    batch, heads, tokens, dim = layer.host_k.shape
    slots, block = want.shape[1], layer.block_size
    dim_p2 = triton.next_power_of_2(dim)
    per_program = max(1, min(slots_per_program, MAX_TILE // (triton.next_power_of_2(block) * dim_p2)))
    grid = (triton.cdiv(slots, per_program), batch * heads)
    _copy_blocks_kernel[grid](
        layer.host_k, layer.host_v, layer.front_k, layer.front_v, want, layer.current, heads, tokens,
        layer.front_k.shape[2], layer.sink_tokens, slots, block, FULL=full, SLOTS=per_program,
        ROWS=triton.next_power_of_2(per_program * block), DIM=dim, DIM_P2=dim_p2, num_warps=num_warps)


# --- the ops ------------------------------------------------------------------------------------------
@torch.library.custom_op("slimpass::offload_gather", mutates_args=())
def offload_gather(handle: torch.Tensor, layer: int, active: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   front_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """K/V a decoding step at offloaded slim layer `layer` attends to: ``cat(front, k)``, ``cat(front, v)``
    (k, v: the layer's resident tail), the front holding the blocks of `active` [B, m]. Waits for / issues
    the copies (module docstring)."""
    return manager(handle).gather(layer, active, k, v)


@offload_gather.register_fake
def _gather_fake(handle, layer, active, k, v, front_tokens):
    shape = (k.shape[0], k.shape[1], front_tokens + k.shape[2], k.shape[3])
    return k.new_empty(shape), v.new_empty(shape)


@torch.library.custom_op("slimpass::offload_done", mutates_args=())
def offload_done(handle: torch.Tensor, layer: int, active: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """After the attention of offloaded slim layer `layer`: hand its next active set to the manager.
    Returns a copy of `out` (the attention output): what orders it after the attention and keeps it."""
    manager(handle).done(layer, active)
    return out.clone()


@offload_done.register_fake
def _done_fake(handle, layer, active, out):
    return torch.empty_like(out)
