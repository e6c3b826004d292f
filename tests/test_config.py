"""SlimConfig validation, option sources and their precedence, decorators."""

from __future__ import annotations

import logging

import pytest
import torch

import slimpass
from slimpass.config import ConfigError, SlimConfig, resolve
from slimpass.registry import REGISTRY

from .conftest import tiny_model, twin


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("block_size", 0, "block_size=0 is out of range"),
        ("block_size", 64.0, "expected an int"),
        ("unit_size", 7, "must divide block_size=16"),
        ("local_window", -1, "local_window=-1"),
        ("compiler", "tvm", "expected one of 'auto', 'inductor', 'eager'"),
        ("attention_backend", "xformers", "attention_backend='xformers'"),
        ("prune", "yes", "expected True or False"),
        ("schedule", {0: 128}, "layer 0 must be an int >= 1"),
        ("schedule", {10: 1.5}, "keep ratio must be in (0, 1]"),
        ("schedule", {10: 0}, "token budget must be >= 1"),
        ("schedule", [10, 20], "expected a mapping"),
        ("dump_dir", 3, "expected a folder path"),
        ("reselect", 1, "expected True or False"),
        ("active_tokens", 0, "active_tokens=0 is out of range"),
        ("gamma", 1.5, "expected a float in [0, 1]"),
        ("reselect_unit", 3, "must divide block_size=16"),
    ],
)
def test_bad_values_name_field_value_and_range(field, value, message):
    with pytest.raises(ConfigError, match=None) as err:
        SlimConfig(**{field: value})
    assert message in str(err.value)
    assert field in str(err.value)


def test_unknown_option_suggests_closest():
    with pytest.raises(ConfigError, match="unknown slimpass option 'complier'.*did you mean 'compiler'"):
        resolve({"complier": "eager"}, None)


def test_schedule_is_frozen_and_sorted():
    config = SlimConfig(schedule={20: 4096, 10: 0.25})
    assert list(config.schedule) == [10, 20]
    with pytest.raises(TypeError):
        config.schedule[30] = 2048


def test_precedence_options_over_patch_over_registered_over_defaults():
    registered = SlimConfig(compiler="eager", block_size=32, unit_size=8, local_window=2)
    assert resolve(None, None) == SlimConfig()
    assert resolve(None, registered).block_size == 32
    with slimpass.config.patch(block_size=16, local_window=3):
        config = resolve({"local_window": 5}, registered)
    assert (config.block_size, config.local_window, config.compiler) == (16, 5, "eager")
    assert resolve(None, registered).block_size == 32  # patch ended


def test_patch_rejects_bad_values_at_once():
    with pytest.raises(ConfigError, match="compiler"):
        with slimpass.config.patch(compiler="nope"):
            pass


def test_dump_env_variable(monkeypatch, tmp_path):
    monkeypatch.setenv("SLIMPASS_DUMP", str(tmp_path))
    assert resolve(None, None).dump_dir == str(tmp_path)
    assert resolve({"dump_dir": "elsewhere"}, None).dump_dir == "elsewhere"


def test_configure_class_and_instance():
    model = tiny_model()

    @slimpass.configure(block_size=32)
    class Sub(type(model)):
        pass

    sub = Sub(model.config)
    assert REGISTRY.config_for(sub).block_size == 32
    slimpass.configure(sub, block_size=16)
    assert REGISTRY.config_for(sub).block_size == 16
    assert REGISTRY.config_for(model) is None
    with pytest.raises(ConfigError, match="applies to a torch.nn.Module"):
        slimpass.configure(object(), block_size=16)


def test_instance_config_reaches_backend(tmp_path):
    """slimpass.configure(model, ...) is read when torch.compile's backend finds the model."""
    model = tiny_model()
    slimpass.configure(model, compiler="eager", dump_dir=str(tmp_path))
    compiled = torch.compile(model, backend="sliminfer")
    ids = torch.randint(0, 128, (1, 24))
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids).logits, twin(model)(ids).logits, atol=1e-4, rtol=0)
    assert list(tmp_path.iterdir()), "dump_dir from the instance config was not used"


