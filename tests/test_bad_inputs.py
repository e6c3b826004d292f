"""Bad input at each user entry point: clear errors, raised before anything is compiled or changed.

Complements tests/test_config.py (SlimConfig value checks, `resolve` suggestions) and
tests/passes/test_find_decoder_layers.py (GPT-2 forward through torch.compile).
"""

from __future__ import annotations

import logging

import pytest
import torch
import transformers

import slimpass
from slimpass.config import ConfigError

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
        ("fallback_compiler", "tvm", "SlimConfig.fallback_compiler='tvm': expected one of 'inductor', 'eager'"),
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
        assert f"graph {record.graph_id} is not a LLaMA-style decoder" in message
        assert "layer 0: query is not rotary-embedded" in message
        assert "compiling it without slimpass passes" in message
