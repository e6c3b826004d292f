"""Events inside a decode graph around an offloaded layer's fronts (``offload`` with ``static_decode``).

Under `static_decode` a decoding step is one CUDA-graph replay, and its GPU time is what the step costs
(docs/PERF.md, ninth round). The offload manager's copies for the next step would then run between two
replays and add to every step. So with fixed-size buffers the step's graph carries two marks per
offloaded layer, which `reselection.reselect_attention` calls:

- `wait_front`, before the layer reads its fronts: the compute stream waits for the event that the side
  stream records after it copied the layer's blocks for this step;
- `front_done`, after the layer's last read of its fronts: it writes the layer's next set (`pending`)
  and the compute stream records an event, which the side stream waits for before it reads that set and
  copies for the next step.

So a layer's copy for step s + 1 may run from its layer in step s to its layer in step s + 1: while the
rest of step s and the start of step s + 1 compute. Both are custom ops declared as writing the fronts,
so the compiler keeps them and orders them among the fronts' reads and writes. Three more orderings are
not implied by the fronts, and Inductor does not keep the traced order of ops without data dependencies:

- `wait_front` also reads a tensor of the layer's step computed just before (its query), or Inductor
  hoists every layer's wait to the top of the graph (and the whole copy would have to be done before
  the step starts);
- `front_done` itself writes `pending`: a traced ``pending.copy_`` of a graph input is written back at the
  graph's end, after the event, and the side stream would read the step before's set;
- `front_done` returns (a copy of) the layer's attention output, which the layer's next op reads, or
  Inductor sinks every layer's mark to the end of the graph (and the copy could run only between steps).

Captured in a CUDA graph they become event nodes (``torch.cuda.Event(external=True)``) that each replay
records or waits for.

A recording has its events baked in, and CUDA-graph trees replay a recording whenever the static inputs'
addresses match. So the events belong to the fronts' address, not to a request: a later request whose fronts land
at the same address finds (and its manager uses) the same events. They are created once per address and
kept for the process (two small handles per address ever used; `known_addresses` counts them).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch


@dataclasses.dataclass(eq=False)
class FrontEvents:
    """A layer's two events (None off CUDA, where both marks only check that the layer is known)."""

    ready: Any  # torch.cuda.Event: recorded on the side stream after the copy into the layer's fronts
    done: Any  # torch.cuda.Event: recorded in the step after its last read of the fronts


_EVENTS: dict[tuple[str, int], FrontEvents] = {}


def _key(front_k: torch.Tensor) -> tuple[str, int]:
    return str(front_k.device), front_k.data_ptr()


def events_for(front_k: torch.Tensor) -> FrontEvents:
    """The events of the fronts at `front_k`'s address (made on first use)."""
    key = _key(front_k)
    if key not in _EVENTS:
        cuda = front_k.device.type == "cuda"
        _EVENTS[key] = FrontEvents(torch.cuda.Event(external=True) if cuda else None,
                                   torch.cuda.Event(external=True) if cuda else None)
    return _EVENTS[key]


def known_addresses() -> int:
    """How many front addresses have events (they are kept for the process)."""
    return len(_EVENTS)


def _lookup(front_k: torch.Tensor, layer: int, mark: str) -> FrontEvents:
    events = _EVENTS.get(_key(front_k))
    if events is None:
        raise RuntimeError(
            f"slimpass: {mark} of offloaded layer {layer} got a fronts tensor that no offload manager set up "
            f"(address {front_k.data_ptr():#x}): the compiler handed the mark a copy of the fronts, so the step could "
            "not be ordered after the side stream's copies. Run with static_decode=False (the manager then orders the "
            "copies around each step from the host)")
    return events


@torch.library.custom_op("slimpass::wait_front", mutates_args=("front_k", "front_v"))
def wait_front(front_k: torch.Tensor, front_v: torch.Tensor, after: torch.Tensor, layer: int) -> None:
    """Before decoder layer `layer` reads its fronts, after `after` (read only to be ordered after it): the
    current stream waits for their copy. (Declared as writing the fronts, so that their reads come after it.)"""
    events = _lookup(front_k, layer, "wait_front")
    if events.ready is not None:
        torch.cuda.current_stream(front_k.device).wait_event(events.ready)


@wait_front.register_fake
def _(front_k, front_v, after, layer):
    return None


@torch.library.custom_op("slimpass::front_done", mutates_args=("front_k", "front_v", "pending"))
def front_done(front_k: torch.Tensor, front_v: torch.Tensor, pending: torch.Tensor, upcoming: torch.Tensor,
               out: torch.Tensor, layer: int) -> torch.Tensor:
    """After decoder layer `layer`'s last read of its fronts: write its next set `upcoming` into `pending` and
    record that on the current stream. Returns a copy of the layer's attention output `out` for the layer to
    go on with. (Declared as writing the fronts, so that it comes after their reads.)"""
    events = _lookup(front_k, layer, "front_done")
    pending.copy_(upcoming)
    if events.done is not None:
        events.done.record(torch.cuda.current_stream(front_k.device))
    return out.clone()


@front_done.register_fake
def _(front_k, front_v, pending, upcoming, out, layer):
    return torch.empty_like(out)
