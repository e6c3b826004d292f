"""GPU check of ``static_decode``: under Inductor's CUDA graphs, greedy decoding on the fixed-size K/V buffers
gives the plain-PyTorch reference's tokens, request after request.

A tiny random-weight float32 Llama (6 layers, TF32 off), pruned with reselection. Several requests, each with
its own prompt, go through one compiled model; the buffers' room (``--capacity``) is smaller than the tokens
generated, so every request also grows them. A CUDA-graph replay that read the previous request's buffers, or
the buffers from before a growth, would show as other tokens or logits.

Oracle: `slimpass.runtime.reference.generate` on an uncompiled copy with the same weights.

    PYTHONPATH=. python benchmarks/gpu_static_check.py --out result.json
    PYTHONPATH=. python benchmarks/gpu_static_check.py --offload --out result.json   # with offload
    PYTHONPATH=. python benchmarks/gpu_static_check.py --more-requests 100 --out result.json   # then memory growth
    PYTHONPATH=. python benchmarks/gpu_static_check.py --device cpu --compiler eager   # the script itself
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
import transformers

import slimpass
from slimpass.config import SlimConfig
from slimpass.hf_compat import cache_argument
from slimpass.runtime import reference

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=2048)
# small blocks and an early schedule, so that a prompt of a few hundred tokens is pruned twice
PRUNING = dict(prune=True, schedule={2: 0.5, 4: (60, 0.25)}, block_size=8, unit_size=2, min_prompt_len=64,
               reselect=True, active_tokens=16)
LENGTHS = (150, 150, 150, 333)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--compiler", default="inductor", help="SlimConfig.compiler (inductor: CUDA graphs on a GPU)")
    parser.add_argument("--new-tokens", type=int, default=20)
    parser.add_argument("--capacity", type=int, default=8, help="SlimConfig.decode_capacity")
    parser.add_argument("--offload", action="store_true",
                        help="offload=True too: slim layers' prompt K/V in (pinned) host memory, the fronts copied on a "
                             "side stream between the CUDA-graph replays")
    parser.add_argument("--more-requests", type=int, default=0,
                        help="then this many more requests (prompts of 150 and 333 tokens in turn, not checked): "
                             "the memory and time of each, to see whether CUDA-graph recordings pile up")
    parser.add_argument("--out", type=Path)
    return parser.parse_args(argv)


def _resident_bytes() -> int:
    """This process's resident set (Linux), bytes."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def more_requests(model: torch.nn.Module, device: torch.device, args: argparse.Namespace) -> list[dict]:
    """`args.more_requests` requests after the checked ones: per request its time, the device memory
    allocated and reserved, and the host's resident set. Each request has new buffers (new addresses), so
    Inductor records its CUDA graphs again; growth here would be recordings that are kept."""
    rows = []
    for request in range(args.more_requests):
        length = (150, 333)[request % 2]
        ids = torch.randint(0, model.config.vocab_size, (1, length),
                            generator=torch.Generator().manual_seed(1000 + request)).to(device)
        start = time.perf_counter()
        with torch.no_grad():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new_tokens, do_sample=False,
                           **{cache_argument(model): slimpass.SlimCache(model.config)})
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        cuda = device.type == "cuda"
        rows.append({"request": request, "prompt": length, "ms": (time.perf_counter() - start) * 1e3,
                     "allocated": torch.cuda.memory_allocated(device) if cuda else 0,
                     "reserved": torch.cuda.memory_reserved(device) if cuda else 0, "host_rss": _resident_bytes()})
    first, last = rows[0], rows[-1]
    print(f"{len(rows)} more requests: ms {first['ms']:.1f} -> {last['ms']:.1f}, device allocated "
          f"{first['allocated'] / 2**20:.1f} -> {last['allocated'] / 2**20:.1f} MiB, reserved "
          f"{first['reserved'] / 2**20:.1f} -> {last['reserved'] / 2**20:.1f} MiB, host RSS "
          f"{first['host_rss'] / 2**20:.1f} -> {last['host_rss'] / 2**20:.1f} MiB")
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    config = transformers.LlamaConfig(**TINY)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval().to(device)
    oracle = transformers.LlamaForCausalLM(config).eval().to(device)
    oracle.load_state_dict(model.state_dict())
    pruning = {**PRUNING, **({"offload": True, "copy_group": 2} if args.offload else {})}
    slimpass.compile(model, options={**pruning, "compiler": args.compiler, "static_decode": True,
                                     "decode_capacity": args.capacity})
    rows, start = [], time.perf_counter()
    for request, length in enumerate(LENGTHS):
        generator = torch.Generator().manual_seed(100 + request)
        ids = torch.randint(0, config.vocab_size, (1, length), generator=generator).to(device)
        cache = slimpass.SlimCache(model.config)
        with torch.no_grad():
            got = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new_tokens,
                                 do_sample=False, output_logits=True, return_dict_in_generate=True,
                                 **{cache_argument(model): cache})
        want_logits: list[torch.Tensor] = []
        want = reference.generate(oracle, ids, SlimConfig(**pruning), max_new_tokens=args.new_tokens,
                                  logits=want_logits)
        differ = (got.sequences != want).any(dim=0).nonzero()
        rows.append({
            "request": request, "prompt": length, "tokens_equal": torch.equal(got.sequences, want),
            "first_different_token": int(differ[0]) - length if len(differ) else None,
            "max_logit_difference": max((a.float() - b.float()).abs().max().item()
                                        for a, b in zip(got.logits, want_logits)),
            "last_layer_slots": cache.layers[-1].keys.shape[2], "last_layer_written": cache.layers[-1].slots.written,
            "offloaded_layers": len(cache.offload.layers) if cache.offload is not None else 0,
            "seconds": round(time.perf_counter() - start, 1)})
        print(json.dumps(rows[-1]), flush=True)
    growth = more_requests(model, device, args) if args.more_requests else []
    result = {"rows": rows, "more_requests": growth, "torch": torch.__version__, "transformers": transformers.__version__,
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "cudagraph_counters": {k: v for k, v in torch._dynamo.utils.counters["inductor"].items()
                                     if "cudagraph" in k}}
    print(f"tokens equal to the reference's in {sum(r['tokens_equal'] for r in rows)}/{len(rows)} requests; "
          f"CUDA-graph counters {result['cudagraph_counters']}")
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
    return rows


if __name__ == "__main__":
    main()
