"""Offload mode (``SlimConfig.offload``): the same tokens as the resident cache and the reference loop, what
lives where (memory report against the tensors), the copies it counts, and its errors.

On CPU the manager runs with CPU tensors and no streams (the side-stream logic and the zero-copy kernel
on pinned memory are checked on a GPU by ``benchmarks/gpu_offload_check.py``); the Triton copy kernel
itself runs here in Triton's interpreter.
"""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import textwrap
import weakref
from pathlib import Path

import pytest
import torch

import slimpass
from slimpass.config import ConfigError, SlimConfig
from slimpass.runtime import offload, reference
from tests.runtime.test_reselection import _compiled, _config, _generate, _ids


@pytest.fixture(autouse=True)
def _room_for_two_models():
    """Two compiled models (offload on and off) share the traced code objects' cache entries."""
    with torch._dynamo.config.patch(recompile_limit=64):
        yield


def _pair(**options):
    """The same tiny model compiled resident and with offload, and their uncompiled twin."""
    resident, oracle = _compiled(**options)
    offloaded, _ = _compiled(offload=True, **options)
    offloaded.load_state_dict(resident.state_dict())
    return resident, offloaded, oracle


PROMPTS = ((1, 120), (2, 300), (1, 517), (2, 800))


@pytest.mark.parametrize(("family", "unit", "group", "prompts"),
                         [("llama", 1, 4, PROMPTS), ("qwen2", 1, 1, PROMPTS[1::2]), ("llama", 2, 2, PROMPTS[:2])],
                         ids=["llama-unit1-group4", "qwen2-unit1-group1", "llama-unit2-group2"])
def test_offload_gives_the_resident_tokens(family, unit, group, prompts):
    """Greedy tokens with offload on equal offload off and the reference loop's, over prompt lengths,
    batch sizes and copy groups (one group of all offloaded layers, one per layer, and groups split by
    size or by shape)."""
    resident, offloaded, oracle = _pair(family=family, reselect_unit=unit, copy_group=group)
    for batch, length in prompts:
        ids = _ids(batch, length)
        want, kept = _generate(resident, ids)
        got, cache = _generate(offloaded, ids)
        assert torch.equal(got, want), (batch, length)
        assert torch.equal(got, reference.generate(oracle, ids, _config(reselect_unit=unit), max_new_tokens=10))
        armed = [index for index, layer in enumerate(kept.layers) if layer.reselection is not None]
        assert sorted(cache.offload.layers) == armed and armed
        groups = [g.layers for g in cache.offload.groups]
        assert sum(groups, []) == armed and all(len(g) <= group for g in groups)
        for g in cache.offload.groups:  # a group holds layers of one shape
            assert len({cache.layers[index].prompt_positions.shape for index in g.layers}) == 1
        for index in armed:
            layer, moved = cache.layers[index], cache.offload.layers[index]
            prompt = layer.prompt_positions.shape[1]
            tail = prompt - (prompt - 1) // 8 * 8
            assert layer.keys.shape[2] == tail + 9  # last prompt block + 9 generated tokens
            assert moved.host_k.shape[2] == prompt
            index_of = (moved.current[:, :, None] * 8 + torch.arange(8)).flatten(1)  # the front holds its slots' blocks
            rows = torch.arange(batch)[:, None]
            assert torch.equal(moved.front_v[:, :, moved.sink_tokens:],
                               moved.host_v.transpose(1, 2)[rows, index_of].transpose(1, 2))
            assert torch.equal(cache.positions(index), kept.positions(index))


def test_copies_counted_are_the_swaps():
    """Blocks copied for the steps after the first = blocks that entered a used active set between
    consecutive steps (the reference trace), each once; the first step copies every active block."""
    _, offloaded, oracle = _pair(gamma=1.0)
    ids = _ids(2, 600)
    _, cache = _generate(offloaded, ids, new_tokens=12)
    trace = []
    reference.generate(oracle, ids, _config(gamma=1.0), max_new_tokens=12, trace=trace)
    layers = cache.offload.layers
    # trace[s]: the sets step s decided for step s + 1; the last step's decision is never used
    swaps = sum(len(set(now[index][row]) - set(before[index][row])) for before, now in zip(trace[:-1], trace[1:-1])
                for index in layers for row in range(2))
    report = cache.offload_report()
    block_bytes = 2 * 16 * 8 * 4  # K + V, head dim 16, 8 tokens, float32, summed over heads below
    assert report["blocks"] == swaps > 0
    assert report["h2d_bytes"] == swaps * block_bytes * offloaded.config.num_key_value_heads
    assert report["start_blocks"] == sum(layer.current.numel() for layer in layers.values())
    assert report["steps"] == 11


