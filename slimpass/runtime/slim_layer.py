"""`SlimLayer`: one decoder layer's K/V in a `SlimCache` (`slimpass.runtime.slim_cache`), with what the
runtime keeps beside them: the original positions of the prompt tokens that reached the layer, the
reselection state, the fronts of an offloaded layer and, with `SlimConfig.static_decode`, fixed-size
buffers that a decoding step writes in place.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import DynamicLayer

from slimpass.runtime import reselection, static_kv  # noqa: F401  (they register the marker ops `update` calls)


class SlimLayer(DynamicLayer):
    """One decoder layer's K/V: the prompt tokens that reached the layer, then every generated token.

    `prompt_positions` ([B, n], original positions of the cached prompt tokens) is None while the layer
    holds the whole prompt (an unpruned layer, or before `SlimCache.record_prefill`). Each decoding mode's
    state is one object owned by the mode's module, None when the mode is off for this layer.
    """

    def __init__(self, index: int = 0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.index = index
        self.prompt_positions: torch.Tensor | None = None
        self.reselection: reselection.ReselectState | None = None  # armed for reselection (SlimConfig.reselect)
        self.offloaded = False  # its prompt K/V go to the host (SlimConfig.offload) ...
        self.fronts: Any = None  # ... and once they are there, the manager's `offload.OffloadedLayer`: its fronts
        self.slots: static_kv.StaticSlots | None = None  # fixed-size buffers (SlimConfig.static_decode)

    def make_static(self, room: int) -> None:
        """Move the layer's K/V into buffers with `room` more slots (`slimpass.runtime.static_kv`); again
        when full: the same written slots in larger buffers."""
        held = self.slots.written if self.slots is not None else self.keys.shape[2]
        batch, heads, _, dim = self.keys.shape
        keys = self.keys.new_zeros(batch, heads, held + room, dim)
        values = self.values.new_zeros(batch, heads, held + room, self.values.shape[3])
        keys[:, :, :held], values[:, :, :held] = self.keys[:, :, :held], self.values[:, :, :held]
        self.keys, self.values = keys, values
        if self.slots is None:
            self.slots = static_kv.StaticSlots(torch.full((1,), held, dtype=torch.long, device=keys.device), held)
        self._mark_static()

    def cut_to_tail(self, start: int) -> None:
        """Hold only the tokens from slot `start` on (an offloaded layer, once the manager's fronts hold its
        sinks and active blocks); fixed-size buffers keep their room."""
        self.keys, self.values = self.keys[:, :, start:].clone(), self.values[:, :, start:].clone()
        if self.slots is not None:
            self.slots.valid.sub_(start)
            self.slots.written -= start
            self._mark_static()

    def _mark_static(self) -> None:
        """The tensors a decode graph on fixed-size buffers reads and writes: CUDA graphs read them in place
        (a replay copies other inputs, and skips graphs that write to them). No guard on the address: a new
        request does not recompile (its graphs are recorded again)."""
        state = self.reselection.tensors() if self.reselection is not None else ()
        fronts = (self.fronts.front_k, self.fronts.front_v, self.fronts.pending) if self.fronts is not None else ()
        for tensor in (self.keys, self.values, self.slots.valid, self.prompt_positions, *state, *fronts):
            if tensor is not None:
                torch._dynamo.mark_static_address(tensor, guard=False)

    def get_seq_length(self) -> int:
        return self.slots.written if self.slots is not None else super().get_seq_length()

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        if self.slots is not None:  # fixed-size buffers: write this step's token in place
            if key_states.shape[2] != 1:
                raise NotImplementedError(
                    f"SlimCache: layer {self.index} has fixed-size buffers (static_decode) and takes one token a "
                    f"step, not {key_states.shape[2]}; run with static_decode=False")
            valid = self.slots.valid
            keys = self.keys.index_copy_(2, valid, key_states)
            values = self.values.index_copy_(2, valid, value_states)
            valid.add_(1)
            torch.ops.slimpass.bind_static_kv(valid, self.index)
        else:
            keys, values = super().update(key_states, value_states, *args, **kwargs)
        state = self.reselection
        if state is not None:  # a decoding step at an armed slim layer: show the pass its state
            fronts = (self.fronts.front_k, self.fronts.front_v, self.fronts.pending) if self.fronts else (None,) * 3
            torch.ops.slimpass.bind_layer_state(state.active, state.stats, self.prompt_positions, state.unit_keys,
                                                self.index, *fronts)
        return keys, values

    def reset(self) -> None:
        super().reset()
        self.prompt_positions = self.reselection = self.fronts = self.slots = None
        self.offloaded = False

    def _refuse_offloaded(self, what: str, static_too: bool = True) -> None:
        if self.offloaded:
            raise NotImplementedError(
                f"SlimCache: {what} of offloaded layer {self.index} is not supported (its prompt K/V live in host "
                "memory, out of this layer's tensors); run with offload=False")
        if static_too and self.slots is not None:
            raise NotImplementedError(
                f"SlimCache: {what} of layer {self.index} is not supported with fixed-size buffers (static_decode); "
                "run with static_decode=False")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: row i takes row ``beam_idx[i]``'s history: its K/V and its active set. In place where a
        graph reads the tensor where it is (fixed-size buffers, the active set). The kept positions and scored
        keys stay: beam search reorders only among one prompt's beams, whose prefill rows are the same (and
        layers of one stage share one positions tensor, which an in-place reorder would permute twice)."""
        self._refuse_offloaded("reordering (beam search)", static_too=False)
        if self.slots is None:
            super().reorder_cache(beam_idx)
        rows = [self.reselection.active] if self.reselection is not None else []
        rows += [self.keys, self.values] if self.slots is not None else []  # (all rows: same slots)
        for tensor in rows:
            if tensor is not None:
                tensor.copy_(tensor.index_select(0, beam_idx.to(tensor.device)))

    def crop(self, *args: Any, **kwargs: Any) -> None:
        self._refuse_offloaded("cropping")
        super().crop(*args, **kwargs)

    def batch_repeat_interleave(self, *args: Any, **kwargs: Any) -> None:
        self._refuse_offloaded("repeating rows")
        super().batch_repeat_interleave(*args, **kwargs)

    def batch_select_indices(self, *args: Any, **kwargs: Any) -> None:
        self._refuse_offloaded("selecting rows")
        super().batch_select_indices(*args, **kwargs)
