"""The `sliminfer` torch.compile backend: resolve config, run the passes, lower with Inductor.

Registered through the ``torch_dynamo_backends`` entry point, so ``backend="sliminfer"`` works
after ``pip install slimpass`` without importing slimpass.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import logging
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.fx

from slimpass.config import ConfigError, SlimConfig, resolve
from slimpass.passes.base import PassContext, PassResult
from slimpass.passes.dump import GraphDumper
from slimpass.passes.manager import PassManager
from slimpass.progress import Progress, enabled
from slimpass.registry import REGISTRY
from slimpass.runtime.guards import InputGuard, inputs_canonical
from slimpass.runtime.keep_sets import SlimState, state_of

log = logging.getLogger(__name__)


@dataclasses.dataclass
class GraphRecord:
    """What the backend did with one graph; kept per model (see `slimpass.compiled_graphs`)."""

    graph_id: str
    kind: str  # prefill / decode / extend / unrecognised
    layers: int
    results: list[PassResult]
    guards: list[InputGuard]
    compile_seconds: float
    calls: dict = dataclasses.field(default_factory=lambda: {"rewritten": 0, "fallback": 0})


class GuardedGraph:
    """Runs the rewritten graph when its input guards hold, else the unrewritten one."""

    def __init__(self, fast: Callable, fallback: Callable, guards: Sequence[InputGuard], record: GraphRecord,
                 state: SlimState | None = None) -> None:
        self.fast, self.fallback, self.guards, self.record, self.state = fast, fallback, list(guards), record, state

    def __call__(self, *args: Any) -> Any:
        if inputs_canonical(self.guards, args):
            self.record.calls["rewritten"] += 1
            return self.fast(*args)
        self.record.calls["fallback"] += 1
        if self.state is not None:
            self.state.record_dense(self.record.graph_id)
        return self.fallback(*args)


class DenseRecorder:
    """A prefill graph that pruning declined: each call records "nothing pruned" (`last_keep_sets` -> [])."""

    def __init__(self, fn: Callable, state: SlimState, graph_id: str) -> None:
        self.fn, self.state, self.graph_id = fn, state, graph_id

    def __call__(self, *args: Any) -> Any:
        self.state.record_dense(self.graph_id)
        return self.fn(*args)


class KeepRecorder:
    """Strips the kept-position outputs `insert_pruning` appended and records them (`last_keep_sets`)."""

    def __init__(self, fn: Callable, layers: Sequence[int], state: SlimState, graph_id: str) -> None:
        self.fn, self.layers, self.state, self.graph_id = fn, list(layers), state, graph_id

    def __call__(self, *args: Any) -> Any:
        out = self.fn(*args)
        count = len(self.layers)
        self.state.record_kept(self.graph_id, self.layers, list(out[-count:]))
        return type(out)(out[:-count])


def _compiled_module() -> Any:
    """The nn.Module whose forward Dynamo is compiling, when Dynamo exposes it (best effort)."""
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator

        tx = InstructionTranslator.current_tx()
    except (ImportError, AttributeError, AssertionError):
        return None
    local = getattr(tx, "f_locals", None) or {}
    candidate = local.get("self")
    if candidate is None:  # forward wrapped by a decorator: wrapped_func(*args, **kwargs), self is args[0]
        args = local.get("args")
        candidate = args[0] if isinstance(args, tuple) and args else None
    return candidate if isinstance(candidate, torch.nn.Module) else None


def _graph_id() -> str:
    """Dynamo's compile id, as TORCH_LOGS names it ("graph_0_0")."""
    compile_id = torch._guards.CompileContext.current_compile_id()
    return f"graph_{compile_id}".replace("/", "_") if compile_id is not None else f"graph_{time.monotonic_ns()}"


def inner_compiler(name: str, example_inputs: list[Any]) -> str:
    """`SlimConfig.compiler` for one graph: "auto" is Inductor when a tensor input is on an accelerator,
    eager when all are on the CPU."""
    if name != "auto":
        return name
    on_device = any(isinstance(x, torch.Tensor) and x.device.type != "cpu" for x in example_inputs)
    return "inductor" if on_device else "eager"


def lower(gm: torch.fx.GraphModule, example_inputs: list[Any], config: SlimConfig, mode: str | None,
          static_decode: bool = False) -> Callable:
    """Compile the edited graph with the configured inner compiler. `static_decode`: a decoding step on
    fixed-size buffers (`SlimConfig.static_decode`), which Inductor runs as CUDA graphs on a GPU unless
    ``inductor_options`` say otherwise (no size in it changes between steps; elsewhere CUDA graphs would
    record a graph per prompt length)."""
    if inner_compiler(config.compiler, example_inputs) == "eager":
        return gm.forward
    from torch._inductor.compile_fx import compile_fx

    patches = dict(torch._inductor.list_mode_options(mode)) if mode else {}
    if static_decode:
        patches["triton.cudagraphs"] = True
    patches.update(config.inductor_options)
    return compile_fx(gm, example_inputs, config_patches=patches or None)


