"""`SlimConfig`: every knob the passes and the runtime read, and where it comes from.

Sources, highest precedence first:

1. ``options=`` given to ``torch.compile(..., backend="sliminfer", options={...})`` or
   ``slimpass.compile(model, options={...})``;
2. overrides active in a ``slimpass.config.patch(...)`` block when the graph is compiled;
3. the config registered for the model instance (``slimpass.configure(model, ...)``) or its class
   (``@slimpass.configure(...)``);
4. the defaults below.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import threading
from collections.abc import Iterator, Mapping
from types import MappingProxyType
from typing import Any

INNER_COMPILERS = ("auto", "inductor", "eager")
ATTENTION_BACKENDS = ("auto", "flash", "cudnn", "efficient", "math")


class ConfigError(ValueError):
    """A configuration value or key that slimpass cannot accept."""


def _check_range(name: str, value: Any, low: int, high: int | None = None) -> None:
    allowed = f"an int >= {low}" if high is None else f"an int in [{low}, {high}]"
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"SlimConfig.{name}={value!r}: expected {allowed}")
    if value < low or (high is not None and value > high):
        raise ConfigError(f"SlimConfig.{name}={value!r} is out of range: expected {allowed}")


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"SlimConfig.{name}={value!r}: expected one of {', '.join(map(repr, choices))}")


def _check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ConfigError(f"SlimConfig.{name}={value!r}: expected True or False")


SCHEDULE_PRESETS = ("default", "paper")


def _check_budget(layer: int, budget: Any) -> int | float | tuple[int, float]:
    """A budget is tokens (int >= 1), a keep ratio of the prompt (float in (0, 1]) or (tokens, ratio): the smaller."""
    if isinstance(budget, (tuple, list)) and len(budget) == 2:
        tokens, ratio = budget
        _check_budget(layer, tokens)
        _check_budget(layer, ratio)
        if not (isinstance(tokens, int) and isinstance(ratio, float)):
            raise ConfigError(f"SlimConfig.schedule[{layer}]={budget!r}: a pair is (tokens: int, ratio: float)")
        return (tokens, ratio)
    if isinstance(budget, bool) or not isinstance(budget, (int, float)):
        raise ConfigError(
            f"SlimConfig.schedule[{layer}]={budget!r}: expected tokens (int), a keep ratio (float) or (tokens, ratio)"
        )
    if isinstance(budget, int) and budget < 1:
        raise ConfigError(f"SlimConfig.schedule[{layer}]={budget!r}: a token budget must be >= 1")
    if isinstance(budget, float) and not 0.0 < budget <= 1.0:
        raise ConfigError(f"SlimConfig.schedule[{layer}]={budget!r}: a keep ratio must be in (0, 1]")
    return budget


def _freeze_schedule(schedule: Any) -> Mapping[int, Any] | str | None:
    """Validate a preset name or a layer -> budget mapping (see `slimpass.schedule`)."""
    if schedule is None or schedule in SCHEDULE_PRESETS:
        return schedule
    if isinstance(schedule, str):
        raise ConfigError(f"SlimConfig.schedule={schedule!r}: expected a preset ({', '.join(map(repr, SCHEDULE_PRESETS))}) "
                          "or a mapping layer -> budget")
    if not isinstance(schedule, Mapping):
        raise ConfigError(
            f"SlimConfig.schedule={schedule!r}: expected a mapping layer -> tokens (int), ratio "
            "(float in (0, 1]) or (tokens, ratio), e.g. {10: 8192, 20: 0.125, 30: (2048, 0.0625)}"
        )
    frozen: dict[int, Any] = {}
    for layer, budget in sorted(schedule.items()):
        if isinstance(layer, bool) or not isinstance(layer, int) or layer < 1:
            raise ConfigError(f"SlimConfig.schedule: layer {layer!r} must be an int >= 1 (the layer whose input is cut)")
        frozen[layer] = _check_budget(layer, budget)
    if not frozen:
        raise ConfigError("SlimConfig.schedule={}: give at least one pruning point, or prune=False")
    return MappingProxyType(frozen)


@dataclasses.dataclass(frozen=True)
class SlimConfig:
    """All settings of the ``sliminfer`` backend. Unknown keys and bad values raise `ConfigError`."""

    prune: bool = False
    """Insert SlimInfer token pruning into prefill graphs."""
    schedule: Mapping[int, Any] | str | None = None
    """Layer -> budget of that layer's input: int tokens, float keep ratio of the prompt, or (tokens, ratio)
    for the smaller of the two; or a preset, "default" (= None) or "paper". See `slimpass.schedule`."""
    block_size: int = 16
    """Tokens per block, the unit that is kept or dropped. 16: at ~1k tokens a 25% cut keeps 14 middle
    blocks of 16 but only 2 of 64, too few to hold a needle that straddles a boundary; on the H100 16, 32
    and 64 run at the same speed (docs/QUALITY.md, docs/PERF.md)."""
    unit_size: int = 8
    """Tokens per scoring unit; must divide `block_size`."""
    local_window: int = 4
    """Number of last prompt tokens whose queries form the local query."""
    sink_blocks: int = 1
    """Leading blocks always kept (attention sink)."""
    min_prompt_len: int = 1024
    """Prompts shorter than this are never pruned."""
    scorer: str = "window_attention"
    """Name of the block scorer in the scorer registry: "window_attention" (SnapKV-style; kept needles far
    more often than the paper's on SmolLM2, docs/QUALITY.md) or "tokenunit" (the paper's, Triton on GPU)."""
    rewrite_attention: bool = True
    """Replace provably causal masked attention by mask-free causal attention in prefill graphs."""
    sink_selection: bool = True
    """Run row-wise work after a token selection on the selected rows only: the scoring layer's o_proj and
    MLP on the kept tokens, the last layer's on the logits rows (`logits_to_keep`). Exact."""
    attention_backend: str = "auto"
    """SDPA backend for rewritten attention: 'auto' lets PyTorch choose, or flash/cudnn/efficient/math."""
    fuse_projections: bool = True
    """Compute the projections that read one tensor (q/k/v, gate/up) with one matrix multiply: four calls a
    layer instead of seven, which batch-1 decoding, bound by the host's launches, feels. The model's
    parameters of each group move into one stacked tensor (each becomes a view of its rows; values unchanged;
    `slimpass.passes.fuse_projections`). Off under gradients."""
    compiler: str = "auto"
    """Inner compiler that lowers the edited graph: 'inductor', 'eager' (the edited graph run as Python:
    debugging, fast tests), or 'auto': Inductor where the graph's inputs are on a GPU, eager where they are on
    the CPU, whose Inductor C++ build of a 30-layer model takes minutes (SmolLM2-135M's first pruned
    `generate`: 25 s eager, minutes with Inductor; docs/PERF.md) for a TTFT that pruning, not the lowering,
    mostly sets there."""
    fallback_compiler: str = "eager"
    """How the unedited graph runs when a runtime guard fails (padded batch, prompt below the pruning
    threshold): 'eager' runs Dynamo's graph as is (no compile time; HF-eager speed), 'inductor' lowers it
    too (twice the compile time, and Inductor's guards on its N x N mask, e.g. a recompile from 64k)."""
    inductor_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    """Extra `torch._inductor.config` settings passed to compile_fx as config patches."""
    dump_dir: str | None = None
    """Write per-graph dumps (graph before/after each pass, summary.md, skeleton) under this folder."""
    progress: bool | None = None
    """One line on stderr per compile step of each graph (traced, passes, lowering, compiled; with timings):
    True, False, or None for "when stderr is a terminal". The lines also go to the `slimpass.progress` logger (DEBUG)."""
    dynamic_prompt: bool = True
    """`slimpass.compile` marks the prompt length dynamic, so one prefill graph serves all lengths."""
    reselect: bool = False
    """Decode-time reselection (paper section 4.3): at each slim layer (a layer at or after the first
    pruning stage) every decoding step re-scores the layer's cached prompt blocks with the current query
    and attends to the sink blocks, the `active_tokens` best, the last prompt block and the generated
    tokens. Needs `prune` (it chooses among the blocks a pruned prefill kept) and a `SlimCache`
    (`slimpass.compile`'s `generate` passes one)."""
    active_tokens: int = 2048
    """Per slim layer, the prompt tokens a decoding step attends to under `reselect` (whole blocks; the
    sink blocks and the last prompt block come on top)."""
    reselect_unit: int = 1
    """Keys per representative key that reselection scores against: 1 = the cached keys themselves; n > 1 =
    the mean of each n keys (float32; what an offloading cache keeps on the accelerator). Must divide
    `block_size`. On SmolLM2 QA at ~1k (natural text, 128 active tokens) the cached keys answered 7/20, means
    of 2 / 4 / 8 keys 5 / 2 / 0 of 20 (docs/QUALITY.md)."""
    gamma: float = 0.9
    """Reselection hysteresis: a layer's active blocks change only when the share of the newly chosen
    best blocks already active drops under `gamma` (1.0: follow every step's choice; 0.0: never change)."""
    offload: bool = False
    """Offload mode (needs `reselect`): after the prefill the K/V of every armed slim layer move to host
    memory (pinned on CUDA); the accelerator keeps the layers before the first pruning stage, per slim layer
    its sink and active blocks plus the last prompt block and the generated tokens, and the keys reselection
    scores against (`reselect_unit`). A layer's next active set is known one step ahead (reselection's lag),
    so its changed blocks are copied on a side stream as soon as it is decided: a whole step before they are
    read (`slimpass.runtime.offload`)."""
    copy_group: int = 4
    """Under `offload`: consecutive slim layers whose copies go in one launch, issued once the last of them
    has decided its next step (fewer launches and less host time per step; a larger group issues its first
    layers' copies later)."""
    static_decode: bool = False
    """Decode graphs with no size that changes from step to step (opt-in; needs `prune`): after a pruned
    prefill each layer's K/V move into buffers with room for `decode_capacity` more tokens, every step writes
    its token in place and attends to the written slots only (a per-layer mask), and the room grows by the
    same amount when it runs out (the same compiled graph serves every size). Under Inductor such decode
    graphs run as CUDA graphs on a GPU (``inductor_options={"triton.cudagraphs": False}`` turns that off).
    Needs `rewrite_attention` (it adds the masks). With `offload`, an offloaded layer's tail (last prompt block
    and generated tokens) is such a buffer, and the manager's fronts and next sets are read in place too."""
    decode_capacity: int = 256
    """Under `static_decode`: the tokens of room each layer's buffers get at a time. A request through
    `slimpass.compile`'s `generate` that says how many tokens it may generate (`max_new_tokens`) gets no more
    first room than those need, so short requests hold no empty slots."""

    def __deepcopy__(self, memo: dict) -> SlimConfig:
        """Itself: frozen, with read-only mappings, it cannot change (and a mappingproxy does not deepcopy;
        a deep copy of a compiled model copies the configs its state records)."""
        return self

    def __post_init__(self) -> None:
        self._check_values()
        self._check_combinations()

    def _check_values(self) -> None:
        """Each field alone: its type and range (and the frozen forms of the schedule and dicts)."""
        _check_bool("prune", self.prune)
        object.__setattr__(self, "schedule", _freeze_schedule(self.schedule))
        _check_range("block_size", self.block_size, 1, 65536)
        _check_range("unit_size", self.unit_size, 1, 65536)
        _check_range("local_window", self.local_window, 1, 4096)
        _check_range("sink_blocks", self.sink_blocks, 0, 1024)
        _check_range("min_prompt_len", self.min_prompt_len, 1)
        if not isinstance(self.scorer, str) or not self.scorer:
            raise ConfigError(f"SlimConfig.scorer={self.scorer!r}: expected the name of a registered scorer")
        _check_bool("rewrite_attention", self.rewrite_attention)
        _check_bool("sink_selection", self.sink_selection)
        _check_bool("fuse_projections", self.fuse_projections)
        _check_choice("attention_backend", self.attention_backend, ATTENTION_BACKENDS)
        _check_choice("compiler", self.compiler, INNER_COMPILERS)
        _check_choice("fallback_compiler", self.fallback_compiler, INNER_COMPILERS)
        if not isinstance(self.inductor_options, Mapping):
            raise ConfigError(f"SlimConfig.inductor_options={self.inductor_options!r}: expected a dict")
        object.__setattr__(self, "inductor_options", MappingProxyType(dict(self.inductor_options)))
        if self.dump_dir is not None and not isinstance(self.dump_dir, (str, os.PathLike)):
            raise ConfigError(f"SlimConfig.dump_dir={self.dump_dir!r}: expected a folder path or None")
        if self.dump_dir is not None:
            object.__setattr__(self, "dump_dir", os.fspath(self.dump_dir))
        if self.progress is not None:
            _check_bool("progress", self.progress)
        _check_bool("dynamic_prompt", self.dynamic_prompt)
        _check_bool("reselect", self.reselect)
        _check_range("active_tokens", self.active_tokens, 1)
        _check_range("reselect_unit", self.reselect_unit, 1, 65536)
        if isinstance(self.gamma, bool) or not isinstance(self.gamma, (int, float)) or not 0.0 <= self.gamma <= 1.0:
            raise ConfigError(f"SlimConfig.gamma={self.gamma!r}: expected a float in [0, 1] (the overlap under which "
                              "a layer's active blocks are swapped)")
        object.__setattr__(self, "gamma", float(self.gamma))
        _check_bool("offload", self.offload)
        _check_range("copy_group", self.copy_group, 1, 64)
        _check_bool("static_decode", self.static_decode)
        _check_range("decode_capacity", self.decode_capacity, 1, 1 << 20)

    def _check_combinations(self) -> None:
        """The fields that constrain each other (checked on the resolved config, where every source is known)."""
        if self.block_size % self.unit_size:
            raise ConfigError(
                f"SlimConfig.unit_size={self.unit_size} must divide block_size={self.block_size} "
                "(a block is a whole number of scoring units)"
            )
        if self.block_size % self.reselect_unit:
            raise ConfigError(f"SlimConfig.reselect_unit={self.reselect_unit} must divide block_size={self.block_size} "
                              "(a block is a whole number of representative keys)")
        if self.reselect and not self.prune:
            raise ConfigError("SlimConfig.reselect=True needs prune=True: reselection chooses, at each decoding step, "
                              "among the blocks a pruned prefill kept at its slim layers (without pruning there are "
                              "none); set prune=True or drop reselect")
        if self.static_decode and not self.rewrite_attention:
            raise ConfigError("SlimConfig.static_decode=True needs rewrite_attention=True: that pass masks each layer's "
                              "attention to the slots its buffers hold")
        if self.static_decode and not self.prune:
            raise ConfigError("SlimConfig.static_decode=True needs prune=True: the fixed-size buffers are made after a "
                              "pruned prefill (an unpruned prompt decodes on transformers' cache)")
        if self.offload and not self.reselect:
            raise ConfigError("SlimConfig.offload=True needs reselect=True: an offloaded slim layer keeps only its "
                              "active blocks on the accelerator, and reselection is what chooses them")

    @classmethod
    def check_values(cls, values: Mapping[str, Any]) -> None:
        """Check the given fields' values alone (types, ranges), not how they combine with the others:
        for `patch`, whose block is resolved later with options and registered configs it cannot see."""
        probe = object.__new__(cls)
        for f in dataclasses.fields(cls):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            object.__setattr__(probe, f.name, values.get(f.name, default))
        probe._check_values()

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    def replace(self, source: str = "overrides", /, **overrides: Any) -> SlimConfig:
        """A copy with `overrides` applied; unknown keys raise `ConfigError` naming `source`."""
        check_keys(overrides, source=source)
        return dataclasses.replace(self, **overrides)

    def as_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["schedule"] = dict(self.schedule) if isinstance(self.schedule, Mapping) else self.schedule
        out["inductor_options"] = dict(self.inductor_options)
        return out


