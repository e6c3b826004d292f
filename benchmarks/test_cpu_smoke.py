"""CPU smoke benchmark: prefill of a tiny random LLaMA with HF eager, stock Inductor and sliminfer.

Run explicitly (the default ``pytest`` collects ``tests/`` only)::

    pytest benchmarks/test_cpu_smoke.py --benchmark-only          # timings + correctness
    pytest benchmarks/test_cpu_smoke.py --benchmark-disable -q    # correctness only, one call each

Each case times last-token-logits prefill (``logits_to_keep=1, use_cache=False``) at one prompt
length and asserts the logits equal the eager model's within 1e-4. There are deliberately no timing
assertions: on a tiny model and a shared CPU the numbers only show that the paths run, not which is
faster. Compiles happen in an untimed warm-up call; compiled models are shared across lengths
(sliminfer compiles one dynamic-length graph, stock Inductor one static graph per length).
"""

from __future__ import annotations

import functools

import pytest
import torch
import transformers

import slimpass

# Inductor C++ compiles: about 1 min for the module on 2 cores with a cold Inductor cache, 20 s warm.
pytestmark = pytest.mark.slow

# Same tiny shape as the unit tests: small enough that one Inductor compile takes seconds, not minutes.
TINY = dict(
    vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
)

LENGTHS = (128, 512)
VARIANTS = ("hf_eager", "stock_inductor", "sliminfer")
ATOL = 1e-4
ROUNDS = 10  # tiny model: 10 rounds of a few ms each keep the module's timed part to seconds


def tiny_llama(seed: int = 0) -> torch.nn.Module:
    """A tiny random-weight float32 LlamaForCausalLM with SDPA attention, in eval mode."""
    config = transformers.LlamaConfig(**TINY)
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config).eval()


def copy_of(model: torch.nn.Module) -> torch.nn.Module:
    """An independent model with the same weights.

    Each variant needs its own instance: `slimpass.compile` replaces `forward` on the instance and
    `torch.compile(model)` calls whatever `forward` the instance has, so sharing one would mix them.
    """
    other = type(model)(model.config).eval()
    other.load_state_dict(model.state_dict())
    return other


def compile_variant(model: torch.nn.Module, variant: str) -> torch.nn.Module:
    """`model` prepared as `variant` would run it (compiles lazily, on the first call)."""
    if variant == "hf_eager":
        return model
    if variant == "stock_inductor":
        # What a user gets from torch.compile(model), kept static per length (no mark_dynamic; and
        # dynamic=False so the second length is not silently recompiled with a symbolic length).
        return torch.compile(model, dynamic=False)
    if variant == "sliminfer":
        return slimpass.compile(model, options={"compiler": "inductor"})
    raise ValueError(f"unknown variant {variant!r}")


class ModelZoo:
    """One model per variant, compiled on first use and reused for every length in the module."""

    def __init__(self) -> None:
        self.base = tiny_llama()
        self.oracle = copy_of(self.base)  # never compiled: the reference logits
        self.models: dict[str, torch.nn.Module] = {}
        self.logits: dict[int, torch.Tensor] = {}

    def get(self, variant: str) -> torch.nn.Module:
        if variant not in self.models:
            self.models[variant] = compile_variant(copy_of(self.base), variant)
        return self.models[variant]

    def reference(self, length: int) -> torch.Tensor:
        if length not in self.logits:
            self.logits[length] = prefill(self.oracle, prompt(length))
        return self.logits[length]


@pytest.fixture(scope="module")
def zoo():
    """Compiled models shared by all cases of this module, with Dynamo caches emptied before and after."""
    torch._dynamo.reset()
    yield ModelZoo()
    torch._dynamo.reset()


@functools.cache
def prompt(length: int) -> torch.Tensor:
    """The same random token ids for every variant at `length` (batch 1)."""
    generator = torch.Generator().manual_seed(length)
    return torch.randint(0, TINY["vocab_size"], (1, length), generator=generator)


def prefill(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Prefill with an all-ones mask and return the last token's logits [1, 1, vocab]."""
    with torch.no_grad():
        out = model(ids, attention_mask=torch.ones_like(ids), logits_to_keep=1, use_cache=False)
    return out.logits


def assert_rewrite_engaged(model: torch.nn.Module) -> None:
    """The sliminfer timings are only meaningful if calls took the rewritten graph, not the fallback."""
    records = slimpass.compiled_graphs(model)
    assert records, "sliminfer compiled no graph"
    assert any(r.kind == "prefill" for r in records), [r.kind for r in records]
    calls = {r.graph_id: r.calls for r in records}
    assert all(c["fallback"] == 0 for c in calls.values()), calls
    assert sum(c["rewritten"] for c in calls.values()) > 0, calls


@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_prefill(benchmark, zoo, variant, length):
    """Time one variant at one length (compile excluded) and check its logits against eager's."""
    model, ids = zoo.get(variant), prompt(length)
    run = functools.partial(prefill, model, ids)
    run()  # warm-up outside timing: the first call at a new shape compiles
    benchmark.group = f"prefill {length} tokens"
    benchmark.extra_info.update(variant=variant, length=length)
    got = benchmark.pedantic(run, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    want = zoo.reference(length)
    assert got.shape == want.shape == (1, 1, want.shape[-1])
    diff = (got - want).abs().max().item()
    assert diff <= ATOL, f"{variant} at {length} tokens: max abs diff {diff:.3g} > {ATOL}"
    if variant == "sliminfer":
        assert_rewrite_engaged(model)


# Pruning on the same tiny model: cut the input of layer 1 to a quarter of the prompt (blocks of 8).
PRUNING = {"prune": True, "schedule": {1: 0.25}, "block_size": 8, "unit_size": 2, "min_prompt_len": 64}


@pytest.fixture(scope="module")
def pruned_pair():
    """The pruned compiled model and the uncompiled twin the reference loop runs on."""
    from slimpass.config import SlimConfig

    torch._dynamo.reset()
    base = tiny_llama()
    model = slimpass.compile(copy_of(base), options={"compiler": "inductor", **PRUNING})
    yield model, base, SlimConfig(**PRUNING)
    torch._dynamo.reset()


@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("variant", ("sliminfer_pruned", "reference_pruned"))
def test_pruned_prefill(benchmark, pruned_pair, variant, length):
    """Time pruned prefill (compiled vs the plain-PyTorch reference loop); logits and kept sets must agree."""
    from slimpass.runtime import reference

    model, base, config = pruned_pair
    ids = prompt(length)
    if variant == "sliminfer_pruned":
        run = functools.partial(prefill, model, ids)
    else:
        run = functools.partial(lambda: reference.prefill(base, ids, config).logits[:, None])
    run()  # warm-up outside timing (compiles)
    benchmark.group = f"pruned prefill {length} tokens"
    benchmark.extra_info.update(variant=variant, length=length)
    got = benchmark.pedantic(run, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    want = reference.prefill(base, ids, config)
    diff = (got[:, -1] - want.logits).abs().max().item()
    assert diff <= ATOL, f"{variant} at {length} tokens: max abs diff {diff:.3g} > {ATOL}"
    if variant == "sliminfer_pruned":
        kept = slimpass.last_keep_sets(model)
        assert [k.tokens for k in kept] == [k.tokens for k in want.keep_sets] and kept[0].tokens < length
        assert all(torch.equal(a.positions, b.positions) for a, b in zip(kept, want.keep_sets))
