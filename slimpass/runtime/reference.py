"""The reference SlimInfer implementation: a plain PyTorch loop over a Hugging Face decoder's layers.

This is the readable specification of the method and the test oracle of the compiled path. It
shares no code with the graph passes, and it is family-generic: it runs the model's *own* forward
(its embedding, decoder layers, attention, norms, multipliers and LM head, whatever they are) with a
`DynamicCache`, and does only the pruning itself, from outside the model:

- transformers' attention interface: the model's attention runs through a registered implementation
  that wraps the one the model was configured with (``sdpa``, or the family's own
  ``eager_attention_forward``), records each layer's post-RoPE queries and keys, and at decode
  attends to the reselected blocks;
- forward pre-hooks on the decoder layers: at a pruning layer they score, select and gather the hidden
  states; at every layer from the first pruning layer on they gather what the model computed for the
  whole prompt (rotary cos/sin, position ids, the attention mask's rows and columns) at the original
  positions of the tokens that reached it.

With pruning off nothing is gathered and the wrapped attention is called with the model's own
arguments: the logits equal the model's forward bit for bit.

The method (one pruning point, after layer ``p - 1``, cutting the input of layer ``p``):

1. The current sequence (length ``L``) is cut into blocks of ``block_size`` tokens; the last block
   may be partial. The first ``sink_blocks`` blocks and the last block are always kept.
2. The scorer (``SlimConfig.scorer``) scores every full block from layer ``p - 1``'s post-RoPE
   queries and keys; the middle blocks with the highest scores are kept, as many as the stage's
   budget allows (see `slimpass.schedule`); equal scores prefer the earlier block.
3. The hidden states of the kept tokens, in their original order, continue to layer ``p``; each
   keeps its original position (RoPE is not re-indexed). Later stages cut what survived.
4. Each layer's KV cache holds the tokens that reached it. Decoding appends each new token to every
   layer's cache (generated tokens are never pruned) at position prompt length + step.
5. Decode-time reselection (``SlimConfig.reselect``, paper section 4.3). The slim layers are the
   layers from the first pruning stage on. Each slim layer cuts its cached prompt tokens (in cache
   order) into blocks as in 1. At each decoding step the scorer scores the full blocks from the step's
   query (one query) and the cached prompt keys; with ``reselect_unit = n > 1``, against representative
   keys instead (once after prefill, the mean of each n keys in float32, each one "token", blocks of
   ``block_size // n`` of them: what stays on the accelerator when the cache is offloaded). The best
   ``active_tokens // block_size`` middle blocks are the candidates. The first step's candidates become the layer's active set. The step attends to the
   sink blocks, the active blocks, the last prompt block and every generated token (this step's
   included). After attending, when fewer than ``gamma`` of the candidates are already active, the
   candidates become the active set of the *next* step (one step of lag: an offloading cache copies
   the new blocks while the rest of the step runs).

Use::

    out = reference.prefill(model, input_ids, config)      # last-position logits, keep sets, caches
    tokens = reference.generate(model, input_ids, config, max_new_tokens=32)

What it cannot run it refuses with a `ReferenceError` naming why: a model whose attention does not go
through transformers' attention interface once per decoder layer, an attention implementation other
than sdpa or eager, a cache-less or hybrid (state-space) family.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import sys
from collections.abc import Callable, Iterator
from typing import Any

import torch
from transformers import AttentionInterface, DynamicCache
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from slimpass.config import SlimConfig
from slimpass.hf_compat import cache_argument
from slimpass.runtime.keep_sets import KeepSet  # a plain record, shared with the compiled path's report
from slimpass.runtime.scoring import ScoreSettings, get_scorer
from slimpass.schedule import Stage, min_prune_length, resolve_schedule

IMPLEMENTATION = "slimpass_reference"  # the attention implementation name the reference registers


class ReferenceError(TypeError):
    """The reference cannot run this model; the message says why."""


@dataclasses.dataclass
class ReferenceState:
    """The result of a reference prefill: last-position logits and what decoding needs."""

    logits: torch.Tensor  # [B, V] at the last prompt position
    keep_sets: list[KeepSet]
    keys: list[torch.Tensor]  # per layer [B, Hkv, n_layer, D] (post-RoPE)
    values: list[torch.Tensor]
    prompt_len: int


def _text_config(model: torch.nn.Module):
    config = getattr(model, "config", None)
    if config is None:
        raise ReferenceError(f"reference: {type(model).__name__} has no Hugging Face config")
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The model's decoder layers: the outermost ModuleList with ``num_hidden_layers`` entries."""
    depth = getattr(_text_config(model), "num_hidden_layers", None)
    lists = [(name, module) for name, module in model.named_modules()
             if isinstance(module, torch.nn.ModuleList) and depth is not None and len(module) == depth]
    if not lists:
        raise ReferenceError(f"reference: {type(model).__name__} has no ModuleList of its {depth} decoder layers")
    return min(lists, key=lambda item: item[0].count("."))[1]


