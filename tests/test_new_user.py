"""A new user's first hour, scripted (issue 29): every README command (on a tiny local model, so it runs in CI)
and every path that used to break or mislead, in order. No traceback may reach the user, a refusal is one
`error:` line that names its fix and exits non-zero, and a command that works exits 0.

`make demo` itself runs in tests/test_demo.py, and `slimpass bench cpu` is benchmarks/test_cpu_smoke.py,
which `make test` runs; here the CLI is called as the `slimpass` entry point calls it (`cli.main`).
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import transformers

import slimpass
from slimpass import cli, demo
from slimpass.config import ConfigError

from .conftest import document, errors, save_tiny_model, tiny_model


@dataclasses.dataclass
class Said:
    rc: int
    out: str
    err: str


def slimpass_cli(argv: list[str], capsys) -> Said:
    """Run `slimpass ARGV` as the entry point does; an exception escaping main is a traceback the user sees."""
    try:
        rc = cli.main(argv)
    except SystemExit as stop:  # argparse's usage errors (rc 2) and --help (rc 0)
        rc = stop.code
    captured = capsys.readouterr()
    said = Said(rc, captured.out, captured.err)
    assert "Traceback" not in said.out + said.err, f"slimpass {' '.join(argv)} printed a traceback:\n{said.err}"
    return said


def refused(said: Said, *fix: str) -> None:
    """rc 2, one `error:` (or argparse usage) line, naming each of `fix`."""
    assert said.rc == 2, said
    line = errors(said.err) or said.err.strip().splitlines()[-1]
    for words in fix:
        assert words in line, f"{words!r} not in {line!r}"


def test_the_readme_commands_and_every_refusal(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a CPU-only machine, also on a GPU one
    model = str(save_tiny_model(tmp_path / "model", context=512))
    (tmp_path / "report.txt").write_text(document(300))
    tiny = ["--model", model, "--option", "min_prompt_len=64"]

    # the README's commands
    said = slimpass_cli(["run", "--prompt-file", "report.txt", "--question", "w7 w8", "--compare", "--rounds", "1",
                         "--max-new-tokens", "4", *tiny], capsys)
    assert said.rc == 0 and "verdict: " in said.out and "first call with SlimInfer (compiling" in said.out
    assert "kept tokens per cut layer: layer 1: " in said.out
    said = slimpass_cli(["dump", "--length", "256", "--prune", "--out", "dumps", *tiny], capsys)
    assert said.rc == 0 and (tmp_path / "dumps").is_dir()
    said = slimpass_cli(["eval", "--tasks", "passkey", "--lengths", "200", "--samples", "2", "--max-new-tokens", "4",
                         "--quiet", "--out", "reports", *tiny], capsys)
    assert said.rc == 0 and json.loads((tmp_path / "reports" / "results.json").read_text())["tasks"]
    for verb in ("run", "eval", "dump", "calibrate", "bench"):
        said = slimpass_cli([verb, "--help"], capsys)
        assert said.rc == 0 and "--" in said.out

    # what used to break: each refused up front, naming the fix
    refused(slimpass_cli(["bench", "prefill"], capsys), "no CUDA device", "slimpass bench cpu")
    refused(slimpass_cli(["eval", "--device", "cuda", *tiny], capsys), "sees no CUDA device", "--device cpu")
    refused(slimpass_cli(["run", "--prompt-file", "report.txt", "--schedule", 'deep={"40": 0.5}', *tiny], capsys),
            "[40]", "the model has 2 decoder layers")
    refused(slimpass_cli(["run", "--prompt-file", "nowhere.txt", *tiny], capsys), "nowhere.txt")
    refused(slimpass_cli(["run", "--prompt-file", "report.txt", "--model", "qwen-typo"], capsys),
            "'qwen-typo' is neither a named model")
    (tmp_path / "long.txt").write_text(document(600))
    refused(slimpass_cli(["run", "--prompt-file", "long.txt", *tiny], capsys), "pass --truncate")
    refused(slimpass_cli(["dump", "--length", "4096", *tiny], capsys), "give --length 512 or less")
    refused(slimpass_cli(["run", "--prompt-file", "report.txt", "--rounds", "0", *tiny], capsys),
            "give a whole number of at least 1")
    refused(slimpass_cli(["run", "--prompt-file", "report.txt", "--option", "block_size=5", *tiny], capsys),
            "block_size")
    with pytest.raises(SystemExit) as stop:
        demo.main(["--rounds", "0"])
    assert stop.value.code == 2 and "give a whole number of at least 1" in capsys.readouterr().err

    # with --truncate the long document is answered
    said = slimpass_cli(["run", "--prompt-file", "long.txt", "--truncate", "--max-new-tokens", "4", *tiny], capsys)
    assert said.rc == 0 and "(--truncate)" in said.out


def test_the_library_paths_that_used_to_break():
    """generate's own cache choices with pruning off; with pruning on, refused before anything compiles;
    assisted decoding refused with a reason, not a Dynamo shape error."""
    model = tiny_model()
    slimpass.compile(model, options={"compiler": "eager", "prune": True, "min_prompt_len": 64})
    ids = torch.randint(3, 128, (1, 80))
    for implementation in ("static", "offloaded", "quantized"):
        with pytest.raises(ConfigError, match="drop cache_implementation, or compile with prune=False"):
            model.generate(ids, max_new_tokens=2, cache_implementation=implementation)
    with pytest.raises(ConfigError, match="assisted / speculative decoding .* compile with prune=False"):
        model.generate(ids, max_new_tokens=2, assistant_model=tiny_model())
    assert slimpass.compiled_graphs(model) == []

    dense = tiny_model()
    oracle = transformers.LlamaForCausalLM(dense.config).eval()
    oracle.load_state_dict(dense.state_dict())
    slimpass.compile(dense, options={"compiler": "eager"})
    with torch.no_grad():
        got = dense.generate(ids, max_new_tokens=4, do_sample=False, cache_implementation="static")
        want = oracle.generate(ids, max_new_tokens=4, do_sample=False, cache_implementation="static")
    assert torch.equal(got, want)