def test_memory_report_under_offload_sums_tensor_sizes():
    _, offloaded, _ = _pair()
    _, cache = _generate(offloaded, _ids(2, 800), new_tokens=4)
    report = cache.memory_report()
    for m, layer in zip(report.layers, cache.layers):
        moved = cache.offload.layers.get(m.layer)
        tensors = [layer.keys, layer.values] + ([moved.front_k, moved.front_v, moved.host_k, moved.host_v] if moved else [])
        assert m.cpu_bytes == sum(t.nbytes for t in tensors)  # a CPU model: every byte is on the CPU
        assert m.score_bytes == (layer.reselection.unit_keys.nbytes if moved else 0)
        assert m.tokens == (layer.prompt_positions.shape[1] + 3 if moved else layer.keys.shape[2])
    per_token = 2 * 2 * offloaded.config.num_key_value_heads * 16 * 4
    assert report.dense_bytes == len(cache.layers) * (800 + 3) * per_token
    assert "scored keys" in str(report)


def test_no_growth_and_no_shared_state_across_requests():
    """Each request's manager dies with its cache; live tensors do not grow."""
    _, offloaded, _ = _pair()
    ids = _ids(1, 300)
    first = _generate(offloaded, ids)[0]

    def live_tensors():
        gc.collect()
        return sum(1 for obj in gc.get_objects() if isinstance(obj, torch.Tensor))

    for _ in range(3):
        _generate(offloaded, ids)
    before, managers = live_tensors(), []
    for _ in range(100):
        got, cache = _generate(offloaded, ids, new_tokens=10)
        assert torch.equal(got, first)
        managers.append(weakref.ref(cache.offload))
        del got, cache
    gc.collect()
    assert all(ref() is None for ref in managers)
    assert live_tensors() <= before


def test_offloaded_layers_refuse_reordering_and_reset_frees_the_manager():
    _, offloaded, _ = _pair()
    _, cache = _generate(offloaded, _ids(2, 300), new_tokens=3)
    index = next(iter(cache.offload.layers))
    with pytest.raises(NotImplementedError, match=f"reordering .beam search. of offloaded layer {index}"):
        cache.reorder_cache(torch.tensor([1, 0]))
    with pytest.raises(NotImplementedError, match="offload=False"):
        cache.crop(-2)
    manager = weakref.ref(cache.offload)
    cache.reset()
    gc.collect()
    assert manager() is None and cache.offload is None and not cache.recorded


def test_offload_needs_reselect_needs_prune_and_a_copy_group():
    with pytest.raises(ConfigError, match="offload=True needs reselect=True"):
        SlimConfig(prune=True, offload=True)
    with pytest.raises(ConfigError, match="reselect=True needs prune=True"):
        SlimConfig(reselect=True)
    with pytest.raises(ConfigError, match="reselect=True needs prune=True"):
        SlimConfig(reselect=True, offload=True)
    with pytest.raises(ConfigError, match="copy_group=0"):
        SlimConfig(prune=True, reselect=True, offload=True, copy_group=0)


def test_pinned_allocation_failure_names_the_size(monkeypatch):
    def fail(*args, **kwargs):
        raise RuntimeError("CUDA error: out of memory")

    monkeypatch.setattr(torch, "empty", fail)
    with pytest.raises(offload.OffloadMemoryError, match=r"could not allocate 8\.0 MiB of pinned \(page-locked\) host "
                                                         r"memory for layers 3-4' keys .*offload=False"):
        offload.host_buffer((2, 1, 8, 1024, 64), torch.float64, True, "layers 3-4' keys")


def test_offloaded_layer_outside_the_compiled_graph_raises():
    """Regression: a decoding step that ran eagerly (no reselect_kv) would attend to the last block only."""
    state, front = torch.zeros(1, 2, dtype=torch.long), torch.zeros(1, 1, 24, 4)
    with pytest.raises(RuntimeError, match="layer 4 is offloaded .*recompile_limit"):
        torch.ops.slimpass.bind_layer_state(state, torch.zeros(2, dtype=torch.long), state, None, 4, front, front,
                                            state)