def block_scores(q: torch.Tensor, k: torch.Tensor, config: SlimConfig) -> torch.Tensor:
    """[B, L // block] scores of the configured scorer; for "tokenunit" its torch version (the compiled
    graph may run the Triton kernel; the reference stays plain PyTorch)."""
    name = "tokenunit_torch" if config.scorer == "tokenunit" else config.scorer
    return get_scorer(name)(q, k, ScoreSettings(config.block_size, config.unit_size, config.local_window))


def select_blocks(scores: torch.Tensor, length: int, keep_middle: int, config: SlimConfig) -> list[int]:
    """The kept block indices of one row: sinks, the `keep_middle` best middle blocks, the last block."""
    block, sink = config.block_size, config.sink_blocks
    last = (length - 1) // block
    if last < sink:  # the sinks already cover the whole sequence
        return list(range(last + 1))
    middle = list(range(sink, last))
    values = scores.tolist()  # one device-to-host copy, not one per block
    ranked = sorted(middle, key=lambda j: (-values[j], j))  # ties: the earlier block
    chosen = sorted(ranked[: min(keep_middle, len(middle))])
    return list(range(sink)) + chosen + [last]


def middle_blocks(budget: int, length: int, config: SlimConfig) -> int:
    """How many middle blocks a `budget`-token stage keeps of a `length`-token sequence, counted one block
    at a time: the sinks and the last block first, then whole blocks while they fit (and remain)."""
    block, sink = config.block_size, config.sink_blocks
    last = (length - 1) // block
    used = min(sink, last) * block + (length - last * block)
    chosen = 0
    while sink + chosen < last and used + block <= budget:
        used += block
        chosen += 1
    return chosen


def _positions_of(blocks: list[int], length: int, block: int) -> list[int]:
    return [t for j in blocks for t in range(j * block, min((j + 1) * block, length))]


def _stages(model: torch.nn.Module, config: SlimConfig | None, prompt_len: int) -> list[Stage]:
    if config is None or not config.prune or prompt_len < min_prune_length(config):
        return []
    return resolve_schedule(config, len(decoder_layers(model)))


def _rows(value: torch.Tensor, batch: int) -> torch.Tensor:
    return value.expand(batch, *value.shape[1:]) if value.shape[0] == 1 else value


def _gather(value: Any, dim: int, index: torch.Tensor) -> Any:
    """`value` at per-row `index` ([B, K]) along `dim` (a batch of 1 is broadcast to B rows)."""
    value = _rows(value, index.shape[0])
    shape = [index.shape[0]] + [1] * (value.dim() - 1)
    shape[dim] = index.shape[1]
    expand = list(value.shape)
    expand[dim] = index.shape[1]
    return value.gather(dim, index.view(shape).expand(expand))


