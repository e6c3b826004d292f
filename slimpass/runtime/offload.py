"""Offload mode (``SlimConfig.offload``): slim layers' prompt K/V in host memory, active blocks on the accelerator.

After a pruned prefill with reselection armed, `SlimCache.record_prefill` hands the armed slim layers
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

Reselection decides a layer's next active set one step ahead, so the copies for step s + 1 can start as
soon as step s has passed the layer. Consecutive layers of one shape form a *copy group*
(`SlimConfig.copy_group` of them), whose buffers are stacked so that one kernel launch copies for all of
them. The decode graph calls one op per layer, ``slimpass::offload_kv``, before the attention
(`reselection.reselect_attention` puts it there with the layer's active sets for this step and the next):

- the first layer of a group makes the compute stream wait on the event of the group's copy, issued a
  step earlier (on the first step instead each layer copies all its active blocks, on the compute stream);
- it returns ``cat(front, tail)`` and stores the next step's active set in a buffer the manager owns;
- at the group's last layer it records an event and issues, on the side stream after that event, one
  copy of the blocks that change for the group's next step: it runs while the rest of the step computes.

The side stream reads and writes only buffers the manager owns (host K/V, fronts, slot tables), never
one the compiler allocated. On CUDA the copy is a Triton kernel (`slimpass.runtime.copy_kernel`) that
reads the changed blocks straight from pinned host memory (mapped into the device's address space), so
only changed blocks cross the bus; a few programs loop over the blocks, so the copy holds few SMs while it
waits on the bus. It also keeps the slot tables and counts the copied blocks on the device (no host sync,
no extra launches). Elsewhere it is plain tensor indexing.

Decoding is host-bound at batch 1 (the compiled step launches hundreds of kernels), so every microsecond
the op spends on the host lengthens the step. Two things keep it short (measured on an H200 host,
docs/PERF.md): the op is registered straight with the dispatcher (`torch.library.Library`), not through
`torch.library.custom_op`, whose Python wrappers cost ~50 µs a call there; and a group's copy ahead, whose
arguments are the same every other step (the slot tables alternate by step parity), is captured once per
parity in a CUDA graph and replayed (~5 µs instead of a ~70 µs Triton launch). If capturing fails, the
manager logs why once and launches the kernel instead.

The op gets tensors only; a request's manager is found through its ``handle`` (a CPU int64 scalar held
by the cache) in a weak registry, so every cache has its own state and dropping the cache frees it.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import weakref
from collections.abc import Sequence
from typing import Any

import torch

from slimpass.runtime.copy_kernel import copy_blocks_torch as _copy_blocks_torch
from slimpass.runtime.copy_kernel import copy_blocks_triton as _copy_blocks_triton
from slimpass.runtime.copy_kernel import triton

log = logging.getLogger(__name__)

_MANAGERS: weakref.WeakValueDictionary[int, OffloadManager] = weakref.WeakValueDictionary()


class OffloadMemoryError(MemoryError):
    """Host memory for the offloaded K/V could not be allocated (pinned)."""


def host_buffer(shape: Sequence[int], dtype: torch.dtype, pin: bool, what: str) -> torch.Tensor:
    """An empty host tensor (page-locked when `pin`), or `OffloadMemoryError` naming the size."""
    size = math.prod(shape) * dtype.itemsize
    try:
        return torch.empty(shape, dtype=dtype, device="cpu", pin_memory=pin)
    except RuntimeError as error:
        kind = "pinned (page-locked) " if pin else ""
        raise OffloadMemoryError(
            f"slimpass offload: could not allocate {size / 2**20:.1f} MiB of {kind}host memory for {what} ({error}). "
            "Free host memory, raise the locked-memory limit (ulimit -l) or run with offload=False") from error


@dataclasses.dataclass(eq=False)
class CopyGroup:
    """Consecutive offloaded layers of one shape, their buffers stacked (leading dim: the layer), copied by
    one launch."""

    layers: list[int]  # decoder layer indices, ascending (the order a step runs them)
    host_k: torch.Tensor  # [G, B, Hkv, P, D] on the host
    host_v: torch.Tensor
    front_k: torch.Tensor  # [G, B, Hkv, S + m * block, D] on the accelerator
    front_v: torch.Tensor
    tables: torch.Tensor  # [G, 2, B, m] the block in each slot after the copy for an even / odd step
    pending: torch.Tensor  # [G, B, m] each layer's active set for its next step
    sink_tokens: int
    block_size: int
    issued_for: int = -1  # the step whose copy has been issued on the side stream
    ready: Any = None  # torch.cuda.Event of that copy
    done: Any = None  # torch.cuda.Event after which the side stream may rewrite the fronts
    graphs: dict[int, Any] = dataclasses.field(default_factory=dict)  # step parity -> CUDA graph of the copy ahead


@dataclasses.dataclass(eq=False)
class OffloadedLayer:
    """One offloaded slim layer: its views into its group's buffers (taken once: the op runs every step)
    and its step count."""

    index: int
    group: CopyGroup
    position: int  # in the group
    host_k: torch.Tensor
    host_v: torch.Tensor
    front_k: torch.Tensor
    front_v: torch.Tensor
    tables: torch.Tensor  # [2, B, m]
    pending: torch.Tensor  # [B, m]
    steps: int = 0  # decoding steps seen (offload_kv calls)
    copied_for: int = -1  # the step of the last copy issued for it

    @classmethod
    def of(cls, index: int, group: CopyGroup, position: int) -> OffloadedLayer:
        return cls(index, group, position, group.host_k[position], group.host_v[position], group.front_k[position],
                   group.front_v[position], group.tables[position], group.pending[position])

    sink_tokens = property(lambda self: self.group.sink_tokens)
    block_size = property(lambda self: self.group.block_size)

    @property
    def current(self) -> torch.Tensor:
        """[B, m] the block in each front slot once the last copy issued has run (-1: none yet)."""
        return self.tables[max(self.copied_for, 0) % 2]


@dataclasses.dataclass
class LayerToOffload:
    """What `OffloadManager.add_layers` takes per layer: its cached prompt K/V ``[B, Hkv, P, D]`` on the
    accelerator, its active blocks, sink tokens and block size."""

    index: int
    keys: torch.Tensor
    values: torch.Tensor
    active_blocks: int
    sink_tokens: int
    block_size: int

    def group_key(self) -> tuple:
        """Layers with equal keys share a copy group (their buffers stack)."""
        return self.keys.shape, self.keys.dtype, self.active_blocks, self.sink_tokens, self.block_size


class OffloadManager:
    """The offloaded slim layers of one `SlimCache` and the side stream that refreshes their fronts."""

    def __init__(self, device: torch.device, copy_group: int = 4, graphs: bool = True) -> None:
        self.device = torch.device(device)
        self.copy_group = copy_group
        self.cuda = self.device.type == "cuda"
        self.stream = torch.cuda.Stream(self.device) if self.cuda else None
        self.graphs = graphs and self.cuda and triton is not None  # replay the copies ahead (module docstring)
        self.graph_pool = None
        self.layers: dict[int, OffloadedLayer] = {}
        self.groups: list[CopyGroup] = []
        self.issued = torch.zeros((), dtype=torch.long, device=self.device)  # blocks copied after the first step
        self.first_fetched = 0
        self.handle = torch.tensor(id(self), dtype=torch.long)
        _MANAGERS[id(self)] = self
        if self.cuda:  # the side stream may still read host memory that dies with the manager
            weakref.finalize(self, self.stream.synchronize)

    # --- set-up, after the prefill -------------------------------------------------------------------
    def add_layers(self, layers: Sequence[LayerToOffload]) -> None:
        """Move slim layers' cached prompt K/V to the host and make their fronts, grouped: consecutive
        layers of one shape, `copy_group` at most."""
        runs: list[list[LayerToOffload]] = []
        for layer in sorted(layers, key=lambda layer: layer.index):
            if runs and len(runs[-1]) < self.copy_group and runs[-1][-1].group_key() == layer.group_key():
                runs[-1].append(layer)
            else:
                runs.append([layer])
        for run in runs:
            self._add_group(run)

    def _add_group(self, run: list[LayerToOffload]) -> None:
        first = run[0]
        batch, heads, _, dim = first.keys.shape
        names = _names([layer.index for layer in run])
        host = (len(run), *first.keys.shape)
        host_k = host_buffer(host, first.keys.dtype, self.cuda, f"{names}' keys")
        host_v = host_buffer(host, first.values.dtype, self.cuda, f"{names}' values")
        front = (len(run), batch, heads, first.sink_tokens + first.active_blocks * first.block_size, dim)
        front_k, front_v = first.keys.new_empty(front), first.values.new_empty(front)
        for position, layer in enumerate(run):
            host_k[position].copy_(layer.keys, non_blocking=self.cuda)  # before any later write, on this stream
            host_v[position].copy_(layer.values, non_blocking=self.cuda)
            front_k[position, :, :, :first.sink_tokens] = layer.keys[:, :, :first.sink_tokens]
            front_v[position, :, :, :first.sink_tokens] = layer.values[:, :, :first.sink_tokens]
        tables = torch.full((len(run), 2, batch, first.active_blocks), -1, dtype=torch.long, device=first.keys.device)
        group = CopyGroup([layer.index for layer in run], host_k, host_v, front_k, front_v, tables, tables[:, 0].clone(),
                          first.sink_tokens, first.block_size)
        if self.cuda:
            for tensor in (front_k, front_v, group.tables, group.pending, self.issued):
                tensor.record_stream(self.stream)
            group.ready, group.done = torch.cuda.Event(), torch.cuda.Event()
        self.groups.append(group)
        for position, layer in enumerate(run):
            self.layers[layer.index] = OffloadedLayer.of(layer.index, group, position)

    # --- what the op does ----------------------------------------------------------------------------
    def attend_kv(self, index: int, active: torch.Tensor, upcoming: torch.Tensor, k: torch.Tensor,
                  v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        layer = self.layers[index]
        group, position = layer.group, layer.position
        step, layer.steps = layer.steps, layer.steps + 1
        if step == 0 or group.issued_for != step:  # the first step (its set was chosen by this step's query)
            self._copy(group, position, 1, active, step)  # or no copy was issued ahead: copy now
            if step == 0:
                self.first_fetched += active.numel()
        elif position == 0 and self.cuda:  # the group's copy for this step, issued a step ago
            torch.cuda.current_stream(self.device).wait_event(group.ready)
        keys, values = torch.cat([layer.front_k, k], dim=2), torch.cat([layer.front_v, v], dim=2)
        layer.pending.copy_(upcoming)
        if position == len(group.layers) - 1:  # the group's next step is decided: fetch it
            self._issue(group, step + 1)
        return keys, values

    def _issue(self, group: CopyGroup, step: int) -> None:
        """Copy the group's blocks for `step` (its `pending` sets) on the side stream, once the compute
        stream is past every read of the fronts for the step before."""
        if self.cuda:
            group.done.record(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self.stream):
                self.stream.wait_event(group.done)
                graph = group.graphs.get(step % 2)
                if graph is not None:
                    graph.replay()
                    self._copied(group, 0, len(group.layers), step)
                else:
                    self._copy(group, 0, len(group.layers), group.pending, step)
                    if self.graphs:  # after the launch above compiled the kernel: record it for this parity
                        self._capture(group, step)
                group.ready.record(self.stream)
        else:
            self._copy(group, 0, len(group.layers), group.pending, step)
        group.issued_for = step

    def _capture(self, group: CopyGroup, step: int) -> None:
        """Record the group's copy ahead for steps of `step`'s parity in a CUDA graph, on the side stream
        (current); the copy is not run. On failure, log why and launch from now on."""
        graph = torch.cuda.CUDAGraph()
        if self.graph_pool is None:
            self.graph_pool = torch.cuda.graph_pool_handle()
        try:
            graph.capture_begin(pool=self.graph_pool, capture_error_mode="thread_local")
            try:
                _copy_blocks_triton(group, 0, len(group.layers), group.pending, step, self.issued)
            finally:
                graph.capture_end()
        except RuntimeError as error:
            self.graphs = False
            log.warning("slimpass offload: could not capture the copy of %s in a CUDA graph (%s); launching it "
                        "every step instead (more host time per step)", _names(group.layers), error)
            return
        group.graphs[step % 2] = graph

    def _copy(self, group: CopyGroup, first: int, count: int, want: torch.Tensor, step: int) -> None:
        """Make the front slots of the group's layers first..first+count-1 hold the blocks `want`
        ([count, B, m], or [B, m] for one layer) for decoding step `step`: all of them on the first step,
        afterwards only the slots whose block changed (counted in `issued`)."""
        if self.cuda and triton is not None:
            _copy_blocks_triton(group, first, count, want, step, self.issued)
        else:
            _copy_blocks_torch(group, first, count, want, step, self.issued)
        self._copied(group, first, count, step)

    def _copied(self, group: CopyGroup, first: int, count: int, step: int) -> None:
        """Note that a copy for `step` was issued for the group's layers first..first+count-1."""
        for index in group.layers[first:first + count]:
            self.layers[index].copied_for = step

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
        for group in self.groups:
            step = self.layers[group.layers[0]].steps
            if group.issued_for == step:  # issued ahead for a step that has not run
                fetched -= int((group.tables[:, step % 2] != group.tables[:, (step - 1) % 2]).sum())
        group = self.groups[0]
        block_bytes = 2 * group.host_k[0, 0, :, :group.block_size].nbytes
        steps = max(layer.steps for layer in self.layers.values())
        return {"layers": len(self.layers), "groups": len(self.groups), "steps": steps,
                "first_step_blocks": self.first_fetched, "blocks": fetched, "h2d_bytes": fetched * block_bytes,
                "h2d_bytes_per_step": fetched * block_bytes / max(steps - 1, 1)}


