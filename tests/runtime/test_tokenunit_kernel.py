"""The fused Triton TokenUnit kernel (``slimpass::tokenunit_scores``) against `tokenunit_torch`.

Without a GPU the kernel runs in Triton's interpreter on CPU tensors: ``TRITON_INTERPRET=1`` must be
set before the kernel module is imported (``triton.jit`` reads it when it decorates the kernel) and
while it runs, so this module sets it at import time (when no CUDA device is present) and restores
the previous value after its tests. With a CUDA device the same tests run the compiled kernel on it.
"""

from __future__ import annotations

import os

import pytest
import torch

_CUDA = torch.cuda.is_available()
_PREVIOUS_INTERPRET = os.environ.get("TRITON_INTERPRET")
if not _CUDA:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton and the kernel module are imported

pytest.importorskip("triton")

import torch._dynamo.testing  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from slimpass.runtime import tokenunit_kernel  # noqa: E402
from slimpass.runtime.scoring import ScoreSettings, tokenunit_torch  # noqa: E402

DEVICE = "cuda" if _CUDA else "cpu"


@pytest.fixture(scope="module", autouse=True)
def _interpreter():
    """Keep TRITON_INTERPRET as it was at import while these tests run, restore the outer value after."""
    if not _CUDA and not tokenunit_kernel._INTERPRETED:
        pytest.skip(
            "slimpass.runtime.tokenunit_kernel was imported before TRITON_INTERPRET=1 was set (by an "
            "earlier test module?), so its kernel cannot run on CPU here"
        )
    if not _CUDA:
        os.environ["TRITON_INTERPRET"] = "1"
    yield
    if _PREVIOUS_INTERPRET is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = _PREVIOUS_INTERPRET


def make_qk(batch, heads_q, heads_kv, length, dim, dtype, transposed=False, seed=0):
    """Random post-RoPE-like q ``[B, Hq, L, D]`` and k ``[B, Hkv, L, D]``; `transposed` gives strided
    views of ``[B, L, H, D]`` tensors (what ``x.view(B, L, H, D).transpose(1, 2)`` gives)."""
    gen = torch.Generator().manual_seed(seed)
    if transposed:
        q = torch.randn(batch, length, heads_q, dim, generator=gen).transpose(1, 2)
        k = torch.randn(batch, length, heads_kv, dim, generator=gen).transpose(1, 2)
    else:
        q = torch.randn(batch, heads_q, length, dim, generator=gen)
        k = torch.randn(batch, heads_kv, length, dim, generator=gen)
    return q.to(DEVICE, dtype), k.to(DEVICE, dtype)


def order(scores):
    return torch.argsort(scores, dim=-1, descending=True, stable=True)


