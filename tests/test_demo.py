"""The main job (`make demo`): both modes run and print what they promise."""

from __future__ import annotations

from slimpass import demo


def test_real_model_demo(capsys):
    assert demo.main(["--tokens", "1100", "--new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert "without SlimInfer: TTFT" in out and "with SlimInfer: TTFT" in out
    assert "tokens reaching each cut layer" in out and "layer 9:" in out


def test_random_model_demo(capsys):
    assert demo.main(["--random", "--lengths", "40,90", "--layers", "2", "--compiler", "eager",
                      "--new-tokens", "3"]) == 0
    out = capsys.readouterr().out
    assert "identical to eager" in out and "rewrite_attention" in out
