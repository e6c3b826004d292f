"""Graph dumps for debugging: the graph as traced, what each pass changed, the graph lowered, a summary,
a layer skeleton picture.

Enabled by ``options={"dump_dir": ...}`` or ``SLIMPASS_DUMP=dir``. Per compiled graph, a folder
``<dump_dir>/<graph id>/`` holds ``00_input.py`` (the graph Dynamo traced, as readable Python: one line
per node with its shape and module path), ``NN_<pass>.diff`` (a unified diff of what pass NN changed;
"unchanged" when it changed nothing), ``final.py`` (the graph handed to the inner compiler),
``summary.md`` and ``skeleton.dot`` (+ ``.svg`` where Graphviz' ``dot`` is installed). Shapes are
propagated again after every pass (fake tensors, guards suppressed), so a pruned layer shows its kept
length, not the prompt's; where a graph cannot be re-run that way the traced shapes are shown and the
debug log says why.
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import os
import shutil
from typing import Any

import networkx as nx
import torch.fx
from torch._subclasses.fake_tensor import FakeTensor

from slimpass.passes.graph_utils import fake, module_path, shape_str

log = logging.getLogger(__name__)


def _target(node: torch.fx.Node) -> str:
    if node.op == "call_method":
        return f"{node.args[0]}.{node.target}"
    try:
        return torch.fx.node._get_qualified_name(node.target)
    except Exception:  # noqa: BLE001 - fall back to repr for unnamed callables
        return repr(node.target)


class _Ref:
    """A node in an argument, printed as its name (a bare identifier, not a quoted string)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


def _arg(value: Any) -> str:
    return repr(torch.fx.node.map_arg(value, lambda n: _Ref(n.name)))


def _call_args(node: torch.fx.Node) -> str:
    args = node.args[1:] if node.op == "call_method" else node.args
    return ", ".join([_arg(a) for a in args] + [f"{k}={_arg(v)}" for k, v in node.kwargs.items()])


def current_values(gm: torch.fx.GraphModule) -> dict[torch.fx.Node, Any]:
    """Every node's fake value in `gm` as it is now: the graph re-run on its placeholders' fake values, in
    their fake mode, guards suppressed (a dump must not change what is compiled). Empty where it cannot be."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    inputs = [fake(n) for n in placeholders]
    modes = {id(v.fake_mode): v.fake_mode for v in inputs if isinstance(v, FakeTensor)}
    mode = next(iter(modes.values()), None)
    if len(modes) != 1 or any(v is None for v in inputs):
        log.debug("dump: no fake inputs to re-run shapes on; the traced shapes are shown")
        return {}
    values: dict[torch.fx.Node, Any] = {}

    class Recorder(torch.fx.Interpreter):
        def run_node(self, node: torch.fx.Node) -> Any:
            values[node] = result = super().run_node(node)
            return result

    env = mode.shape_env
    guards = (env.suppress_guards(), env.ignore_fresh_unbacked_symbols()) if env is not None else ()
    try:
        with contextlib.ExitStack() as stack:
            for manager in (mode, *guards):
                stack.enter_context(manager)
            Recorder(gm).run(*inputs)
    except Exception as err:  # noqa: BLE001 - a dump falls back to the traced shapes, never fails a compile
        log.debug("dump: shapes not re-propagated (%s: %s); the traced shapes are shown", type(err).__name__, err)
        return {}
    return values


class _Sizes:
    """Short names (n1, n2, ...) for size expressions too long to repeat on every line (a pruned layer's kept
    length is a formula of the prompt length); `legend` lists them."""

    def __init__(self) -> None:
        self.names: dict[str, str] = {}

    def __call__(self, size: Any) -> str:
        text = str(size)
        if len(text) <= 16:
            return text
        return self.names.setdefault(text, f"n{len(self.names) + 1}")

    def legend(self) -> str:
        return "".join(f"# {name} = {text}\n" for text, name in self.names.items())


def _shape(node: torch.fx.Node, values: dict[torch.fx.Node, Any], sizes: _Sizes) -> str:
    return shape_str(node, values.get(node), sizes)


def render_graph(gm: torch.fx.GraphModule, values: dict[torch.fx.Node, Any] | None = None) -> str:
    """The graph as readable Python: `name = op(args)  # shape  module.path  [slimpass role]`; shapes from
    `values` (see `current_values`) where given, else as traced; long size expressions named in a legend."""
    values, sizes = values or {}, _Sizes()
    lines, inputs = [], []
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            inputs.append(f"    {node.name},  # {_shape(node, values, sizes)}")
            continue
        if node.op == "output":
            lines.append(f"    return {_arg(node.args[0])}")
            continue
        if node.op == "get_attr":
            code = f"{node.name} = self.{node.target}"
        else:
            code = f"{node.name} = {_target(node)}({_call_args(node)})"
        notes = [_shape(node, values, sizes), module_path(node)]
        if "slimpass" in node.meta:
            notes.append(f"[slimpass {node.meta['slimpass']}]")
        lines.append(f"    {code}  # {'  '.join(n for n in notes if n)}")
    return sizes.legend() + "def forward(\n    self,\n" + "\n".join(inputs) + "\n):\n" + "\n".join(lines) + "\n"


def skeleton(layer_map: Any) -> nx.DiGraph:
    """The layer skeleton: embedding -> layers -> head, with the shared cos/sin and mask producers."""
    view = nx.DiGraph()
    view.add_node("input", label="input (residual stream)", shape="box")
    view.add_node("rope", label=f"cos/sin\\n{layer_map.cos.name}, {layer_map.sin.name}", shape="ellipse")
    prev = "input"
    for index, mask in enumerate(layer_map.masks):
        view.add_node(f"mask{index}", label=f"mask\\n{mask.name} {shape_str(mask)}", shape="ellipse")
    for layer in layer_map.layers:
        name = f"layer{layer.index}"
        attn = layer.attention.meta.get("slimpass", {}).get("rewritten") and "causal SDPA (rewritten)" or layer.kind
        label = f"{layer.path}\\nattention: {attn}\\nKV writes: {len(layer.kv_writes)}"
        view.add_node(name, label=label + (", GQA copy" if layer.gqa_repeat else ""), shape="box")
        view.add_edge(prev, name)
        view.add_edge("rope", name, style="dashed")
        if layer.mask is not None:
            view.add_edge(f"mask{layer_map.masks.index(layer.mask)}", name, style="dashed")
        prev = name
    view.add_node("output", label="final norm / lm_head", shape="box")
    view.add_edge(prev, "output")
    return view


def _fresh_folder(root: str, name: str) -> str:
    """A new folder `root/name` (or `name.2`, `name.3`, ...): Dynamo's compile ids restart after
    `torch._dynamo.reset()`, and a later graph must not overwrite an earlier one's dumps."""
    os.makedirs(root, exist_ok=True)
    folder, n = os.path.join(root, name), 1
    while True:
        try:
            os.mkdir(folder)
            return folder
        except FileExistsError:
            n += 1
            folder = os.path.join(root, f"{name}.{n}")


