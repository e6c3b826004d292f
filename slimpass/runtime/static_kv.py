"""Fixed-size K/V buffers for decoding (``SlimConfig.static_decode``): what the decode graph reads of them.

After a pruned prefill, `SlimCache` moves each layer's K/V into buffers with room for more tokens
(`SlimLayer.make_static`); a decoding step writes its token in place at the layer's count of written
slots (``valid``, a one-element tensor on the accelerator) and returns the whole buffers, so no size in
the step's graph changes from one step to the next. A layer's slot index is not its token's position (a
pruned layer holds a subset of the prompt), so transformers' shared mask cannot tell the written slots
from the empty ones: `SlimLayer.update` leaves a `bind_static_kv` marker carrying ``valid`` in the traced
graph, and the `rewrite_attention` pass masks the layer's attention with `slot_mask` (`reselect_kv` masks
the reselected tokens the same way).
"""

from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass
class StaticSlots:
    """A layer's count of written slots in its fixed-size buffers, held by its `SlimLayer`."""

    valid: torch.Tensor
    """[1] on the accelerator: what the decode graph reads and advances."""
    written: int
    """The same count on the host (kept by `SlimCache`, outside the graphs)."""


@torch.library.custom_op("slimpass::bind_static_kv", mutates_args=("valid",))
def bind_static_kv(valid: torch.Tensor, layer: int) -> None:
    """Marks, in a traced decoding step, decoder layer `layer`'s count of written slots. The passes replace it;
    run (a step outside the compiled graph, or a pass that did not mask the layer) it raises, since the layer
    would attend to empty slots. (Declared as writing `valid` so that no compiler drops it first.)"""
    raise RuntimeError(
        f"slimpass: decoder layer {layer} decodes from fixed-size buffers (SlimConfig.static_decode) but this step's "
        "attention was not masked to the written slots: the step ran outside the sliminfer backend's compiled graph "
        "(decode through the model slimpass.compile returned; torch._dynamo may have run it eagerly after "
        "torch._dynamo.config.recompile_limit), or the rewrite_attention pass could not mask it (its log says why). "
        "Run with static_decode=False")


@bind_static_kv.register_fake
def _(valid, layer):
    return None


def slot_mask(keys: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """[1, 1, 1, S] bool (an attention mask): which of the S slots of `keys` [B, H, S, D] hold a token (the
    first `valid` of them)."""
    return (torch.arange(keys.shape[2], device=keys.device) < valid).view(1, 1, 1, -1)
