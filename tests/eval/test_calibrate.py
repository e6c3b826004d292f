"""Calibration: the schedule rule on made-up tables, and one small run on the real model."""

from __future__ import annotations

import pytest

from slimpass import cli
from slimpass.config import SlimConfig
from slimpass.eval import calibrate, models


def _table(rows, samples=10, ratios=(0.5, 0.25)):
    return calibrate.SurvivalTable(ratios, [list(r) for r in rows], samples, {})


def test_recommend_takes_the_earliest_good_layer_per_stage():
    rows = [(3, 1), (10, 2), (9, 9), (10, 10), (10, 4), (10, 10)]
    assert calibrate.recommend(_table(rows)) == {2: 0.5, 4: 0.25}  # scores of layers 1 and 3
    assert calibrate.recommend(_table(rows), target=0.9) == {2: 0.5, 3: 0.25}  # layer 2 reaches 90% at 25%
    assert calibrate.recommend(_table(rows), min_gap=3) == {2: 0.5, 6: 0.25}  # at least 3 layers apart


def test_recommend_says_none_when_a_ratio_never_reaches_the_target():
    assert calibrate.recommend(_table([(10, 1), (10, 9)])) is None


def test_bad_ratios_are_refused():
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        calibrate.layer_survival(None, None, ratios=(0.5, 1.0))


def test_layer_survival_on_the_real_model(smollm, capsys, monkeypatch):
    model, tokenizer = smollm
    table = calibrate.layer_survival(model, tokenizer, SlimConfig(prune=True), ("passkey:repeat",), length=512,
                                     samples=2, ratios=(0.75, 0.5))
    assert table.samples == 2 and len(table.survived) == model.config.num_hidden_layers - 1
    assert all(0 <= n <= 2 for row in table.survived for n in row)
    # keeping more never loses a needle that keeping less held (the kept sets are nested)
    assert all(row[0] >= row[1] for row in table.survived)
    monkeypatch.setattr(models, "load", lambda name=models.DEFAULT_MODEL, dtype=None: smollm)
    assert cli.main(["calibrate", "--tasks", "passkey:repeat", "--length", "512", "--samples", "1",
                     "--ratios", "0.75", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "| 0 (1) |" in out and ("Recommended: --schedule" in out or "No layer keeps" in out)
