"""The GPU benchmark scripts' CPU dry runs (``--tiny``): they must keep working between GPU sessions, and
their side-by-side timing must leave every variant compiled and decoding as it would alone."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from tests.test_host_sampler import fake_py_spy

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture
def gpu_decode(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import gpu_decode

    return gpu_decode


def test_gpu_decode_times_variants_side_by_side(gpu_decode, tmp_path, monkeypatch):
    from transformers.cache_utils import StaticCache

    static_caches = []
    init = StaticCache.__init__
    monkeypatch.setattr(StaticCache, "__init__", lambda self, *a, **k: (static_caches.append(self), init(self, *a, **k))[1])
    out = tmp_path / "decode.json"
    gpu_decode.main(["--tiny", "--length", "600", "--new-tokens", "6", "--active-tokens", "64", "--repeats", "2",
                     "--variants", "hf_eager,hf_static,sliminfer_reselect,sliminfer_offload", "--out", str(out)])
    result = json.loads(out.read_text())
    rows = {row["variant"]: row for row in result["rows"]}
    assert list(rows) == ["hf_eager", "hf_static", "sliminfer_reselect", "sliminfer_offload"]
    # transformers' static cache: the same greedy tokens as its dynamic one (float32), no slimpass reports
    assert rows["hf_static"]["tokens"] == rows["hf_eager"]["tokens"]
    assert rows["hf_static"]["options"] is None and "kv_bytes" not in rows["hf_static"]
    assert static_caches  # hf_static's generates ran on transformers' static cache
    for row in rows.values():
        assert len(row["e2e_all_ms"]) == len(row["ttft_all_ms"]) == len(row["decode_all_ms_per_token"]) == 2
        assert len(row["step_all_ms"]) == 2 and 0 < row["step_ms"] <= max(row["step_p90_all_ms"])
        assert len(row["tokens"]) == 6
        assert len(row["host_probe_all_ms"]) == 2 and min(row["host_probe_all_ms"]) > 0
    for name in ("hf_static", "sliminfer_reselect", "sliminfer_offload"):  # hf_eager's time over the variant's
        assert rows[name]["e2e_speedup_by_round"] == [
            a / b for a, b in zip(rows["hf_eager"]["e2e_all_ms"], rows[name]["e2e_all_ms"])]
    assert "e2e_speedup_by_round" not in rows["hf_eager"]
    offload, resident = rows["sliminfer_offload"], rows["sliminfer_reselect"]
    assert offload["tokens"] == resident["tokens"]  # the copies that share the weights decode as one model alone
    assert len(offload["decode_vs_resident_by_round"]) == len(offload["step_vs_resident_by_round"]) == 2
    assert offload["offload"]["layers"] > 0 and offload["offload"]["h2d_bytes_per_step"] > 0
    assert offload["gpu_kv_share"] < resident["kv_share"]
    assert resident["reselection"] and not resident["offload"]
    assert result["environment"]["cpus"] >= 1
    # each compiled copy kept its graphs (prefill, decode; offload a second decode graph, from the step
    # that reads the fronts on): the rounds recompiled nothing
    assert rows["hf_eager"]["options"] is None
    assert len(resident["graphs"]) == 2 and len(offload["graphs"]) == 3
    # where each first call's compile time went: Dynamo traced the compiled variants, not HF eager
    assert rows["hf_eager"]["compile_phases_s"] == {}
    assert resident["compile_phases_s"]["bytecode_tracing"] > 0
    assert list(resident["compile_phases_s"].values()) == sorted(resident["compile_phases_s"].values(), reverse=True)


def test_gpu_offload_ablation_rows(gpu_decode, tmp_path, monkeypatch):
    import gpu_offload_ablation

    from slimpass.runtime import offload

    calls = []
    after_step = offload.OffloadManager.after_step
    monkeypatch.setattr(offload.OffloadManager, "after_step",
                        lambda self, *args: calls.append(1) or after_step(self, *args))
    manager = offload.OffloadManager
    shipped = (manager._issue, manager.add_layers, manager.before_step, manager.after_step,
               offload._copy_blocks_triton)
    out = tmp_path / "ablation.json"
    monkeypatch.setenv("PY_SPY", str(fake_py_spy(tmp_path, ["resident", "offload"])))
    monkeypatch.setattr(sys, "argv", ["gpu_offload_ablation.py", "--tiny", "--length", "600", "--new-tokens", "4",
                                      "--active-tokens", "64", "--repeats", "1", "--spy-seconds", "0.01", "--launch-times",
                                      "--out", str(out)])
    gpu_offload_ablation.main()
    result = json.loads(out.read_text())
    assert result["tokens_equal"] and calls  # it offloads (it once ran with pruning off: nothing to offload)
    rows = result["rows"]
    for ablation in gpu_offload_ablation.ROWS:
        assert len(rows[f"offload/{ablation}"]["vs_resident_by_round"]) == 1
        assert len(rows[f"offload/{ablation}"]["step_vs_resident_by_round"]) == 1
        assert rows[f"resident (beside {ablation})"]["vs_resident"] == 0.0
    samples = rows["host_samples"]  # sampled under a marker per model (a stand-in py-spy)
    assert set(samples) == {"resident", "offload"}
    assert all(row["generates"] >= 1 and row["samples"] == 5 for row in samples.values())
    parts = rows["offload"]["host"]["forward_parts_ms"]  # the eager inner compiler: no Inductor graph to time
    assert parts["graph"] is parts["before_graph"] is None and parts["cache_after_step"] > 0
    for name in ("resident", "offload"):  # per decoding step (3 of 4 tokens); the eager inner compiler's graph
        launches = rows[f"{name}/launch_times"]  # calls its ops from C++: only its size queries are noted
        assert launches["per"] == 3 and set(launches["rows"]) <= {"aten.sym_size.int"}
    difference = rows["launch_times_difference"]
    assert difference["total_us"]["offload"] == rows["offload/launch_times"]["total_us"]
    timed = rows["offload/timed-steps"]["manager_us"]
    assert timed["before"] > 0 and timed["after"] > 0
    # every row's patch undone
    assert (manager._issue, manager.add_layers, manager.before_step, manager.after_step,
            offload._copy_blocks_triton) == shipped


def test_step_clock_times_each_decoding_step(gpu_decode):
    """The streamer sees the prompt, then every new token: N tokens give N - 1 decoding steps."""
    import argparse

    from gpu_prefill import build_model

    import torch

    model = build_model(argparse.Namespace(tiny=True, layers=2, seed=0), torch.device("cpu"))
    clock = gpu_decode.StepClock()
    out = gpu_decode.generate(model, torch.randint(0, model.config.vocab_size, (1, 12)), 5, streamer=clock)
    assert out.shape[1] == 17 and len(clock.times) == 6
    assert len(clock.steps_ms()) == 4 and all(step > 0 for step in clock.steps_ms())


def test_forward_parts_sums_each_part_inside_each_forward(gpu_decode):
    # two forwards (start s, host time 1 s); graph calls and the cache's calls noted inside and outside them
    notes = [("cache_before_step", 10.1, 0.05), ("graph", 10.2, 0.5), ("graph", 10.75, 0.1),
             ("cache_after_step", 10.9, 0.05), ("graph", 11.5, 9.0),  # between the forwards: not counted
             ("graph", 12.4, 0.3), ("cache_after_step", 12.8, 0.1)]
    parts = gpu_decode.forward_parts(notes, [10.0, 12.0], [1.0, 1.0])
    assert parts["graph"] == pytest.approx((600 + 300) / 2)  # per forward its summed calls; the median of two
    assert parts["before_graph"] == pytest.approx((200 + 400) / 2)
    assert parts["cache_after_step"] == pytest.approx((50 + 100) / 2)
    assert parts["cache_before_step"] == pytest.approx(50)  # only the first forward had one
    assert gpu_decode.forward_parts([], [10.0], [1.0]) == dict.fromkeys(parts)


def test_gpu_slot_sorts_times_both_counts(gpu_decode, tmp_path):
    import gpu_slot_sorts

    result = gpu_slot_sorts.main(["--blocks", "64", "--slots", "8", "--calls", "3", "--out", str(tmp_path / "s.json")])
    assert json.loads((tmp_path / "s.json").read_text()) == result
    assert result["static"]["host_us_per_call"] > 0 and result["symbolic"]["host_us_per_call"] > 0
    for count in ("static", "symbolic"):  # no Triton sorts on the CPU: the slot update's four sorts are aten's
        assert result[count]["kernels"]["rows"]["aten.sort.stable"]["calls"] == 4


def test_launch_times_notes_inductors_calls_per_decoding_forward(gpu_decode):
    import torch

    class Step(torch.nn.Module):
        def forward(self, x, y):
            return torch.sort(x @ y, dim=1, stable=True).values

    model = Step()
    model.forward = torch.compile(model.forward, backend="inductor", dynamic=False)
    x, y = torch.randn(4, 8), torch.randn(8, 600)  # 600 > 512: Inductor sorts with aten, not its own kernels
    model(x, y)  # compiled before the timing

    def three_forwards():  # as a generate: the first forward (the prefill's) is left out
        for _ in range(3):
            model(x, y)

    notes = gpu_decode.launch_times(model, three_forwards, torch.device("cpu"))
    assert notes["per"] == 2
    assert notes["rows"]["aten.sort.stable"]["calls"] == 1 and notes["rows"]["extern:mm"]["calls"] == 1
    assert notes["total_us"] >= notes["rows"]["extern:mm"]["us"] > 0
    assert torch._ops.OpOverload.__call__.__name__ == "__call__"  # unpatched again


@pytest.mark.parametrize("offload", [False, True], ids=["resident", "offload"])
def test_gpu_static_check_on_cpu(gpu_decode, tmp_path, offload):
    """The static_decode GPU check, run on the CPU with the eager inner compiler: every request decodes the
    reference's tokens, and the buffers grew (room 4 for 9 tokens)."""
    import gpu_static_check

    out = tmp_path / "static.json"
    rows = gpu_static_check.main(["--device", "cpu", "--compiler", "eager", "--new-tokens", "9", "--capacity", "4",
                                  "--more-requests", "2", "--out", str(out)] + (["--offload"] if offload else []))
    assert all((row["offloaded_layers"] > 0) == offload for row in rows)
    assert [row["prompt"] for row in rows] == list(gpu_static_check.LENGTHS)
    assert all(row["tokens_equal"] and row["first_different_token"] is None for row in rows)
    assert all(row["max_logit_difference"] < 1e-4 for row in rows)
    # the last layer kept fewer than a quarter of the prompt, and its buffers hold the 9 tokens beyond
    # their first room of 4: they grew
    assert all(row["last_layer_slots"] >= row["last_layer_written"] for row in rows)
    assert all(9 < row["last_layer_written"] < row["prompt"] // 4 + 9 for row in rows)
    # (an offloaded layer's buffers hold its tail: the last prompt block and the new tokens)
    result = json.loads(out.read_text())
    assert result["rows"] == rows
    assert [row["prompt"] for row in result["more_requests"]] == [150, 333]
    assert all(row["ms"] > 0 and row["host_rss"] > 0 for row in result["more_requests"])


def test_gpu_decode_static_variants(gpu_decode, tmp_path, monkeypatch):
    """The static_decode variants (resident and offload) decode the same tokens, and offload's is compared
    with its static resident counterpart. What is done is saved as it is done (a run cut short keeps it)."""
    out = tmp_path / "decode.json"
    saved = []
    save_partial = gpu_decode.save_partial
    monkeypatch.setattr(gpu_decode, "save_partial", lambda args, device, progress: (
        saved.append(json.loads(json.dumps(progress, default=str))), save_partial(args, device, progress)))
    gpu_decode.main(["--tiny", "--length", "600", "--new-tokens", "6", "--active-tokens", "64", "--repeats", "1",
                     "--variants", "sliminfer_reselect_static,sliminfer_offload_static", "--out", str(out)])
    rows = {row["variant"]: row for row in json.loads(out.read_text())["rows"]}
    resident, offload = rows["sliminfer_reselect_static"], rows["sliminfer_offload_static"]
    assert resident["options"]["static_decode"] and offload["options"]["static_decode"] and offload["options"]["offload"]
    assert offload["tokens"] == resident["tokens"]
    assert len(offload["step_vs_resident_by_round"]) == 1 and offload["offload"]["h2d_bytes_per_step"] > 0
    assert offload["gpu_kv_share"] < resident["kv_share"]
    assert [sorted(p["compiled"]) for p in saved[:2]] == [["sliminfer_reselect_static"],
                                                           ["sliminfer_offload_static", "sliminfer_reselect_static"]]
    assert saved[-1]["rounds_done"] == 1 and saved[-1]["raw"]["sliminfer_offload_static"]["tokens"] == offload["tokens"]
    assert "partial" not in json.loads(out.read_text())  # the finished run overwrote the partial file


def test_long_quality_summary_counts_retention_over_cells_the_full_model_solves(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "benchmarks"))
    import gpu_long_quality

    def row(task, variant, score, survived=None):
        return {"task": task, "length": 4096, "variant": variant, "score": score, "seconds": 1.0, "survived": survived}
    rows = [row("passkey", "full", 1.0), row("passkey", "full", 1.0),
            row("passkey", "default", 1.0, [True, True]), row("passkey", "default", 0.0, [True, False]),
            row("qa", "full", 0.0), row("qa", "full", 1.0), row("qa", "default", 1.0), row("qa", "default", 1.0)]
    text = gpu_long_quality.summarize(rows)
    # all cells: default 75% vs full 75% -> 100%; cells where full >= 80%: passkey only, 50% of 100%
    assert "| 4096 | default | 2 (2) | 75.0% | 100.0% | 50.0% (1 fam.) | 50.0% | 50.0% |" in text
    assert "| passkey | 4096 | default | 2 | 50% [9, 91] | 50% | 1/2 | 1.00 |" in text


