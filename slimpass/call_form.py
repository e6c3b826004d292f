"""One form for every call of a compiled model, so that calls which mean the same thing reuse one graph.

Dynamo guards on how a function is called: the number of positional arguments, the keys of ``**kwargs``,
which of them are None. ``generate`` calls ``forward(input_ids=..., cache=..., attention_mask=...,
use_cache=True, return_dict=True, logits_to_keep=1)`` (and, in transformers 5.17, ``position_ids``); a user
calls ``model(ids, logits_to_keep=1)``. Both mean the same prefill, yet each compiled a graph of its own
(on CPU 12.8 s eager, 324 s Inductor for SmolLM2). `canonical` rewrites a call into one form: arguments
by name, and nothing that only restates what the model would do anyway (a default, the config's value, the
positions ``0..N-1`` of an unpadded prompt), keys in one order, and inputs as a fresh tensor would be
(contiguous; an inference tensor under `torch.inference_mode`).
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

# Inputs made contiguous: their strides are guarded on (a no-op for what generate passes, which it clones).
_CONTIGUOUS = ("input_ids", "inputs_embeds", "position_ids", "attention_mask")
# Each is replaced by the model's config value when absent (transformers' forward / `can_return_tuple`).
_CONFIG_DEFAULTS = ("use_cache", "return_dict")


class CallForm:
    """Rewrites calls of one forward (its signature read once) into the one form its graphs are compiled for."""

    def __init__(self, forward: Any, config: Any) -> None:
        parameters = inspect.signature(forward).parameters.values()
        self.names = [p.name for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        self.defaults = {p.name: p.default for p in parameters if p.default is not inspect.Parameter.empty}
        self.order = {name: i for i, name in enumerate(self.names)}  # the keys' order in every canonical call
        self.config = config

    def canonical(self, args: tuple, kwargs: dict, prefill: bool) -> tuple[tuple, dict]:
        """`(args, kwargs)` in the one form: by name, defaults and config values left out; for an unpadded
        prefill (no attention mask left), position ids equal to ``0..N-1`` left out (one host sync)."""
        if len(args) > len(self.names):
            return args, kwargs  # not a call this forward accepts: let the model raise its own error
        named = dict(zip(self.names, args))
        if set(named) & set(kwargs):
            return args, kwargs  # a name given twice: the model's own TypeError
        named.update(kwargs)
        for name in [n for n, value in named.items() if self._restates_default(n, value)]:
            del named[name]
        if prefill and named.get("attention_mask") is None and _counts_from_zero(named.get("position_ids")):
            del named["position_ids"]
        for name in _CONTIGUOUS:  # a slice of a longer batch guards on its strides; generate clones contiguous
            if isinstance(named.get(name), torch.Tensor):
                named[name] = _fresh(named[name])
        last = len(self.order)
        return (), dict(sorted(named.items(), key=lambda item: (self.order.get(item[0], last), item[0])))

    def _restates_default(self, name: str, value: Any) -> bool:
        if value is None:
            return name in self.defaults or name not in self.names  # None is every optional input's "absent"
        if name in _CONFIG_DEFAULTS and isinstance(value, bool):
            return value == getattr(self.config, name, None)
        default = self.defaults.get(name, inspect.Parameter.empty)
        return isinstance(value, (bool, int)) and type(value) is type(default) and value == default


def _fresh(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` as if made here: row-major strides, size-1 dimensions included (`contiguous()` keeps a [1, 500]
    slice of a [1, 600] tensor as it is, with stride 600 where a fresh tensor has 500), and an inference tensor
    exactly when inference mode is on (`generate` clones its inputs inside `torch.inference_mode`; a tensor made
    outside it has other dispatch keys). Dynamo guards on both. A copy only where one of them differs."""
    expected, step = [], 1
    for size in reversed(tensor.shape):
        expected.append(step)
        step *= size
    if tensor.stride() == tuple(reversed(expected)) and tensor.is_inference() == torch.is_inference_mode_enabled():
        return tensor
    return tensor.clone(memory_format=torch.contiguous_format)


def _counts_from_zero(positions: Any) -> bool:
    """Whether `positions` is ``[[0, 1, ..., N-1]]`` for every row: what the model makes when none are given."""
    if not isinstance(positions, torch.Tensor) or positions.dim() != 2 or positions.dtype.is_floating_point:
        return False
    expected = torch.arange(positions.shape[-1], device=positions.device, dtype=positions.dtype)
    return bool((positions == expected).all())