def test_register_pass_runs_at_its_point():
    seen = []

    @slimpass.register_pass(after="find_decoder_layers")
    def after_discovery(gm, ctx):
        seen.append(("discovery", ctx.layer_map is not None, len(ctx.results)))

    @slimpass.register_pass(after="end")
    def at_end(gm, ctx):
        seen.append(("end", len(ctx.results)))
        return 0

    model = tiny_model()
    slimpass.compile(model, options={"compiler": "eager"})
    with torch.no_grad():
        model(torch.randint(0, 128, (1, 20)))
    assert seen == [("discovery", True, 1), ("end", 7)]
    record = slimpass.compiled_graphs(model)[0]
    assert [r.name for r in record.results] == [
        "find_decoder_layers", "after_discovery", "rewrite_attention", "insert_pruning", "sink_selection",
        "reselect_kv", "fuse_projections", "at_end"]


def test_every_builtin_pass_is_a_point_in_the_managers_order():
    """Regression: the points were a hand-kept list that lacked reselect_kv and fuse_projections."""
    from slimpass.passes.manager import BUILTIN_PASSES
    from slimpass.registry import pass_points

    assert pass_points() == ("start", *(cls.name for cls in BUILTIN_PASSES), "end")
    for point in pass_points():
        slimpass.register_pass(lambda gm, ctx: None, after=point)  # each accepted


def test_scorers_live_in_the_registry_the_fixture_restores():
    from slimpass.registry import REGISTRY
    from slimpass.runtime.scoring import get_scorer, scorer_names

    saved = REGISTRY.snapshot()
    slimpass.register_scorer("test_only")(lambda q, k, settings: None)
    assert "test_only" in scorer_names() and get_scorer("test_only") is REGISTRY.scorers["test_only"]
    REGISTRY.restore(saved)
    assert "test_only" not in scorer_names() and "window_attention" in scorer_names()


def test_register_pass_bad_point():
    with pytest.raises(ConfigError, match="register_pass\\(after='middle'\\)"):
        slimpass.register_pass(lambda gm, ctx: None, after="middle")


def test_failing_user_pass_names_itself_and_predecessors():
    @slimpass.register_pass(after="rewrite_attention")
    def broken(gm, ctx):
        raise ValueError("boom")

    model = tiny_model()
    slimpass.compile(model, options={"compiler": "eager"})
    with pytest.raises(Exception, match="pass 'broken' failed .*find_decoder_layers, rewrite_attention.*boom"):
        with torch.no_grad():
            model(torch.randint(0, 128, (1, 20)))


def test_backend_rejects_unknown_options():
    model = tiny_model()
    compiled = torch.compile(model, backend="sliminfer", options={"blocksize": 32})
    with pytest.raises(Exception, match="unknown slimpass option 'blocksize'"):
        compiled(torch.randint(0, 128, (1, 20)))


def test_compile_validates_options_before_running():
    with pytest.raises(ConfigError, match="unit_size=5 must divide"):
        slimpass.compile(tiny_model(), options={"unit_size": 5})


def test_patches_are_checked_together_with_the_sources_they_stack_on():
    """Regression (issue 30, bug 6): `patch` checked each block alone against the defaults, so
    `patch(block_size=12)` inside `patch(unit_size=4)` raised "unit_size=8 must divide block_size=12", and
    `patch(static_decode=True)` on a model compiled with `options={"prune": True}` was refused. Values are
    checked at once; how they combine, when a graph resolves every source."""
    with slimpass.config.patch(unit_size=4), slimpass.config.patch(block_size=12):
        assert (resolve(None, None).block_size, resolve(None, None).unit_size) == (12, 4)
    with slimpass.config.patch(static_decode=True):
        assert resolve({"prune": True}, None).static_decode
        with pytest.raises(ConfigError, match="static_decode=True needs prune=True"):
            resolve(None, None)
    with pytest.raises(ConfigError, match="block_size=0 is out of range"):
        with slimpass.config.patch(block_size=0):
            pass


