import pytest
import torch

from soe.plugin.expert import TokenLayout
from soe.stitch.align import (DepthMapError, broadcast_to_grid, linear_pairs, pool_time_steps, resample_matrix,
                              resample_time, resolve_depth_map)


def test_linear_30_vs_24_end_aligned_and_monotonic():
    pairs = linear_pairs(30, 24)
    assert len(pairs) == 24 and pairs[0] == (0, 0) and pairs[-1] == (29, 23)
    assert [p[0] for p in pairs][:5] == [0, 1, 2, 4, 5]
    assert all(b[0] > a[0] and b[1] > a[1] for a, b in zip(pairs, pairs[1:]))
    assert linear_pairs(24, 30) == [(j, i) for i, j in pairs]


def test_equal_depth_and_identity():
    assert resolve_depth_map("linear", 4, 4) == [(0, 0), (1, 1), (2, 2), (3, 3)]
    assert resolve_depth_map("identity", 3, 3) == [(0, 0), (1, 1), (2, 2)]


def test_every_k():
    assert resolve_depth_map({"every": 2}, 8, 4) == [(3, 1), (7, 3)]
    assert resolve_depth_map({"every": 3}, 6, 6) == [(2, 2), (5, 5)]


def test_explicit_pairs():
    assert resolve_depth_map([[0, 1], [5, 2]], 6, 3) == [(0, 1), (5, 2)]


@pytest.mark.parametrize(
    "spec, message",
    [
        ([[0, 3]], "block 3 of expert b is out of range 0..2"),
        ([[6, 0]], "block 6 of expert a is out of range 0..5"),
        ([[-1, 0]], "out of range"),
        ([[2, 1], [1, 2]], "strictly increasing"),
        ([[1, 1], [1, 2]], "strictly increasing"),
        ([], "empty"),
        ([[0]], "expected [i, j]"),
        ([[0.5, 1]], "two integers"),
        ({"every": 0}, "positive integer"),
        ({"every": 9}, "keeps no pair"),
        ({"evry": 2}, "{every: k}"),
        ("diagonal", "unknown name 'diagonal'"),
        (3, "expected 'linear'"),
        ("identity", "equal depths"),
    ],
)
def test_invalid_depth_maps_fail_clearly(spec, message):
    with pytest.raises(DepthMapError, match=None) as info:
        resolve_depth_map(spec, 6, 3)
    assert message in str(info.value)


def test_pool_and_broadcast_roundtrip_shapes():
    layout = TokenLayout((3, 2, 2), ("t", "h", "w"), 6.25)
    h = torch.arange(3 * 4, dtype=torch.float32).reshape(1, 12, 1)
    pooled = pool_time_steps(h, layout)
    assert pooled.flatten().tolist() == [1.5, 5.5, 9.5]  # mean of tokens 0-3, 4-7, 8-11
    back = broadcast_to_grid(pooled, layout)
    assert back.flatten().tolist() == [1.5] * 4 + [5.5] * 4 + [9.5] * 4


def test_time_resampling_hand_computed():
    # source: 4 steps at 4/s (centres 0.125, 0.375, 0.625, 0.875 s); host: 2 steps at 2/s (centres 0.25, 0.75 s)
    src, dst = TokenLayout((4,), ("t",), 4.0), TokenLayout((2,), ("t",), 2.0)
    x = torch.tensor([[[0.0], [1.0], [2.0], [3.0]]])
    # linear: 0.25 s is halfway between source steps 0 and 1 -> 0.5; 0.75 s -> 2.5
    assert resample_time(x, src, dst, "linear").flatten().tolist() == [0.5, 2.5]
    # area: host step [0, 0.5) averages source steps 0 and 1 -> 0.5; [0.5, 1) -> 2.5
    assert resample_time(x, src, dst, "area").flatten().tolist() == [0.5, 2.5]
    # upsampling 2/s -> 4/s, linear by timestamps, clamped at the ends
    y = torch.tensor([[[0.0], [4.0]]])
    assert resample_time(y, dst, src, "linear").flatten().tolist() == [0.0, 1.0, 3.0, 4.0]


def test_area_resampling_uneven_rates():
    # 12.5/s audio tokens onto 6.25/s video frames: each frame averages exactly two audio tokens
    src, dst = TokenLayout((5,), ("t",), 12.5), TokenLayout((3,), ("t",), 6.25)
    w = resample_matrix(src, dst, "auto")
    expected = torch.tensor([[0.5, 0.5, 0, 0, 0], [0, 0, 0.5, 0.5, 0], [0, 0, 0, 0, 1.0]], dtype=torch.float64)
    torch.testing.assert_close(w, expected)
    assert torch.allclose(w.sum(1), torch.ones(3, dtype=torch.float64))


def test_same_rate_is_identity():
    layout = TokenLayout((5,), ("t",), 6.25)
    x = torch.randn(2, 5, 3)
    assert resample_time(x, layout, layout) is x


def test_token_layout_validation():
    with pytest.raises(ValueError, match="first axis must be time"):
        TokenLayout((2, 3), ("h", "t"), 1.0)
    with pytest.raises(ValueError, match="time_rate"):
        TokenLayout((2,), ("t",), 0.0)
