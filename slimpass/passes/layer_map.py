"""`LayerMap`: what discovery found in a graph, read by every later pass.

Written by `find_decoder_layers` into `PassContext.layer_map`, and per node into
``node.meta["slimpass"]`` (a dict with ``layer`` and ``role``) so dumps and user passes can see it.
"""

from __future__ import annotations

import dataclasses

import torch.fx

GRAPH_KINDS = ("prefill", "decode", "extend")


@dataclasses.dataclass
class EagerAttention:
    """The nodes of HF's eager attention: softmax(q @ k^T * scale + mask) @ v."""

    scores: torch.fx.Node  # matmul(q, k^T)
    scaled: torch.fx.Node  # mul(scores, scale)
    masked: torch.fx.Node | None  # add(scaled, mask), absent without a mask
    softmax: torch.fx.Node
    probs: torch.fx.Node  # last node before the value matmul (after cast / dropout)
    output: torch.fx.Node  # matmul(probs, v)
    scale: float


@dataclasses.dataclass
class LayerInfo:
    """One decoder layer as it appears in the graph."""

    index: int
    path: str  # e.g. "model.layers.3"
    input: torch.fx.Node  # residual stream entering the layer
    output: torch.fx.Node  # residual stream leaving the layer (after sink_selection: its selected rows)
    q: torch.fx.Node  # query after RoPE, [B, Hq, Nq, D]
    k: torch.fx.Node  # this step's keys after RoPE, [B, Hkv, Nq, D]
    v: torch.fx.Node  # this step's values, [B, Hkv, Nq, D]
    k_attn: torch.fx.Node  # keys the attention reads (cache + new, possibly repeated for GQA)
    v_attn: torch.fx.Node
    k_full: torch.fx.Node  # keys after the cache write, before any GQA repeat
    v_full: torch.fx.Node
    attention: torch.fx.Node  # the SDPA call, or the value matmul of eager attention
    kind: str  # "sdpa" or "eager"
    mask: torch.fx.Node | None  # mask reaching the attention, if any
    kv_writes: tuple[torch.fx.Node, ...]  # cache updates (cat) of this layer
    gqa_repeat: bool  # keys/values copied with repeat_kv before the attention
    eager: EagerAttention | None = None
    found_kind: str = ""  # `kind` as discovered, before any rewrite ("eager" stays "eager" here)
    static_valid: torch.fx.Node | None = None  # static_decode: the count of written slots the attention is masked to

    def __post_init__(self) -> None:
        self.found_kind = self.found_kind or self.kind

    @property
    def q_len(self):
        return self.q.meta["example_value"].shape[-2]

    @property
    def kv_len(self):
        return self.k_attn.meta["example_value"].shape[-2]


@dataclasses.dataclass
class LayerMap:
    """Every decoder layer of a graph plus the producers they share."""

    layers: list[LayerInfo]
    cos: torch.fx.Node
    sin: torch.fx.Node
    masks: tuple[torch.fx.Node, ...]  # distinct mask producers reaching attention calls
    kind: str  # one of GRAPH_KINDS

    def describe(self) -> str:
        kinds = sorted({layer.kind for layer in self.layers})
        gqa = sum(layer.gqa_repeat for layer in self.layers)
        return (
            f"{self.kind} graph, {len(self.layers)} decoder layers ({'/'.join(kinds)} attention), "
            f"{len(self.masks)} mask producer(s), {gqa} layer(s) with repeat_kv copies, "
            f"{sum(len(layer.kv_writes) for layer in self.layers)} KV-cache writes"
        )
