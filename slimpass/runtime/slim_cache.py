"""`SlimCache`: the KV cache of a pruned prompt — per layer the tokens that reached it, their original
positions, and what they cost in memory.

After a pruned prefill each decoder layer holds the K/V of a different set of prompt tokens: all of
them before the first pruning stage, the survivors of each stage after it. `SlimCache` is a
`transformers` cache (a `DynamicCache`, so `generate` and the compiled graphs use it unchanged) that
also knows, per layer, the original positions of those tokens and the prompt's original length:

- `get_seq_length()` is the original prompt length plus the generated tokens, for every layer (it is
  what positions the next token), not the number of tokens a pruned layer holds;
- `positions(layer)` are the original positions of the layer's cached tokens;
- `memory_report()` gives per layer the tokens held and their bytes on the accelerator and on the CPU;
- with `SlimConfig.offload` the prompt K/V of armed slim layers move to host memory after the prefill
  (`slimpass.runtime.offload`): the layer keeps its last prompt block and generated tokens.

`slimpass.compile` links it: its `generate` passes a fresh `SlimCache` to every request that brings no
cache of its own, and after a prefill that ran on an empty `SlimCache` the keep sets that the pruned
graph reported (`slimpass.last_keep_sets`) are recorded into it (`record_prefill`). Models with
sliding-window or other non-global attention layers are not supported (`SlimCache` raises; `generate`
then keeps transformers' own cache).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from transformers.cache_utils import Cache, DynamicCache

from slimpass.config import SlimConfig
from slimpass.runtime import offload, reselection
from slimpass.runtime.block_layout import BlockLayout
from slimpass.runtime.keep_sets import KeepSet
from slimpass.runtime.memory_report import LayerMemory, MemoryReport
from slimpass.runtime.slim_layer import SlimLayer

__all__ = ["LayerMemory", "MemoryReport", "SlimCache", "SlimLayer", "supports"]


def _attention_layer_types(config: Any) -> list[str]:
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    types = getattr(text, "layer_types", None)
    if types is None:
        window = getattr(text, "sliding_window", None)
        kind = "sliding_attention" if window is not None else "full_attention"
        types = [kind] * text.num_hidden_layers
    return list(types)


def supports(config: Any) -> bool:
    """Whether a model config has only global (full) attention layers, the layers `SlimCache` models."""
    return all(kind == "full_attention" for kind in _attention_layer_types(config))


class SlimCache(DynamicCache):
    """A `DynamicCache` whose layers remember the original positions of the tokens they hold.

    Use::

        cache = slimpass.SlimCache(model.config)
        out = model.generate(input_ids, past_key_values=cache, max_new_tokens=64)  # `cache=` from transformers 5.24
        print(cache.memory_report())

    A cache serves one request: pass a new one (or none: `slimpass.compile`'s `generate` makes one)
    for every `generate` call.
    """

    def __init__(self, config: Any) -> None:
        types = _attention_layer_types(config)
        if not supports(config):
            other = sorted({kind for kind in types if kind != "full_attention"})
            raise ValueError(
                f"SlimCache: the model has {', '.join(other)} layers; SlimCache models global-attention layers "
                "only (sliding-window layers drop old tokens that pruning bookkeeping would keep). Use "
                "transformers' own cache for this model (slimpass.compile's generate does so)")
        Cache.__init__(self, layers=[SlimLayer(index) for index in range(len(types))])
        self.prompt_len = 0
        self.recorded = False
        self.config: SlimConfig | None = None  # set by record_prefill
        self.block_bytes = 0  # K + V bytes of one block of one row (for the reselection report)
        self.offload: offload.OffloadManager | None = None
        self.steps = 0  # decoding steps run (before_step / after_step)
        self.room = 0  # static_decode: the slots each layer's buffers grow by (0: transformers' growing tensors)
        self.new_tokens: int | None = None  # the most tokens the request generates, when known (its first room)

    # --- what transformers asks -------------------------------------------------------------------------
    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Original prompt length + generated tokens (the next token's position), whatever the layer.

        Layer 0 is never pruned (a stage cuts the input of a layer >= 1), so its cache length is that
        count; reading it keeps the value symbolic inside compiled graphs."""
        return self.layers[0].get_seq_length() if self.layers else 0

    def get_query_offset(self, layer_idx: int = 0) -> int:
        """The query's offset in the mask transformers builds (only its mask code asks). With fixed-size buffers
        (static_decode) 0: every step is one token and `get_mask_sizes` makes that mask one all-true column
        whatever the offset, while the passes mask each layer to its written slots; the true offset changes
        every step, and a number read inside the graph would specialise it (one more compile)."""
        if self.room:
            return 0
        return super().get_query_offset(layer_idx)

    def get_mask_sizes(self, query_length: int, layer_idx: int) -> tuple[int, int]:
        """(kv_length, kv_offset) of the mask transformers builds. After a pruned prefill each layer holds a
        different number of tokens, so no single mask over the full length fits them all; a one-token
        decoding step of an unpadded prompt (pruning runs only on those) sees every cached token, so its
        mask is one all-true column that broadcasts over any layer's keys: (1, 0). transformers <= 5.17
        builds that mask even under torch.compile; later versions skip it there."""
        if query_length == 1 and self.pruned:
            return 1, 0
        return super().get_mask_sizes(query_length, layer_idx)

    @property
    def pruned(self) -> bool:
        """Whether the recorded prefill pruned the prompt (some layer holds a subset of it)."""
        return any(layer.prompt_positions is not None for layer in self.layers)

    # --- what slimpass records and reports --------------------------------------------------------------
    def record_prefill(self, prompt_len: int, keep_sets: Sequence[KeepSet], config: SlimConfig | None = None) -> None:
        """After the prefill of a `prompt_len`-token prompt: each layer from a stage's layer on holds
        that stage's kept tokens (until the next stage). Checks that the caches agree. With
        ``config.reselect``, arms decode-time reselection at every slim layer whose cached prompt has more
        middle blocks than ``config.active_tokens`` allows (at the others it would change nothing)."""
        stages = {keep.layer: keep.positions for keep in keep_sets}
        positions, offloaded = None, []
        for index, layer in enumerate(self.layers):
            positions = stages.get(index, positions)
            held = layer.get_seq_length()
            expected = prompt_len if positions is None else positions.shape[-1]
            if held != expected:
                raise RuntimeError(
                    f"SlimCache.record_prefill: layer {index} holds {held} tokens but the keep sets say {expected} "
                    f"(prompt of {prompt_len}); was this cache used for an earlier request? Pass a new SlimCache "
                    "to each generate call")
            layer.prompt_positions = None if positions is None else positions.to(layer.keys.device)
            layer.reselection = None
            # Inductor's prefill may hand back K/V in another memory layout than the decode graph's `cat`
            # makes; one layout for every step keeps a single compiled decode graph (one copy per request).
            layer.keys, layer.values = layer.keys.contiguous(), layer.values.contiguous()
            if config is not None and config.reselect and positions is not None:
                self._arm(layer, config)
                if config.offload and layer.reselection is not None:
                    offloaded.append(layer)
        if offloaded:
            self._offload(offloaded, config)
        self.config = config  # the prefill graph's: decoding steps read it (`slimpass.compile`'s forward)
        self.room = config.decode_capacity if config is not None and config.static_decode and self.pruned else 0
        if self.room:  # a request of N tokens writes N - 1 (the last is not fed back): no more room than that
            first = min(self.room, max(self.new_tokens - 1, 1)) if self.new_tokens else self.room
            for layer in self.layers:
                layer.make_static(first)
        self.prompt_len, self.steps = prompt_len, 0
        self.recorded = True

    def _arm(self, layer: SlimLayer, config: SlimConfig) -> None:
        block = config.block_size
        middle = BlockLayout.of(config).middle(layer.prompt_positions.shape[1])
        count = min(config.active_tokens // block, middle)
        if count < middle:
            device = layer.keys.device
            units = reselection.unit_keys(layer.keys, block, config.reselect_unit) if config.reselect_unit > 1 else None
            layer.reselection = reselection.ReselectState(
                torch.full((layer.keys.shape[0], count), -1, dtype=torch.long, device=device),
                torch.zeros(2, dtype=torch.long, device=device), units)
            self.block_bytes = 2 * layer.keys[0, :, :block].nbytes

    def _offload(self, layers: list[SlimLayer], config: SlimConfig) -> None:
        """Copy armed slim layers' prompt K/V to the host (`slimpass.runtime.offload`). They stay on the
        accelerator for the first decoding step, which runs resident (its active set is chosen by its own
        query); before the second, `before_step` fills the fronts and cuts each layer to its last prompt
        block, keeping the keys reselection scores against."""
        self.offload = offload.OffloadManager(layers[0].keys.device, config.copy_group,
                                              in_graph=config.static_decode)
        block, layout, moved = config.block_size, BlockLayout.of(config), []
        for layer in layers:
            sinks = layout.sink_tokens(layer.prompt_positions.shape[1])
            state = layer.reselection
            moved.append(offload.LayerToOffload(layer.index, layer.keys, layer.values, state.active.shape[1], sinks,
                                                block))
            if state.unit_keys is None:  # reselect_unit == 1 scores the prompt keys themselves: they stay
                state.unit_keys = layer.keys
            layer.offloaded = True
        self.offload.add_layers(moved)

    # --- around each decoding step (slimpass.compile's forward calls these) ------------------------------
    def before_step(self) -> None:
        """Before a decoding step's forward. Under offload, before the second step: fill the fronts from the
        layers' K/V still on the accelerator (the first step's reselection chose this step's sets) and cut
        the layers to their tails, so the step's graph reads the fronts (a graph of its own: Dynamo sees
        them appear); before every later step: order the compute stream after the copies."""
        if self.room and any(layer.slots.written >= layer.keys.shape[2] for layer in self.layers):
            for layer in self.layers:  # full: more room (the same compiled graph; under CUDA graphs a new recording)
                layer.make_static(self.room)
        manager = self.offload
        if manager is None or self.steps < 1:
            return
        if manager.started is None:
            offloaded = {index: self.layers[index] for index in manager.layers}
            manager.start({index: (layer.keys, layer.values, layer.reselection.active)
                           for index, layer in offloaded.items()},
                          self.steps)
            for index, layer in offloaded.items():
                moved = manager.layers[index]
                tail = BlockLayout(moved.block_size, 0).tail_start(layer.prompt_positions.shape[1])
                layer.fronts = moved
                layer.cut_to_tail(tail)
        manager.before_step()

    def after_step(self) -> None:
        """After a decoding step's forward (its kernels all enqueued): under offload, the copies for the next
        step."""
        if self.offload is not None and self.offload.started is not None:
            self.offload.after_step(self.steps)
        if self.room:  # the step wrote one token in place into each layer's buffers
            for layer in self.layers:
                layer.slots.written += 1
        self.steps += 1

    def offload_report(self) -> dict[str, float]:
        """Under offload: the host -> accelerator block copies so far (`OffloadManager.report`); {} otherwise."""
        return self.offload.report() if self.offload is not None else {}

    def reset(self) -> None:
        super().reset()
        self.offload = None
        self.prompt_len, self.recorded, self.steps, self.room, self.config = 0, False, 0, 0, None

    def reselection_report(self) -> dict[int, dict[str, int | float]]:
        """Per armed slim layer: decoding steps, active tokens per row, blocks swapped in after the first
        step (summed over rows) and the bytes those blocks hold per step (what an offloading cache moves)."""
        out = {}
        for index, layer in enumerate(self.layers):
            state = layer.reselection
            if state is None:
                continue
            steps, swapped = (int(x) for x in state.stats.tolist())
            moved = swapped * self.block_bytes
            out[index] = {"steps": steps, "active_blocks": state.active.shape[1], "swapped_blocks": swapped,
                          "bytes_moved": moved, "bytes_per_step": moved / max(steps - 1, 1)}
        return out

    def generated(self) -> int:
        """Tokens appended after the prompt (0 before decoding)."""
        return max(0, self.get_seq_length() - self.prompt_len) if self.recorded else 0

    def positions(self, layer_idx: int) -> torch.Tensor:
        """[B, n] original positions of the tokens cached at layer `layer_idx` (prompt, then generated)."""
        layer = self.layers[layer_idx]
        if not layer.is_initialized or layer.keys is None or layer.keys.numel() == 0:
            raise ValueError(f"SlimCache.positions({layer_idx}): the layer holds no tokens yet (run a prefill first)")
        batch, device = layer.keys.shape[0], layer.keys.device
        if layer.prompt_positions is None:
            return torch.arange(layer.get_seq_length(), device=device).expand(batch, -1)
        prompt = layer.prompt_positions
        tail = torch.arange(self.prompt_len, self.prompt_len + self.generated(), device=device).expand(batch, -1)
        return torch.cat([prompt, tail], dim=1)

    def memory_report(self) -> MemoryReport:
        """Per layer: tokens held and the bytes of its K and V on the accelerator and on the CPU (an offloaded
        layer: its front and tail on the accelerator, its prompt in host memory), and the scored keys."""
        rows, dense = [], 0
        dense_tokens = self.get_seq_length()
        managed = self.offload.layers if self.offload is not None else {}
        started = self.offload is not None and self.offload.started is not None
        for index, layer in enumerate(self.layers):
            tensors = [t for t in (layer.keys, layer.values) if isinstance(t, torch.Tensor) and t.numel()]
            moved = managed.get(index)
            if moved is not None:
                tensors += [moved.front_k, moved.front_v, moved.host_k, moved.host_v]
            size = sum(t.nbytes for t in tensors)
            on_cpu = sum(t.nbytes for t in tensors if t.device.type == "cpu")
            units = layer.reselection.unit_keys if layer.reselection is not None else None
            scored = units.nbytes if units is not None else 0
            if moved is not None and started:  # the front's sinks and slots copy host tokens: count them once
                tokens = layer.prompt_positions.shape[1] + self.generated()
            else:
                tokens = layer.get_seq_length()
            rows.append(LayerMemory(index, tokens, size - on_cpu, on_cpu, scored))
            if tensors:
                per_token = 2 * tensors[0].nbytes // max(tensors[0].shape[2], 1)
                dense += per_token * dense_tokens
        return MemoryReport(tuple(rows), dense)
