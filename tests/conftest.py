"""Shared fixtures: tiny random models of each supported family, clean Dynamo and registries."""

from __future__ import annotations

import pytest
import torch
import transformers

from slimpass.hf_compat import decode_mask_skipped_under_compile
from slimpass.registry import REGISTRY

FAMILIES = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
}


HF_ALWAYS_MASKS = not decode_mask_skipped_under_compile()
TINY = dict(
    vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
)


def tiny_model(family: str = "llama", attn: str = "sdpa", seed: int = 0, **overrides) -> torch.nn.Module:
    """A tiny random-weight causal LM of `family` in float32, eval mode."""
    config_cls, model_cls = FAMILIES[family]
    config = config_cls(**{**TINY, **overrides})
    config._attn_implementation = attn
    torch.manual_seed(seed)
    return model_cls(config).eval()


def twin(model: torch.nn.Module) -> torch.nn.Module:
    """An independent copy with the same weights (the eager oracle stays uncompiled)."""
    other = type(model)(model.config).eval()
    other.load_state_dict(model.state_dict())
    return other


@pytest.fixture(autouse=True)
def _clean_state():
    """Each test starts with fresh Dynamo caches and leaves the slimpass registries as it found them."""
    torch._dynamo.reset()
    saved = REGISTRY.snapshot()
    yield
    REGISTRY.restore(saved)
    torch._dynamo.reset()


class GraphCapture:
    """A test backend: runs the slimpass pipeline and keeps each graph before and after the passes."""

    def __init__(self, **options):
        self.options = {"compiler": "eager", **options}
        self.graphs: list[dict] = []

    def __call__(self, gm, example_inputs, **kwargs):
        import copy

        from slimpass.backend import compile_graph

        before = torch.fx.GraphModule(gm, copy.deepcopy(gm.graph))
        record = {"before": before}
        self.graphs.append(record)
        captured = {}

        def keep(gm_after, ctx):
            captured["after"], captured["ctx"] = gm_after, ctx
            return None

        import slimpass

        slimpass.register_pass(keep, after="end", name="test_capture")
        try:
            compiled = compile_graph(gm, example_inputs, options=self.options, model=kwargs.get("model"))
        finally:
            slimpass.unregister_pass(keep)
        record.update(captured)
        return compiled


@pytest.fixture
def capture():
    return GraphCapture
