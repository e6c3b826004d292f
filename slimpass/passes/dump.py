"""Graph dumps for debugging: each graph before/after each pass, a summary, a layer skeleton picture.

Enabled by ``options={"dump_dir": ...}`` or ``SLIMPASS_DUMP=dir``. Per compiled graph, a folder
``<dump_dir>/<graph id>/`` holds ``NN_<pass>.before.py`` / ``NN_<pass>.after.py`` (readable Python,
one line per node, with its shape and module path), ``summary.md`` and ``skeleton.dot`` (+ ``.svg``
where Graphviz' ``dot`` is installed).
"""

from __future__ import annotations

import logging
import os
import shutil
from typing import Any

import networkx as nx
import torch.fx

from slimpass.passes.graph_utils import module_path, shape_str

log = logging.getLogger(__name__)


def _target(node: torch.fx.Node) -> str:
    if node.op == "call_method":
        return f"{node.args[0]}.{node.target}"
    try:
        return torch.fx.node._get_qualified_name(node.target)
    except Exception:  # noqa: BLE001 - fall back to repr for unnamed callables
        return repr(node.target)


def _call_args(node: torch.fx.Node) -> str:
    args = node.args[1:] if node.op == "call_method" else node.args
    parts = [str(torch.fx.node.map_arg(a, lambda n: n.name)) for a in args]
    parts += [f"{k}={torch.fx.node.map_arg(v, lambda n: n.name)}" for k, v in node.kwargs.items()]
    return ", ".join(parts)


def render_graph(gm: torch.fx.GraphModule) -> str:
    """The graph as readable Python: `name = op(args)  # shape  module.path  [slimpass role]`."""
    lines, inputs = [], []
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            inputs.append(f"    {node.name},  # {shape_str(node)}")
            continue
        if node.op == "output":
            lines.append(f"    return {torch.fx.node.map_arg(node.args[0], lambda n: n.name)}")
            continue
        if node.op == "get_attr":
            code = f"{node.name} = self.{node.target}"
        else:
            code = f"{node.name} = {_target(node)}({_call_args(node)})"
        notes = [shape_str(node), module_path(node)]
        if "slimpass" in node.meta:
            notes.append(f"[slimpass {node.meta['slimpass']}]")
        lines.append(f"    {code}  # {'  '.join(n for n in notes if n)}")
    return "def forward(\n    self,\n" + "\n".join(inputs) + "\n):\n" + "\n".join(lines) + "\n"


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

    @property
    def name(self) -> str | None:
        """The folder's name: the graph id, or graph id + ".N" when that folder was taken."""
        return os.path.basename(self.folder) if self.folder else None

    @property
    def enabled(self) -> bool:
        return self.folder is not None

    def write_graph(self, step: int, name: str, gm: torch.fx.GraphModule) -> None:
        if self.folder:
            with open(os.path.join(self.folder, f"{step:02d}_{name}.py"), "w") as fh:
                fh.write(render_graph(gm))

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
