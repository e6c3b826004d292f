"""Is the GPU machine's host two-speed, and why? Times, per step, a pure-Python loop (no GPU) and a decode-like
launch loop (84 batch-1 `torch.mm` of 4096 x 4096 bf16 then a sync), unpinned and pinned to single cores, and
records what could explain a slow state: the core the process ran on, the cores' clocks, the cgroup's CPU
quota and throttling counters, the load average and the busiest other processes.

    python benchmarks/gpu_host_speed.py results.json     # one CUDA GPU

This is the script of `docs/results/h200_host_speed.json` (PERF, eighth round).
"""
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

if not torch.cuda.is_available():
    raise SystemExit("gpu_host_speed: needs a CUDA GPU (it times kernel launches)")


def read(path: str) -> str | None:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


def cpu_stat() -> dict[str, int]:
    text = read("/sys/fs/cgroup/cpu.stat") or ""
    return {k: int(v) for k, v in (line.split() for line in text.splitlines())}


def current_core() -> int:
    return int(read("/proc/self/stat").rsplit(")", 1)[1].split()[36])  # field 39, "processor"


def core_mhz() -> list[float]:
    return [float(line.split(":")[1]) for line in (read("/proc/cpuinfo") or "").splitlines()
            if line.startswith("cpu MHz")]


def python_step() -> None:
    total = 0
    for i in range(200_000):
        total += i * i


dev = torch.device("cuda:0")
weights = [torch.randn(4096, 4096, device=dev, dtype=torch.bfloat16) for _ in range(4)]
x = torch.randn(1, 4096, device=dev, dtype=torch.bfloat16)


def launch_step() -> None:
    h = x
    for i in range(84):
        h = torch.mm(h, weights[i % 4]) * 0.01
    h.sum().item()


def phase(name: str, cores: set[int] | None, steps: int = 150) -> dict:
    all_cores = os.sched_getaffinity(0)
    if cores is not None:
        os.sched_setaffinity(0, cores)
    stat0 = cpu_stat()
    out = {"name": name, "affinity": sorted(os.sched_getaffinity(0))}
    for label, fn in (("python_ms", python_step), ("launch_ms", launch_step)):
        times, seen = [], []
        for _ in range(steps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
            seen.append(current_core())
        out[label] = {"median": statistics.median(times), "min": min(times), "max": max(times),
                      "p10": statistics.quantiles(times, n=10)[0], "p90": statistics.quantiles(times, n=10)[-1],
                      "cores_seen": sorted(set(seen)), "per_step": [round(t, 3) for t in times]}
    stat1 = cpu_stat()
    out["cgroup_delta"] = {k: stat1[k] - stat0.get(k, 0) for k in stat1}
    out["mhz"] = core_mhz()
    os.sched_setaffinity(0, all_cores)
    print(name, {k: out[k]["median"] for k in ("python_ms", "launch_ms")}, out["cgroup_delta"], flush=True)
    return out


def main() -> None:
    for _ in range(5):
        launch_step()
    torch.cuda.synchronize()
    cores = sorted(os.sched_getaffinity(0))
    ps = subprocess.run(["ps", "-eo", "pid,pcpu,nlwp,comm", "--sort=-pcpu"], capture_output=True, text=True)
    report = {
        "nproc": len(cores), "cpu_max": read("/sys/fs/cgroup/cpu.max"), "loadavg": read("/proc/loadavg"),
        "governor": read("/sys/devices/system/cpu/cpu0/cpufreq/scaling_governor"),
        "model": next((l.split(":")[1].strip() for l in (read("/proc/cpuinfo") or "").splitlines()
                       if l.startswith("model name")), None),
        "threads_in_process": len(os.listdir("/proc/self/task")),
        "top_processes": ps.stdout.splitlines()[:12],
        "phases": [],
    }
    plan = [("unpinned", None), (f"core {cores[1]}", {cores[1]}), (f"core {cores[len(cores) // 2]}",
            {cores[len(cores) // 2]}), (f"core {cores[-1]}", {cores[-1]}), ("unpinned again", None)]
    for _ in range(2):
        for name, pin in plan:
            report["phases"].append(phase(name, pin))
    report["loadavg_end"] = read("/proc/loadavg")
    Path(sys.argv[1]).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
