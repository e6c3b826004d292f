"""Offload mode on a real GPU: the side-stream path gives the resident path's tokens, and the copy kernel
reads pinned host memory right. A check to run by hand (CI has no GPU); exits non-zero on a mismatch.

    PYTHONPATH=. python benchmarks/gpu_offload_check.py --out check.json

1. `_copy_blocks_kernel` on pinned host tensors against plain indexing (bitwise), full and changed-only, for
   a few program layouts, over a copy group of three layers; its slot tables and count of copied blocks.
2. The manager over several decoding steps (`decode_steps`: what a cache and its graphs do around each
   step): every layer's `cat(front, tail)` at every step against plain indexing (no sync between the
   calls); then 50 more managers (requests), one after the other: device memory and the process's pinned
   host memory must not grow. The resident set is reported too (the copies replayed from CUDA graphs, since
   removed, grew it ~45 KB a manager on an H200, torch 2.11: docs/PERF.md, tenth round).
3. A small random-weight Llama (float32, Inductor) compiled twice, with pruning + reselection resident and
   with ``offload=True``: greedy tokens must be equal for two prompt lengths and batch sizes.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import slimpass  # noqa: E402
from slimpass.hf_compat import cache_argument  # noqa: E402
from slimpass.runtime import copy_kernel, offload  # noqa: E402


LAYOUTS = ({"slots_per_program": 1, "programs": None}, {"slots_per_program": 2, "programs": 3},
           {"slots_per_program": 4, "programs": 16})


def group_manager(device, keys, values, slots, sinks, block) -> offload.OffloadManager:
    """A manager holding one copy group of every layer of `keys` / `values` [layers, B, H, P, D]."""
    manager = offload.OffloadManager(device, copy_group=keys.shape[0])
    manager.add_layers([offload.LayerToOffload(i, keys[i], values[i], slots, sinks, block)
                        for i in range(keys.shape[0])])
    return manager


def check_kernel(device: torch.device, layouts=LAYOUTS) -> dict:
    """Per copy-kernel layout (`copy_kernel.copy_blocks_triton` keywords), for a group of three layers: a
    full copy layer by layer, then two changed-only copies of the group; fronts, slot tables and the count
    of copied blocks against plain indexing."""
    layers, batch, heads, tokens, dim, block, slots, sinks = 3, 2, 3, 40 * 16, 64, 16, 8, 16
    keys = torch.randn(layers, batch, heads, tokens, dim, device=device, dtype=torch.bfloat16)
    values = torch.randn_like(keys)
    results = {}
    for layout in layouts:
        manager = group_manager(device, keys, values, slots, sinks, block)
        group, changed = manager.groups[0], 0
        for step in range(3):
            want = torch.stack([torch.stack([torch.randperm(38, device=device)[:slots] + 1 for _ in range(batch)])
                                for _ in range(layers)])
            if step:
                for p in range(layers):
                    want[p, :, ::2] = manager.layers[p].current[:, ::2]  # half the slots keep their block
                    changed += int((want[p] != manager.layers[p].current).sum())
            for first, count in ([(p, 1) for p in range(layers)] if step == 0 else [(0, layers)]):
                copy_kernel.copy_blocks_triton(group, first, count, want[first] if count == 1 else want, step,
                                            manager.issued, **layout)
            group.issued_for = step
            torch.cuda.synchronize(device)
            rows = torch.arange(batch, device=device)[:, None]
            ok = int(manager.issued) == changed
            for p in range(layers):
                index = (want[p, :, :, None] * block + torch.arange(block, device=device)).flatten(1)
                ok = ok and torch.equal(group.front_k[p, :, :, sinks:], keys[p].transpose(1, 2)[rows, index].transpose(1, 2))
                ok = ok and torch.equal(group.front_v[p, :, :, sinks:], values[p].transpose(1, 2)[rows, index].transpose(1, 2))
                ok = ok and torch.equal(group.front_k[p, :, :, :sinks], keys[p, :, :, :sinks])
                ok = ok and torch.equal(manager.layers[p].current, want[p])
            results[f"{'x'.join(map(str, layout.values()))} step {step}"] = ok
    return results


def decode_steps(manager: offload.OffloadManager, sets: torch.Tensor, tail: torch.Tensor, steps: int) -> list:
    """What a cache and its decode graphs do from the second decoding step on, for every layer of
    `manager` (`sets` [steps + 1, layers, B, m]): fill the fronts for step 1, then per step wait, read
    ``cat(front, tail)`` and write the next set (the graph's part), and issue the copies. No sync."""
    manager.start({p: (layer.host_k.to(tail.device), layer.host_v.to(tail.device), sets[1, p])
                   for p, layer in manager.layers.items()}, 1)
    outputs = []
    for step in range(1, steps + 1):
        manager.before_step()
        outputs.append([(torch.cat([layer.front_k, tail], 2), torch.cat([layer.front_v, tail], 2))
                        for layer in manager.layers.values()])
        for p, layer in manager.layers.items():
            layer.pending.copy_(sets[step + 1, p])
        manager.after_step(step)
    return outputs


def check_replay(device: torch.device, steps: int = 6) -> dict:
    """Decoding steps of a copy group of three layers (`decode_steps`); what each step read compared after
    the last step (no sync in between, as in decoding)."""
    layers, batch, heads, tokens, dim, block, slots, sinks = 3, 2, 3, 40 * 16, 64, 16, 8, 16
    keys = torch.randn(layers, batch, heads, tokens, dim, device=device, dtype=torch.bfloat16)
    values = torch.randn_like(keys)
    tail = torch.randn(batch, heads, 5, dim, device=device, dtype=torch.bfloat16)
    generator = torch.Generator().manual_seed(1)
    sets = torch.stack([torch.randperm(38, generator=generator)[:slots] + 1
                        for _ in range((steps + 2) * layers * batch)]).view(steps + 2, layers, batch, slots).to(device)
    rows = torch.arange(batch, device=device)[:, None]
    manager = group_manager(device, keys, values, slots, sinks, block)
    outputs = decode_steps(manager, sets, tail, steps)
    torch.cuda.synchronize(device)
    ok = True
    for step in range(1, steps + 1):
        for p in range(layers):
            index = (sets[step, p, :, :, None] * block + torch.arange(block, device=device)).flatten(1)
            for got, source in zip(outputs[step - 1][p], (keys[p], values[p])):
                picked = source.transpose(1, 2)[rows, index].transpose(1, 2)
                want = torch.cat([source[:, :, :sinks], picked, tail], 2)
                ok = ok and torch.equal(got, want)
    # two rounds: the first may still fill the allocator's caches
    growth = [request_growth(device, keys, values, sets, tail, sinks, slots, block) for _ in range(2)]
    return {"launches": ok, "blocks": manager.report()["blocks"], "growth": growth}


def request_growth(device, keys, values, sets, tail, sinks, slots, block, requests: int = 50) -> dict:
    """Bytes of device memory (allocated, reserved), of pinned host memory and of the process's resident set
    gained over `requests` managers that each run and are dropped (after one warm-up request)."""
    def request():
        decode_steps(group_manager(device, keys, values, slots, sinks, block), sets, tail, 4)
        torch.cuda.synchronize(device)

    def usage():
        gc.collect()
        host = torch.cuda.memory.host_memory_stats().get("allocated_bytes.current", 0) \
            if hasattr(torch.cuda.memory, "host_memory_stats") else 0
        with open("/proc/self/statm") as statm:
            resident = int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        return torch.cuda.memory_allocated(device), torch.cuda.memory_reserved(device), host, resident

    request()
    before = usage()
    for _ in range(requests):
        request()
    after = usage()
    return dict(zip(("allocated", "reserved", "pinned_host", "host_rss"), (a - b for a, b in zip(after, before))))


def check_generate(device: torch.device) -> list[dict]:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=8,
                         num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=8192)
    base = {"prune": True, "schedule": {2: 0.5, 5: 0.25}, "reselect": True, "active_tokens": 256, "min_prompt_len": 64}
    models = {}
    weights = LlamaForCausalLM(config).state_dict()
    for name, extra in (("resident", {}), ("offload", {"offload": True, "copy_group": 2})):
        model = LlamaForCausalLM(config).eval()
        model.load_state_dict(weights)
        models[name] = slimpass.compile(model.to(device), options={**base, **extra})
    rows = []
    for batch, length in ((1, 1000), (2, 2100)):
        ids = torch.randint(0, 512, (batch, length), generator=torch.Generator().manual_seed(length)).to(device)
        tokens, reports = {}, {}
        for name, model in models.items():
            cache = slimpass.SlimCache(model.config)
            with torch.inference_mode():
                out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False,
                                     pad_token_id=0, **{cache_argument(model): cache})
            tokens[name] = out[:, length:].tolist()
            reports[name] = {"offload": cache.offload_report(), "reselection": cache.reselection_report(),
                             "gpu_share": cache.memory_report().gpu_bytes / cache.memory_report().dense_bytes}
        rows.append({"batch": batch, "length": length,
                     "equal": {name: tokens[name] == tokens["resident"] for name in tokens},
                     "reports": reports})
        print(json.dumps({k: rows[-1][k] for k in ("batch", "length", "equal")}), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--kernel-only", action="store_true", help="check the copy kernel only (no models)")
    args = parser.parse_args()
    device = torch.device("cuda:0")
    torch._dynamo.config.recompile_limit = 64  # two models share the code objects' cache entries
    kernel = check_kernel(device)
    print("kernel:", kernel, flush=True)
    replay = check_replay(device)
    print("replay:", replay, flush=True)
    rows = [] if args.kernel_only else check_generate(device)
    result = {"kernel": kernel, "replay": replay, "generate": rows, "device": torch.cuda.get_device_name(device),
              "torch": torch.__version__}
    if args.out:
        args.out.write_text(json.dumps(result, indent=1, default=str))
    ok = (all(kernel.values()) and replay["launches"]
          and not any(replay["growth"][1][key] for key in ("allocated", "reserved", "pinned_host"))
          and all(all(row["equal"].values()) for row in rows))
    print("OK" if ok else "MISMATCH")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
