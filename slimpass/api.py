"""`slimpass.compile`: compile a Hugging Face causal LM so that `forward` *and* `generate` use sliminfer.

``torch.compile(model)`` returns a wrapper whose ``.generate`` still calls the uncompiled model;
`compile` instead replaces ``model.forward`` on the instance, so HF's ``generate`` runs the
compiled prefill and decode graphs. It also marks the prompt length (and the KV-cache length)
dynamic, so one prefill graph and one decode graph serve every length, and gives every ``generate``
call that brings no cache a fresh `SlimCache` (per-layer kept positions, memory report), into which
the prefill records its keep sets.
"""

from __future__ import annotations

import functools
import logging
import time
import warnings
from collections.abc import Mapping
from typing import Any

import torch

from slimpass.backend import GraphRecord, SlimpassWarning, compile_graph
from slimpass.call_form import CallForm
from slimpass.config import ConfigError, resolve
from slimpass.hf_compat import cache_argument, context_length, decode_mask_skipped_under_compile
from slimpass.registry import REGISTRY
from slimpass.runtime import slim_cache
from slimpass.runtime.keep_sets import SlimState, state_of, unwrap

log = logging.getLogger(__name__)

# Inputs whose last dimension is the sequence length.
_SEQUENCE_INPUTS = ("input_ids", "attention_mask", "position_ids", "cache_position", "token_type_ids")


def _cache_of(kwargs: dict) -> Any:
    return kwargs.get("past_key_values", kwargs.get("cache"))  # renamed `cache` in transformers 5.24


def _mark_dynamic(args: tuple, kwargs: dict) -> None:
    tensors = [kwargs.get(name) for name in _SEQUENCE_INPUTS]
    if args:
        tensors.append(args[0])
    for tensor in tensors:
        if isinstance(tensor, torch.Tensor) and tensor.dim() >= 1 and tensor.shape[-1] > 1:
            torch._dynamo.maybe_mark_dynamic(tensor, tensor.dim() - 1)
    embeds = kwargs.get("inputs_embeds")
    if isinstance(embeds, torch.Tensor) and embeds.dim() == 3 and embeds.shape[1] > 1:
        torch._dynamo.maybe_mark_dynamic(embeds, 1)
    cache = _cache_of(kwargs)
    for layer in getattr(cache, "layers", None) or ():
        for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(tensor, torch.Tensor) and tensor.dim() == 4 and tensor.shape[2] > 1:
                torch._dynamo.maybe_mark_dynamic(tensor, 2)
        # SlimLayer's. Not `active`: its count of blocks is the config's (active_tokens // block_size) for every
        # prompt, and a static count lets Inductor sort the slots in its own kernels instead of aten.sort (on an
        # H200, one layer's slot update: 159 µs of host time against 467 µs with a symbolic count)
        state = getattr(layer, "reselection", None)
        units = state.unit_keys if state is not None else None
        for tensor, dim in ((getattr(layer, "prompt_positions", None), 1), (units, 2)):
            if isinstance(tensor, torch.Tensor) and tensor.shape[dim] > 1:
                torch._dynamo.maybe_mark_dynamic(tensor, dim)


def _drop_trivial_mask(kwargs: dict) -> None:
    """An all-ones attention_mask means "no padding": pass None instead, so transformers builds no mask.

    With pruning, each layer's KV cache holds a different number of tokens, and one decode mask
    built for the full prompt length cannot serve them all; without padding none is needed. A padded
    batch keeps its mask: its prefill fails the pruned graph's guard and runs dense. Costs one host
    sync per call (reading the mask).
    """
    mask = kwargs.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.dim() == 2 and bool(mask.bool().all()):
        kwargs["attention_mask"] = None


def _prompt_length(args: tuple, kwargs: dict) -> int | None:
    ids = kwargs.get("input_ids", args[0] if args else None)
    if isinstance(ids, torch.Tensor):
        return int(ids.shape[-1])
    embeds = kwargs.get("inputs_embeds")
    return int(embeds.shape[1]) if isinstance(embeds, torch.Tensor) else None


def _warn_past_context(model: torch.nn.Module, state: SlimState, length: int | None) -> None:
    """A SlimpassWarning, once per model, when a prompt is longer than the model's context: its positions past
    `max_position_embeddings` were never trained on, so the answer is unreliable (pruned or not)."""
    context = context_length(getattr(model, "config", None))
    if length is None or context is None or length <= context or "context" in state.warned:
        return
    state.warned.add("context")
    warnings.warn(f"slimpass: a prompt of {length} tokens is longer than the model's context ({context} tokens, "
                  "config.max_position_embeddings): positions past it were never trained on and answers are "
                  "unreliable; shorten the prompt or use a model with a longer context", SlimpassWarning, stacklevel=3)


