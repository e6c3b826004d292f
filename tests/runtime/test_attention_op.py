"""`slimpass::causal_attention`: real and fake implementations agree, and it is causal SDPA."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses import FakeTensorMode

from slimpass.runtime import attention

OP = torch.ops.slimpass.causal_attention.default
# (query heads, key/value heads): plain multi-head, GQA, multi-query
HEADS = [(4, 4), (4, 2), (4, 1)]


def _inputs(heads_q: int, heads_kv: int, n: int, dv: int = 16, dtype=torch.float32, batch: int = 2):
    generator = torch.Generator().manual_seed(n * 100 + heads_kv)
    q = torch.randn(batch, heads_q, n, 16, generator=generator).to(dtype)
    k = torch.randn(batch, heads_kv, n, 16, generator=generator).to(dtype)
    v = torch.randn(batch, heads_kv, n, dv, generator=generator).to(dtype)
    return q, k, v


def _reference(q, k, v, scale):
    """Causal SDPA on KV repeated to the query heads by hand (independent of enable_gqa)."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True, scale=scale)


@pytest.mark.parametrize("dv", [16, 8])
@pytest.mark.parametrize("n", [1, 9, 70])
@pytest.mark.parametrize("heads", HEADS)
def test_real_and_fake_agree(heads, n, dv):
    q, k, v = _inputs(*heads, n, dv)
    args = (0.25, heads[0] != heads[1], "math")
    real = OP(q, k, v, *args)
    with FakeTensorMode() as mode:
        fake = OP(*(mode.from_tensor(t) for t in (q, k, v)), *args)
    assert (fake.shape, fake.stride(), fake.dtype, fake.device) == (real.shape, real.stride(), real.dtype, real.device)
    assert tuple(real.shape) == (2, heads[0], n, dv)
    # stored [B, N, H, Dv], as the fused kernels write it
    assert real.transpose(1, 2).is_contiguous()


@pytest.mark.parametrize("heads", HEADS)
def test_opcheck(heads):
    """Schema, fake tensor and AOT-dispatch (dynamic shapes) checks of torch.library, inference only."""
    q, k, v = _inputs(*heads, 11)
    torch.library.opcheck(OP, (q, k, v, 0.25, heads[0] != heads[1], "math"))
    q_strided = torch.randn(2, 11, heads[0], 16).transpose(1, 2)  # [B, H, N, D] view of [B, N, H, D]
    torch.library.opcheck(OP, (q_strided, k, v, 0.25, heads[0] != heads[1], "math"))


@pytest.mark.parametrize("backend", ["math", "flash"])
@pytest.mark.parametrize("n", [1, 9, 70])
@pytest.mark.parametrize("heads", HEADS)
def test_matches_causal_sdpa(heads, n, backend):
    q, k, v = _inputs(*heads, n)
    scale = 16 ** -0.5
    try:
        got = OP(q, k, v, scale, heads[0] != heads[1], backend)
    except RuntimeError as err:
        if "No viable backend" not in str(err):
            raise
        pytest.skip(f"SDPA backend {backend!r} is not available on this machine")
    torch.testing.assert_close(got, _reference(q, k, v, scale), atol=1e-5, rtol=1e-5)
    # and the plain PyTorch call the "auto" rewrite emits
    want = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=heads[0] != heads[1])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_low_precision_keeps_dtype():
    q, k, v = _inputs(4, 2, 33, dtype=torch.bfloat16)
    got = OP(q, k, v, 0.25, True, "math")
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), _reference(q, k, v, 0.25), atol=2e-2, rtol=2e-2)


def test_first_query_attends_to_first_key_only():
    """Causality itself: the first output row is exactly the first value row, whatever the keys."""
    q, k, v = _inputs(4, 2, 12)
    got = OP(q, k, v, 0.25, True, "math")
    torch.testing.assert_close(got[:, :, 0], v.repeat_interleave(2, dim=1)[:, :, 0])


def test_unknown_backend_names_allowed_values():
    q, k, v = _inputs(4, 2, 5)
    with pytest.raises(ValueError, match="unknown backend 'bogus'") as info:
        OP(q, k, v, 0.25, True, "bogus")
    for name in attention._BACKENDS:
        assert repr(name) in str(info.value)


def test_config_backends_are_op_backends():
    """Every non-auto `attention_backend` the config accepts is one the op can run."""
    from slimpass.config import ATTENTION_BACKENDS

    assert set(ATTENTION_BACKENDS) - {"auto"} == set(attention._BACKENDS)