def check(q, k, block, unit, window, rtol=1e-5):
    got = tokenunit_kernel.tokenunit_scores(q, k, block, unit, window)
    want = tokenunit_torch(q, k, ScoreSettings(block, unit, window))
    assert got.dtype == torch.float32 and got.shape == want.shape == (q.shape[0], q.shape[2] // block)
    torch.testing.assert_close(got, want, rtol=rtol, atol=1e-6)
    assert torch.equal(order(got), order(want)), (got, want)
    return got


# (B, Hq, Hkv, L, D, block, unit, window, transposed)
CASES = [
    (1, 4, 2, 128, 64, 16, 4, 4, False),
    (2, 9, 3, 100, 80, 8, 2, 1, True),  # L not a multiple of block, D not a power of two, G=3
    (1, 4, 4, 200, 16, 64, 8, 4, False),  # Hq == Hkv, a partial last block
    (2, 4, 2, 50, 16, 64, 8, 4, True),  # L < block: no full block
    (1, 9, 3, 3, 16, 2, 1, 4, False),  # L < window: the window is all the queries
    (1, 4, 2, 96, 16, 16, 16, 1, False),  # one unit per block
    (2, 4, 4, 72, 80, 8, 8, 4, True),
    (1, 4, 2, 64 * 6 + 5, 64, 64, 2, 1, False),  # 32 units a block
    (1, 4, 2, 70, 256, 16, 4, 2, True),  # the largest head dim the kernel takes
    (2, 2, 1, 45, 200, 8, 2, 4, False),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}_H{}x{}_L{}_D{}_b{}_u{}_w{}{}".format(*c[:8], "_T" if c[8] else ""))
def test_matches_torch(case, dtype):
    batch, heads_q, heads_kv, length, dim, block, unit, window, transposed = case
    q, k = make_qk(batch, heads_q, heads_kv, length, dim, dtype, transposed, seed=length)
    check(q, k, block, unit, window)


def test_fp16_and_mixed_views():
    q, k = make_qk(1, 4, 2, 130, 64, torch.float16, seed=3)
    check(q, k, 16, 4, 4)
    # q contiguous, k a strided slice of a wider tensor (stride along D = 2)
    wide = torch.randn(1, 2, 130, 128, device=DEVICE)
    check(q.float(), wide[..., ::2], 16, 4, 4)


def test_head_dim_over_256_runs_torch():
    q, k = make_qk(1, 2, 1, 40, 320, torch.float32, seed=1)
    got = tokenunit_kernel.tokenunit_scores(q, k, 8, 4, 2)
    assert torch.equal(got, tokenunit_torch(q, k, ScoreSettings(8, 4, 2)))


def test_ties_keep_the_lower_block_first():
    # Identical blocks give identical scores (the kernel is deterministic), so the stable sort keeps
    # block order among them.
    q, k = make_qk(1, 4, 2, 16, 16, torch.float32, seed=2)
    k = k.repeat(1, 1, 4, 1)  # 4 copies of the same 16 keys -> 4 equal blocks of 16
    q = q.repeat(1, 1, 4, 1)
    got = tokenunit_kernel.tokenunit_scores(q, k, 16, 4, 4)
    assert torch.equal(got, got[:, :1].expand_as(got))
    assert order(got).tolist() == [[0, 1, 2, 3]]


@pytest.mark.parametrize(
    "heads, block, unit, window, message",
    [((4, 3), 16, 4, 4, "multiple"), ((4, 2), 16, 3, 4, "divide"), ((4, 2), 16, 4, 0, "local_window")],
)
def test_rejects_bad_geometry(heads, block, unit, window, message):
    q, _ = make_qk(1, heads[0], heads[0], 32, 16, torch.float32)
    k = torch.randn(1, heads[1], 32, 16, device=DEVICE)
    with pytest.raises(ValueError, match=message):
        tokenunit_kernel.tokenunit_scores(q, k, block, unit, window)


@settings(max_examples=25, deadline=None)
@given(
    batch=st.integers(1, 2),
    heads=st.sampled_from([(4, 2), (9, 3), (4, 4), (2, 1), (6, 2)]),
    dim=st.sampled_from([8, 16, 48, 64, 80, 96]),
    block_unit=st.sampled_from([(8, 2), (8, 8), (16, 4), (16, 1), (24, 3), (64, 8), (32, 16)]),
    blocks=st.integers(0, 9),
    tail=st.integers(0, 63),
    window=st.integers(1, 8),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    transposed=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_property_matches_torch(batch, heads, dim, block_unit, blocks, tail, window, dtype, transposed, seed):
    block, unit = block_unit
    length = max(1, blocks * block + tail % block)
    q, k = make_qk(batch, *heads, length, dim, dtype, transposed, seed)
    check(q, k, block, unit, window)


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compiles_dynamic_without_recompiling(backend):
    counter = torch._dynamo.testing.CompileCounterWithBackend(backend)

    @torch.compile(backend=counter, fullgraph=True, dynamic=True)
    def scores(q, k):
        # [B, L, H, D] -> strided [B, H, L, D] views, as in an attention layer
        s = torch.ops.slimpass.tokenunit_scores(q.transpose(1, 2), k.transpose(1, 2), 16, 4, 4)
        return s * 2.0

    for length in (100, 173):
        q, k = make_qk(1, 4, 2, length, 16, torch.float32, transposed=True, seed=length)
        q, k = q.transpose(1, 2).contiguous(), k.transpose(1, 2).contiguous()
        got = scores(q, k)
        want = 2.0 * tokenunit_torch(q.transpose(1, 2), k.transpose(1, 2), ScoreSettings(16, 4, 4))
        assert got.shape == (1, length // 16)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert counter.frame_count == 1, "a second length recompiled: L was specialised"
    graph = counter.graphs[0]
    op = torch.ops.slimpass.tokenunit_scores
    assert any(n.target in (op, op.default) for n in graph.graph.nodes)


@pytest.mark.skipif(not _CUDA, reason="scoring.tokenunit uses the kernel on CUDA tensors only")
def test_registered_scorer_uses_kernel_on_cuda():
    from slimpass.runtime.scoring import get_scorer

    q, k = make_qk(1, 8, 2, 1000, 128, torch.bfloat16, seed=5)
    got = get_scorer("tokenunit")(q, k, ScoreSettings(64, 8, 4))
    assert torch.equal(got, tokenunit_kernel.tokenunit_scores(q, k, 64, 8, 4))
    torch.testing.assert_close(got, tokenunit_torch(q, k, ScoreSettings(64, 8, 4)), rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(_CUDA, reason="the CPU fallback path only")
def test_cpu_without_interpreter_runs_torch(tmp_path):
    """Imported without TRITON_INTERPRET, the op on CPU tensors runs tokenunit_torch, also compiled."""
    import subprocess
    import sys

    script = tmp_path / "fallback.py"
    script.write_text(
        "import torch, torch._dynamo.testing\n"
        "from slimpass.runtime import tokenunit_kernel as tk\n"
        "from slimpass.runtime.scoring import ScoreSettings, tokenunit_torch\n"
        "assert not tk._INTERPRETED and tk.available() == torch.cuda.is_available()\n"
        "cnt = torch._dynamo.testing.CompileCounterWithBackend('aot_eager')\n"
        "f = torch.compile(lambda q, k: tk.tokenunit_scores(q, k, 16, 4, 4), backend=cnt, fullgraph=True, dynamic=True)\n"
        "for n in (100, 150):\n"
        "    q, k = torch.randn(1, 4, n, 16), torch.randn(1, 2, n, 16)\n"
        "    want = tokenunit_torch(q, k, ScoreSettings(16, 4, 4))\n"
        "    assert torch.equal(tk.tokenunit_scores(q, k, 16, 4, 4), want)\n"
        "    torch.testing.assert_close(f(q, k), want)\n"
        "assert cnt.frame_count == 1\n"
        "print('ok')\n"
    )
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-3000:]