def _not_a_decoder_lm(model: torch.nn.Module) -> str | None:
    """Why sliminfer cannot prune `model`'s prompts (None: a decoder-only LM it may try): pruning drops
    prompt tokens between a causal decoder's layers and decodes on the kept KV."""
    name = type(model).__name__
    config = getattr(model, "config", None)
    if config is None:
        return f"{name} has no transformers config"
    if getattr(config, "is_encoder_decoder", False):
        return f"{name} is an encoder-decoder model (its decoder reads the encoder's output, not a pruned prompt)"
    can_generate = getattr(model, "can_generate", None)
    if not callable(can_generate) or not can_generate():
        return f"{name} is not a generative decoder (no generate)"
    return None


def _check_depth(model: torch.nn.Module, config) -> None:
    """A schedule naming a layer the model does not have is a `ConfigError` here, not at the first call."""
    text = getattr(model, "config", None)
    text = text.get_text_config(decoder=True) if hasattr(text, "get_text_config") else text
    depth = getattr(text, "num_hidden_layers", None)
    if config.prune and isinstance(depth, int):
        from slimpass.schedule import resolve_schedule

        resolve_schedule(config, depth)


def _check_mode(mode: str | None) -> None:
    if mode is None:
        return
    try:
        torch._inductor.list_mode_options(mode)
    except RuntimeError as error:
        raise ConfigError(f"slimpass.compile(mode={mode!r}): {error}") from None


