"""The eval plumbing on the real model, small: runner rows, needle survival, fidelity, report files, CLI.

Tiny lengths and a couple of samples: this checks that the pieces fit, not what pruning costs
(docs/QUALITY.md has the measured study).
"""

from __future__ import annotations

import argparse
import json

import pytest

import slimpass
from slimpass import cli
from slimpass.eval import models, report, runner, tasks


def _settings(**extra):
    given = {"tasks": ("passkey",), "lengths": (320,), "schedules": {"half": {9: 0.5}}, "samples": 2,
             "max_new_tokens": 8, "fidelity_samples": 1, "fidelity_tokens": 4, "options": {"min_prompt_len": 128}}
    return runner.EvalSettings(**{**given, **extra})


def test_runner_rows_and_report(smollm, tmp_path):
    results = runner.run(_settings(), progress=False, loaded=smollm)
    rows = results["tasks"]
    assert [r["schedule"] for r in rows] == ["full", "full", "half", "half"]
    for row in rows:
        assert 0.0 <= row["score"] <= 1.0 and row["ttft_ms"] > 0 and row["tokens"] <= 320
        assert row["score"] == tasks.score(_sample_like(row), row["answer"])
    for row in rows[2:]:  # pruned: one stage at layer 9, half of the prompt kept, needle checked
        ((layer, kept),) = row["kept"]
        assert layer == 9 and kept < row["tokens"] and len(row["survived"]) == 1
    assert rows[0]["kept"] is None and rows[0]["survived"] is None
    (fid,) = results["fidelity"]
    assert fid["schedule"] == "half" and fid["top1"] in (0.0, 1.0) and fid["kl"] >= 0 and 0 <= fid["prefix"] <= 4
    written = report.write(results, tmp_path / "out")
    assert {p.name for p in written} >= {"results.json", "report.md"}
    assert json.loads((tmp_path / "out" / "results.json").read_text())["tasks"] == rows
    text = (tmp_path / "out" / "report.md").read_text()
    assert "| passkey | 320" in text and "Fidelity on natural text" in text


def _sample_like(row):
    """A stand-in Sample with the row's answers (score only reads answers and metric)."""
    return tasks.Sample(task="passkey", input_ids=None, answers=tuple(row["answers"]), needle_spans=(),
                        metric="all", seed=row["seed"], length=320, info={})


def test_interval_is_wilson_for_binary_scores():
    mean, low, high = report.interval([1.0] * 19 + [0.0])
    assert mean == 0.95 and 0.763 < low < 0.764 and 0.991 < high < 0.992  # Wilson 95%: [0.7639, 0.9911]
    mean, low, high = report.interval([0.5, 1.0, 0.5, 1.0])
    assert mean == 0.75 and low < 0.75 < high
    for scores in ([1.0] * 60, [0.0] * 60):  # the bounds never leave the mean outside (the plot's error bars)
        mean, low, high = report.interval(scores)
        assert low <= mean <= high and 0.0 <= low and high <= 1.0 and high - low > 0.03


def test_retention_summary_counts_only_families_the_full_model_answers():
    def rows(task, schedule, right, n=10):
        return [{"task": task, "length": 512, "schedule": schedule, "score": float(i < right), "tokens": 512,
                 "kept": None, "survived": None, "ttft_ms": 1.0} for i in range(n)]

    results = {"tasks": rows("a", "full", 10) + rows("a", "cut", 9) + rows("b", "full", 8) + rows("b", "cut", 8)
               + rows("c", "full", 5) + rows("c", "cut", 0)}
    (kept,) = report.retention_summary(results)
    assert kept["families"] == ["a", "b"]  # c: the full model scores 50%, below the 80% bar
    assert kept["mean"] == pytest.approx((0.9 + 1.0) / 2) and kept["min"] == pytest.approx(0.9) and kept["worst"] == "a"


def test_several_seeds_fill_one_cell(smollm):
    results = runner.run(_settings(seeds=(3, 4), fidelity_samples=0), progress=False, loaded=smollm)
    full = [r for r in results["tasks"] if r["schedule"] == "full"]
    assert len(full) == 4 and len({r["seed"] for r in full}) == 4  # 2 samples from each seed, all different
    assert report.summarize(results)[0]["n"] == 4
    with pytest.raises(ValueError, match="repeat a seed"):
        runner.EvalSettings(seeds=(1, 1))