def _carry_dynamo_metadata(gm: torch.fx.GraphModule, work: torch.fx.GraphModule) -> None:
    """Give the edited copy `work` the metadata Dynamo hands to AOTAutograd with `gm`: its compile id, the
    sources of its parameters and of each placeholder. From them AOTAutograd knows which inputs are static
    (parameters, buffers, ``mark_static_address`` tensors); without them Inductor's CUDA graphs take every
    input for one that moves, copy each into graph memory at every replay, and refuse a graph that writes
    to one (a cache update). Parameters the passes added (fused weights) get a source of their own."""
    sources = {node.name: node._dynamo_source for node in gm.graph.find_nodes(op="placeholder")
               if hasattr(node, "_dynamo_source")}
    placeholders = work.graph.find_nodes(op="placeholder")
    if "dynamo_compile_id" not in gm.meta or any(node.name not in sources for node in placeholders):
        log.debug("sliminfer: graph without Dynamo's metadata; AOTAutograd will not know its static inputs")
        return
    work.meta.update(gm.meta)
    for node in placeholders:
        node._dynamo_source = sources[node.name]
    if hasattr(gm, "_param_name_to_source"):
        from torch._dynamo.source import ConstantSource

        work._param_name_to_source = dict(gm._param_name_to_source)
        for name, _ in itertools.chain(work.named_parameters(remove_duplicate=False),
                                       work.named_buffers(remove_duplicate=False)):
            work._param_name_to_source.setdefault(name, ConstantSource(f"slimpass:{name}"))


def _summary(ctx: PassContext, record: GraphRecord) -> str:
    lines = [f"# slimpass: {ctx.graph_id}", "", f"- graph kind: {record.kind}"]
    if ctx.layer_map is not None:
        lines.append(f"- layers found: {ctx.layer_map.describe()}")
        for layer in ctx.layer_map.layers:
            lines.append(
                f"  - layer {layer.index} `{layer.path}`: in `{layer.input.name}` out `{layer.output.name}`, "
                f"q `{layer.q.name}` k `{layer.k.name}` v `{layer.v.name}`, attention `{layer.attention.name}` "
                f"({layer.kind}), KV writes {[n.name for n in layer.kv_writes]}"
            )
    lines += ["", "## Passes", "", "| # | pass | matched | inserted | replaced | summary | declined |", "|---|---|---|---|---|---|---|"]
    for i, res in enumerate(ctx.results, start=1):
        lines.append(f"| {i} | {res.name} | {res.matched} | {res.inserted} | {res.replaced} | {res.summary} | {'; '.join(res.declined)} |")
    lines += ["", "## Runtime guards", ""] + ([f"- {g.describe()}" for g in record.guards] or ["- none"])
    lines += ["", "## Notes", ""] + [f"- {n}" for n in ctx.notes]
    lines += ["", "## Config", "", "```", repr(ctx.config), "```", ""]
    return "\n".join(lines)


def _records(model: Any) -> list[GraphRecord] | None:
    if model is None:
        return None
    try:
        return model.__dict__.setdefault("_slimpass_graphs", [])
    except AttributeError:
        return None


class SlimpassWarning(UserWarning):
    """Something the user turned on (``prune=True``, ``reselect=True``) does not apply to this model's graph:
    it runs without it (dense, or decoding on every cached token)."""


def _family(model: Any) -> str:
    config = getattr(model, "config", None)
    kind = getattr(config, "model_type", None)
    return f"{kind} ({type(model).__name__})" if kind else type(model).__name__


_WARNED_WITHOUT_MODEL: set[tuple[str, str]] = set()


def _warn_once(model: Any, what: str, reason: str) -> None:
    """Warn once per model and reason that pruning does not apply (Python `warnings`, `SlimpassWarning`)."""
    try:
        seen = model.__dict__.setdefault("_slimpass_warned", set())
    except AttributeError:
        seen = _WARNED_WITHOUT_MODEL
    if (what, reason) in seen:
        return
    seen.add((what, reason))
    option = "reselect=True" if what == "reselect_kv" else "prune=True"
    warnings.warn(f"slimpass: {_family(model)}: {option} does not apply ({what}): {reason}. This graph runs "
                  "without it; slimpass.compiled_graphs(model) has the detail of every pass", SlimpassWarning,
                  stacklevel=2)


