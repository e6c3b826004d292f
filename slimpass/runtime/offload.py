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

Reselection decides a layer's next active set one step ahead, so the copies for step s + 1 can run while
step s + 1 has not started. Consecutive layers of one shape form a *copy group* (`SlimConfig.copy_group`
of them), whose buffers are stacked so that one kernel launch copies for all of them. Without
``static_decode`` no op of ours runs inside the compiled decode graph: the graph reads the fronts and
writes each layer's next set into a buffer the manager owns (`pending`), as traced PyTorch that the
compiler fuses (`reselection.reselect_attention`), and `SlimCache` calls the manager around each step's
forward:

- the first decoding step runs resident: its active set is chosen by its own query, and the layers'
  prompt K/V are still on the accelerator (their copy to the host started after the prefill);
- before the second step, `start` fills the fronts from those K/V with a gather on the accelerator and
  the cache cuts the layers to their tails (the decode graph that reads the fronts is a second graph);
- before every later step the compute stream waits for the copies issued after the step before;
- after each step (its reads of the fronts and writes of the next sets are all enqueued) an event is
  recorded and each group's copy of the blocks that change for the next step is issued on the side
  stream after it.

An op inside the graph cost far more host time per call than the same work in a loop (docs/PERF.md,
fifth round), and decoding is host-bound at batch 1; around the graph the manager's work is a few calls
per group a step.

