"""The TokenUnit block scorer as one fused Triton kernel: the op ``slimpass::tokenunit_scores``.

Specification: `slimpass.runtime.scoring.tokenunit_torch` (q ``[B, Hq, L, D]`` and k ``[B, Hkv, L, D]``
after RoPE -> float32 ``[B, L // block_size]``). The kernel makes one pass over the keys of the full
blocks and never materialises the ``[B, Hkv, units, D]`` unit keys nor the ``[B, Hq, units]`` unit
scores that the torch version builds:

- the local queries (mean of the last ``local_window`` queries, float32 ``[B, Hq, D]``) are computed in
  torch with the same expression as `tokenunit_torch` (a tiny tensor, and bitwise the same values);
- one program per (batch row, tile of ``TILE_BLOCKS`` consecutive blocks); for each KV head it loads
  the tile's keys one unit position at a time (``unit_size`` strided ``[TILE_BLOCKS, units_per_block,
  D]`` loads), sums them in float32 and divides by ``unit_size`` (the unit's mean key), then for each
  query head of that KV head's group adds ``|q_local . k_unit|`` into a float32 accumulator;
- it divides the accumulator by ``Hq`` (the mean over all query heads) and stores each block's max
  over its units.

Any head dim up to 256 (padded to a power of two with masks; a larger one runs `tokenunit_torch`),
any ``unit_size`` dividing ``block_size``, grouped-query attention, bf16/fp16/fp32 inputs (float32
accumulation), and arbitrary strides of q and k (e.g. the transpose of a ``[B, L, H, D]`` tensor).
The length ``L`` stays symbolic under ``torch.compile(dynamic=True)``: the output shape is
``[B, L // block_size]`` of ``q.shape``, and ``L`` only reaches the kernel as a runtime int.

Ties and precision: block selection sorts the scores descending with a *stable* sort, so equal
scores keep the lower block index first. The kernel's floating-point accumulation order differs from
torch's (per-unit key sums, dot products and the head mean are summed in another order), so its
scores agree with `tokenunit_torch` to about 1e-6 relative, not bitwise; on random inputs the
selection order is the same, but two blocks whose scores differ by less than that can swap.

Dispatch: on CUDA tensors the op launches the kernel (through ``torch.library.wrap_triton``, so
Inductor sees and can inline the kernel); on CPU tensors it runs `tokenunit_torch`, except under
``TRITON_INTERPRET=1`` (set before triton is imported), where the kernel runs in Triton's interpreter
on CPU tensors -- that is how the tests check it on a machine without a GPU. In interpreter mode the
op stays opaque to ``torch.compile`` (a shape-only fake implementation), because the interpreter
cannot trace a kernel on fake tensors.

Without triton this module still imports: `available()` is False and `tokenunit_scores` is a plain
function that calls `tokenunit_torch`.
"""

from __future__ import annotations

import torch

try:  # pragma: no cover - depends on the environment
    import triton
    import triton.language as tl
    from torch.library import triton_op, wrap_triton

    _HAS_TRITON = True
except ImportError:  # pragma: no cover - depends on the environment
    triton = None
    tl = None
    _HAS_TRITON = False

OP_NAME = "slimpass::tokenunit_scores"
MAX_HEAD_DIM = 256
# A program's tile of pooled keys, [TILE_BLOCKS, units_per_block, D] float32, holds about this many
# elements: small tiles and many programs keep the loads in flight. Measured on an H100 (bf16, Hq=32,
# Hkv=8, D=128, block 64, unit 8; CUDA-graph replays, local-query ops included): 1024 elements at 8
# warps (one block a program) took 23/41/108 us at L=8K/32K/128K, ~2.5 TB/s of keys at 128K; 8192 at 4
# warps took 57/116/164 us.
_TILE_ELEMENTS = 1024
_MAX_TILE_BLOCKS = 16
_NUM_WARPS = 8


def _torch_scores(q: torch.Tensor, k: torch.Tensor, block_size: int, unit_size: int, local_window: int):
    from slimpass.runtime.scoring import ScoreSettings, tokenunit_torch  # lazy: scoring imports us lazily

    return tokenunit_torch(q, k, ScoreSettings(block_size, unit_size, local_window))


