"""GPU check of the kept positions a pruned prefill reports (issue 30): under Inductor's Triton code, at
prompt lengths whose last block is full, partial or one token, every stage's kept positions are valid
(in range, strictly increasing, the last token kept, nested) and equal the reference's; the logits too.

A tiny random-weight float32 Llama (4 layers, TF32 off), default geometry (16-token blocks, one sink),
budgets that sit at the stage lengths. Oracle: `slimpass.runtime.reference.prefill` on an uncompiled copy.

    PYTHONPATH=. python benchmarks/gpu_keep_check.py --out result.json
    PYTHONPATH=. python benchmarks/gpu_keep_check.py --device cpu --compiler eager   # the script itself
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch
import transformers

import slimpass
from slimpass.config import SlimConfig
from slimpass.runtime import reference

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=16384)
SCHEDULE = {2: 150, 3: 0.25}
LENGTHS = (150, 151, 159, 160, 161, 300, 1000, 1025, 4097, 8191, 40, 2048)


def problems(kept, prompt_len: int) -> list[str]:
    """What is wrong with the reported keep sets (empty: nothing)."""
    found, previous = [], None
    for keep in kept:
        rows = keep.positions.cpu()
        if not bool((rows >= 0).all() and (rows < prompt_len).all()):
            found.append(f"layer {keep.layer}: positions out of [0, {prompt_len})")
        if not bool((rows[:, 1:] > rows[:, :-1]).all()):
            found.append(f"layer {keep.layer}: not strictly increasing")
        if not bool((rows[:, -1] == prompt_len - 1).all()):
            found.append(f"layer {keep.layer}: the last token is not kept")
        if previous is not None and not set(rows[0].tolist()) <= set(previous[0].tolist()):
            found.append(f"layer {keep.layer}: keeps a token an earlier stage dropped")
        previous = rows
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--compiler", default="inductor", choices=("inductor", "eager"))
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    config = transformers.LlamaConfig(**TINY)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval().to(args.device)
    oracle = transformers.LlamaForCausalLM(config).eval().to(args.device)
    oracle.load_state_dict(model.state_dict())
    options = {"prune": True, "compiler": args.compiler, "min_prompt_len": 64, "schedule": SCHEDULE}
    slimpass.compile(model, options=options)
    settings = SlimConfig(prune=True, min_prompt_len=64, schedule=SCHEDULE)
    rows = []
    for length in LENGTHS:
        ids = torch.randint(0, 128, (1, length), generator=torch.Generator().manual_seed(length)).to(args.device)
        start = time.perf_counter()
        with torch.no_grad():
            got = model(ids, use_cache=False, logits_to_keep=1).logits[:, -1]
        seconds = time.perf_counter() - start
        want = reference.prefill(oracle, ids, settings)
        kept = slimpass.last_keep_sets(model)
        rows.append({
            "length": length, "seconds": round(seconds, 3), "kept": [k.tokens for k in kept],
            "problems": problems(kept, length),
            "equal_to_reference": [k.layer for k in kept] == [k.layer for k in want.keep_sets]
            and all(torch.equal(a.positions.cpu(), b.positions.cpu()) for a, b in zip(kept, want.keep_sets)),
            "max_logit_diff": float((got - want.logits).abs().max()),
        })
        print(rows[-1], flush=True)
    result = {"device": torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor(),
              "torch": torch.__version__, "transformers": transformers.__version__,
              "graphs": len(slimpass.compiled_graphs(model)), "rows": rows,
              "ok": all(not r["problems"] and r["equal_to_reference"] and r["max_logit_diff"] < 1e-3 for r in rows)}
    print("ok" if result["ok"] else "FAILED", "graphs:", result["graphs"])
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
