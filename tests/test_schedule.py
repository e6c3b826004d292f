"""Schedules: the paper's layers and budgets, depth scaling, budgets in tokens / ratios, validation."""

from __future__ import annotations

from fractions import Fraction

import pytest

from slimpass.config import ConfigError, SlimConfig
from slimpass.schedule import Stage, min_prune_length, resolve_schedule


def test_paper_schedule_on_32_layers():
    stages = resolve_schedule(SlimConfig(schedule="paper"), 32)
    assert stages == [Stage(10, 8192, None), Stage(20, 4096, None), Stage(30, 2048, None)]
    assert [s.budget(32768) for s in stages] == [8192, 4096, 2048]


def test_default_is_paper_capped_by_ratios():
    stages = resolve_schedule(SlimConfig(), 32)
    assert [(s.layer, s.tokens, s.ratio) for s in stages] == [
        (10, 8192, Fraction(1, 2)), (20, 4096, Fraction(1, 4)), (30, 2048, Fraction(1, 8))]
    assert [s.budget(32768) for s in stages] == [8192, 4096, 2048]  # the paper's at 16k and longer
    assert [s.budget(2000) for s in stages] == [1000, 500, 250]


@pytest.mark.parametrize(("depth", "layers"), [(30, [9, 19, 28]), (28, [9, 18, 26]), (8, [2, 5, 7]), (2, [1])])
def test_depth_scaling(depth, layers):
    assert [s.layer for s in resolve_schedule(SlimConfig(), depth)] == layers


def test_explicit_schedule_kinds():
    config = SlimConfig(schedule={3: 96, 5: 0.25, 7: (64, 0.1)})
    stages = resolve_schedule(config, 8)
    assert [s.budget(1000) for s in stages] == [96, 250, 64]
    assert [s.budget(300) for s in stages] == [96, 75, 30]
    assert stages[1].describe() == "layer 5: 0.25 of the prompt"


def test_schedule_beyond_depth():
    with pytest.raises(ConfigError, match=r"cuts the input of layer\(s\) \[8, 9\].*8 decoder layers.*1\.\.7"):
        resolve_schedule(SlimConfig(schedule={3: 10, 8: 10, 9: 5}), 8)


@pytest.mark.parametrize(
    ("schedule", "message"),
    [
        ({0: 100}, "layer 0 must be an int >= 1"),
        ({3: 0}, r"schedule\[3\]=0: a token budget must be >= 1"),
        ({3: 1.5}, r"schedule\[3\]=1.5: a keep ratio must be in \(0, 1\]"),
        ({3: (0.5, 100)}, r"a pair is \(tokens: int, ratio: float\)"),
        ({3: "half"}, "expected tokens"),
        ({}, "give at least one pruning point"),
        ("fast", "expected a preset"),
        ([1, 2], "expected a mapping"),
    ],
)
def test_bad_schedules_name_the_problem(schedule, message):
    with pytest.raises(ConfigError, match=message):
        SlimConfig(schedule=schedule)


def test_min_prune_length_covers_the_sinks():
    assert min_prune_length(SlimConfig()) == 1024
    assert min_prune_length(SlimConfig(min_prompt_len=10, block_size=64, sink_blocks=2)) == 129