class GraphDumper:
    """Writes the dumps of one graph; every method is a no-op when no dump folder is set."""

    def __init__(self, root: str | None, graph_id: str) -> None:
        self.folder = _fresh_folder(root, graph_id.replace("/", "_")) if root else None
        self._last = ""  # the rendering after the last pass

    @property
    def name(self) -> str | None:
        """The folder's name: the graph id, or graph id + ".N" when that folder was taken."""
        return os.path.basename(self.folder) if self.folder else None

    @property
    def enabled(self) -> bool:
        return self.folder is not None

    def write_input(self, gm: torch.fx.GraphModule) -> None:
        """00_input.py: the graph before any pass."""
        if self.folder:
            self._last = render_graph(gm)
            self._write("00_input.py", self._last)

    def write_pass(self, step: int, name: str, gm: torch.fx.GraphModule) -> None:
        """NN_<pass>.diff: what the pass changed in the rendered graph (shapes re-propagated)."""
        if not self.folder:
            return
        text = render_graph(gm, current_values(gm))
        diff = difflib.unified_diff(self._last.splitlines(keepends=True), text.splitlines(keepends=True),
                                    f"before {name}", f"after {name}", n=1)
        self._write(f"{step:02d}_{name}.diff", "".join(diff) or f"# {name}: unchanged\n")
        self._last = text

    def write_final(self) -> None:
        """final.py: the graph handed to the inner compiler (the last pass's result)."""
        if self.folder:
            self._write("final.py", self._last)

    def _write(self, name: str, text: str) -> None:
        with open(os.path.join(self.folder, name), "w") as fh:
            fh.write(text)

    def write_summary(self, text: str) -> None:
        if self.folder:
            with open(os.path.join(self.folder, "summary.md"), "w") as fh:
                fh.write(text)

    def write_skeleton(self, layer_map: Any) -> list[str]:
        """Write skeleton.dot (and skeleton.svg where graphviz is installed); return the files written."""
        if not self.folder or layer_map is None:
            return []
        dot = nx.nx_pydot.to_pydot(skeleton(layer_map))
        dot.set_rankdir("TB")
        path = os.path.join(self.folder, "skeleton.dot")
        with open(path, "w") as fh:
            fh.write(dot.to_string())
        written = [path]
        if shutil.which("dot"):
            svg = os.path.join(self.folder, "skeleton.svg")
            dot.write_svg(svg)
            written.append(svg)
        return written
