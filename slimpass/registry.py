"""Decorators that attach configuration and user passes: `configure` and `register_pass`.

Registries live in one `Registry` object per process (`REGISTRY`), which tests snapshot and
restore; nothing here depends on import order.
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Callable
from typing import Any

import torch

from slimpass.config import ConfigError, SlimConfig


def pass_points() -> tuple[str, ...]:
    """Points of the pipeline where a user pass can run: "start", each builtin pass (meaning "right after
    it"), "end". Read from the pass manager's one ordered list (imported here, late: the manager imports this)."""
    from slimpass.passes.manager import BUILTIN_PASSES

    return ("start", *(cls.name for cls in BUILTIN_PASSES), "end")


@dataclasses.dataclass
class UserPass:
    """A user graph pass registered with `register_pass`: fn(gm, ctx) -> PassResult | int | None."""

    fn: Callable[..., Any]
    name: str
    after: str


@dataclasses.dataclass
class Registry:
    """Per-process registrations: configs by class and by instance, user passes by point, block scorers by
    name (`slimpass.runtime.scoring` registers the builtin ones when imported)."""

    class_configs: dict[type, SlimConfig] = dataclasses.field(default_factory=dict)
    instance_configs: weakref.WeakKeyDictionary = dataclasses.field(default_factory=weakref.WeakKeyDictionary)
    user_passes: list[UserPass] = dataclasses.field(default_factory=list)
    scorers: dict[str, Callable[..., Any]] = dataclasses.field(default_factory=dict)

    def snapshot(self) -> tuple:
        return (dict(self.class_configs), weakref.WeakKeyDictionary(self.instance_configs), list(self.user_passes),
                dict(self.scorers))

    def restore(self, state: tuple) -> None:
        self.class_configs, self.instance_configs = dict(state[0]), weakref.WeakKeyDictionary(state[1])
        self.user_passes, self.scorers = list(state[2]), dict(state[3])

    def config_for(self, model: Any) -> SlimConfig | None:
        """The config registered for this model instance, else for the nearest class in its MRO."""
        if model is None:
            return None
        try:
            if model in self.instance_configs:
                return self.instance_configs[model]
        except TypeError:  # not weak-referenceable
            pass
        for cls in type(model).__mro__:
            if cls in self.class_configs:
                return self.class_configs[cls]
        return None

    def passes_after(self, point: str) -> list[UserPass]:
        return [p for p in self.user_passes if p.after == point]


REGISTRY = Registry()


def configure(target: Any = None, /, **settings: Any) -> Any:
    """Set the slimpass config of a model class (decorator) or of a model instance.

    Examples::

        @slimpass.configure(schedule={10: 8192, 20: 4096, 30: 2048})
        class MyLlama(LlamaForCausalLM): ...

        slimpass.configure(model, compiler="eager", dump_dir="dumps/")

    Values are validated at once; ``options=`` at compile time still takes precedence.
    """
    config = SlimConfig().replace("slimpass.configure()", **settings)

    def apply(obj: Any) -> Any:
        if isinstance(obj, type):
            REGISTRY.class_configs[obj] = config
        elif isinstance(obj, torch.nn.Module):
            REGISTRY.instance_configs[obj] = config
        else:
            raise ConfigError(
                f"slimpass.configure() applies to a torch.nn.Module class or instance, not {type(obj).__name__}"
            )
        return obj

    return apply if target is None else apply(target)


def register_pass(fn: Callable[..., Any] | None = None, /, *, after: str = "end", name: str | None = None) -> Any:
    """Add a user graph pass to the pipeline, run right after the builtin pass `after`.

    ``after`` is one of `pass_points()`: ``"start"`` (before discovery), a builtin pass's name
    (``"find_decoder_layers"``, ``"rewrite_attention"``, ``"insert_pruning"``, ``"sink_selection"``,
    ``"reselect_kv"``, ``"fuse_projections"``) or ``"end"`` (just before lowering). The pass is called as
    ``fn(gm, ctx)`` where `ctx` is the `PassContext` (config, `layer_map`, graph kind); it edits
    ``gm.graph`` in place and may return a `PassResult` or the number of nodes it changed.

    Example::

        @slimpass.register_pass(after="rewrite_attention")
        def count_linears(gm, ctx):
            ctx.notes.append(f"{sum(n.target is torch._C._nn.linear for n in gm.graph.nodes)} linears")
            return 0

    Returns `fn`; `unregister_pass(fn)` removes it.
    """

    def add(f: Callable[..., Any]) -> Callable[..., Any]:
        points = pass_points()
        if after not in points:
            raise ConfigError(f"register_pass(after={after!r}): expected one of {', '.join(map(repr, points))}")
        if not callable(f):
            raise ConfigError(f"register_pass: {f!r} is not callable")
        REGISTRY.user_passes.append(UserPass(fn=f, name=name or getattr(f, "__name__", repr(f)), after=after))
        return f

    return add if fn is None else add(fn)


def unregister_pass(fn: Callable[..., Any]) -> None:
    """Remove every registration of the user pass `fn`."""
    REGISTRY.user_passes = [p for p in REGISTRY.user_passes if p.fn is not fn]