def test_long_quality_batches_only_equal_lengths_and_cuts_answers_at_their_own_eos(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "benchmarks"))
    import gpu_long_quality
    from types import SimpleNamespace

    def sample(n):
        return SimpleNamespace(input_ids=torch.zeros(1, n, dtype=torch.long))
    samples = [(0, sample(100)), (1, sample(98)), (2, sample(100)), (3, sample(100))]
    groups = gpu_long_quality.batches(samples, batch_tokens=200)
    assert [[i for i, _s in g] for g in groups] == [[1], [0, 2], [3]]

    class Tok:
        def decode(self, ids, skip_special_tokens):
            return " ".join(map(str, ids))
    assert gpu_long_quality.answer_text(Tok(), torch.tensor([5, 6, 2, 7, 2]), [2]) == "5 6"


def test_long_quality_fidelity_rows_compare_each_pruned_row_with_its_own_full_row(monkeypatch):
    """A variant that does not prune agrees with the full model exactly; a pruned one yields one row per
    prompt (batched) with the fidelity numbers in range; the summary table reads them."""
    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "benchmarks"))
    import gpu_long_quality
    from slimpass.config import SlimConfig
    from tests.conftest import tiny_model

    model = tiny_model(num_hidden_layers=4, max_position_embeddings=1024)
    text = [3 + i * 7 % (model.config.vocab_size - 3) for i in range(1000)]
    pruned = SlimConfig(prune=True, schedule={2: 0.5}, min_prompt_len=64, block_size=16, unit_size=8)
    configs = {"full": None, "default": pruned, "paper": SlimConfig(prune=False), "streaming": "streaming"}
    rows = gpu_long_quality.fidelity_rows(model, text, 256, 3, configs, batch_tokens=512, env={"device": "cpu"})
    assert sorted((r["variant"], r["sample"]) for r in rows) == [(v, i) for v in ("default", "paper") for i in range(3)]
    assert {r["batch"] for r in rows} == {2, 1}  # 512 tokens a batch: two prompts, then one
    same = [r for r in rows if r["variant"] == "paper"]
    assert all(r["top1"] == 1.0 and r["exact"] == 1.0 and r["prefix"] == 32 and r["kl"] < 1e-6 for r in same)
    assert all(0 <= r["prefix"] <= 32 and r["kl"] >= 0 for r in rows)
    table = gpu_long_quality.summarize(rows)
    assert "| 256 | paper | 3 | 100% [44, 100] | 0.0000 | 100% | 32.0 |" in table
