"""Prove that the mask reaching an attention call is the plain causal mask (for canonical inputs).

The mask subgraph (all ancestors of the mask node, found with networkx) is copied into its own
GraphModule and evaluated on concrete inputs: the tensors it reads are given their canonical
prefill values (attention_mask all ones, positions 0..N-1); inputs it only asks the size of get
placeholders; model buffers get their real values. Any other input makes the proof fail. For a
graph with a symbolic prompt length the mask is evaluated at several lengths. The result must
equal tril(ones(N, N)) (bool masks) or be 0 there and <= finfo.min / 2 elsewhere (additive masks).

What the proof assumed about the inputs comes back as `InputGuard`s, checked on every call.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import networkx as nx
import sympy
import torch
import torch.fx

from slimpass.passes.graph_utils import fake, input_source, is_op, nx_view
from slimpass.runtime.guards import InputGuard

PROBE_LENGTHS = (2, 3, 17, 64, 65, 1025)
_ROLE_SUFFIXES = {"['attention_mask']": "attention_mask", "['cache_position']": "cache_position",
                  "['position_ids']": "position_ids"}


_CANONICAL = ("attention_mask", "cache_position", "position_ids")


class NotCausal(Exception):
    """The mask could not be proven causal; the message says why."""


@dataclasses.dataclass
class CausalProof:
    guards: list[InputGuard]
    lengths: tuple[int, ...]  # prompt lengths at which the mask was evaluated
    symbolic: bool  # the graph serves every prompt length


def _role(node: torch.fx.Node) -> str | None:
    source = input_source(node)
    return next((role for suffix, role in _ROLE_SUFFIXES.items() if source.endswith(suffix)), None)


def _shape_only(node: torch.fx.Node, members: set) -> bool:
    return all(is_op(user, "shape_query") or user.op == "call_method" and user.target in ("size", "dim")
               for user in node.users if user in members)


def _concrete(value: Any, binding: dict, shape_env: Any) -> int:
    if isinstance(value, torch.SymInt):
        expr = value.node.expr
        if shape_env is not None:
            expr = shape_env.replace(expr)
        return int(expr.xreplace(binding))
    return int(value)


def _canonical(role: str, shape: list[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if role == "attention_mask":
        return torch.ones(shape, dtype=dtype, device=device)
    return torch.arange(shape[-1], dtype=dtype, device=device).expand(shape).contiguous()


class _MaskProgram:
    """The mask subgraph as a standalone GraphModule plus how to feed each of its inputs."""

    def __init__(self, gm: torch.fx.GraphModule, mask: torch.fx.Node, example_inputs: list[Any]) -> None:
        members = nx.ancestors(nx_view(gm.graph), mask) | {mask}
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        graph, env = torch.fx.Graph(), {}
        self.feeds: list[tuple[torch.fx.Node, int, str]] = []
        self.guards: list[InputGuard] = []
        for node in gm.graph.nodes:
            if node not in members:
                continue
            env[node] = graph.node_copy(node, lambda n: env[n])
            if node.op == "placeholder":
                self.feeds.append((node, placeholders.index(node), self._classify(node, members)))
        graph.output(env[mask])
        self.module = torch.fx.GraphModule(gm, graph)
        self.example_inputs = example_inputs
        for node, index, how in self.feeds:
            if how in _CANONICAL:
                self.guards.append(InputGuard(index, how))

    @staticmethod
    def _classify(node: torch.fx.Node, members: set) -> str:
        value = fake(node)
        source = input_source(node)
        if not isinstance(value, torch.Tensor):
            return "size"
        if "_buffers" in source or "_parameters" in source:
            return "real"
        role = _role(node)
        if role is not None:
            return role
        if _shape_only(node, members):
            return "shape_only"
        raise NotCausal(f"the mask depends on the contents of input {source or node.name}")

    def sequence_symbols(self) -> set:
        """Length symbols of the inputs given canonical values (the last dim of each)."""
        symbols = set()
        for node, _index, how in self.feeds:
            last = fake(node).shape[-1] if how in _CANONICAL else None
            if isinstance(last, torch.SymInt) and isinstance(last.node.expr, sympy.Symbol):
                symbols.add(last.node.expr)
        return symbols

    def evaluate(self, binding: dict, shape_env: Any) -> torch.Tensor:
        args = []
        for node, index, how in self.feeds:
            value = fake(node)
            if how == "size":
                args.append(_concrete(value, binding, shape_env))
            elif how == "real":
                args.append(self.example_inputs[index])
            else:
                shape = [_concrete(s, binding, shape_env) for s in value.shape]
                device = value.device
                if how == "shape_only":
                    args.append(torch.zeros(shape, dtype=value.dtype, device=device))
                else:
                    args.append(_canonical(how, shape, value.dtype, device))
        return torch.fx.Interpreter(self.module).run(*args)


def _is_causal(result: Any, n: int) -> bool:
    if not isinstance(result, torch.Tensor) or result.dim() < 2 or tuple(result.shape[-2:]) != (n, n):
        return False
    allowed = torch.ones(n, n, dtype=torch.bool, device=result.device).tril()
    result = result.expand(*result.shape[:-2], n, n)
    if result.dtype == torch.bool:
        return bool((result == allowed).all())
    if not result.is_floating_point():
        return False
    floor = torch.finfo(result.dtype).min / 2
    return bool((result.masked_select(allowed) == 0).all()) and bool((result.masked_select(~allowed) <= floor).all())


def prove_causal(gm: torch.fx.GraphModule, mask: torch.fx.Node, q_len: Any, example_inputs: list[Any]) -> CausalProof:
    """Return the guards under which `mask` equals the causal mask, or raise `NotCausal`."""
    program = _MaskProgram(gm, mask, example_inputs)
    if isinstance(q_len, int):
        lengths, binding_for, shape_env = (q_len,), (lambda n: {}), None
    else:
        expr = q_len.node.expr
        shape_env = q_len.node.shape_env
        if not isinstance(expr, sympy.Symbol):
            raise NotCausal(f"the prompt length is the expression {expr}, not a plain size")
        values = getattr(shape_env, "backed_var_to_val", None) or shape_env.var_to_val
        hints = {sym: sympy.Integer(val) for sym, val in values.items()}
        lengths = tuple(sorted({int(hints[expr]), *PROBE_LENGTHS}))
        # attention_mask / position inputs may carry their own length symbol; the guards check
        # at run time that it equals the prompt length, so the proof binds it to the same value.
        sequence = {expr} | program.sequence_symbols()

        def binding_for(n: int) -> dict:
            return {**hints, **{sym: sympy.Integer(n) for sym in sequence}}

    with torch.no_grad():
        for n in lengths:
            try:
                result = program.evaluate(binding_for(n), shape_env)
            except Exception as err:  # noqa: BLE001 - any failure to evaluate means "not proven"
                raise NotCausal(f"evaluating the mask at length {n} failed: {type(err).__name__}: {err}") from err
            if not _is_causal(result, n):
                raise NotCausal(f"the mask is not the causal mask at prompt length {n}")
    return CausalProof(program.guards, lengths, not isinstance(q_len, int))


def prove_all_true(gm: torch.fx.GraphModule, mask: torch.fx.Node, example_inputs: list[Any]) -> list[InputGuard]:
    """Return the guards under which `mask` lets every query see every key (a decoding step's mask of an
    unpadded prompt), or raise `NotCausal`.

    The mask is evaluated at the traced sizes and with every length symbol shifted by the same amounts
    (a longer cache, an attention_mask one longer than it: sizes that grow together in decoding)."""
    program = _MaskProgram(gm, mask, example_inputs)
    if any(how in ("cache_position", "position_ids") for _node, _index, how in program.feeds):
        raise NotCausal("the mask reads positions: their canonical decoding values are not 0..N-1")
    sizes = [size for node, _i, _h in program.feeds
             for size in (fake(node).shape if isinstance(fake(node), torch.Tensor) else [fake(node)])
             if isinstance(size, torch.SymInt)]
    shape_env = sizes[0].node.shape_env if sizes else None
    hints = {}
    if shape_env is not None:
        values = getattr(shape_env, "backed_var_to_val", None) or shape_env.var_to_val
        hints = {sym: sympy.Integer(val) for sym, val in values.items()}
    symbols = {sym for size in sizes for sym in size.node.expr.free_symbols}
    with torch.no_grad():
        for shift in (0, 1, 15, 64, 1000):
            binding = {**hints, **{sym: hints[sym] + shift for sym in symbols if sym in hints}}
            try:
                result = program.evaluate(binding, shape_env)
            except Exception as err:  # noqa: BLE001 - any failure to evaluate means "not proven"
                raise NotCausal(f"evaluating the mask (lengths + {shift}) failed: {type(err).__name__}: {err}") from err
            if not isinstance(result, torch.Tensor):
                raise NotCausal("the mask is not a tensor")
            if result.dtype == torch.bool:
                if not bool(result.all()):
                    raise NotCausal(f"the mask hides some key (lengths + {shift})")
            elif not (result.is_floating_point() and bool((result == 0).all())):
                raise NotCausal(f"the additive mask is not zero everywhere (lengths + {shift})")
    return program.guards


def empty_mask_reason(gm: torch.fx.GraphModule, mask: torch.fx.Node, ctx: Any, proven: dict) -> str:
    """"" when `mask` is proven to hide nothing (its guards added to ``ctx.guards`` once), else why not.
    `proven` caches the answer per mask producer across the layers that share it."""
    if mask not in proven:
        try:
            for guard in prove_all_true(gm, mask, ctx.example_inputs):
                if guard not in ctx.guards:
                    ctx.guards.append(guard)
            proven[mask] = ""
        except NotCausal as err:
            proven[mask] = str(err)
    return proven[mask]


def length_input(gm: torch.fx.GraphModule, q_len: Any) -> tuple[int, int] | None:
    """(input index, dim) of a graph input whose size is the symbolic prompt length."""
    if isinstance(q_len, int):
        return None
    for index, node in enumerate(n for n in gm.graph.nodes if n.op == "placeholder"):
        value = fake(node)
        if isinstance(value, torch.Tensor):
            for dim, size in enumerate(value.shape):
                if isinstance(size, torch.SymInt) and size.node.expr == q_len.node.expr:
                    return index, dim
    return None
