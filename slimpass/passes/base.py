"""The pass contract: `GraphPass`, what a pass reports (`PassResult`) and what it shares (`PassContext`)."""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch.fx

from slimpass.config import SlimConfig

if TYPE_CHECKING:
    from slimpass.passes.layer_map import LayerMap
    from slimpass.runtime.guards import InputGuard


@dataclasses.dataclass
class PassResult:
    """What one pass did: how many sites it matched, how many nodes it inserted/replaced, why it declined."""

    name: str
    matched: int = 0
    inserted: int = 0
    replaced: int = 0
    declined: list[str] = dataclasses.field(default_factory=list)
    summary: str = ""
    # declines of something the user turned on that does not apply to this model (not a routine skip such as a
    # decode graph or a short prompt): the backend warns once per model and reason
    unmet: list[str] = dataclasses.field(default_factory=list)
    seconds: float | None = None
    """Time the pass took (set by the manager)."""

    @property
    def changed(self) -> bool:
        return bool(self.inserted or self.replaced)

    def line(self) -> str:
        text = f"{self.name}: matched {self.matched}, inserted {self.inserted}, replaced {self.replaced}"
        if self.summary:
            text += f" ({self.summary})"
        if self.declined:
            text += f"; declined: {'; '.join(self.declined)}"
        return text


@dataclasses.dataclass
class PassContext:
    """State shared by the passes of one compiled graph (never module-global)."""

    config: SlimConfig
    example_inputs: list[Any]
    model: Any = None
    graph_id: str = "graph"
    layer_map: LayerMap | None = None
    guards: list[InputGuard] = dataclasses.field(default_factory=list)
    results: list[PassResult] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)
    keep_layers: list[int] = dataclasses.field(default_factory=list)
    """Layers whose kept positions `insert_pruning` appended to the graph outputs, in order."""
    after_lower: list[Callable[[], None]] = dataclasses.field(default_factory=list)
    """Work the backend does once this graph is compiled (what must not change the inputs under AOTAutograd,
    which fakifies them as Dynamo saw them: `fuse_projections` stacks parameters for later graphs)."""
    slim_cache: bool = False
    """Every KV cache this graph's caller decodes with is a `SlimCache` (`slimpass.compile` sees to it), whose
    decode masks fit per-layer pruned caches on every transformers version."""

    @property
    def model_config(self) -> Any:
        return getattr(self.model, "config", None)


class GraphPass:
    """A graph pass: constructed from its slice of config, called on a GraphModule, edits it in place.

    Subclasses set `name` and implement `run(gm, ctx) -> PassResult`. The manager runs dead-code
    elimination, `lint()` and `recompile()` after each pass.
    """

    name: str = "pass"

    def __init__(self, config: SlimConfig) -> None:
        self.config = config

    def run(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        raise NotImplementedError

    def __call__(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        return self.run(gm, ctx)

    def uuid(self) -> str:
        """A hash of this pass's source and config, for compile caches keyed on the pipeline."""
        digest = hashlib.sha256(inspect.getsource(type(self)).encode())
        digest.update(repr(sorted(self.config.as_dict().items(), key=lambda kv: kv[0])).encode())
        return digest.hexdigest()[:16]
