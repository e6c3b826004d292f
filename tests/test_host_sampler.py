"""benchmarks/host_sampler.py: py-spy's raw stacks attributed to the marker each was sampled under, and
the sampler's life cycle (start, sample under markers, stop: py-spy writes on Ctrl-C) with a stand-in
py-spy that writes a fixed raw file when interrupted."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import host_sampler  # noqa: E402

RAW = "\n".join([
    "<module> (run.py:9);host_sampler_marker_a (<host_sampler_marker_a>:2);step (run.py:4);"
    "call (cabc.py:100);cudaLaunchKernel (libcudart.so) 30",
    "<module> (run.py:9);host_sampler_marker_a (<host_sampler_marker_a>:2);step (run.py:5);"
    "attend_kv (offload.py:212);cuStreamSynchronize (libcuda.so) 10",
    "<module> (run.py:9);host_sampler_marker_b (<host_sampler_marker_b>:2);step (run.py:4) 4",
    "<module> (run.py:9);compile (run.py:2) 500",
    "not a sample line",
])


def test_summary_attributes_stacks_to_their_marker():
    summary = host_sampler.summarize(RAW, ["a", "b"], rate=100)
    a, b = summary["a"], summary["b"]
    assert (a["samples"], b["samples"]) == (40, 4)  # the unmarked compile samples count for neither
    assert a["seconds"] == pytest.approx(0.4)
    assert a["leaves"] == [("cudaLaunchKernel (libcudart.so)", 0.75), ("cuStreamSynchronize (libcuda.so)", 0.25)]
    assert a["python_leaves"] == [("call (cabc.py)", 0.75), ("attend_kv (offload.py)", 0.25)]
    inclusive = dict(a["inclusive"])
    assert inclusive["step (run.py)"] == 1.0  # lines 4 and 5 of one function count as one frame
    assert "host_sampler_marker_a (<host_sampler_marker_a>)" not in inclusive and "<module> (run.py)" not in inclusive
    assert b["leaves"] == [("step (run.py)", 1.0)]


def test_sampler_without_py_spy_names_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("PY_SPY", str(tmp_path / "missing"))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(RuntimeError, match=r"needs py-spy: set \$PY_SPY"):
        with host_sampler.HostSampler(tmp_path / "raw.txt"):
            pass


def fake_py_spy(tmp_path: Path, markers: list[str]) -> Path:
    """A stand-in py-spy: waits for Ctrl-C, then writes one stack per marker to its --output."""
    lines = [f"<module> (x.py:1);host_sampler_marker_{name} (<host_sampler_marker_{name}>:2);f (y.py:3) 5"
             for name in markers]
    fake = tmp_path / "py-spy"
    fake.write_text(f"#!{sys.executable}\n"
                    "import signal, sys, time\n"
                    "out = sys.argv[sys.argv.index('--output') + 1]\n"
                    "def stop(*_):\n"
                    f"    open(out, 'w').write({chr(10).join(lines)!r})\n"
                    "    sys.exit(0)\n"
                    "signal.signal(signal.SIGINT, stop)\n"
                    "while True:\n"
                    "    time.sleep(0.05)\n")
    fake.chmod(0o755)
    return fake


def test_sampler_runs_under_markers_and_stops_py_spy(tmp_path, monkeypatch):
    monkeypatch.setenv("PY_SPY", str(fake_py_spy(tmp_path, ["first", "second"])))
    raw, calls = tmp_path / "raw.txt", []
    with host_sampler.HostSampler(raw, rate=50) as sampler:
        assert sampler.sample("first", lambda: calls.append(1), seconds=0.0) == 1  # at least one call
        sampler.sample("second", lambda: calls.append(2), seconds=0.05)
        with pytest.raises(ValueError, match="letters, digits"):
            sampler.sample("no spaces", lambda: None, seconds=0.0)
    assert sampler.process.returncode == 0 and calls[0] == 1 and calls[-1] == 2
    summary = host_sampler.summarize(raw.read_text(), sampler.markers, sampler.rate)
    assert summary["first"]["samples"] == summary["second"]["samples"] == 5
    assert summary["first"]["seconds"] == pytest.approx(0.1)
