"""Compile time and TTFT on the CPU with each inner compiler (issue 29): SmolLM2-135M-Instruct, a 1.5k-token
pass-key prompt, prune=True with the default schedule. Prints the first `generate` (compiles the prefill and
decode graphs), a direct `model(ids, attention_mask=..., logits_to_keep=1)` after it (it reuses the prefill
graph: `slimpass.call_form`; it compiled one of its own before), and the TTFT of the compiled model against the never-compiled one, interleaved over 5 rounds.

    .venv/bin/python benchmarks/cpu_compile_time.py eager
    .venv/bin/python benchmarks/cpu_compile_time.py inductor
"""

import sys
import time

import torch

import slimpass
from slimpass.demo import passkey_prompt
from slimpass.eval import models, timing


def main(compiler: str) -> None:
    model, tokenizer = models.load()
    dense = type(model)(model.config).eval()  # the same weights, never compiled
    dense.load_state_dict(model.state_dict())
    slimpass.compile(model, options={"prune": True, "compiler": compiler})
    ids = passkey_prompt(tokenizer, 1500, 0.5, 71432)
    mask = torch.ones_like(ids)
    with torch.inference_mode():
        start = time.perf_counter()
        model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.eos_token_id)
        first = time.perf_counter() - start
        start = time.perf_counter()
        model(ids, attention_mask=mask, logits_to_keep=1)
        direct = time.perf_counter() - start
        calls = {"dense": lambda: dense(ids, attention_mask=mask, logits_to_keep=1),
                 compiler: lambda: model(ids, attention_mask=mask, logits_to_keep=1)}
        ttft = timing.interleave(calls, rounds=5)
    graphs = len(slimpass.compiled_graphs(model))
    print(f"{compiler}: first generate {first:.1f} s; model(ids, attention_mask, logits_to_keep=1) after it "
          f"{direct:.1f} s ({graphs} graphs compiled in all); TTFT {ttft.line(compiler)}; dense {ttft.line('dense')}; {ttft.verdict(compiler, 'dense')}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "eager")
