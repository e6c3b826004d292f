"""What a `SlimCache` holds, in bytes: `SlimCache.memory_report()` returns a `MemoryReport`."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class LayerMemory:
    """One layer's share of a `SlimCache`: tokens held (per row), the bytes of its K and V on the accelerator
    and on the CPU (an offloaded layer: its front and tail on the accelerator, its prompt in host memory),
    and the bytes of the keys reselection scores against (under offload with ``reselect_unit = 1``, the
    layer's prompt keys, kept on the accelerator; not counted as KV)."""

    layer: int
    tokens: int
    gpu_bytes: int
    cpu_bytes: int
    score_bytes: int = 0


@dataclasses.dataclass(frozen=True)
class MemoryReport:
    """`SlimCache.memory_report()`: per layer, and the totals against an unpruned cache of the same length."""

    layers: tuple[LayerMemory, ...]
    dense_bytes: int
    """What a cache holding every token at every layer would take (same dtype, heads, head size)."""

    @property
    def gpu_bytes(self) -> int:
        return sum(m.gpu_bytes for m in self.layers)

    @property
    def cpu_bytes(self) -> int:
        return sum(m.cpu_bytes for m in self.layers)

    @property
    def total_bytes(self) -> int:
        return self.gpu_bytes + self.cpu_bytes

    @property
    def score_bytes(self) -> int:
        return sum(m.score_bytes for m in self.layers)

    def __str__(self) -> str:
        lines = ["layer  tokens  accelerator MB  cpu MB  scored keys MB"]
        lines += [f"{m.layer:5d}  {m.tokens:6d}  {m.gpu_bytes / 2**20:14.2f}  {m.cpu_bytes / 2**20:6.2f}  "
                  f"{m.score_bytes / 2**20:14.2f}" for m in self.layers]
        dense = self.dense_bytes or 1
        lines.append(f"total  {self.total_bytes / 2**20:.2f} MB = {self.total_bytes / dense:.1%} of the unpruned cache "
                     f"({self.dense_bytes / 2**20:.2f} MB); on the accelerator {self.gpu_bytes / dense:.1%} "
                     f"(+ {self.score_bytes / dense:.1%} scored keys)")
        return "\n".join(lines)
