"""Shared fixtures: tiny random models of each supported family, clean Dynamo and registries."""

from __future__ import annotations

from pathlib import Path

import pytest
import tokenizers
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


WORDS = 120


def save_tiny_model(folder: Path, context: int = 2048) -> Path:
    """A tiny Llama with a word-level tokenizer (w0 .. w119) and a plain chat template, saved as a HF folder."""
    model = tiny_model(max_position_embeddings=context)
    model.save_pretrained(folder)
    vocab = {f"w{i}": i for i in range(WORDS)} | {"[UNK]": WORDS}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", eos_token="w0")
    tokenizer.chat_template = "{% for m in messages %}w1 {{ m['content'] }} w2{% endfor %} w3"
    tokenizer.save_pretrained(folder)
    return folder


def errors(captured: str) -> str:
    """The `error:` lines of a captured stderr (loading and saving print progress bars there too)."""
    return "".join(line + "\n" for line in captured.replace("\r", "\n").splitlines() if line.startswith("error:"))


def document(words: int) -> str:
    return " ".join(f"w{4 + i % (WORDS - 4)}" for i in range(words))


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


def assert_valid_keep_sets(keep_sets, prompt_len: int) -> None:
    """Every reported keep set: positions of the prompt (in range), strictly increasing per row, the last
    prompt token kept, and each stage's set inside the previous stage's (pruning only removes)."""
    previous = None
    for keep in keep_sets:
        rows = keep.positions.cpu()
        assert rows.dtype == torch.int64 and rows.dim() == 2, f"layer {keep.layer}: {rows.dtype} {tuple(rows.shape)}"
        assert bool((rows >= 0).all() and (rows < prompt_len).all()), f"layer {keep.layer}: out of range {rows}"
        assert bool((rows[:, 1:] > rows[:, :-1]).all()), f"layer {keep.layer}: not strictly increasing"
        assert bool((rows[:, -1] == prompt_len - 1).all()), f"layer {keep.layer}: the last token is not kept"
        if previous is not None:
            for row, before in zip(rows.tolist(), previous.tolist()):
                assert set(row) <= set(before), f"layer {keep.layer} keeps a token an earlier stage dropped"
        previous = rows
