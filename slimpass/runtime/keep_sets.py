"""What pruning kept on the last call, per model: `slimpass.last_keep_sets` and the heat map picture.

The pruned prefill graph returns, per stage, the original positions of the kept tokens; the
backend records them here (still on the device: nothing syncs until you ask). State lives on the
model object (or on a private object when the backend cannot see the model), never module-global.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import torch

log = logging.getLogger(__name__)


@dataclasses.dataclass
class KeepSet:
    """The input of decoder layer `layer` held these original prompt positions ([B, K], sorted per row)."""

    layer: int
    positions: torch.Tensor

    @property
    def tokens(self) -> int:
        return int(self.positions.shape[1])

    def __repr__(self) -> str:  # the positions themselves are thousands of numbers: `.positions` has them
        rows, kept = self.positions.shape
        return f"KeepSet(layer={self.layer}, tokens={kept}{f', rows={rows}' if rows != 1 else ''})"

    def blocks(self, block_size: int) -> list[list[int]]:
        """Per batch row, the kept block indices (of the original prompt)."""
        return [sorted({int(p) // block_size for p in row}) for row in self.positions.cpu()]


@dataclasses.dataclass
class SlimState:
    """Per-model runtime state of sliminfer: the keep sets of the last prefill call."""

    last_keep: list[KeepSet] | None = None
    last_graph: str | None = None
    dumps: dict[str, tuple[str, int, int]] = dataclasses.field(default_factory=dict)
    warned: set[str] = dataclasses.field(default_factory=set)
    """Warnings given once per model (their keys)."""
    graph_configs: dict[str, Any] = dataclasses.field(default_factory=dict)
    """The `SlimConfig` each graph was compiled with (resolved once, by the backend), by graph id: what the
    runtime reads for a call that graph ran."""
    call_started: float | None = None
    """When the current `slimpass.compile`d call began (perf_counter): a graph compiled in it was traced since."""

    def record_kept(self, graph_id: str, layers: list[int], positions: list[torch.Tensor]) -> None:
        self.last_keep = [KeepSet(layer, pos) for layer, pos in zip(layers, positions)]
        self.last_graph = graph_id
        if graph_id in self.dumps:
            folder, block_size, depth = self.dumps[graph_id]
            try:
                plot_keep_sets(self.last_keep, os.path.join(folder, "keep_sets.png"), block_size, depth=depth)
            except ImportError:
                pass  # matplotlib is an optional extra

    def record_dense(self, graph_id: str) -> None:
        """The last prefill ran the unpruned graph (a runtime guard failed: padding, short prompt)."""
        self.last_keep = []
        self.last_graph = graph_id

    def configure_dump(self, graph_id: str, folder: str | None, block_size: int, depth: int) -> None:
        if folder:
            self.dumps[graph_id] = (folder, block_size, depth)


def unwrap(model: Any) -> Any:
    """The module under `torch.compile`'s wrapper (`OptimizedModule._orig_mod`): where the backend
    keeps the graph records and runtime state."""
    while isinstance(model, torch.nn.Module) and isinstance(getattr(model, "_orig_mod", None), torch.nn.Module):
        model = model._orig_mod
    return model


def state_of(model: Any) -> SlimState:
    """The model's `SlimState` (created on first use); a fresh private one when there is no model."""
    model = unwrap(model)
    if model is None:
        return SlimState()
    state = model.__dict__.get("_slimpass_state")
    if state is None:
        state = SlimState()
        try:
            model.__dict__["_slimpass_state"] = state
        except (AttributeError, TypeError):
            pass
    return state


def last_keep_sets(model: Any) -> list[KeepSet] | None:
    """Per pruning stage of the model's last prefill call, the kept original positions.

    None: no prefill with pruning compiled yet; []: the last call ran dense (short prompt, padded
    batch, or pruning declined). Example::

        model = slimpass.compile(model, options={"prune": True})
        model.generate(ids, max_new_tokens=32)
        for keep in slimpass.last_keep_sets(model):
            print(keep.layer, keep.tokens, keep.blocks(16)[0])
    """
    model = unwrap(model)
    state = model.__dict__.get("_slimpass_state") if hasattr(model, "__dict__") else None
    return None if state is None else state.last_keep


def keep_matrix(keep_sets: list[KeepSet], prompt_len: int, depth: int, block_size: int, row: int = 0) -> torch.Tensor:
    """[depth, blocks] float: the fraction of each block's tokens that reach each layer (batch row `row`)."""
    blocks = -(-prompt_len // block_size)
    sizes = torch.full((blocks,), float(block_size))
    sizes[-1] = prompt_len - (blocks - 1) * block_size
    matrix = torch.ones(depth, blocks)
    by_layer = {k.layer: k for k in keep_sets}
    current = torch.ones(blocks)
    for layer in range(depth):
        if layer in by_layer:
            counts = torch.bincount(by_layer[layer].positions[row].cpu() // block_size, minlength=blocks).float()
            current = counts[:blocks] / sizes
        matrix[layer] = current
    return matrix


def plot_keep_sets(keep_sets: list[KeepSet], path: str, block_size: int, prompt_len: int | None = None,
                   depth: int | None = None) -> str:
    """Write a blocks x layers heat map (PNG) of what reached each layer; needs matplotlib (`.[plot]`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not keep_sets:
        raise ValueError("plot_keep_sets: no keep sets (the last call was not pruned)")
    last = keep_sets[-1].positions[0]
    prompt_len = prompt_len or int(last.max()) + 1
    depth = depth or keep_sets[-1].layer + 1
    matrix = keep_matrix(keep_sets, prompt_len, depth, block_size)
    fig, ax = plt.subplots(figsize=(min(12, 2 + matrix.shape[1] * 0.08), 1.5 + depth * 0.12))
    ax.imshow(matrix.numpy(), aspect="auto", cmap="Greens", vmin=0, vmax=1, interpolation="nearest")
    ax.set_xlabel(f"prompt block ({block_size} tokens)")
    ax.set_ylabel("decoder layer")
    ax.set_title("tokens reaching each layer (" + ", ".join(f"L{k.layer}: {k.tokens}" for k in keep_sets) + ")",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
