"""Progress lines while compiling (issue 29: the first pruned `generate` on a CPU took minutes in silence)."""

from __future__ import annotations

import io
import logging

import pytest
import torch

import slimpass
from slimpass.config import ConfigError, SlimConfig
from slimpass.progress import Progress, enabled
from tests.conftest import tiny_model

OPTIONS = {"prune": True, "compiler": "eager", "block_size": 8, "unit_size": 2, "min_prompt_len": 64,
           "schedule": {1: 0.5}}


def _generate(progress):
    model = tiny_model(num_hidden_layers=3)
    slimpass.compile(model, options={**OPTIONS, "progress": progress})
    ids = torch.randint(4, 120, (1, 200), generator=torch.Generator().manual_seed(0))
    model.generate(ids, max_new_tokens=2, do_sample=False)
    return model


def test_each_graph_says_what_it_is_and_how_long_each_step_took(capsys):
    model = _generate(True)
    lines = capsys.readouterr().err.splitlines()
    graphs = [record.graph_id for record in slimpass.compiled_graphs(model)]
    for graph, kind in zip(graphs, ("prefill", "decode")):
        mine = [line for line in lines if line.startswith(f"slimpass: {graph}: ")]
        assert len(mine) == 2, lines
        assert f"{kind} graph, 3 decoder layers; traced in " in mine[0] and "insert_pruning " in mine[0]
        assert mine[1].startswith(f"slimpass: {graph}: compiled in ") and "tracing)" in mine[1]


@pytest.mark.parametrize("progress", [False, None])  # None: stderr is not a terminal under pytest
def test_quiet_unless_asked_or_on_a_terminal(capsys, caplog, progress):
    with caplog.at_level(logging.DEBUG, logger="slimpass.progress"):
        _generate(progress)
    assert "slimpass: graph" not in capsys.readouterr().err
    assert any("compiled in" in record.getMessage() for record in caplog.records)  # the logger has them all


def test_none_means_when_stderr_is_a_terminal(monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr("sys.stderr", Terminal())
    assert enabled(None) and not enabled(False)
    monkeypatch.setattr("sys.stderr", io.StringIO())
    assert not enabled(None) and enabled(True)


def test_lowering_with_inductor_is_announced_and_eager_is_not(capsys):
    Progress("graph_9", show=True).lowering("inductor", "edited graph")
    Progress("graph_9", show=True).lowering("eager")
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("slimpass: graph_9: lowering the edited graph with inductor")


def test_a_progress_that_is_not_a_bool_is_refused():
    with pytest.raises(ConfigError, match="progress"):
        SlimConfig(progress="yes")
