"""Graph dumps (``options={"dump_dir": ...}`` / ``SLIMPASS_DUMP``) and the INFO summary of the "slimpass" logger.

Per compiled graph, ``<dump_dir>/<graph id>/`` holds ``NN_<pass>.before.py`` / ``NN_<pass>.after.py``,
``summary.md`` and ``skeleton.dot`` (see slimpass/passes/dump.py).
"""

from __future__ import annotations

import ast
import logging
import shutil

import pydot
import torch
import transformers

import slimpass

from .conftest import tiny_model, twin

PASSES = ["find_decoder_layers", "rewrite_attention", "insert_pruning", "sink_selection", "reselect_kv",
          "fuse_projections"]
PASS_FILES = ["00_input.py", *(f"{i:02d}_{name}.diff" for i, name in enumerate(PASSES, start=1)), "final.py"]


def _diff(folder, step: int, name: str) -> tuple[list[str], list[str]]:
    """The removed and the added lines of a pass's diff file."""
    lines = (folder / f"{step:02d}_{name}.diff").read_text().splitlines()
    return ([ln[1:] for ln in lines if ln.startswith("-") and not ln.startswith("---")],
            [ln[1:] for ln in lines if ln.startswith("+") and not ln.startswith("+++")])


def _expected_files(with_skeleton: bool = True) -> list[str]:
    """The files of one graph's dump folder; skeleton.svg only where Graphviz' dot is installed."""
    skeleton = ["skeleton.dot"] + (["skeleton.svg"] if shutil.which("dot") else [])
    return sorted(PASS_FILES + ["summary.md"] + (skeleton if with_skeleton else []))


def _pass_rows(summary: str) -> dict[str, dict[str, str]]:
    """The summary's pass table as {pass: {column: cell}}."""
    lines = [ln for ln in summary.splitlines() if ln.startswith("| ")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = {}
    for line in lines[1:]:
        cells = dict(zip(header, (c.strip() for c in line.strip("|").split("|"))))
        rows[cells["pass"]] = cells
    return rows


def _generate(model, ids, mask):
    return model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False)


def test_dump_dir_option_writes_each_graph(tmp_path):
    """A masked prefill (rewritten) and the decode graph of generate (a decode mask, where this transformers
    builds one, proven empty and dropped under a guard): files, readable graphs, skeleton."""
    model = tiny_model("llama", "sdpa")
    oracle = twin(model)
    slimpass.compile(model, options={"compiler": "eager", "dump_dir": tmp_path})  # a Path is accepted
    ids = torch.randint(3, 128, (1, 40))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        torch.testing.assert_close(model(ids, attention_mask=mask).logits, oracle(ids, attention_mask=mask).logits,
                                   atol=1e-4, rtol=0)
        assert torch.equal(_generate(model, ids, mask), _generate(oracle, ids, mask))
    records = slimpass.compiled_graphs(model)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(r.graph_id for r in records)
    for record in records:
        assert sorted(p.name for p in (tmp_path / record.graph_id).iterdir()) == _expected_files(), record.graph_id

    prefill = tmp_path / records[0].graph_id
    assert records[0].kind == "prefill"
    for name in ("00_input.py", "final.py"):
        ast.parse((prefill / name).read_text())  # the graphs are Python, one statement per node
    before, after = (prefill / "00_input.py").read_text(), (prefill / "final.py").read_text()
    # shapes (symbolic prompt length) and module paths on every node line; node arguments are names, not strings
    removed, added = _diff(prefill, 2, "rewrite_attention")
    attention_before = [ln for ln in removed if "'role': 'attention'" in ln]
    attention_after = [ln for ln in added if "'rewritten': True" in ln]
    assert "'s" not in before and "view((1, s" in before
    assert len(attention_before) == 2 and len(attention_after) == 2
    for index, (old, new) in enumerate(zip(attention_before, attention_after)):
        assert f"model.layers.{index}.self_attn" in old and f"model.layers.{index}.self_attn" in new
        assert "attn_mask=attention_mask" in old and "is_causal=True" in new and "enable_gqa=True" in new
        assert "float32[1, 4, s" in old and "float32[1, 4, s" in new
    assert "model.layers.1.mlp" in before and "model.embed_tokens" in before
    assert ".expand(" in before and ".expand(" not in after  # repeat_kv copies and the mask are gone

    summary = (prefill / "summary.md").read_text()
    assert "- graph kind: prefill" in summary
    assert "layer 0 `model.layers.0`" in summary and "layer 1 `model.layers.1`" in summary
    rows = _pass_rows(summary)
    assert (rows["find_decoder_layers"]["matched"], rows["find_decoder_layers"]["replaced"]) == ("2", "0")
    assert (rows["rewrite_attention"]["matched"], rows["rewrite_attention"]["replaced"]) == ("2", "2")
    # a padded batch fails this guard and runs the unrewritten graph
    assert "(attention_mask) is all ones" in summary.split("## Runtime guards")[1]

    decode = next(r for r in records if r.kind == "decode")
    summary = (tmp_path / decode.graph_id / "summary.md").read_text()
    assert "- graph kind: decode" in summary
    rows = _pass_rows(summary)
    assert not rows["rewrite_attention"]["declined"]
    decode_before = (tmp_path / decode.graph_id / "00_input.py").read_text()
    removed, added = _diff(tmp_path / decode.graph_id, 2, "rewrite_attention")
    if "attn_mask=attention_mask" in decode_before:
        assert rows["rewrite_attention"]["replaced"] == "2"
        assert any("'rewritten': True" in ln and "attn_mask=None" in ln for ln in added)
    else:  # no mask and no KV copies in this transformers' decode graph: nothing to rewrite
        assert rows["rewrite_attention"]["replaced"] == "0"
        assert (tmp_path / decode.graph_id / "02_rewrite_attention.diff").read_text() == "# rewrite_attention: unchanged\n"

    (dot,) = pydot.graph_from_dot_data((prefill / "skeleton.dot").read_text())
    nodes = {n.get_name(): n.get("label") for n in dot.get_nodes()}
    assert {"input", "rope", "layer0", "layer1", "output"} <= set(nodes)
    assert "model.layers.0" in nodes["layer0"] and "causal SDPA (rewritten)" in nodes["layer1"]
    edges = {(e.get_source(), e.get_destination()) for e in dot.get_edges()}
    assert {("input", "layer0"), ("layer0", "layer1"), ("layer1", "output")} <= edges


