"""`InputGuard` / `inputs_canonical`: when a rewritten graph may run on a call's inputs."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from slimpass.runtime.guards import ROLES, InputGuard, inputs_canonical

MASK = InputGuard(0, "attention_mask")
CACHE = InputGuard(0, "cache_position")
POSITIONS = InputGuard(0, "position_ids")


def test_unknown_role_rejected():
    with pytest.raises(ValueError, match="unknown guard role 'mask'") as info:
        InputGuard(0, "mask")
    for role in ROLES:
        assert repr(role) in str(info.value)


def test_guards_are_hashable_values():
    """The rewrite pass deduplicates guards in a set: equal fields, one guard."""
    assert len({InputGuard(1, "attention_mask"), InputGuard(1, "attention_mask"), InputGuard(2, "attention_mask")}) == 2
    assert InputGuard(3, "max_len", 1, 4096).describe() == "input 3 size(1) <= 4096"


def test_no_guards_always_canonical():
    assert inputs_canonical([], [torch.zeros(2, 3)])


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.float32])
def test_attention_mask(dtype):
    ones = torch.ones(2, 9, dtype=dtype)
    assert inputs_canonical([MASK], [ones])
    padded = ones.clone()
    padded[1, 0] = 0
    assert not inputs_canonical([MASK], [padded])


def test_cache_position():
    assert inputs_canonical([CACHE], [torch.arange(7)])
    assert not inputs_canonical([CACHE], [torch.arange(7) + 3])  # a continued prompt, not a fresh one
    assert not inputs_canonical([CACHE], [torch.arange(7).flip(0)])


def test_position_ids_every_row():
    rows = torch.arange(6).expand(3, 6)
    assert inputs_canonical([POSITIONS], [rows])
    shifted = rows.clone()
    shifted[2] += 1
    assert not inputs_canonical([POSITIONS], [shifted])


def test_content_guard_on_non_tensor_fails():
    assert not inputs_canonical([MASK], [None])


@pytest.mark.parametrize(("length", "ok"), [(4095, True), (4096, True), (4097, False)])
def test_max_len(length, ok):
    guard = InputGuard(1, "max_len", dim=1, limit=4096)
    ids = torch.zeros(1, length, dtype=torch.long)
    assert inputs_canonical([guard], [None, ids]) is ok


def test_max_len_checked_with_content_guards():
    guards = [InputGuard(0, "max_len", dim=1, limit=8), InputGuard(1, "attention_mask")]
    ids, mask = torch.zeros(1, 9, dtype=torch.long), torch.ones(1, 9, dtype=torch.long)
    assert not inputs_canonical(guards, [ids, mask])
    assert inputs_canonical(guards, [ids[:, :8], mask[:, :8]])


def test_length_of_mismatch():
    """The proof bound the mask's length to the prompt length; a mask of another length fails."""
    guard = InputGuard(1, "attention_mask", length_of=(0, 1))
    ids = torch.zeros(2, 10, dtype=torch.long)
    assert inputs_canonical([guard], [ids, torch.ones(2, 10)])
    assert not inputs_canonical([guard], [ids, torch.ones(2, 12)])
    positions = InputGuard(1, "position_ids", length_of=(0, 1))
    assert not inputs_canonical([positions], [ids, torch.arange(11).expand(2, 11)])


def test_all_guards_must_hold():
    guards = [InputGuard(0, "attention_mask"), InputGuard(1, "cache_position")]
    assert inputs_canonical(guards, [torch.ones(1, 5), torch.arange(5)])
    assert not inputs_canonical(guards, [torch.ones(1, 5), torch.arange(1, 6)])
    assert not inputs_canonical(guards, [torch.zeros(1, 5), torch.arange(5)])


_masks = st.integers(1, 4).flatmap(
    lambda batch: st.integers(1, 40).flatmap(
        lambda n: st.lists(st.lists(st.integers(0, 1), min_size=n, max_size=n), min_size=batch, max_size=batch)
    )
)


@settings(max_examples=200, deadline=None)
@given(_masks)
def test_mask_canonical_iff_all_ones(rows):
    """Any mask containing a zero anywhere (any row, any position) is non-canonical; all ones is canonical."""
    mask = torch.tensor(rows)
    assert inputs_canonical([MASK], [mask]) is bool((mask == 1).all())


@settings(max_examples=100, deadline=None)
@given(n=st.integers(1, 64), offset=st.integers(-5, 5), rows=st.integers(1, 3))
def test_positions_canonical_iff_no_offset(n, offset, rows):
    positions = (torch.arange(n) + offset).expand(rows, n)
    assert inputs_canonical([POSITIONS], [positions]) is (offset == 0)
    assert inputs_canonical([CACHE], [positions[0]]) is (offset == 0)


def test_data_ptr_guard_holds_only_at_its_address():
    base = torch.zeros(6, 4)
    view = base[2:4]
    guard = InputGuard(0, "data_ptr", limit=view.data_ptr())
    assert inputs_canonical([guard], [view])
    assert not inputs_canonical([guard], [view.clone()])  # same values, another tensor
    assert not inputs_canonical([guard], [base[4:6]])
    assert f"{view.data_ptr():#x}" in guard.describe()