class _Run:
    """One reference prefill or generation: what the pre-hooks and the attention wrapper share."""

    active: "_Run | None" = None

    def __init__(self, model: torch.nn.Module, config: SlimConfig | None, stages: list[Stage], batch: int,
                 prompt_len: int, device: torch.device, record_all: bool = False):
        self.model, self.config = model, config
        self.layers = decoder_layers(model)
        self.layer_of = {id(module): index for index, layer in enumerate(self.layers) for module in layer.modules()}
        self.stages = {stage.layer: stage for stage in stages}
        self.first = min(self.stages, default=len(self.layers))
        self.batch, self.prompt_len = batch, prompt_len
        self.positions = torch.arange(prompt_len, device=device).expand(batch, prompt_len)  # the current sequence's
        self.layer_positions: list[torch.Tensor | None] = [None] * len(self.layers)  # each layer's cached prompt tokens
        self.keep_sets: list[KeepSet] = []
        self.recorded: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # prefill: layer -> (queries, keys)
        self.keep_queries = record_all or self.stages
        self.calls = [0] * len(self.layers)
        self.step: int | None = None  # None in prefill; the decoding step (0, 1, ...) after
        self.last_logits_only = False  # logits_to_keep=1: memory at long prompts, but not bit for bit the model's
        self.reselect: dict[int, Reselection] = {}
        self.implementation = _text_config(model)._attn_implementation or "eager"
        if self.implementation not in ("sdpa", "eager"):
            raise ReferenceError(f"reference: attention implementation {self.implementation!r}; it runs 'sdpa' or 'eager'")

    # -- the attention wrapper --------------------------------------------------------------------------
    def inner(self, module: torch.nn.Module) -> Callable:
        if self.implementation == "sdpa":
            return ALL_ATTENTION_FUNCTIONS["sdpa"]
        inner = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
        if inner is None:
            raise ReferenceError(f"reference: {type(module).__module__} has no eager_attention_forward to wrap")
        return inner

    def attend(self, module, query, key, value, attention_mask, **kwargs):
        index = self.layer_of.get(id(module))
        if index is None:
            raise ReferenceError(f"reference: an attention call from {type(module).__name__}, outside the decoder layers")
        self.calls[index] += 1
        if self.step is None:
            if self.keep_queries is True or index + 1 in self.stages:
                self.recorded[index] = (query, key)
        elif index in self.reselect:
            chosen = self.reselect[index](query, key)  # [B, n] of the layer's cached + new keys
            key, value = _gather(key, 2, chosen), _gather(value, 2, chosen)
            if isinstance(attention_mask, torch.Tensor):
                attention_mask = _gather_columns(attention_mask, chosen)
        return self.inner(module)(module, query, key, value, attention_mask, **kwargs)

    # -- the decoder-layer pre-hook ---------------------------------------------------------------------
    def before_layer(self, index: int, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if self.step is None:
            return self._prefill(index, args, kwargs)
        if index < self.first:
            return args, kwargs
        total = self.prompt_len + self.step + 1
        generated = torch.arange(self.prompt_len, total, device=self.positions.device).expand(self.batch, -1)
        columns = torch.cat([self.layer_positions[index], generated], dim=1)
        def cut(value):
            if isinstance(value, torch.Tensor) and value.dim() == 4 and value.shape[-1] == total:
                return _gather_columns(value, columns)
            if isinstance(value, torch.Tensor) and value.dim() == 4 and value.shape[-1] > 1 and value.shape[-1] != total:
                raise ReferenceError(f"reference: layer {index}'s decode mask covers {value.shape[-1]} keys, "
                                     f"not the {total} of prompt and generated tokens")
            return value
        return _map(cut, args, kwargs)

    def _prefill(self, index: int, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        stage = self.stages.get(index)
        hidden_key = "hidden_states" if "hidden_states" in kwargs else None
        hidden = kwargs[hidden_key] if hidden_key else args[0]
        if stage is not None:
            queries, keys = self.recorded.pop(index - 1)
            config, length = self.config, hidden.shape[1]
            scores = block_scores(queries, keys, config)
            keep_middle = middle_blocks(stage.budget(self.prompt_len), length, config)
            rows = [_positions_of(select_blocks(scores[b], length, keep_middle, config), length, config.block_size)
                    for b in range(self.batch)]
            chosen = torch.tensor(rows, device=hidden.device)  # [B, K] indices into the current sequence
            hidden = _gather(hidden, 1, chosen)
            self.positions = self.positions.gather(1, chosen)
            self.keep_sets.append(KeepSet(index, self.positions.clone()))
            if hidden_key:
                kwargs = {**kwargs, hidden_key: hidden}
            else:
                args = (hidden, *args[1:])
        self.layer_positions[index] = self.positions
        if index < self.first:
            return args, kwargs
        n, positions = self.prompt_len, self.positions
        def cut(value):  # a whole-prompt tensor the model computed once for every layer
            if not isinstance(value, torch.Tensor) or value.dim() == 0 or value is hidden:
                return value
            if value.dim() == 4 and value.shape[-2:] == (n, n):  # an attention mask: rows and columns
                return _gather_columns(_gather(value, 2, positions), positions)
            if value.dim() >= 2 and value.shape[1] == n:  # rotary cos/sin, position ids, per-token inputs
                return _gather(value, 1, positions)
            if value.dim() == 1 and value.shape[0] == n:  # cache_position (transformers < 5.24), one for all rows:
                # rows that keep different tokens leave it whole (it only addresses cache slots, which the
                # reference's DynamicCache ignores)
                return value[positions[0]] if bool((positions == positions[:1]).all()) else value
            return value
        return _map(cut, args[1:], kwargs, head=args[:1])


def _gather_columns(mask: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """mask [b, h, q, k] at per-row key `columns` ([B, K])."""
    mask = _rows(mask, columns.shape[0])
    index = columns[:, None, None, :].expand(mask.shape[0], mask.shape[1], mask.shape[2], -1)
    return mask.gather(3, index)


def _map(fn: Callable, args: tuple, kwargs: dict, head: tuple = ()) -> tuple[tuple, dict]:
    def walk(value):
        if isinstance(value, (tuple, list)):
            return type(value)(walk(v) for v in value)
        if isinstance(value, dict):
            return {k: walk(v) for k, v in value.items()}
        return fn(value)
    return (*head, *(walk(a) for a in args)), {k: (v if k == "hidden_states" else walk(v)) for k, v in kwargs.items()}


def _attention(module, query, key, value, attention_mask, **kwargs):
    run = _Run.active
    if run is None:
        raise ReferenceError(f"reference: the {IMPLEMENTATION!r} attention implementation ran outside a reference call")
    return run.attend(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register(IMPLEMENTATION, _attention)


@contextlib.contextmanager
def _instrumented(run: _Run) -> Iterator[_Run]:
    """The model's attention through `_attention` and its decoder layers behind the pre-hooks, for `run`."""
    config = _text_config(run.model)
    saved = config._attn_implementation
    AttentionMaskInterface.register(IMPLEMENTATION, ALL_MASK_ATTENTION_FUNCTIONS[run.implementation])
    hooks = [layer.register_forward_pre_hook(lambda _m, a, k, i=index: run.before_layer(i, a, k), with_kwargs=True)
             for index, layer in enumerate(run.layers)]
    previous, _Run.active = _Run.active, run
    config._attn_implementation = IMPLEMENTATION
    try:
        yield run
    finally:
        config._attn_implementation = saved
        _Run.active = previous
        for hook in hooks:
            hook.remove()


def _forward(run: _Run, ids: torch.Tensor, cache: DynamicCache) -> torch.Tensor:
    """One forward of the model's own code under `run`: the last position's logits [B, V]."""
    model = run.model
    run.calls = [0] * len(run.layers)
    kwargs = {cache_argument(model): cache}
    if run.last_logits_only and "logits_to_keep" in inspect.signature(model.forward).parameters:
        kwargs["logits_to_keep"] = 1  # a long prompt's [B, N, vocab] logits would not fit
    out = model(ids, use_cache=True, **kwargs)
    missing = [index for index, count in enumerate(run.calls) if count != 1]
    if missing:
        raise ReferenceError(
            f"reference: {type(model).__name__}'s attention does not go through transformers' attention interface "
            f"once per decoder layer (layers {missing[:4]} called it {[run.calls[i] for i in missing[:4]]} times)")
    return out.logits[:, -1]


def _cache_of(run: _Run, cache: DynamicCache) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    layers = getattr(cache, "layers", None)
    if layers is None or len(layers) != len(run.layers):
        raise ReferenceError(f"reference: the DynamicCache holds {len(layers or [])} layers, not "
                             f"{len(run.layers)} (a family with layers that keep no KV cache)")
    return [layer.keys for layer in layers], [layer.values for layer in layers]


def _prefill(model, input_ids, config, record_all=False, last_logits_only=False) -> tuple[_Run, DynamicCache, torch.Tensor]:
    batch, prompt_len = input_ids.shape
    run = _Run(model, config, _stages(model, config, prompt_len), batch, prompt_len, input_ids.device, record_all)
    run.last_logits_only = last_logits_only
    cache = DynamicCache()
    with _instrumented(run):
        logits = _forward(run, input_ids, cache)
    return run, cache, logits


@torch.no_grad()
def prefill(model: torch.nn.Module, input_ids: torch.Tensor, config: SlimConfig | None = None) -> ReferenceState:
    """Run the prompt through the model with SlimInfer pruning as `config` says (None: no pruning)."""
    run, cache, logits = _prefill(model, input_ids, config)
    keys, values = _cache_of(run, cache)
    return ReferenceState(logits, run.keep_sets, keys, values, run.prompt_len)


@torch.no_grad()
def layer_queries_keys(model: torch.nn.Module, input_ids: torch.Tensor) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """(layer index, post-RoPE queries, keys) of every decoder layer of an unpruned forward, in order.

    What a scorer at that layer would see (`slimpass.eval.calibrate` ranks blocks at each layer)."""
    run, _cache, _logits = _prefill(model, input_ids, None, record_all=True)
    for index in range(len(run.layers)):
        yield index, *run.recorded[index]


@dataclasses.dataclass
class Reselection:
    """One slim layer's decode-time reselection state (section 5 of the module docstring), held on the device
    as tensors: a step costs a few batched operations, not a Python loop over rows and blocks."""

    keys: torch.Tensor  # [B, Hkv, n, D] the layer's cached prompt keys
    config: SlimConfig

    def __post_init__(self) -> None:
        batch, heads, n, dim = self.keys.shape
        block, unit = self.config.block_size, self.config.reselect_unit
        full = n // block * block
        self.prompt_tokens = n
        self.unit_keys = None if unit == 1 else \
            self.keys[:, :, :full].float().reshape(batch, heads, full // unit, unit, dim).mean(dim=3)
        self._active: torch.Tensor | None = None  # [B, k] per row its active middle blocks, ascending
        self._swapped = torch.zeros((), dtype=torch.long, device=self.keys.device)

    @property
    def active(self) -> list[list[int]] | None:
        """Per row, the active middle blocks (cache-order block indices, ascending)."""
        return None if self._active is None else self._active.tolist()

    @property
    def swapped_in(self) -> int:
        """Blocks that entered an active set after the first step, summed over rows."""
        return int(self._swapped)

    def _candidates(self, scores: torch.Tensor) -> torch.Tensor:
        """[B, k] per row the `active_tokens // block` best middle blocks, ascending: `select_blocks`'
        middle, batched (a stable descending sort ranks ties to the earlier block, as it does)."""
        config = self.config
        last = (self.prompt_tokens - 1) // config.block_size
        sink = config.sink_blocks
        count = min(config.active_tokens // config.block_size, max(last - sink, 0))
        if count == 0:
            return torch.empty(scores.shape[0], 0, dtype=torch.long, device=scores.device)
        ranked = torch.sort(scores[:, sink:last], dim=1, descending=True, stable=True).indices[:, :count]
        return torch.sort(ranked + sink, dim=1).values

    def __call__(self, q: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        config, n = self.config, self.prompt_tokens
        block = config.block_size
        if self.unit_keys is None:
            scores = block_scores(q, keys[:, :, :n], config)  # [B, full blocks]
        else:
            name = "tokenunit_torch" if config.scorer == "tokenunit" else config.scorer
            settings = ScoreSettings(block // config.reselect_unit, 1, config.local_window)
            scores = get_scorer(name)(q, self.unit_keys, settings)
        candidates = self._candidates(scores)
        if self._active is None:
            self._active = candidates
        batch, device = keys.shape[0], keys.device
        last = (n - 1) // block
        sinks = torch.arange(min(config.sink_blocks, last), device=device).expand(batch, -1)
        whole = torch.cat([sinks, self._active], dim=1)  # full blocks, ascending, all before the last block
        tokens = (whole[:, :, None] * block + torch.arange(block, device=device)).flatten(1)
        tail = torch.arange(last * block, keys.shape[2], device=device).expand(batch, -1)  # last block + generated
        rows = torch.cat([tokens, tail], dim=1)
        if candidates.shape[1]:  # for the next step: swap a row's set when too few of the new blocks are active
            overlap = (self._active[:, :, None] == candidates[:, None, :]).any(dim=1).sum(dim=1)
            swap = overlap < config.gamma * candidates.shape[1]
            self._swapped += torch.where(swap, candidates.shape[1] - overlap, 0).sum()
            self._active = torch.where(swap[:, None], candidates, self._active)
        return rows


@torch.no_grad()
def generate(model: torch.nn.Module, input_ids: torch.Tensor, config: SlimConfig | None = None,
             max_new_tokens: int = 32, trace: list[dict[int, list[list[int]]]] | None = None,
             logits: list[torch.Tensor] | None = None, forced: torch.Tensor | None = None,
             eos_token_id: int | list[int] | None = None, keep_sets: list[KeepSet] | None = None,
             last_logits_only: bool = False) -> torch.Tensor:
    """Greedy decoding after a (pruned) prefill: returns [B, prompt + max_new_tokens] token ids.

    With ``config.reselect``, slim layers attend to their reselected blocks (section 5); `trace`, if
    given, receives per decoding step {slim layer: per row its active middle blocks}; `logits`, if given,
    the [B, vocab] logits each new token was chosen from. `forced` ([B, max_new_tokens]), if given, are the
    tokens to feed instead of the greedy ones (to score a sequence another search chose). With
    `eos_token_id` (one id or a list), decoding stops early once every row has produced one (the result is then shorter);
    `keep_sets`, if given, receives the prefill's keep sets. `last_logits_only` asks the model for the last
    position's logits only (``logits_to_keep=1``: long prompts' full logits do not fit; the rounding of the
    LM head may then differ from the model's full forward in the last bits)."""
    run, cache, step_logits = _prefill(model, input_ids, config, last_logits_only=last_logits_only)
    if keep_sets is not None:
        keep_sets.extend(run.keep_sets)
    return _decode(run, cache, input_ids, step_logits, config, max_new_tokens, trace, logits, forced, eos_token_id)


@torch.no_grad()
def generate_shared(model: torch.nn.Module, input_ids: torch.Tensor, configs: list[SlimConfig | None],
                    max_new_tokens: int = 32, eos_token_id: int | list[int] | None = None,
                    keep_sets: list[KeepSet] | None = None, last_logits_only: bool = False) -> list[torch.Tensor]:
    """`generate` under each of `configs`, from one prefill: the configs may differ only in what decoding
    does (reselection and its settings), so their prefills are the same computation. Each result equals
    ``generate(model, input_ids, config, ...)``; `keep_sets` receives the one prefill's keep sets."""
    def prefill_fields(config):
        return None if config is None else \
            {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.name not in _DECODE_ONLY}
    if any(prefill_fields(c) != prefill_fields(configs[0]) for c in configs):
        raise ValueError(f"generate_shared: the configs prefill differently; they may differ only in "
                         f"{', '.join(_DECODE_ONLY)}")
    run, cache, step_logits = _prefill(model, input_ids, configs[0], last_logits_only=last_logits_only)
    if keep_sets is not None:
        keep_sets.extend(run.keep_sets)
    rewind = cache_rewinder(cache)
    results = []
    for config in configs:
        rewind()
        results.append(_decode(run, cache, input_ids, step_logits, config, max_new_tokens, eos_token_id=eos_token_id))
    return results


def cache_rewinder(cache: DynamicCache) -> Callable[[], None]:
    """A function that puts `cache`'s layers back to the tensors they hold now: decoding (and gathering)
    replaces them with new tensors rather than writing into them, so one prefill serves several decodes."""
    saved = [(layer.keys, layer.values) for layer in cache.layers]

    def rewind() -> None:
        for layer, (keys, values) in zip(cache.layers, saved):
            layer.keys, layer.values = keys, values
    return rewind


_DECODE_ONLY = ("reselect", "active_tokens", "gamma", "reselect_unit")  # SlimConfig fields only decoding reads


def _decode(run: _Run, cache: DynamicCache, input_ids: torch.Tensor, step_logits: torch.Tensor,
            config: SlimConfig | None, max_new_tokens: int, trace: list | None = None, logits: list | None = None,
            forced: torch.Tensor | None = None, eos_token_id: int | list[int] | None = None) -> torch.Tensor:
    """The greedy decoding loop after `run`'s prefill filled `cache` and gave the first `step_logits`."""
    keys, _values = _cache_of(run, cache)
    run.reselect = {index: Reselection(keys[index], config) for index in range(run.first, len(run.layers))} \
        if config is not None and config.reselect else {}

    def choose(step_logits: torch.Tensor, step: int) -> torch.Tensor:
        return step_logits.argmax(-1, keepdim=True) if forced is None else forced[:, step:step + 1]

    out = [input_ids, choose(step_logits, 0)]
    if eos_token_id is not None:
        eos = torch.tensor(eos_token_id if isinstance(eos_token_id, list) else [eos_token_id], device=input_ids.device)
    if logits is not None:
        logits.append(step_logits)
    with _instrumented(run):
        for step in range(max_new_tokens - 1):
            run.step = step
            step_logits = _forward(run, out[-1], cache)
            if trace is not None:
                trace.append({index: [list(row) for row in r.active] for index, r in run.reselect.items()})
            if logits is not None:
                logits.append(step_logits)
            out.append(choose(step_logits, step + 1))
            if eos_token_id is not None and bool(torch.isin(torch.cat(out[1:], dim=1), eos).any(dim=1).all()):
                break
    return torch.cat(out, dim=1)
