"""slimpass: the ``sliminfer`` torch.compile backend for faster, leaner long-prompt LLM inference.

    model = torch.compile(model, backend="sliminfer")   # forward only; no import needed
    model = slimpass.compile(model)                     # forward and generate

See README.md for usage and options, docs/GUIDE.md for passes, graph dumps and benchmarks.
"""

from __future__ import annotations

from slimpass import config
from slimpass.api import compile, compiled_graphs, restore
from slimpass.backend import SlimpassWarning, sliminfer
from slimpass.config import ConfigError, SlimConfig
from slimpass.passes.base import GraphPass, PassContext, PassResult
from slimpass.registry import configure, register_pass, unregister_pass
from slimpass.runtime.keep_sets import KeepSet, last_keep_sets, plot_keep_sets
from slimpass.runtime.scoring import ScoreSettings, make_window_attention, register_scorer
from slimpass.runtime.slim_cache import MemoryReport, SlimCache

__all__ = [
    "ConfigError", "GraphPass", "SlimpassWarning", "KeepSet", "MemoryReport", "PassContext", "PassResult", "ScoreSettings", "SlimCache", "SlimConfig", "compile",
    "compiled_graphs", "config", "configure", "last_keep_sets", "make_window_attention", "plot_keep_sets", "register_pass",
    "register_scorer",
    "restore", "sliminfer", "unregister_pass",
]
__version__ = "0.1.0"


def _register_without_entry_point() -> None:
    """Make backend="sliminfer" work when slimpass is imported from a source tree (not installed).

    Installed, the entry point registers the backend lazily and registering here too would be a
    duplicate; so register only when no entry point provides the name.
    """
    from importlib.metadata import entry_points

    from torch._dynamo.backends import registry

    if "sliminfer" in entry_points(group="torch_dynamo_backends").names:
        return
    if "sliminfer" not in registry._COMPILER_FNS:
        registry.register_backend(sliminfer, name="sliminfer")


_register_without_entry_point()