def test_settings_reject_bad_values():
    with pytest.raises(ValueError, match="unknown task"):
        runner.EvalSettings(tasks=("nope",))
    with pytest.raises(ValueError, match="'full' names the unpruned model"):
        runner.EvalSettings(schedules={"full": "default"})
    with pytest.raises(Exception, match="SlimConfig"):
        runner.EvalSettings(options={"block_size": 0})
    # eval always prunes: prune=True is accepted (it once raised a bare TypeError), prune=False is refused
    assert "prune" not in runner.EvalSettings(options={"prune": True, "reselect": True}).options
    with pytest.raises(ValueError, match="always prunes"):
        runner.EvalSettings(options={"prune": False})


def test_cli_parsers():
    assert cli.parse_lengths("1k,2k,1500") == (1024, 2048, 1500)
    assert cli.parse_seeds("0,1,2") == (0, 1, 2)
    with pytest.raises(argparse.ArgumentTypeError, match="comma-separated integers"):
        cli.parse_seeds("0;1")
    assert cli.parse_schedule('gentle={"9": 0.5, "19": [512, 0.25]}') == ("gentle", {9: 0.5, 19: (512, 0.25)})
    assert cli.parse_schedule("paper") == ("paper", "paper")
    assert cli.parse_schedule('t={"schedule": {"9": 0.5}, "scorer": "tokenunit"}') == (
        "t", {"schedule": {9: 0.5}, "scorer": "tokenunit"})
    assert runner.variant_options({"schedule": {9: 0.5}, "scorer": "tokenunit"})["scorer"] == "tokenunit"
    assert runner.variant_options("paper") == {"schedule": "paper"}
    with pytest.raises(argparse.ArgumentTypeError, match="expected token counts"):
        cli.parse_lengths("1x")
    with pytest.raises(argparse.ArgumentTypeError, match="bad JSON"):
        cli.parse_schedule("x={9: 0.5}")


def test_cli_eval_writes_the_report(smollm, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(models, "load", lambda name=models.DEFAULT_MODEL, dtype=None: smollm)
    code = cli.main(["eval", "--tasks", "passkey", "--lengths", "320", "--samples", "1", "--max-new-tokens", "6",
                     "--schedule", 'half={"9": 0.5}', "--option", "min_prompt_len=128", "--out", str(tmp_path),
                     "--quiet"])
    assert code == 0
    assert (tmp_path / "report.md").is_file() and "| passkey | 320" in capsys.readouterr().out
    assert cli.main(["eval", "--tasks", "nope", "--out", str(tmp_path), "--quiet"]) == 2
    assert "unknown task(s) ['nope']" in capsys.readouterr().err


def test_cli_run_and_dump(smollm, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(models, "load", lambda name=models.DEFAULT_MODEL, dtype=None: smollm)
    document = tmp_path / "doc.txt"
    filler = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
    document.write_text(filler * 10 + "The pass key is 40213. Remember it. " + filler * 10)
    try:
        code = cli.main(["run", "--prompt-file", str(document), "--question", "What is the pass key?", "--compare",
                         "--max-new-tokens", "6", "--rounds", "2", "--option", "min_prompt_len=128"])
        out = capsys.readouterr().out
        assert code == 0 and "without SlimInfer: TTFT" in out and "with SlimInfer (default): TTFT" in out
        assert "(median of 2," in out and "first call with SlimInfer (compiling, not timed below)" in out
        assert "\nverdict: with SlimInfer (default) " in out
        assert "kept tokens per cut layer: layer 9:" in out
    finally:
        slimpass.restore(smollm[0])  # the module-scoped model stays plain for the other tests
    try:
        code = cli.main(["dump", "--length", "300", "--prune", "--option", "min_prompt_len=128", "--out",
                         str(tmp_path / "dumps")])
        assert code == 0
        summaries = list((tmp_path / "dumps").glob("*/summary.md"))
        assert summaries and "insert_pruning" in summaries[0].read_text()
    finally:
        slimpass.restore(smollm[0])
    assert cli.main(["run", "--prompt-file", str(tmp_path / "missing.txt")]) == 2
    assert "missing.txt" in capsys.readouterr().err


def test_report_warns_when_a_schedule_pruned_nothing():
    def row(schedule, kept):
        return {"task": "passkey", "length": 512, "schedule": schedule, "score": 1.0, "tokens": 512, "kept": kept,
                "survived": None, "ttft_ms": 1.0}

    results = {"settings": {"model": "m", "samples": 1, "seeds": [0], "haystack": "repeat", "options": {},
                            "fidelity_tokens": 32},
               "environment": {"torch": "t", "transformers": "x", "date": "d"}, "fidelity": [],
               "tasks": [row("full", None), row("dense", []), row("dense", []), row("cut", [[9, 256]]), row("cut", [])]}
    assert report.unpruned_schedules(results) == ["dense"]
    text = report.to_markdown(results)
    assert "schedule `dense` pruned no prompt" in text and "schedule `cut` pruned" not in text
