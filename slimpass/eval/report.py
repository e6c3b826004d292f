"""Tables, confidence intervals and a plot from `slimpass.eval.runner.run` results.

    write(results, "reports/eval")   # results.json, report.md, accuracy.png (matplotlib, if installed)

Accuracy cells are means over samples with a 95% interval: Wilson's for 0/1 scores, a normal
interval (clipped to [0, 1]) for fractional ones ("all" tasks with several answers). Retention is the
pruned accuracy over the full model's, per task and length. Needle survival is, per pruning stage, the
fraction of samples whose needle tokens all reached that stage's layer.
"""

from __future__ import annotations

import json
import math
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

Z95 = 1.959964


def interval(scores: list[float]) -> tuple[float, float, float]:
    """(mean, low, high) with a 95% interval (Wilson for 0/1 scores)."""
    n = len(scores)
    mean = sum(scores) / n
    if all(s in (0.0, 1.0) for s in scores):
        centre = (mean + Z95**2 / (2 * n)) / (1 + Z95**2 / n)
        half = Z95 * math.sqrt(mean * (1 - mean) / n + Z95**2 / (4 * n * n)) / (1 + Z95**2 / n)
        # min/max: rounding may put a bound a hair on the wrong side of a mean of exactly 0 or 1
        return mean, min(mean, max(0.0, centre - half)), max(mean, min(1.0, centre + half))
    half = Z95 * (statistics.stdev(scores) / math.sqrt(n) if n > 1 else 0.0)
    return mean, max(0.0, mean - half), min(1.0, mean + half)


def summarize(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (task, length, schedule): n, accuracy and its interval, retention, survival, TTFT."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for row in results["tasks"]:
        groups[row["task"], row["length"], row["schedule"]].append(row)
    summary = []
    for (task, length, schedule), rows in groups.items():
        mean, low, high = interval([r["score"] for r in rows])
        full = groups.get((task, length, "full"))
        full_mean = sum(r["score"] for r in full) / len(full) if full else None
        stages = [r["survived"] for r in rows if r["survived"] is not None]
        summary.append({
            "task": task, "length": length, "schedule": schedule, "n": len(rows), "accuracy": mean,
            "low": low, "high": high, "tokens": statistics.median(r["tokens"] for r in rows),
            "retention": None if schedule == "full" or not full_mean else mean / full_mean,
            "survival": [sum(s[i] for s in stages) / len(stages) for i in range(len(stages[0]))] if stages else None,
            "kept": rows[0]["kept"], "ttft_ms": statistics.median(r["ttft_ms"] for r in rows),
        })
    return summary


def unpruned_schedules(results: dict[str, Any]) -> list[str]:
    """Pruned variants whose every task row ran dense (kept == []): their numbers are the full model's."""
    by_schedule: dict[str, list[Any]] = defaultdict(list)
    for row in results["tasks"]:
        if row["schedule"] != "full":
            by_schedule[row["schedule"]].append(row["kept"])
    return sorted(name for name, kept in by_schedule.items() if all(k == [] for k in kept))


FULL_SCORES_WELL = 0.8


def retention_summary(results: dict[str, Any], threshold: float = FULL_SCORES_WELL) -> list[dict[str, Any]]:
    """Per (length, schedule): retention averaged over the task families where the full model scores at
    least `threshold` at that length, and the lowest family's (the issue's acceptance measure)."""
    rows = summarize(results)
    full = {(r["task"], r["length"]): r["accuracy"] for r in rows if r["schedule"] == "full"}
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        if r["schedule"] != "full" and full.get((r["task"], r["length"]), 0.0) >= threshold:
            groups[r["length"], r["schedule"]].append(r)
    return [{"length": length, "schedule": schedule, "families": sorted(r["task"] for r in cells),
             "mean": sum(r["retention"] for r in cells) / len(cells),
             "worst": min(cells, key=lambda r: r["retention"])["task"],
             "min": min(r["retention"] for r in cells)}
            for (length, schedule), cells in sorted(groups.items())]


def fidelity_summary(results: dict[str, Any]) -> list[dict[str, Any]]:
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for row in results["fidelity"]:
        groups[row["length"], row["schedule"]].append(row)
    return [{"length": length, "schedule": schedule, "n": len(rows),
             **{key: sum(r[key] for r in rows) / len(rows) for key in ("top1", "kl", "exact", "prefix")}}
            for (length, schedule), rows in sorted(groups.items())]


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.0f}%"


