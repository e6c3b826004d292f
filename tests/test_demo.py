"""The main job (`make demo`): both modes run and print what they promise."""

from __future__ import annotations

import pytest

from slimpass import demo


def test_real_model_demo(capsys):
    assert demo.main(["--tokens", "1100", "--max-new-tokens", "4", "--rounds", "3"]) == 0
    out = capsys.readouterr().out
    assert "without SlimInfer: TTFT" in out and "with SlimInfer: TTFT" in out and "(median of 3," in out
    assert "first call with SlimInfer (compiling, not timed below):" in out
    verdict = next(line for line in out.splitlines() if line.startswith("verdict: "))
    assert "within noise" in verdict or "faster than without SlimInfer" in verdict or "slower than" in verdict
    assert "tokens reaching each cut layer" in out and "layer 9:" in out


def test_random_model_demo(capsys):
    assert demo.main(["--random", "--lengths", "40,90", "--layers", "2", "--compiler", "eager",
                      "--new-tokens", "3"]) == 0
    out = capsys.readouterr().out
    assert "identical to eager" in out and "rewrite_attention" in out


def test_slimpass_demo_help_lists_the_demos_options(capsys):
    from slimpass import cli

    with pytest.raises(SystemExit) as exit_:
        cli.main(["demo", "--help"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0 and "--max-new-tokens" in out and "--rounds" in out and "(default: 1500)" in out