def test_static_decode_patched_onto_a_pruned_model_generates_as_compiled_with_it():
    """`patch(static_decode=True)` around generate on a model compiled with prune=True: the same tokens as
    a model compiled with static_decode in its options, and its cache decodes on fixed-size buffers."""
    geometry = dict(prune=True, compiler="eager", block_size=8, unit_size=2, local_window=4, min_prompt_len=64,
                    schedule={1: 0.5})
    model = tiny_model(num_hidden_layers=4)
    other = twin(model)
    slimpass.compile(model, options=geometry)
    slimpass.compile(other, options={**geometry, "static_decode": True})
    ids = torch.randint(0, 128, (1, 200), generator=torch.Generator().manual_seed(0))
    settings = dict(max_new_tokens=6, do_sample=False, return_dict_in_generate=True)
    with torch.no_grad():
        with slimpass.config.patch(static_decode=True):
            got = model.generate(ids, **settings)
        want = other.generate(ids, **settings)
    assert torch.equal(got.sequences, want.sequences)
    assert got.past_key_values.room > 0 and want.past_key_values.room > 0


def test_the_cache_holds_the_config_of_the_prefill_graph_that_ran():
    """Config is resolved once per graph, by the backend; a request's cache takes the config of the prefill
    graph that ran (its decoding steps read it there), not a copy `slimpass.compile` kept. A graph compiled
    under `config.patch(reselect=True)` and reused after it arms its requests for reselection alike."""
    from slimpass.runtime.keep_sets import state_of

    options = dict(prune=True, compiler="eager", block_size=8, unit_size=2, local_window=4, min_prompt_len=64,
                   schedule={1: 0.5})
    model = tiny_model(num_hidden_layers=4)
    slimpass.compile(model, options=options)
    ids = torch.randint(0, 128, (1, 300), generator=torch.Generator().manual_seed(0))
    settings = dict(max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
    with torch.no_grad():
        with slimpass.config.patch(reselect=True, active_tokens=16):
            first = model.generate(ids, **settings).past_key_values
        second = model.generate(ids, **settings).past_key_values
    prefill = [r.graph_id for r in slimpass.compiled_graphs(model) if r.kind == "prefill"]
    assert len(prefill) == 1
    compiled_with = state_of(model).graph_configs[prefill[0]]
    assert compiled_with.reselect and first.config is compiled_with and second.config is compiled_with
    assert first.reselection_report() and second.reselection_report()


def test_auto_compiler_is_eager_on_the_cpu_and_inductor_elsewhere(caplog):
    """The default inner compiler: Inductor's C++ build of a deep model takes minutes on a CPU, so "auto"
    lowers CPU graphs with eager and graphs on an accelerator with Inductor."""
    from slimpass.backend import inner_compiler

    cpu, elsewhere = torch.zeros(2), torch.zeros(2, device="meta")
    assert SlimConfig().compiler == "auto"
    assert inner_compiler("auto", [3, cpu]) == "eager" and inner_compiler("auto", [cpu, elsewhere]) == "inductor"
    assert inner_compiler("inductor", [cpu]) == "inductor" and inner_compiler("eager", [elsewhere]) == "eager"
    model = tiny_model()
    slimpass.compile(model)
    with caplog.at_level(logging.INFO, logger="slimpass"), torch.no_grad():
        model(torch.randint(0, 128, (1, 20)))
    assert "compiled in " in caplog.text and " s (eager): " in caplog.text


def test_a_compiled_model_deep_copies():
    """Regression: the model's state records each graph's config, whose frozen schedule is a mappingproxy that
    `copy.deepcopy` cannot copy; the CLI's dump deep-copied a compiled model and failed."""
    import copy

    model = tiny_model()
    slimpass.compile(model, options={"compiler": "eager", "prune": True, "schedule": {1: 0.5}, "min_prompt_len": 64})
    with torch.no_grad():
        model(torch.randint(0, 128, (1, 100)))
    config = SlimConfig(schedule={1: 0.5})
    assert copy.deepcopy(config) is config
    assert isinstance(copy.deepcopy(model), type(model))