def to_markdown(results: dict[str, Any]) -> str:
    rows = summarize(results)
    settings = results["settings"]
    seeds = settings["seeds"]
    lines = [f"Model `{settings['model']}`, {settings['samples'] * len(seeds)} samples per cell "
             f"({settings['samples']} from each of seeds {', '.join(map(str, seeds))}), device "
             f"{results['environment'].get('device', 'cpu')}, "
             f"haystack {settings['haystack']}, options {settings['options']}; "
             f"torch {results['environment']['torch']}, transformers {results['environment']['transformers']}, "
             f"{results['environment']['date']}.", "",
             "| task | length | schedule | accuracy [95% CI] | retention | needle survival per stage | kept per stage "
             "| TTFT (median) |", "|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["task"], r["length"], r["schedule"] != "full", r["schedule"])):
        survival = " / ".join(_pct(s) for s in r["survival"]) if r["survival"] else "-"
        kept = " / ".join(f"{tokens}@{layer}" for layer, tokens in r["kept"]) if r["kept"] else "-"
        lines.append(f"| {r['task']} | {r['length']} ({r['tokens']:.0f}) | {r['schedule']} | "
                     f"{_pct(r['accuracy'])} [{_pct(r['low'])}, {_pct(r['high'])}] | {_pct(r['retention'])} | "
                     f"{survival} | {kept} | {r['ttft_ms']:.0f} ms |")
    for schedule in unpruned_schedules(results):
        lines += ["", f"**Warning: schedule `{schedule}` pruned no prompt** (every call ran the dense graph: prompts "
                      "shorter than min_prompt_len, or a pass declined, e.g. eager attention under generate; "
                      "`slimpass.compiled_graphs(model)` says why). Its rows measure the full model."]
    kept = retention_summary(results)
    if kept:
        lines += ["", f"Retention over the families where the full model scores >= {FULL_SCORES_WELL:.0%}:", "",
                  "| length | schedule | families | mean retention | lowest (family) |", "|---|---|---|---|---|"]
        lines += [f"| {k['length']} | {k['schedule']} | {len(k['families'])} ({', '.join(k['families'])}) | "
                  f"{_pct(k['mean'])} | {_pct(k['min'])} ({k['worst']}) |" for k in kept]
    fid = fidelity_summary(results)
    if fid:
        tokens = settings["fidelity_tokens"]
        lines += ["", "Fidelity on natural text (vs the full model):", "",
                  f"| length | schedule | n | top-1 agreement | KL (nats) | greedy {tokens}-token exact match "
                  "| agreeing prefix |", "|---|---|---|---|---|---|---|"]
        lines += [f"| {f['length']} | {f['schedule']} | {f['n']} | {_pct(f['top1'])} | {f['kl']:.3f} | "
                  f"{_pct(f['exact'])} | {f['prefix']:.1f} |" for f in fid]
    return "\n".join(lines) + "\n"


def plot(results: dict[str, Any], path: Path) -> bool:
    """Accuracy vs length, one panel per task, one line per schedule (with its interval). False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = summarize(results)
    task_names = sorted({r["task"] for r in rows})
    fig, axes = plt.subplots(1, len(task_names), figsize=(4 * len(task_names), 3.2), squeeze=False)
    for ax, task in zip(axes[0], task_names):
        for schedule in sorted({r["schedule"] for r in rows}, key=lambda s: (s != "full", s)):
            cells = sorted((r for r in rows if r["task"] == task and r["schedule"] == schedule), key=lambda r: r["length"])
            xs = [r["length"] for r in cells]
            ax.errorbar(xs, [r["accuracy"] for r in cells], capsize=3, marker="o", label=schedule,
                        yerr=[[r["accuracy"] - r["low"] for r in cells], [r["high"] - r["accuracy"] for r in cells]])
        ax.set(title=task, xlabel="prompt tokens", ylabel="accuracy", ylim=(-0.05, 1.05), xscale="log", xticks=xs)
        ax.minorticks_off()  # log-scale minor labels would overprint the lengths
        ax.set_xticklabels([str(x) for x in xs])
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write(results: dict[str, Any], folder: str | Path) -> list[Path]:
    """results.json, report.md and accuracy.png under `folder`; returns the paths written."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = [folder / "results.json", folder / "report.md"]
    written[0].write_text(json.dumps(results, indent=1))
    written[1].write_text(to_markdown(results))
    if plot(results, folder / "accuracy.png"):
        written.append(folder / "accuracy.png")
    return written