def _check(q: torch.Tensor, k: torch.Tensor, block_size: int, unit_size: int, local_window: int) -> None:
    """Shape checks on static quantities only (never on the symbolic length)."""
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"tokenunit_scores: q and k must be [B, H, L, D], got {tuple(q.shape)} and {tuple(k.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"tokenunit_scores: q {tuple(q.shape)} and k {tuple(k.shape)} disagree on B or D")
    if k.shape[1] < 1 or q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"tokenunit_scores: Hq={q.shape[1]} is not a multiple of Hkv={k.shape[1]}")
    if block_size < 1 or unit_size < 1 or block_size % unit_size != 0:
        raise ValueError(f"tokenunit_scores: unit_size={unit_size} must divide block_size={block_size}")
    if local_window < 1:
        raise ValueError(f"tokenunit_scores: local_window={local_window} must be >= 1")


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _tile_blocks(units_per_block: int, head_dim: int) -> int:
    per_block = _next_pow2(units_per_block) * _next_pow2(head_dim)
    return max(1, min(_MAX_TILE_BLOCKS, _TILE_ELEMENTS // per_block))


if _HAS_TRITON:
    # The kernel calls no @triton.jit function of triton.language (tl.zeros, tl.sum and tl.max are
    # ones): it uses tl.full, and tl.reduce with its own combine functions. When triton was imported
    # before TRITON_INTERPRET=1 was set (pytest's conftest imports it through transformers), the
    # interpreter cannot call triton.language's jit functions; it runs the builtin tl.reduce, in numpy
    # when the combine function *is* tl.sum's / tl.max's (so in interpreter mode these names are bound
    # to those), else element by element in Python. The names match the functions' __name__s because
    # Inductor, which copies the kernel's source, defines each jit function it calls under that name.
    @triton.jit
    def _sum_combine(a, b):
        return a + b

    @triton.jit
    def _elementwise_max(a, b):
        return tl.maximum(a, b)

    def _interpreted() -> bool:
        try:
            from triton.runtime.interpreter import InterpretedFunction
        except ImportError:  # pragma: no cover
            return False
        return isinstance(_sum_combine, InterpretedFunction)

    _INTERPRETED = _interpreted()
    if _INTERPRETED:
        _sum_combine = getattr(tl.standard, "_sum_combine", _sum_combine)
        _elementwise_max = getattr(tl.standard, "_elementwise_max", _elementwise_max)

    @triton.jit
    def _tokenunit_kernel(
        local_ptr,  # float32 [B, Hq, D], the local queries
        k_ptr,  # [B, Hkv, L, D] keys, any strides
        out_ptr,  # float32 [B, n_blocks]
        n_blocks,
        stride_lb, stride_lh, stride_ld,
        stride_kb, stride_kh, stride_kl, stride_kd,
        stride_ob, stride_on,
        HKV: tl.constexpr,
        GROUP: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        BLOCK: tl.constexpr,
        UNIT: tl.constexpr,
        UNITS_PER_BLOCK: tl.constexpr,
        TILE_BLOCKS: tl.constexpr,
        UPB_PAD: tl.constexpr,
        D_PAD: tl.constexpr,
    ):
        tile = tl.program_id(0)
        batch = tl.program_id(1).to(tl.int64)
        blocks = tile * TILE_BLOCKS + tl.arange(0, TILE_BLOCKS)  # [T]
        units = tl.arange(0, UPB_PAD)  # [U]
        dims = tl.arange(0, D_PAD)  # [D]
        unit_mask = (blocks[:, None] < n_blocks) & (units[None, :] < UNITS_PER_BLOCK)  # [T, U]
        dim_mask = dims < HEAD_DIM
        key_mask = unit_mask[:, :, None] & dim_mask[None, None, :]  # [T, U, D]
        # first token of each unit, int64 so that token * stride cannot overflow
        first = blocks[:, None].to(tl.int64) * BLOCK + units[None, :] * UNIT  # [T, U]
        key_offsets = first[:, :, None] * stride_kl + dims[None, None, :].to(tl.int64) * stride_kd

        acc = tl.full((TILE_BLOCKS, UPB_PAD), 0.0, tl.float32)
        for kv in tl.static_range(HKV):
            key_base = k_ptr + batch * stride_kb + (batch * 0 + kv) * stride_kh  # int64 offsets
            pooled = tl.full((TILE_BLOCKS, UPB_PAD, D_PAD), 0.0, tl.float32)
            for j in tl.static_range(UNIT):
                pooled += tl.load(key_base + key_offsets + j * stride_kl, mask=key_mask, other=0.0).to(tl.float32)
            pooled = pooled / UNIT  # the unit's mean key
            for g in tl.static_range(GROUP):
                query = tl.load(
                    local_ptr + batch * stride_lb + (kv * GROUP + g) * stride_lh + dims * stride_ld,
                    mask=dim_mask,
                    other=0.0,
                )
                acc += tl.abs(tl.reduce(pooled * query[None, None, :], 2, _sum_combine))
        acc = acc / (HKV * GROUP)  # mean over all query heads
        acc = tl.where(unit_mask, acc, float("-inf"))
        best = tl.reduce(acc, 1, _elementwise_max)  # [T], the max over each block's units
        tl.store(out_ptr + batch * stride_ob + blocks * stride_on, best, mask=blocks < n_blocks)

    def _kernel_runs_on(q: torch.Tensor) -> bool:
        return q.device.type == "cuda" or _INTERPRETED

    @triton_op(OP_NAME, mutates_args=())
    def tokenunit_scores(q: torch.Tensor, k: torch.Tensor, block_size: int, unit_size: int, local_window: int) -> torch.Tensor:
        """TokenUnit block scores ``[B, L // block_size]`` float32 (see the module docstring)."""
        _check(q, k, block_size, unit_size, local_window)
        batch, heads_q, length, dim = q.shape
        heads_kv = k.shape[1]
        if dim > MAX_HEAD_DIM or not _kernel_runs_on(q):
            return _torch_scores(q, k, block_size, unit_size, local_window)
        blocks = length // block_size
        units_per_block = block_size // unit_size
        # The same expression as tokenunit_torch: the same local queries, bit for bit.
        local = q[:, :, length - local_window :].float().mean(dim=2)  # [B, Hq, D]
        out = torch.empty((batch, blocks), dtype=torch.float32, device=q.device)
        tile = _tile_blocks(units_per_block, dim)
        grid = ((blocks + tile - 1) // tile, batch)
        wrap_triton(_tokenunit_kernel)[grid](
            local, k, out, blocks,
            local.stride(0), local.stride(1), local.stride(2),
            k.stride(0), k.stride(1), k.stride(2), k.stride(3),
            out.stride(0), out.stride(1),
            HKV=heads_kv,
            GROUP=heads_q // heads_kv,
            HEAD_DIM=dim,
            BLOCK=block_size,
            UNIT=unit_size,
            UNITS_PER_BLOCK=units_per_block,
            TILE_BLOCKS=tile,
            UPB_PAD=_next_pow2(units_per_block),
            D_PAD=_next_pow2(dim),
            num_warps=_NUM_WARPS,
        )
        return out

    if _INTERPRETED:
        # The interpreter runs kernels on real tensors only (wrap_triton hands back the raw
        # interpreted function), so tracing the body with fake tensors would fail: keep the op
        # opaque to torch.compile instead, with a shape-only fake implementation.
        from torch._subclasses.functional_tensor import FunctionalTensorMode

        @tokenunit_scores.register_fake
        def _(q, k, block_size, unit_size, local_window):
            _check(q, k, block_size, unit_size, local_window)
            return q.new_empty((q.shape[0], q.shape[2] // block_size), dtype=torch.float32)

        @tokenunit_scores.register_torch_dispatch(FunctionalTensorMode)
        def _(mode, op, types, args, kwargs):
            return mode.__torch_dispatch__(op, types, args, kwargs)

else:  # pragma: no cover - depends on the environment
    _INTERPRETED = False

    def tokenunit_scores(q: torch.Tensor, k: torch.Tensor, block_size: int, unit_size: int, local_window: int) -> torch.Tensor:
        """No triton here: the plain-PyTorch `tokenunit_torch`."""
        _check(q, k, block_size, unit_size, local_window)
        return _torch_scores(q, k, block_size, unit_size, local_window)


def available() -> bool:
    """Whether the kernel can run: triton imports, and there is a CUDA device (or the interpreter)."""
    return _HAS_TRITON and (_INTERPRETED or torch.cuda.is_available())