def compile(  # noqa: A001 - mirrors torch.compile
    model: torch.nn.Module,
    *,
    options: Mapping[str, Any] | None = None,
    mode: str | None = None,
    fullgraph: bool = False,
) -> torch.nn.Module:
    """Compile `model.forward` in place with the sliminfer backend and return `model`.

    Example::

        model = slimpass.compile(AutoModelForCausalLM.from_pretrained(path), options={"compiler": "inductor"})
        out = model.generate(input_ids, max_new_tokens=64)   # prefill + decode through sliminfer

    `options` are `SlimConfig` fields and take precedence over `slimpass.configure`; they are
    validated here, before anything is compiled.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"slimpass.compile expects a torch.nn.Module, got {type(model).__name__}")
    config = resolve(options, REGISTRY.config_for(model))  # fail early on bad options
    _check_mode(mode)
    _check_depth(model, config)
    unfit = _not_a_decoder_lm(model)
    if unfit is not None and config.prune:
        warnings.warn(f"slimpass.compile: prune=True does not apply: {unfit}; compiling forward without it",
                      SlimpassWarning, stacklevel=2)
        options, config = {**(options or {}), "prune": False}, config.replace(prune=False)
    original = model.__dict__.get("_slimpass_original_forward", model.forward)
    with_slim_cache = unfit is None and slim_cache.supports(model.config)
    wanted = [name for name in ("reselect", "offload", "static_decode") if getattr(config, name)]
    if unfit is None and wanted and not with_slim_cache:
        warnings.warn(f"slimpass.compile: {'/'.join(f'{name}=True' for name in wanted)} does not apply: "
                      f"{getattr(model.config, 'model_type', type(model).__name__)} has sliding-window (or other "
                      "non-global) attention layers, which the SlimCache these need does not model; decoding attends "
                      "every kept token", SlimpassWarning, stacklevel=2)
    backend = functools.partial(compile_graph, options=options, mode=mode, model=model, slim_cache=with_slim_cache)
    compiled = torch.compile(original, backend=backend, fullgraph=fullgraph, dynamic=None)

    state = state_of(model)
    cache_name = cache_argument(model) if with_slim_cache else ""
    form = CallForm(original, getattr(model, "config", None))

    @functools.wraps(original)
    def forward(*args: Any, **kwargs: Any) -> Any:
        # A decoding step reads the config its request's prefill graph was compiled with (the cache holds it); a
        # prefill resolves it as the backend will (`options`, `slimpass.configure`, an active `config.patch`) and
        # gives the cache the config of the graph that ran. No copy of it is kept here.
        held = _cache_of(kwargs)
        recorded = isinstance(held, slim_cache.SlimCache) and held.recorded and held.config is not None
        config = held.config if recorded else resolve(options, REGISTRY.config_for(model))
        if config.prune:
            _drop_trivial_mask(kwargs)
        cache = _cache_of(kwargs)
        use_cache = kwargs.get("use_cache")
        if use_cache is None:
            use_cache = getattr(getattr(model, "config", None), "use_cache", True)
        if with_slim_cache and cache is None and use_cache:
            cache = kwargs[cache_name] = slim_cache.SlimCache(model.config)  # what the model would make, and more
        elif (with_slim_cache and config.prune and cache is not None and not isinstance(cache, slim_cache.SlimCache)
              and not decode_mask_skipped_under_compile()):
            raise ConfigError(
                f"slimpass.compile: the model was called with a {type(cache).__name__}; this transformers builds "
                "decode masks over the full prompt length, which a pruned cache does not hold: pass a "
                "slimpass.SlimCache(model.config) or no cache (one is made)")
        prefill = isinstance(cache, slim_cache.SlimCache) and cache.get_seq_length() == 0
        decoding = isinstance(cache, slim_cache.SlimCache) and not prefill and cache.recorded
        if not decoding:
            _warn_past_context(model, state, _prompt_length(args, kwargs))
        if prefill:
            state.last_keep = None  # set again by this call's prefill graph when pruning is compiled in
        elif decoding:
            cache.before_step()  # may replace the cache's tensors (offload): before marking them dynamic
        args, kwargs = form.canonical(args, kwargs, prefill=prefill or cache is None)
        state.call_started = time.perf_counter()  # a graph compiled in this call says how long tracing took
        if config.dynamic_prompt:
            _mark_dynamic(args, kwargs)
        try:
            out = compiled(*args, **kwargs)
        finally:
            state.call_started = None
        if prefill:
            ran = state.graph_configs.get(state.last_graph) if state.last_keep is not None else None
            cache.record_prefill(_prompt_length(args, kwargs), state.last_keep or [], ran or config)
        elif decoding:
            cache.after_step()
        return out

    model.__dict__["_slimpass_original_forward"] = original
    model.forward = forward
    if not hasattr(model, "generate"):  # a plain module: its forward is all there is to compile
        return model
    original_generate = model.__dict__.get("_slimpass_original_generate", model.generate)

    @functools.wraps(original_generate)
    def generate(*args: Any, **kwargs: Any) -> Any:
        config = resolve(options, REGISTRY.config_for(model))
        if config.prune and kwargs.get("assistant_model") is not None:
            raise ConfigError("slimpass.compile(prune=True): assisted / speculative decoding (assistant_model=) "
                              "verifies several tokens a step against a pruned cache, which is not supported; "
                              "generate without assistant_model, or compile with prune=False")
        other = kwargs.get("cache_implementation") or getattr(kwargs.get("generation_config"), "cache_implementation", None)
        if other:
            if config.prune:
                raise ConfigError(f"slimpass.compile(prune=True) decodes from a slimpass.SlimCache (the pruned layers "
                                  f"hold fewer tokens); generate(cache_implementation={other!r}) asks for another "
                                  "cache: drop cache_implementation, or compile with prune=False")
            return original_generate(*args, **kwargs)  # pruning off: the cache generate was asked for
        if with_slim_cache and _cache_of(kwargs) is None and kwargs.get("use_cache", True):
            cache = kwargs[cache_name] = slim_cache.SlimCache(model.config)  # every request a clean cache
            cache.new_tokens = _max_new_tokens(model, kwargs)  # static_decode sizes its buffers by it
        return original_generate(*args, **kwargs)

    model.__dict__["_slimpass_original_generate"] = original_generate
    model.generate = generate
    return model


def _max_new_tokens(model: torch.nn.Module, kwargs: dict) -> int | None:
    """The most tokens a generate call asks for (its `max_new_tokens`, or its generation config's, or the
    model's), or None when it does not say."""
    for source in (kwargs, kwargs.get("generation_config"), getattr(model, "generation_config", None)):
        value = source.get("max_new_tokens") if isinstance(source, dict) else getattr(source, "max_new_tokens", None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def restore(model: torch.nn.Module) -> torch.nn.Module:
    """Undo `compile`: the model's own forward again."""
    original = model.__dict__.pop("_slimpass_original_forward", None)
    if original is not None:
        model.__dict__.pop("forward", None)
    if model.__dict__.pop("_slimpass_original_generate", None) is not None:
        model.__dict__.pop("generate", None)
    return model


def compiled_graphs(model: torch.nn.Module) -> list[GraphRecord]:
    """What sliminfer compiled for this model so far: one `GraphRecord` per graph (kind, passes, guards).
    `model` may be the module or what `torch.compile(model, backend="sliminfer")` returned."""
    return list(unwrap(model).__dict__.get("_slimpass_graphs", []))