def _names(layers: Sequence[int]) -> str:
    return f"layers {layers[0]}-{layers[-1]}" if len(layers) > 1 else f"layer {layers[0]}"


def manager(handle: torch.Tensor) -> OffloadManager:
    found = _MANAGERS.get(int(handle))
    if found is None:
        raise RuntimeError("slimpass offload: this decoding step's SlimCache is gone (the compiled graph was called "
                           "with a cache whose manager was freed); pass the live cache")
    return found


# --- the op -------------------------------------------------------------------------------------------
# Registered with the dispatcher directly: `custom_op`'s Python wrappers (autograd, kernel switch, aliasing
# check) cost more host time than the op's own work (module docstring). The op never needs a gradient.
_LIB = torch.library.Library("slimpass", "FRAGMENT")
_LIB.define("offload_kv(Tensor handle, int layer, Tensor active, Tensor upcoming, Tensor k, Tensor v, "
            "SymInt front_tokens) -> (Tensor, Tensor)")


def offload_kv(handle: torch.Tensor, layer: int, active: torch.Tensor, upcoming: torch.Tensor, k: torch.Tensor,
               v: torch.Tensor, front_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``slimpass::offload_kv``: K/V a decoding step at offloaded slim layer `layer` attends to:
    ``cat(front, k)``, ``cat(front, v)`` (k, v: the layer's resident tail), the front holding the blocks of
    `active` [B, m]; `upcoming` [B, m] is the layer's active set for its next step, which the side stream
    may fetch from here on (module docstring)."""
    return manager(handle).attend_kv(layer, active, upcoming, k, v)


_LIB.impl("offload_kv", offload_kv, "CompositeExplicitAutograd")


@torch.library.register_fake("slimpass::offload_kv", lib=_LIB)
def _offload_kv_fake(handle, layer, active, upcoming, k, v, front_tokens):
    shape = (k.shape[0], k.shape[1], front_tokens + k.shape[2], k.shape[3])
    return k.new_empty(shape), v.new_empty(shape)