def test_start_fills_the_fronts_on_the_device_and_a_step_copies_the_next_sets():
    """`start` gathers each front from the layer's K/V still on the accelerator (no host copy); after a
    step, the copy for the next one takes the blocks of the layer's `pending` set from the host."""
    manager = offload.OffloadManager("cpu")
    keys = torch.randn(2, 3, 64, 16)
    manager.add_layers([offload.LayerToOffload(5, keys, keys + 1, active_blocks=2, sink_tokens=8, block_size=8)])
    layer = manager.layers[5]
    active = torch.tensor([[2, 4], [6, 1]])
    manager.start({5: (keys, keys + 1, active)}, step=1)
    assert torch.equal(layer.front_k[:, :, :8], keys[:, :, :8])  # sinks, then the slots' blocks
    assert torch.equal(layer.front_k[1, :, 8:16], keys[1, :, 48:56]) and torch.equal(layer.front_v[0, :, 16:24],
                                                                                       keys[0, :, 32:40] + 1)
    assert manager.report()["start_blocks"] == 4 and manager.report()["blocks"] == 0
    layer.pending.copy_(torch.tensor([[2, 7], [3, 1]]))  # what step 1's graph writes: one new block per row
    manager.before_step()
    manager.after_step(1)
    assert torch.equal(layer.front_k[0, :, 16:24], keys[0, :, 56:64]) and torch.equal(layer.front_v[1, :, 8:16],
                                                                                        keys[1, :, 24:32] + 1)
    assert torch.equal(layer.current, layer.pending) and manager.steps == 2 and layer.group.issued_for == 2
    manager.after_step(2)  # step 2 ran: its copy counts (2 blocks); the one issued for step 3 does not
    assert manager.report()["blocks"] == 2 and manager.report()["steps"] == 3


def test_copy_kernel_in_triton_interpreter():
    """The Triton copy kernel (changed slots only, and all of them) against plain indexing, in Triton's
    interpreter on CPU tensors (a fresh process: TRITON_INTERPRET must be set before triton is imported)."""
    pytest.importorskip("triton")
    script = textwrap.dedent("""
        import torch
        from slimpass.runtime import copy_kernel, offload
        # (block size, head dim, slots per program, programs): padded tiles, a block size that is no power
        # of two, one program per item or a few looping over them; a group of three layers of which the copies
        # touch one or all
        for block, dim, per, programs in ((8, 24, 1, None), (8, 24, 3, 2), (6, 16, 2, 1), (16, 64, 4, 3)):
            manager = offload.OffloadManager("cpu", copy_group=3)
            keys, values = torch.randn(3, 2, 3, 17 * block, dim), torch.randn(3, 2, 3, 17 * block, dim)
            manager.add_layers([offload.LayerToOffload(i, keys[i], values[i], 5, block, block) for i in range(3)])
            group, changed = manager.groups[0], 0
            sets = torch.tensor([[[3, 5, 7, 9, 2], [1, 2, 10, 11, 4]], [[3, 6, 7, 2, 12], [4, 2, 10, 8, 15]],
                                 [[3, 6, 7, 2, 12], [4, 2, 10, 8, 15]], [[13, 6, 1, 2, 12], [4, 2, 10, 8, 15]]])
            for step, base in enumerate(sets):
                want = torch.stack([base, base.roll(1, dims=1), base.flip(1)])  # [layers, B, m]
                for position in range(3) if step == 0 else [None]:  # the first step copies layer by layer
                    first, count = (position, 1) if step == 0 else (0, 3)
                    if step:
                        for p in range(3):
                            layer = manager.layers[p]
                            changed += int((want[p] != layer.current).sum())
                            same = (want[p] == layer.current)[:, None, :, None].repeat_interleave(block, 2)
                            front = layer.front_k[:, :, block:]
                            front[same.expand_as(front)] = -1.0  # poison what must not be rewritten
                    sets_now = want[first:first + count].squeeze(0) if count == 1 else want
                    copy_kernel.copy_blocks_triton(group, first, count, sets_now, step, manager.issued,
                                                   slots_per_program=per, programs=programs)
                    group.issued_for = step
                rows = torch.arange(2)[:, None]
                for p in range(3):
                    layer = manager.layers[p]
                    index = (want[p][:, :, None] * block + torch.arange(block)).flatten(1)
                    moved = keys[p].transpose(1, 2)[rows, index].transpose(1, 2)
                    kept = (want[p] == layer.tables[(step + 1) % 2])[:, None, :, None].repeat_interleave(block, 2) & (step > 0)
                    # changed slots hold their block; unchanged ones are not rewritten (poisoned above, still -1)
                    assert torch.equal(layer.front_k[:, :, block:], torch.where(kept, -1.0, moved)), (block, step, p)
                    expect_v = values[p].transpose(1, 2)[rows, index].transpose(1, 2)
                    assert torch.equal(layer.front_v[:, :, block:][~kept.expand_as(moved)], expect_v[~kept.expand_as(moved)])
                    assert torch.equal(layer.front_k[:, :, :block], keys[p][:, :, :block])
                    assert torch.equal(layer.current, want[p])
                assert int(manager.issued) == changed
        print("ok")
    """)
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]
