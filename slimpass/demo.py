"""`make demo` / `python -m slimpass.demo`: compile a LLaMA-style model with backend="sliminfer" and
check it against the model's own eager forward.

The model is a small random-weight LlamaForCausalLM (no download, no checkpoint), so the demo shows
the mechanics: one prefill graph for every prompt length, the attention rewrite, exact logits, and
greedy generation through `slimpass.compile`. Pruning arrives with the SlimInfer schedule.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time

import torch
import transformers

import slimpass


def build_model(layers: int, seed: int) -> torch.nn.Module:
    """A random-weight Llama with SmolLM2-135M's head layout (9 query heads, 3 KV heads, head dim 64)."""
    config = transformers.LlamaConfig(
        vocab_size=2048, hidden_size=576, intermediate_size=1536, num_hidden_layers=layers,
        num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
    )
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config).eval()


def median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m slimpass.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="300,1000,2048", help="prompt lengths, comma-separated")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--compiler", choices=("inductor", "eager"), default="inductor")
    parser.add_argument("--new-tokens", type=int, default=8, help="greedy tokens generated at the end")
    parser.add_argument("--dump-dir", help="write graph dumps (before/after each pass, summary.md) here")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    lengths = [int(n) for n in args.lengths.split(",")]
    logging.basicConfig(format="%(name)s: %(message)s")
    logging.getLogger("slimpass").setLevel(logging.INFO)

    model = build_model(args.layers, args.seed)
    oracle = build_model(args.layers, args.seed)  # same weights, never compiled
    options = {"compiler": args.compiler, **({"dump_dir": args.dump_dir} if args.dump_dir else {})}
    slimpass.compile(model, options=options)
    print(f"random-weight Llama, {args.layers} layers, torch {torch.__version__}, "
          f"transformers {transformers.__version__}, compiler {args.compiler}\n")

    generator = torch.Generator().manual_seed(args.seed)
    print(f"{'length':>7} {'first call':>11} {'compiled':>10} {'eager':>10} {'max |diff|':>11}")
    with torch.inference_mode():
        for length in lengths:
            ids = torch.randint(0, model.config.vocab_size, (1, length), generator=generator)
            inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), logits_to_keep=1)
            start = time.perf_counter()
            got = model(**inputs).logits
            first = time.perf_counter() - start
            want = oracle(**inputs).logits
            diff = (got - want).abs().max().item()
            ours = median_ms(lambda: model(**inputs), repeats=3)
            theirs = median_ms(lambda: oracle(**inputs), repeats=3)
            print(f"{length:>7} {first:>10.1f}s {ours:>8.1f}ms {theirs:>8.1f}ms {diff:>11.2e}")

        prompt = torch.randint(0, model.config.vocab_size, (1, lengths[0]), generator=generator)
        settings = dict(max_new_tokens=args.new_tokens, do_sample=False)
        same = torch.equal(model.generate(prompt, **settings), oracle.generate(prompt, **settings))
    print(f"\ngreedy generate, {args.new_tokens} tokens: {'identical to eager' if same else 'DIFFERS from eager'}")

    print("\ncompiled graphs:")
    for record in slimpass.compiled_graphs(model):
        passes = "; ".join(r.line() for r in record.results)
        calls = f", calls {record.calls}" if record.guards else ""  # only guarded graphs choose per call
        print(f"  {record.graph_id} ({record.kind}, {record.layers} layers{calls}): {passes}")
    if args.dump_dir:
        print(f"\ngraph dumps in {args.dump_dir}/")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
