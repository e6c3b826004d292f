"""Where a decoding step's host time goes, by sampling: py-spy attached to this process while a model
decodes inside a marker function, so that each sampled stack names the model it belongs to.

torch.profiler only sees the events it records (aten ops, CUDA runtime calls, `record_function` ranges):
Python between them (Dynamo's frame, AOTAutograd's runtime wrappers, our wrappers, generate's loop) and a
wait inside a call it does not record are invisible to it. A sampler sees both: by default the Python
frames, time blocked in a C call counted in the Python frame that made it, read without pausing the
process; ``native=True`` adds C frames down to the driver, but pauses the process at every sample (on a
CPU it ran a tiny model's decoding ~5× slower, which changes what a host-bound step waits for). py-spy is not a dependency: give its path in ``$PY_SPY`` or put it on ``PATH`` (``pip
install py-spy``; on a machine without network, carry its wheel and install it with ``--no-deps``).

    with HostSampler(out_path, rate=250) as sampler:
        for name, run in runs.items():
            sampler.sample(name, run, seconds=8)      # run() again and again for ~8 s under marker `name`
    summary = summarize(out_path.read_text(), sampler.markers, sampler.rate)
"""

from __future__ import annotations

import collections
import ctypes
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Callable

MARKER = "host_sampler_marker_"
_PR_SET_PTRACER, _PR_SET_PTRACER_ANY = 0x59616D61, ctypes.c_ulong(-1)


def py_spy() -> str | None:
    """py-spy's path: ``$PY_SPY`` or the one on PATH; None when there is none."""
    found = os.environ.get("PY_SPY") or shutil.which("py-spy")
    return found if found and Path(found).exists() else None


def _marked(name: str) -> Callable[[Callable[[], object]], None]:
    """A function named after `name` that calls its argument: the frame that tags a stack."""
    code = f"def {MARKER}{name}(run):\n    run()\n"
    scope: dict = {}
    exec(compile(code, f"<{MARKER}{name}>", "exec"), scope)  # noqa: S102 - a fixed template, name checked
    return scope[f"{MARKER}{name}"]


class HostSampler:
    """py-spy recording this process (raw collapsed stacks to `out`) from `__enter__` to `__exit__`."""

    def __init__(self, out: Path, rate: int = 250, native: bool = False) -> None:
        self.out, self.rate, self.native = Path(out), rate, native
        self.markers: list[str] = []
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> HostSampler:
        exe = py_spy()
        if exe is None:
            raise RuntimeError("host sampling needs py-spy: set $PY_SPY to its path or put it on PATH "
                               "(pip install py-spy)")
        try:  # where Yama restricts ptrace to descendants, let py-spy (our child) attach to us
            ctypes.CDLL(None).prctl(_PR_SET_PTRACER, _PR_SET_PTRACER_ANY, 0, 0, 0)
        except (OSError, AttributeError):
            pass
        # --idle: time blocked in a call counts too; without --native py-spy reads the process's memory
        # without pausing it (--nonblocking), so the sampled host runs at its own speed
        command = [exe, "record", "--pid", str(os.getpid()), "--rate", str(self.rate), "--format", "raw", "--idle",
                   "--output", str(self.out)] + (["--native"] if self.native else ["--nonblocking"])
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        time.sleep(2.0)  # attach
        if self.process.poll() is not None:
            raise RuntimeError(f"py-spy stopped at once: {self.process.stdout.read().strip()}")
        return self

    def sample(self, name: str, run: Callable[[], object], seconds: float) -> int:
        """Call `run` under the marker `name` until `seconds` have passed; returns the count of calls."""
        if not re.fullmatch(r"[A-Za-z0-9_]+", name):
            raise ValueError(f"marker {name!r}: letters, digits and _ only")
        marked, calls, end = _marked(name), 0, time.perf_counter() + seconds
        self.markers.append(name)
        while time.perf_counter() < end or calls == 0:
            marked(run)
            calls += 1
        return calls

    def __exit__(self, *exc) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)  # py-spy writes its output on Ctrl-C
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()


def summarize(raw: str, markers: list[str], rate: int, top: int = 25) -> dict[str, dict]:
    """Per marker: samples, seconds, and shares of its samples: the frames most often at the top of its
    stacks (where the host was, working or waiting: with ``--native`` a C function), the innermost Python
    frames of its stacks (which Python code that time belongs to), and the frames most often anywhere
    below the marker (inclusive time). `raw`: py-spy's ``--format raw`` output (``frame;frame;... count``
    per line)."""
    result = {}
    for name in markers:
        tag = f"{MARKER}{name} "
        leaves, python, inclusive, total = collections.Counter(), collections.Counter(), collections.Counter(), 0
        for line in raw.splitlines():
            stack, _, count = line.rpartition(" ")
            if not count.isdigit():
                continue
            frames = stack.split(";")
            at = next((i for i, frame in enumerate(frames) if frame.startswith(tag)), None)
            if at is None:
                continue
            n = int(count)
            total += n
            below = frames[at + 1:]
            if below:
                leaves[_short(below[-1])] += n
                python[next((_short(frame) for frame in reversed(below) if _PYTHON.search(frame)), "-")] += n
            for frame in {_short(frame) for frame in below}:
                inclusive[frame] += n

        def shares(counter):
            return [(frame, n / total) for frame, n in counter.most_common(top)] if total else []

        result[name] = {"samples": total, "seconds": total / rate, "leaves": shares(leaves),
                        "python_leaves": shares(python), "inclusive": shares(inclusive)}
    return result


_PYTHON = re.compile(r"\((.*\.py|<.*>)(:\d+)?\)$")  # a Python frame: "fn (file.py:12)" or "fn (<string>:3)"


def _short(frame: str) -> str:
    """``fn (path/to/file.py:123)`` -> ``fn (file.py)``: the same function at other lines counts once."""
    match = re.fullmatch(r"(.*) \((.*?)(?::\d+)?\)", frame)
    if not match:
        return frame
    return f"{match.group(1)} ({Path(match.group(2)).name})"