def test_dump_env_variable(monkeypatch, tmp_path):
    """SLIMPASS_DUMP=dir alone turns dumps on, also for torch.compile(backend="sliminfer") by name."""
    monkeypatch.setenv("SLIMPASS_DUMP", str(tmp_path))
    model = tiny_model("qwen2", "eager")
    compiled = torch.compile(model, backend="sliminfer", options={"compiler": "eager"})
    with torch.no_grad():
        compiled(torch.randint(0, 128, (1, 20)))
    (record,) = slimpass.compiled_graphs(model)
    assert [p.name for p in tmp_path.iterdir()] == [record.graph_id]
    folder = tmp_path / record.graph_id
    assert sorted(p.name for p in folder.iterdir()) == _expected_files()
    assert f"dump_dir='{tmp_path}'" in (folder / "summary.md").read_text()
    # eager attention: the softmax(q k^T * s + mask) v chain becomes one causal SDPA per layer
    removed, added = _diff(folder, 2, "rewrite_attention")
    assert any("softmax" in ln for ln in removed) and not any("softmax" in ln for ln in added)
    assert "softmax" in (folder / "00_input.py").read_text() and "softmax" not in (folder / "final.py").read_text()
    (dot,) = pydot.graph_from_dot_data((folder / "skeleton.dot").read_text())
    assert {"layer0", "layer1"} <= {n.get_name() for n in dot.get_nodes()}


def test_dump_without_option_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.delenv("SLIMPASS_DUMP", raising=False)
    monkeypatch.chdir(tmp_path)
    model = tiny_model()
    slimpass.compile(model, options={"compiler": "eager"})
    with torch.no_grad():
        model(torch.randint(0, 128, (1, 20)))
    assert slimpass.compiled_graphs(model) and not list(tmp_path.iterdir())


