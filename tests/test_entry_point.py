"""backend="sliminfer" through the installed ``torch_dynamo_backends`` entry point, with or without ``import slimpass``.

The user-facing promise: after ``pip install slimpass``, ``torch.compile(model, backend="sliminfer")``
works in a program that never imports slimpass. Dynamo loads the backend lazily, so each case runs in
a fresh interpreter (in this process slimpass is already imported by the test fixtures).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest
import torch
from torch._dynamo.backends import registry

import slimpass

REPO = pathlib.Path(__file__).resolve().parents[1]

# Run in a child interpreter; prints one JSON line of facts for the parent to check.
# It imports slimpass only when IMPORT_FIRST is set; otherwise only Dynamo's lookup may import it.
_CHILD = textwrap.dedent(
    """
    import json, logging, sys
    import torch, transformers

    IMPORT_FIRST = {import_first}
    if IMPORT_FIRST:
        import slimpass  # noqa: F401

    seen = []
    class Keep(logging.Handler):
        def emit(self, record):
            seen.append((record.name, record.levelname, record.getMessage()))
    logging.getLogger("slimpass").addHandler(Keep())
    logging.getLogger("slimpass").setLevel(logging.INFO)

    config = transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
    )
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 128, (1, 24))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        want = model(ids, attention_mask=mask).logits

    from torch._dynamo.backends import registry
    facts = {{"listed": "sliminfer" in torch._dynamo.list_backends()}}
    facts["imported_before_compile"] = "slimpass" in sys.modules
    # read now: Dynamo's register_backend replaces the EntryPoint by None once it is loaded
    facts["entry_point"] = getattr(registry._BACKENDS.get("sliminfer"), "value", None)
    compiled = torch.compile(model, backend="sliminfer", options={{"compiler": "eager"}})
    with torch.no_grad():
        got = compiled(ids, attention_mask=mask).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)

    slimpass = sys.modules["slimpass"]
    facts["backend_is_slimpass"] = registry._COMPILER_FNS["sliminfer"] is slimpass.sliminfer
    facts["slimpass_file"] = slimpass.__file__
    facts["records"] = [
        {{"kind": r.kind, "replaced": [p.replaced for p in r.results], "calls": r.calls}}
        for r in slimpass.compiled_graphs(model)
    ]
    facts["logs"] = seen
    print("FACTS " + json.dumps(facts))
    """
)


def _run_child(import_first: bool, cwd: pathlib.Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "SLIMPASS_DUMP")}
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD.format(import_first=import_first)],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, f"child failed:\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-4000:]}"
    (line,) = [ln for ln in proc.stdout.splitlines() if ln.startswith("FACTS ")]
    return json.loads(line[len("FACTS "):])


@pytest.fixture(scope="module")
def installed():
    """The entry point exists only when slimpass is pip-installed (editable or not)."""
    try:
        dist = importlib.metadata.distribution("slimpass")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("slimpass is not pip-installed, so there is no entry point (pip install -e .)")
    names = [ep.name for ep in dist.entry_points if ep.group == "torch_dynamo_backends"]
    assert names == ["sliminfer"], f"pyproject's torch_dynamo_backends entry point is missing: {names}"


@pytest.mark.parametrize("import_first", [False, True], ids=["never-imported", "imported-first"])
def test_backend_by_name_in_fresh_interpreter(installed, import_first, tmp_path):
    """The user program never imports slimpass (or imports it first): same backend, one registration, exact."""
    # cwd outside the repository: slimpass must come from the installed distribution, not from ''
    facts = _run_child(import_first, tmp_path)
    assert facts["listed"]
    assert facts["imported_before_compile"] is import_first  # listing backends does not import slimpass
    assert facts["entry_point"] == "slimpass.backend:sliminfer"
    assert facts["backend_is_slimpass"]
    assert pathlib.Path(facts["slimpass_file"]).resolve().is_relative_to(REPO)
    # the backend ran: one prefill graph, both attention calls rewritten (logits of every position: no
    # row selection for sink_selection to move), the rewritten graph taken
    assert facts["records"] == [{"kind": "prefill", "replaced": [0, 2, 0, 0, 0, 0], "calls": {"rewritten": 1, "fallback": 0}}]
    infos = [msg for name, level, msg in facts["logs"] if level == "INFO" and name == "slimpass.backend"]
    assert len(infos) == 1 and "(prefill)" in infos[0], facts["logs"]
    assert not [entry for entry in facts["logs"] if entry[1] == "WARNING"], facts["logs"]


def test_listed_and_resolves_to_slimpass_after_import():
    assert "sliminfer" in torch._dynamo.list_backends()
    assert registry.lookup_backend("sliminfer") is slimpass.sliminfer


def _without_sliminfer(monkeypatch, table: str) -> None:
    """Swap Dynamo's backend table for a copy without "sliminfer" (restored after the test)."""
    monkeypatch.setattr(registry, table, {k: v for k, v in getattr(registry, table).items() if k != "sliminfer"})


def test_source_tree_registration_happens_once(monkeypatch):
    """Without an entry point (a source checkout on sys.path) import registers the backend, and only once."""
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group=None: importlib.metadata.EntryPoints(()))
    _without_sliminfer(monkeypatch, "_COMPILER_FNS")
    _without_sliminfer(monkeypatch, "_BACKENDS")
    slimpass._register_without_entry_point()
    slimpass._register_without_entry_point()  # a second import (importlib.reload) must not raise "duplicate name"
    assert registry._COMPILER_FNS["sliminfer"] is slimpass.sliminfer



def test_introspection_reads_through_the_torch_compile_wrapper():
    """`compiled_graphs` / `last_keep_sets` given what torch.compile returned (an OptimizedModule)
    answer for the module under it; a KeepSet's repr is one short line, not its positions."""
    from tests.conftest import tiny_model

    model = tiny_model("llama")
    options = {"compiler": "eager", "prune": True, "schedule": {1: 0.5}, "block_size": 8, "min_prompt_len": 64}
    wrapper = torch.compile(model, backend="sliminfer", dynamic=True, options=options)
    assert slimpass.compiled_graphs(wrapper) == [] and slimpass.last_keep_sets(wrapper) is None
    ids = torch.randint(0, 100, (1, 200), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        wrapper(ids, logits_to_keep=1)
    assert [r.graph_id for r in slimpass.compiled_graphs(wrapper)] == [r.graph_id for r in slimpass.compiled_graphs(model)]
    assert slimpass.compiled_graphs(wrapper) and slimpass.last_keep_sets(wrapper) == slimpass.last_keep_sets(model)
    (keep,) = slimpass.last_keep_sets(wrapper)
    assert repr(keep) == f"KeepSet(layer=1, tokens={keep.tokens})" and 0 < keep.tokens < 200