The side stream reads and writes only buffers the manager owns (host K/V, fronts, slot tables, the
stacked next sets), never one the compiler allocated. On CUDA the copy is a Triton kernel
(`slimpass.runtime.copy_kernel`) that reads the changed blocks straight from pinned host memory (mapped
into the device's address space), so only changed blocks cross the bus; a few programs loop over the
blocks, so the copy holds few SMs while it waits on the bus. It also keeps the slot tables and counts the
copied blocks on the device (no host sync, no extra launches). Elsewhere it is plain tensor indexing.
(Replaying each group's copy from a CUDA graph, ~5 µs instead of a ~70 µs launch, was tried and removed:
on an H200, torch 2.11, each manager's captures left ~45 KB of host memory behind that their release did
not return, and a server makes a manager per request; docs/PERF.md, tenth round.)

With ``static_decode`` (``in_graph``) the decoding step is one CUDA-graph replay whose GPU time is the
step's cost, so copies between replays would add to every step. There the graph orders itself: each
offloaded layer waits for its group's copy just before it reads its fronts and records an event once it
is done with them (`slimpass.runtime.front_events`), and the side stream waits for those events of a
group's layers, not for the whole step. A layer's copy for the next step then runs beside the rest of
this step and the next step's first layers.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import weakref
from collections.abc import Sequence
from typing import Any

import torch

from slimpass.runtime import front_events
from slimpass.runtime.block_index import block_tokens, gather_tokens
from slimpass.runtime.copy_kernel import copy_blocks_torch as _copy_blocks_torch
from slimpass.runtime.copy_kernel import copy_blocks_triton as _copy_blocks_triton
from slimpass.runtime.copy_kernel import triton

log = logging.getLogger(__name__)


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
    ready: Any = None  # torch.cuda.Event of that copy (not with in_graph: its layers' events)
    done: Any = None  # torch.cuda.Event after which the side stream may rewrite the fronts (same)


@dataclasses.dataclass(eq=False)
class OffloadedLayer:
    """One offloaded slim layer: its views into its group's buffers (taken once) and its own next-set
    buffer."""

    index: int
    group: CopyGroup
    position: int  # in the group
    host_k: torch.Tensor
    host_v: torch.Tensor
    front_k: torch.Tensor
    front_v: torch.Tensor
    tables: torch.Tensor  # [2, B, m]
    pending: torch.Tensor  # [B, m] its own (not a view of the group's: the decode graph writes it)
    events: front_events.FrontEvents | None  # in-graph ordering only: what the decode graph's marks use

    @classmethod
    def of(cls, index: int, group: CopyGroup, position: int, in_graph: bool) -> OffloadedLayer:
        front_k = group.front_k[position]
        return cls(index, group, position, group.host_k[position], group.host_v[position], front_k,
                   group.front_v[position], group.tables[position], group.pending[position].clone(),
                   front_events.events_for(front_k) if in_graph else None)

    sink_tokens = property(lambda self: self.group.sink_tokens)
    block_size = property(lambda self: self.group.block_size)

    @property
    def current(self) -> torch.Tensor:
        """[B, m] the block in each front slot once the group's last copy issued has run (-1: none yet)."""
        return self.tables[max(self.group.issued_for, 0) % 2]


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

    def __init__(self, device: torch.device, copy_group: int = 4, in_graph: bool = False) -> None:
        self.device = torch.device(device)
        self.copy_group = copy_group
        self.in_graph = in_graph  # the decode graph orders itself around the copies (`front_events`; static_decode)
        self.cuda = self.device.type == "cuda"
        self.stream = torch.cuda.Stream(self.device) if self.cuda else None
        self.layers: dict[int, OffloadedLayer] = {}
        self.groups: list[CopyGroup] = []
        self.issued = torch.zeros((), dtype=torch.long, device=self.device)  # blocks copied host -> accelerator
        self.started: int | None = None  # the decoding step the fronts were first filled for
        self.steps = 0  # decoding steps done (set by `start` and `after_step`)
        self.start_blocks = 0  # blocks gathered into the fronts at the start, on the accelerator
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
            if not self.in_graph:  # (in_graph: each layer's events, `front_events`)
                group.ready, group.done = torch.cuda.Event(), torch.cuda.Event()
        self.groups.append(group)
        for position, layer in enumerate(run):
            moved = self.layers[layer.index] = OffloadedLayer.of(layer.index, group, position, self.in_graph)
            if self.cuda:  # read on the side stream (after_step's stack)
                moved.pending.record_stream(self.stream)

    # --- around each decoding step (`SlimCache.before_step`, `SlimCache.after_step`) ----------------------
    def start(self, layers: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]], step: int) -> None:
        """Fill every front for decoding step `step` (the first step ran resident): per layer index its
        K/V ``[B, Hkv, P, D]`` still on the accelerator and its active set ``[B, m]`` for that step. A gather
        on the accelerator: nothing crosses the bus."""
        for group in self.groups:
            for position, index in enumerate(group.layers):
                keys, values, active = layers[index]
                tokens = block_tokens(active, group.block_size)
                group.front_k[position, :, :, group.sink_tokens:] = gather_tokens(keys, tokens)
                group.front_v[position, :, :, group.sink_tokens:] = gather_tokens(values, tokens)
                group.tables[position, step % 2].copy_(active)
                self.layers[index].pending.copy_(active)
                self.start_blocks += active.numel()
            group.issued_for = step
        self.started = self.steps = step

    def before_step(self) -> None:
        """Before a decoding step's graph: the compute stream waits for the copies issued after the step
        before (the graph's first reads of the fronts come after this on that stream). With `in_graph` the
        graph waits itself, each layer just before it reads its fronts."""
        if self.cuda and not self.in_graph:
            stream = torch.cuda.current_stream(self.device)
            for group in self.groups:
                stream.wait_event(group.ready)

    def after_step(self, step: int) -> None:
        """After decoding step `step`'s graph (its reads of the fronts and its writes of the next sets,
        `pending`, are all enqueued): issue each group's copy for step + 1 on the side stream."""
        self.steps = step + 1
        for group in self.groups:
            self._issue(group, step + 1)

    def _issue(self, group: CopyGroup, step: int) -> None:
        """Copy the group's blocks for `step` (the layers' next sets, stacked) on the side stream, once the
        compute stream is past every read of the fronts for the step before: past the whole step, or with
        `in_graph` past the group's layers (their `front_done` events), so that the copy runs beside the rest
        of the step and the next step's first layers."""
        layers = [self.layers[index] for index in group.layers]
        if not self.cuda:
            torch.stack([layer.pending for layer in layers], out=group.pending)
            self._copy(group, step)
        else:
            if not self.in_graph:
                group.done.record(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self.stream):
                for event in [layer.events.done for layer in layers] if self.in_graph else [group.done]:
                    self.stream.wait_event(event)
                torch.stack([layer.pending for layer in layers], out=group.pending)
                self._copy(group, step)
                for event in [layer.events.ready for layer in layers] if self.in_graph else [group.ready]:
                    event.record(self.stream)
        group.issued_for = step

    def _copy(self, group: CopyGroup, step: int) -> None:
        """Make the group's front slots hold its stacked `pending` sets for decoding step `step` (after
        `start`): the slots whose block changed since the step before (counted in `issued`)."""
        copy = _copy_blocks_triton if self.cuda and triton is not None else _copy_blocks_torch
        copy(group, 0, len(group.layers), group.pending, step, self.issued)

    # --- reports -------------------------------------------------------------------------------------
    def report(self) -> dict[str, float]:
        """Blocks copied host -> accelerator (changed ones, counted when used: a copy issued for a step
        that never ran is not), their bytes and the bytes per step after the fronts were filled (waits for
        the side stream); the blocks gathered into the fronts at the start, on the accelerator."""
        if not self.layers:
            return {}
        if self.cuda:
            self.stream.synchronize()
        fetched = int(self.issued)
        step = self.steps
        for group in self.groups:
            if group.issued_for == step != self.started:  # a copy issued ahead for a step that has not run
                fetched -= int((group.tables[:, step % 2] != group.tables[:, (step - 1) % 2]).sum())
        group = self.groups[0]
        block_bytes = 2 * group.host_k[0, 0, :, :group.block_size].nbytes
        copied = step - (self.started if self.started is not None else step) - 1  # steps that used copies
        return {"layers": len(self.layers), "groups": len(self.groups), "steps": step,
                "start_blocks": self.start_blocks, "blocks": fetched, "h2d_bytes": fetched * block_bytes,
                "h2d_bytes_per_step": fetched * block_bytes / max(copied, 1)}


def _names(layers: Sequence[int]) -> str:
    return f"layers {layers[0]}-{layers[-1]}" if len(layers) > 1 else f"layer {layers[0]}"
