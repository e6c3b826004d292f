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

PASS_FILES = [
    "01_find_decoder_layers.before.py", "01_find_decoder_layers.after.py",
    "02_rewrite_attention.before.py", "02_rewrite_attention.after.py",
    "03_insert_pruning.before.py", "03_insert_pruning.after.py",
    "04_sink_selection.before.py", "04_sink_selection.after.py",
    "05_reselect_kv.before.py", "05_reselect_kv.after.py",
    "06_fuse_projections.before.py", "06_fuse_projections.after.py",
]


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
    for name in PASS_FILES:
        ast.parse((prefill / name).read_text())  # the dumps are Python, one statement per node
    before = (prefill / "02_rewrite_attention.before.py").read_text()
    after = (prefill / "02_rewrite_attention.after.py").read_text()
    # shapes (symbolic prompt length) and module paths on every node line
    attention_before = [ln for ln in before.splitlines() if "'role': 'attention'" in ln]
    attention_after = [ln for ln in after.splitlines() if "'rewritten': True" in ln]
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
    decode_before = (tmp_path / decode.graph_id / "01_find_decoder_layers.after.py").read_text()
    decode_after = (tmp_path / decode.graph_id / "02_rewrite_attention.after.py").read_text()
    if "attn_mask = attention_mask" in decode_before or "attn_mask=attention_mask" in decode_before:
        assert rows["rewrite_attention"]["replaced"] == "2"
        assert "'rewritten': True" in decode_after and "attn_mask=None" in decode_after
    else:  # no mask and no KV copies in this transformers' decode graph: nothing to rewrite
        assert rows["rewrite_attention"]["replaced"] == "0" and decode_after == decode_before

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
    assert "softmax" in (folder / "02_rewrite_attention.before.py").read_text()
    assert "softmax" not in (folder / "02_rewrite_attention.after.py").read_text()
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
