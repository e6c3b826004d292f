"""The CLI takes models, devices and dtypes the way the library does, and refuses prompts past the model's
context (issue 29): a local folder or a hub id in the Hugging Face cache (never a download), `--device` /
`--dtype` on every verb that loads a model, help and a default on every flag, and a context-length guard
(refuse, or `--truncate`) in `run`, `dump`, `eval` and the library itself."""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
import transformers

import slimpass
from slimpass import cli, demo
from slimpass.eval import models

from .conftest import document, errors, save_tiny_model, tiny_model

def test_a_hub_id_in_the_hugging_face_cache_loads_without_a_download(tmp_path, monkeypatch):
    """`org/model` resolves through the HF cache with local_files_only (the snapshot layout `hf download`
    leaves); one that is not there is a ModelNotFound naming the cache and the command that fills it."""
    repo = tmp_path / "hub" / "models--slimtest--tiny-llama"
    save_tiny_model(repo / "snapshots" / ("0" * 40))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    model, tokenizer = models.load("slimtest/tiny-llama", dtype=torch.bfloat16)
    assert type(model).__name__ == "LlamaForCausalLM" and model.dtype == torch.bfloat16
    assert tokenizer("w5 w6").input_ids == [5, 6]

    with pytest.raises(models.ModelNotFound, match=r"'slimtest/absent' is not in the Hugging Face cache "
                                                   r"\(.*hub\).*`hf download slimtest/absent`"):
        models.load("slimtest/absent")


def test_a_name_that_is_no_model_says_what_a_model_can_be(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("x")
    for name in ("notes.txt", "./nowhere", "a/b/c"):
        assert cli.main(["dump", "--model", name]) == 2
        err = errors(capsys.readouterr().err)
        assert err.startswith(f"error: {name!r} is neither a named model (") and "nor a hub id like org/model" in err


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_dump_takes_device_and_dtype(dtype, tmp_path, capsys):
    folder = save_tiny_model(tmp_path / "model")
    out = tmp_path / "dumps"
    assert cli.main(["dump", "--model", str(folder), "--device", "cpu", "--dtype", dtype, "--length", "96",
                     "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "(prefill)" in printed and any(out.iterdir())


def test_run_refuses_a_prompt_past_the_context_and_truncates_on_request(tmp_path, capsys):
    """A 300-word document on a model of 128 positions: refused before compiling (rc 2, the fixes named);
    with --truncate the document's first part is kept, the question and template whole, and it answers."""
    folder = save_tiny_model(tmp_path / "model", context=128)
    doc = tmp_path / "doc.txt"
    doc.write_text(document(300))
    argv = ["run", "--model", str(folder), "--prompt-file", str(doc), "--question", "w7 w8", "--max-new-tokens", "4"]
    assert cli.main(argv) == 2
    err = errors(capsys.readouterr().err)
    assert err.startswith("error: the prompt is 305 tokens, over the 124 that the model's context leaves beside")
    assert "pass --truncate" in err

    assert cli.main([*argv, "--truncate", "--option", "min_prompt_len=64"]) == 0
    printed = capsys.readouterr().out
    assert "prompt: 124 tokens, the document's first 119 of 300 tokens (--truncate)" in printed


def test_chat_prompt_keeps_the_question_when_truncating(tmp_path):
    tokenizer = transformers.AutoTokenizer.from_pretrained(save_tiny_model(tmp_path / "model"))
    for budget in (10, 57, 200):
        ids, note = cli.chat_prompt(tokenizer, document(150), "w9 w10", budget, truncate=True)
        assert ids.shape[1] == min(budget, 150 + 5)
        assert ids[0, -4:].tolist() == [9, 10, 2, 3]
        assert bool(note) == (budget < 155)
    with pytest.raises(ValueError, match="the question and the chat template alone exceed"):
        cli.chat_prompt(tokenizer, document(150), "w9 w10", 4, truncate=True)


def test_dump_and_eval_refuse_lengths_past_the_context(tmp_path, capsys):
    folder = save_tiny_model(tmp_path / "model", context=128)
    assert cli.main(["dump", "--model", str(folder), "--length", "200", "--out", str(tmp_path / "d")]) == 2
    assert "--length 200 is longer than the model's context (128 tokens" in errors(capsys.readouterr().err)
    assert cli.main(["eval", "--model", str(folder), "--lengths", "120", "--quiet", "--out", str(tmp_path / "e")]) == 2
    assert "length 120 + 24 new tokens is past the model's context (128 tokens" in errors(capsys.readouterr().err)


def test_the_library_warns_once_when_a_prompt_is_past_the_context():
    model = tiny_model(max_position_embeddings=64)
    slimpass.compile(model, options={"compiler": "eager"})
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        model(torch.randint(0, 128, (1, 48)))
        assert not [w for w in caught if issubclass(w.category, slimpass.SlimpassWarning)]
        model(torch.randint(0, 128, (1, 80)))
        model(torch.randint(0, 128, (1, 90)))
    past = [w for w in caught if issubclass(w.category, slimpass.SlimpassWarning)]
    assert len(past) == 1
    assert "a prompt of 80 tokens is longer than the model's context (64 tokens" in str(past[0].message)


def _parsers() -> dict[str, argparse.ArgumentParser]:
    parser = cli.build_parser()
    verbs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    return {**{f"slimpass {name}": p for name, p in verbs.items() if name != "demo"}, "demo": demo.build_parser()}


def test_every_flag_has_help_and_the_model_verbs_share_their_flags():
    parsers = _parsers()
    for name, parser in parsers.items():
        for action in parser._actions:
            assert action.help, f"{name}: {action.option_strings or action.dest} has no help"
    shared = {"--model", "--device", "--dtype", "--compiler", "--option"}
    for verb in ("eval", "run", "dump", "calibrate"):
        flags = {s for a in parsers[f"slimpass {verb}"]._actions for s in a.option_strings}
        assert shared <= flags, f"slimpass {verb} lacks {shared - flags}"
    assert "--max-new-tokens" in {s for a in parsers["demo"]._actions for s in a.option_strings}


@pytest.mark.parametrize("argv", [["--rounds", "0"], ["--tokens", "-5"], ["--layers", "x"]])
def test_demo_refuses_bad_counts_with_a_usage_line(argv, capsys):
    with pytest.raises(SystemExit) as stop:
        demo.main(argv)
    assert stop.value.code == 2
    assert "give a whole number of at least 1" in capsys.readouterr().err