def compile_graph(
    gm: torch.fx.GraphModule,
    example_inputs: list[Any],
    *,
    options: Mapping[str, Any] | None = None,
    mode: str | None = None,
    model: Any = None,
    slim_cache: bool = False,
) -> Callable:
    """Run the slimpass pipeline on a Dynamo graph and lower it; see `sliminfer`. `slim_cache`: the caller
    (`slimpass.compile`) decodes with a `SlimCache` only."""
    start = time.perf_counter()
    config = resolve(options, REGISTRY.config_for(model))
    ctx = PassContext(config=config, example_inputs=list(example_inputs), model=model, graph_id=_graph_id(),
                      slim_cache=slim_cache)
    state = state_of(model)
    state.graph_configs[ctx.graph_id] = config
    progress = Progress(ctx.graph_id, enabled(config.progress), state.call_started)
    work = torch.fx.GraphModule(gm, copy.deepcopy(gm.graph))
    dumper = GraphDumper(config.dump_dir, ctx.graph_id)
    PassManager(config).run(work, ctx, dumper)
    _carry_dynamo_metadata(gm, work)
    layer_map = ctx.layer_map
    kind = layer_map.kind if layer_map is not None else "unrecognised"
    progress.passes_done(ctx.results, kind, len(layer_map.layers) if layer_map else 0)
    if layer_map is None:
        reason = ctx.results[0].declined[0] if ctx.results and ctx.results[0].declined else "no decoder layers"
        earlier = _records(model) or []
        if any(record.kind != "unrecognised" for record in earlier):  # this model's decoder was found before
            why = ("another piece of a forward that a graph break split (TORCH_LOGS=graph_breaks shows where; "
                   "e.g. output_hidden_states=True records outputs through hooks)")
        else:
            why = "not a RoPE decoder slimpass recognises"
        log.warning("sliminfer: graph %s: slimpass passes declined: %s; %s; compiled without them",
                    ctx.graph_id, reason, why)
        if config.prune and not any(record.kind != "unrecognised" for record in earlier):
            _warn_once(model, "no decoder layer recognised", f"{reason} ({why})")
    for result in ctx.results:
        for reason in result.unmet:
            _warn_once(model, result.name, reason)
    changed = any(r.changed for r in ctx.results)
    static = layer_map is not None and any(layer.static_valid is not None for layer in layer_map.layers)
    progress.lowering(inner_compiler(config.compiler, example_inputs), "edited graph" if changed else "graph")
    fast = lower(work if changed else gm, example_inputs, config, mode, static)
    record = GraphRecord(ctx.graph_id, kind, len(layer_map.layers) if layer_map else 0, ctx.results, list(ctx.guards), 0.0)
    if ctx.keep_layers:
        state.configure_dump(ctx.graph_id, dumper.folder, config.block_size, len(layer_map.layers))
        fast = KeepRecorder(fast, ctx.keep_layers, state, ctx.graph_id)
    elif config.prune and kind == "prefill":
        fast = DenseRecorder(fast, state, ctx.graph_id)
    compiled: Callable = fast
    if changed and ctx.guards:
        progress.lowering(inner_compiler(config.fallback_compiler, example_inputs), "unedited fallback graph")
        fallback = lower(gm, example_inputs, dataclasses.replace(config, compiler=config.fallback_compiler), mode, static)
        compiled = GuardedGraph(fast, fallback, ctx.guards, record,
                                state if kind == "prefill" else None)
    for action in ctx.after_lower:  # after every lowering of this graph's inputs
        action()
    record.compile_seconds = time.perf_counter() - start
    progress.done(record.compile_seconds)
    dumper.write_summary(_summary(ctx, record))
    dumper.write_skeleton(layer_map)
    records = _records(model)
    if records is not None:
        records.append(record)
    log.info("sliminfer: %s (%s) compiled in %.1f s (%s): %s%s", ctx.graph_id, kind, record.compile_seconds,
             inner_compiler(config.compiler, example_inputs), "; ".join(r.line() for r in ctx.results),
             f"; dumps in {dumper.folder}" if dumper.folder else "")
    return compiled


def sliminfer(gm: torch.fx.GraphModule, example_inputs: list[Any], **kwargs: Any) -> Callable:
    """The ``sliminfer`` torch.compile backend.

    ``torch.compile(model, backend="sliminfer", options={...}, mode=...)``: `options` are
    `SlimConfig` fields (unknown keys raise `ConfigError`); `mode` is passed to Inductor.
    """
    options, mode = kwargs.pop("options", None), kwargs.pop("mode", None)
    model = kwargs.pop("model", None)
    if kwargs:
        raise ConfigError(f"sliminfer backend: unexpected keyword argument(s) {sorted(kwargs)}; it takes options= and mode=")
    if model is None:
        model = _compiled_module()
    return compile_graph(gm, example_inputs, options=options, mode=mode, model=model)
