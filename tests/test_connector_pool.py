"""connector.pool: 'moments' keeps where things are within a time step; 'mean' (UniVerse-1) does not."""
import pytest
import torch
from conftest import batch_for, tiny

from soe import ConnectorConfig, Stitcher
from soe.plugin.expert import TokenLayout
from soe.stitch.align import pool_time_moments, pool_time_steps

VIDEO = TokenLayout((2, 3, 4), ("t", "h", "w"), 12.5)  # 2 time steps of 3 rows x 4 columns


def one_token(row: int, col: int) -> torch.Tensor:
    x = torch.zeros(1, 2, 3, 4, 5)
    x[:, :, row, col] = 1.0
    return x.reshape(1, 24, 5)


def test_moments_see_where_the_mean_is_blind():
    top, bottom, right = one_token(0, 0), one_token(2, 0), one_token(0, 3)
    assert torch.equal(pool_time_steps(top, VIDEO), pool_time_steps(bottom, VIDEO))  # the mean cannot tell them apart
    mt, mb, mr = pool_time_moments(top, VIDEO), pool_time_moments(bottom, VIDEO), pool_time_moments(right, VIDEO)
    assert mt.shape == (1, 2, 15)
    assert torch.equal(mt[..., :5], pool_time_steps(top, VIDEO))  # first slot is the mean
    # row moment: coordinate -1 (top row) vs +1 (bottom row), over 12 tokens; column moment follows the column
    torch.testing.assert_close(mt[..., 5:10], torch.full((1, 2, 5), -1 / 12))
    torch.testing.assert_close(mb[..., 5:10], torch.full((1, 2, 5), 1 / 12))
    torch.testing.assert_close(mt[..., 10:], torch.full((1, 2, 5), -1 / 12))
    torch.testing.assert_close(mr[..., 10:], torch.full((1, 2, 5), 1 / 12))


def test_moments_of_a_time_only_layout_are_zero():
    audio = TokenLayout((6,), ("t",), 25.0)
    x = torch.randn(2, 6, 4)
    m = pool_time_moments(x, audio)
    assert torch.equal(m[..., :4], pool_time_steps(x, audio)) and not m[..., 4:].any()


def test_moments_connectors_start_at_zero_and_read_three_widths():
    a, b = tiny("wan2.1"), tiny("ace-step-1.5")
    st = Stitcher(a, b, connector=ConnectorConfig(pool="moments"))
    ba, bb = batch_for(a), batch_for(b)
    with torch.no_grad():
        pa, pb = st(ba, bb)
        assert torch.equal(pa, a(ba)) and torch.equal(pb, b(bb))
    c = st.connector_for("a_to_b", st.pairs[0][1])
    assert c.mlp.fc1.in_features == c.in_width == 3 * a.hidden_size


def test_moments_pooling_is_the_same_in_both_engines():
    outs = {}
    for engine in ("hooks", "lockstep"):
        a, b = tiny("wan2.1", 0), tiny("ace-step-1.5", 1)
        torch.manual_seed(2)
        st = Stitcher(a, b, direction="a_to_b", engine=engine, connector=ConnectorConfig(pool="moments", init="trunc_normal"))
        with torch.no_grad():
            outs[engine] = st(batch_for(a, 2, 1.0, seed=3), batch_for(b, 2, 1.0, seed=4))[1]
        assert not torch.allclose(outs[engine], b(batch_for(b, 2, 1.0, seed=4)))
    torch.testing.assert_close(outs["hooks"], outs["lockstep"], rtol=1e-5, atol=1e-6)


def test_unknown_pool_is_refused():
    with pytest.raises(ValueError, match=r"pool: expected one of \[.mean., .moments.\]"):
        ConnectorConfig(pool="max")