def check_keys(keys: Mapping[str, Any], source: str) -> None:
    """Reject keys that are not SlimConfig fields, suggesting the closest one."""
    import difflib

    names = SlimConfig.field_names()
    for key in keys:
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else "."
            raise ConfigError(f"unknown slimpass option {key!r} in {source}{hint} Known options: {', '.join(names)}")


_patches = threading.local()


def _active_patches() -> list[dict[str, Any]]:
    if not hasattr(_patches, "stack"):
        _patches.stack = []
    return _patches.stack


@contextlib.contextmanager
def patch(**overrides: Any) -> Iterator[None]:
    """Override config values for graphs compiled inside this block (like `torch._inductor.config.patch`).

    Example::

        with slimpass.config.patch(compiler="eager", dump_dir="/tmp/dumps"):
            model(input_ids)   # graphs compiled here use these values
    """
    check_keys(overrides, source="slimpass.config.patch()")
    # each value now, where the mistake was made; how values combine is checked when a graph resolves
    # the config (options, the patches stacked here, the model's registered config): only then are they known
    SlimConfig.check_values(overrides)
    stack = _active_patches()
    stack.append(dict(overrides))
    try:
        yield
    finally:
        stack.pop()


def patched() -> bool:
    """Whether a `patch` block is active in this thread."""
    return bool(_active_patches())


def resolve(options: Mapping[str, Any] | None, registered: SlimConfig | None) -> SlimConfig:
    """Combine the sources in precedence order: options > patch() > registered config > defaults.

    The sources are merged first and checked once, so values that only make sense together (a
    `block_size` from one source and a `unit_size` from another) are checked together."""
    config = registered if registered is not None else SlimConfig()
    merged: dict[str, Any] = {}
    env_dump = os.environ.get("SLIMPASS_DUMP")
    if env_dump and config.dump_dir is None:
        merged["dump_dir"] = env_dump
    for overrides in _active_patches():
        merged.update(overrides)
    if options:
        if not isinstance(options, Mapping):
            raise ConfigError(f"options={options!r}: expected a dict of SlimConfig fields")
        check_keys(options, source="options=")
        merged.update(options)
    return config.replace(**merged) if merged else config