def test_dump_of_unrecognised_graph_says_why(tmp_path):
    """A GPT-2 graph: summary.md names what discovery did not find; no skeleton (there are no layers)."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=256)
    model = transformers.GPT2LMHeadModel(config).eval()
    compiled = torch.compile(model, backend="sliminfer", options={"compiler": "eager", "dump_dir": str(tmp_path)})
    with torch.no_grad():
        compiled(torch.randint(0, 128, (1, 30)))
    (record,) = slimpass.compiled_graphs(model)
    folder = tmp_path / record.graph_id
    assert sorted(p.name for p in folder.iterdir()) == _expected_files(with_skeleton=False)
    summary = (folder / "summary.md").read_text()
    assert "- graph kind: unrecognised" in summary
    rows = _pass_rows(summary)
    assert "rotary-embedded" in rows["find_decoder_layers"]["declined"], summary
    assert rows["find_decoder_layers"]["declined"] == "; ".join(record.results[0].declined)
    assert rows["rewrite_attention"]["declined"] == "no layer map (discovery declined)"


def test_info_log_is_one_line_per_graph(caplog):
    """INFO: one short line per compiled graph naming its kind and what each pass did; per-pass detail is DEBUG."""
    model = tiny_model()
    slimpass.compile(model, options={"compiler": "eager"})
    ids = torch.randint(3, 128, (1, 30))
    with caplog.at_level(logging.DEBUG, logger="slimpass"), torch.no_grad():
        model(ids, attention_mask=torch.ones_like(ids))
        _generate(model, ids, torch.ones_like(ids))
    records = slimpass.compiled_graphs(model)
    ours = [r for r in caplog.records if r.name.startswith("slimpass")]
    infos = [r for r in ours if r.levelno == logging.INFO]
    assert [r.name for r in infos] == ["slimpass.backend"] * len(records)
    assert not [r for r in ours if r.levelno >= logging.WARNING]
    for log_record, record in zip(infos, records):
        message = log_record.getMessage()
        assert "\n" not in message
        assert message.startswith(f"sliminfer: {record.graph_id} ({record.kind}) compiled in ")
        assert "find_decoder_layers: matched 2" in message and "rewrite_attention: matched" in message
    assert "rewrite_attention: matched 2, inserted 0, replaced 2" in infos[0].getMessage()
    debug = [r for r in ours if r.levelno == logging.DEBUG and r.name == "slimpass.passes.manager"]
    assert len(debug) == 6 * len(records)  # one line per pass per graph


def test_empty_env_variable_is_off(monkeypatch):
    monkeypatch.setenv("SLIMPASS_DUMP", "")
    assert slimpass.config.resolve(None, None).dump_dir is None


def test_later_graph_does_not_overwrite_earlier_dump(tmp_path):
    """Regression: compile ids restart after torch._dynamo.reset(), so a second model's first graph
    (also "graph_0_0") overwrote the first model's dump folder."""
    for seed in (0, 1):
        torch._dynamo.reset()
        model = tiny_model("llama", "sdpa", seed=seed)
        slimpass.compile(model, options={"compiler": "eager", "dump_dir": str(tmp_path)})
        ids = torch.randint(0, 128, (1, 20))
        with torch.no_grad():
            model(ids, attention_mask=torch.ones_like(ids))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["graph_0_0", "graph_0_0.2"]
    for folder in tmp_path.iterdir():
        assert sorted(p.name for p in folder.iterdir()) == _expected_files()


def test_pruned_dump_shows_kept_lengths_and_writes_no_copies(tmp_path):
    """After insert_pruning the pruned layers' shapes are re-propagated: layer 1 holds the kept length (a
    named formula of the prompt length), layer 0 the prompt length; passes that change nothing say so."""
    model = tiny_model(num_hidden_layers=4)
    slimpass.compile(model, options={"compiler": "eager", "prune": True, "min_prompt_len": 64,
                                     "dump_dir": str(tmp_path)})
    with torch.no_grad():
        model(torch.randint(0, 128, (1, 300)), logits_to_keep=1)
    (record,) = slimpass.compiled_graphs(model)
    folder = tmp_path / record.graph_id
    final = (folder / "final.py").read_text()
    legend = dict(ln[2:].split(" = ", 1) for ln in final.splitlines() if ln.startswith("# n"))
    assert legend and all("Min(" in formula or "//" in formula for formula in legend.values())
    lines = final.splitlines()
    layer0 = [ln for ln in lines if "model.layers.0.self_attn.q_proj" in ln]
    layer1 = [ln for ln in lines if "model.layers.1.self_attn.q_proj" in ln]
    assert len(layer0) == len(layer1) == 1
    prompt = layer0[0].split("# float32[1, ")[1].split(",")[0]
    kept = layer1[0].split("# float32[1, ")[1].split(",")[0]
    assert prompt.startswith("s") and kept in legend and prompt in legend[kept]
    removed, added = _diff(folder, 3, "insert_pruning")
    assert any(f"[1, {kept}, 64]" in ln for ln in added) and not any(f"[1, {kept}, 64]" in ln for ln in removed)
    texts = [p.read_text() for p in sorted(folder.glob("*.diff"))]
    assert len(set(texts)) == len(texts)  # no two pass files alike
    assert (folder / "05_reselect_kv.diff").read_text() == "# reselect_kv: unchanged\n"
