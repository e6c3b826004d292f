"""The window-attention scorer: its pooling, its factory's checks, and the cache fingerprint of its settings."""

import pytest
import torch

import slimpass
from slimpass.config import ConfigError
from slimpass.runtime import pruning_ops, scoring

SETTINGS = scoring.ScoreSettings(block_size=32, unit_size=8, local_window=4)


def one_hot_attention(length: int, target: int, heads_q: int = 4, heads_kv: int = 2, dim: int = 16):
    """q/k where every query attends (almost) only to key `target`: keys are orthogonal-ish noise but
    the target key is aligned with every query and large."""
    torch.manual_seed(0)
    q = torch.zeros(1, heads_q, length, dim)
    q[..., 0] = 1.0
    k = 0.01 * torch.randn(1, heads_kv, length, dim)
    k[:, :, target, 0] = 200.0
    return q, k


@pytest.mark.parametrize("target", [40, 63, 64, 100])
def test_unpooled_scores_the_attended_block_highest(target):
    q, k = one_hot_attention(256, target)
    scores = scoring.make_window_attention(16, 0)(q, k, SETTINGS)
    assert scores.shape == (1, 256 // 32)
    assert int(scores[0].argmax()) == target // 32
    others = torch.cat([scores[0, : target // 32], scores[0, target // 32 + 1 :]])
    assert float(others.max()) < 1e-3 * float(scores[0, target // 32])


def test_pooling_carries_a_score_to_the_neighbouring_block_within_its_radius():
    # the target sits 3 tokens before a block boundary: radius 4 reaches the next block, radius 2 does not
    q, k = one_hot_attention(256, 3 * 32 - 3)
    hot = float(scoring.make_window_attention(16, 0)(q, k, SETTINGS)[0, 2])
    near = scoring.make_window_attention(16, 4)(q, k, SETTINGS)[0]
    far = scoring.make_window_attention(16, 2)(q, k, SETTINGS)[0]
    assert float(near[2]) == pytest.approx(hot) and float(near[3]) == pytest.approx(hot)
    assert float(far[3]) < 1e-3 * hot
    assert float(near[1]) < 1e-3 * hot  # 29+ tokens away on the other side


def test_the_registered_default_is_the_pooled_window_scorer():
    q, k = one_hot_attention(512, 200)
    default = scoring.get_scorer("window_attention")(q, k, SETTINGS)
    made = scoring.make_window_attention(scoring.OBSERVATION_WINDOW, scoring.POOL_RADIUS)(q, k, SETTINGS)
    torch.testing.assert_close(default, made)


@pytest.mark.parametrize("window, radius", [(0, 4), (16, -1)])
def test_factory_rejects_bad_settings(window, radius):
    with pytest.raises(ConfigError, match="window=.*pool_radius="):
        scoring.make_window_attention(window, radius)


def test_fingerprint_tells_factory_made_scorers_apart():
    slimpass.register_scorer("_test_wa_a")(scoring.make_window_attention(16, 4))
    slimpass.register_scorer("_test_wa_b")(scoring.make_window_attention(16, 8))
    slimpass.register_scorer("_test_wa_c")(scoring.make_window_attention(16, 4))
    assert pruning_ops.fingerprint("_test_wa_a") != pruning_ops.fingerprint("_test_wa_b")
    assert pruning_ops.fingerprint("_test_wa_a") == pruning_ops.fingerprint("_test_wa_c")


@pytest.mark.parametrize("radius", [1, 2, 3, 7, 8, 16, 17, 40])
@pytest.mark.parametrize("length", [1, 5, 33, 100])
def test_sliding_max_equals_max_pooling(radius, length):
    x = torch.rand(3, length, generator=torch.Generator().manual_seed(radius * 1000 + length))
    want = torch.nn.functional.max_pool1d(x[:, None], 2 * radius + 1, stride=1, padding=radius)[:, 0]
    assert torch.equal(scoring.sliding_max(x, radius), want)


def test_fingerprint_covers_the_block_arithmetic_the_pruned_graph_traces(monkeypatch):
    """Regression: `select_tokens` and `keep_middle` call `BlockLayout`; an edit of block_layout.py must change
    the fingerprint, or a compile cache could serve a graph traced through the old arithmetic."""
    import inspect

    from slimpass.runtime import block_layout

    before = pruning_ops.fingerprint("window_attention")
    source = inspect.getsource(block_layout)
    monkeypatch.setattr(inspect, "getsource",
                        lambda obj, _real=inspect.getsource: source + "# edited\n" if obj is block_layout else _real(obj))
    assert pruning_ops.fingerprint("window_attention") != before
