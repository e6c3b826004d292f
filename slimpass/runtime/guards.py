"""Runtime guards: conditions on a graph's inputs under which a rewritten graph is exact.

A pass that proved its rewrite only for "canonical" inputs (an all-ones `attention_mask`, positions
0..N-1, a prompt no longer than a sliding window) records an `InputGuard`; the backend checks them
on every call and runs the unrewritten graph when one fails. Checks that read tensor contents are
combined into one device sync per call.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch

ROLES = ("attention_mask", "cache_position", "position_ids", "max_len", "min_len", "data_ptr")


@dataclasses.dataclass(frozen=True)
class InputGuard:
    """`role` of the graph input at position `index`; for "max_len": size `dim` must be <= `limit`; for
    "data_ptr": the tensor's data must start at address `limit` (a parameter still a view of the stacked
    weight that the graph reads in its place, `fuse_projections`).

    For content roles, `length_of` = (input index, dim) names the size that is the prompt length:
    the input's last dimension must equal it (the proof assumed so).
    """

    index: int
    role: str
    dim: int = -1
    limit: int = 0
    length_of: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"unknown guard role {self.role!r}; expected one of {ROLES}")

    def describe(self) -> str:
        return {
            "attention_mask": f"input {self.index} (attention_mask) is all ones",
            "cache_position": f"input {self.index} (cache_position) is 0..N-1",
            "position_ids": f"input {self.index} (position_ids) rows are 0..N-1",
            "max_len": f"input {self.index} size({self.dim}) <= {self.limit}",
            "min_len": f"input {self.index} size({self.dim}) >= {self.limit} (pruned graph; shorter prompts run dense)",
            "data_ptr": f"input {self.index} still starts at {self.limit:#x} (a row block of a stacked weight)",
        }[self.role]


def _content_flag(guard: InputGuard, value: torch.Tensor) -> torch.Tensor:
    if guard.role == "attention_mask":
        return value.bool().all()
    n = value.shape[-1]
    expected = torch.arange(n, device=value.device, dtype=value.dtype)
    return (value == expected).all()


def inputs_canonical(guards: Sequence[InputGuard], args: Sequence[Any]) -> bool:
    """True when every guard holds for this call's inputs."""
    flags = []
    for guard in guards:
        value = args[guard.index]
        if guard.role == "max_len":
            if int(value.shape[guard.dim]) > guard.limit:
                return False
            continue
        if guard.role == "min_len":
            if int(value.shape[guard.dim]) < guard.limit:
                return False
            continue
        if guard.role == "data_ptr":
            if value.data_ptr() != guard.limit:
                return False
            continue
        if not isinstance(value, torch.Tensor):
            return False
        if guard.length_of is not None:
            ref_index, ref_dim = guard.length_of
            if value.shape[-1] != args[ref_index].shape[ref_dim]:
                return False
        flags.append(_content_flag(guard, value))
    if not flags:
        return True
    return bool(torch.stack(flags).all())
