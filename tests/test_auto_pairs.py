"""``stitch.pairs: auto``: linear CKA, the monotone pairing, and recovering a known block alignment."""
import itertools
import math

import pytest
import torch
from torch import nn

from soe.plugin.expert import BlockState, TokenLayout
from soe.stitch.align import DepthMapError
from soe.stitch.auto_pairs import choose_pairs, linear_cka, monotone_pairs


def test_linear_cka_is_one_under_rotation_and_scale_and_low_for_unrelated_features():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 16, generator=g)
    q, _ = torch.linalg.qr(torch.randn(24, 24, generator=g))
    assert linear_cka(x, 3.0 * torch.cat([x, torch.zeros(200, 8)], 1) @ q) == pytest.approx(1.0, abs=1e-9)
    assert linear_cka(x, torch.randn(200, 24, generator=g)) < 0.3
    assert linear_cka(x, x.tanh() ** 3) < linear_cka(x, x)


def _brute_force(sim, count):
    n_a, n_b = sim.shape
    best = -math.inf
    for rows in itertools.combinations(range(n_a), count):
        for cols in itertools.combinations(range(n_b), count):
            best = max(best, sum(float(sim[i, j]) for i, j in zip(rows, cols)))
    return best


@pytest.mark.parametrize("shape,count", [((3, 5), 2), ((4, 4), 4), ((4, 6), 3), ((5, 3), 3)])
def test_monotone_pairs_reaches_the_brute_force_optimum_and_is_strictly_increasing(shape, count):
    sim = torch.rand(shape, generator=torch.Generator().manual_seed(sum(shape) + count), dtype=torch.float64)
    pairs = monotone_pairs(sim, count)
    assert len(pairs) == count
    assert all(p[0] < q[0] and p[1] < q[1] for p, q in zip(pairs, pairs[1:]))
    assert sum(float(sim[i, j]) for i, j in pairs) == pytest.approx(_brute_force(sim, count))


def test_monotone_pairs_refuses_more_pairs_than_the_shallower_depth():
    with pytest.raises(DepthMapError, match="stitch.auto.connectors"):
        monotone_pairs(torch.rand(3, 6, dtype=torch.float64), 4)


class _Toy(nn.Module):
    """A minimal expert as the split forward sees it: embed, per-block functions, a (t,) token layout."""

    name, dtype = "toy", torch.float32

    def __init__(self, embed: torch.Tensor, blocks: list):
        super().__init__()
        self.w, self.fns = embed, blocks

    @property
    def num_blocks(self):
        return len(self.fns)

    def token_layout(self, batch):
        return TokenLayout((batch["latents"].shape[1],), ("t",), 25.0)

    def embed(self, batch):
        return BlockState(batch["latents"].float() @ self.w)  # (B, T, D)

    def run_block(self, i, state):
        return state.replace(self.fns[i](state.hidden))


def _experts_i_to_2i(n_a=4, d=16, wide=24, d_in=8):
    """Expert b (2 n_a blocks, width ``wide``) is built so that its block 2i's output is expert a's block i's
    output rotated into b's width; its odd blocks cube the state (a CKA-visible distortion) and the next even
    block undoes it (cube root) before applying a's next block."""
    g = torch.Generator().manual_seed(1)
    emb = torch.randn(d_in, d, generator=g) / math.sqrt(d_in)
    ws = [torch.randn(d, d, generator=g) * 1.5 / math.sqrt(d) for _ in range(n_a)]
    p, _ = torch.linalg.qr(torch.randn(wide, d, generator=g))  # (wide, d), orthonormal columns
    p = p.T  # (d, wide): orthonormal rows, h @ p keeps every CKA with h
    f = [lambda h, w=w: torch.tanh(h @ w) for w in ws]
    a = _Toy(emb, f)
    b_blocks = []
    for i in range(n_a):
        if i == 0:
            b_blocks.append(lambda h: f[0](h @ p.T) @ p)
        else:
            b_blocks.append(lambda h, i=i: f[i](torch.sign(h) * h.abs().pow(1 / 3) @ p.T) @ p)
        b_blocks.append(lambda h: h ** 3)
    b = _Toy(emb @ p, b_blocks)
    return a, b


def test_auto_pairs_recover_block_i_to_block_2i_of_two_experts_built_that_way():
    a, b = _experts_i_to_2i()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(6, 10, 8, generator=g)  # 6 paired clips, 10 time steps
    batch = {"latents": x}
    pairs, sim = choose_pairs(a, b, batch, batch, count=4, sigmas=(0.0,))  # clean clips: the same input to both
    assert pairs == [(0, 0), (1, 2), (2, 4), (3, 6)]
    assert sim.shape == (4, 8)
    assert all(float(sim[i, 2 * i]) == pytest.approx(1.0, abs=1e-6) for i in range(4))
    assert all(float(sim[i, 2 * i + 1]) < 0.99 for i in range(4))  # the cubed blocks are measurably different
    # noised clips (independent noise per expert, as for real modalities): the alignment is still found
    assert choose_pairs(a, b, batch, batch, count=4, sigmas=(0.25, 0.5))[0] == pairs
    # fewer connectors: still pairs of the known alignment
    fewer, _ = choose_pairs(a, b, batch, batch, count=2, sigmas=(0.0,))
    assert len(fewer) == 2 and all(j == 2 * i for i, j in fewer)


TINY = __import__("pathlib").Path(__file__).resolve().parent / "recipes" / "tiny.yaml"


def test_inspect_auto_prints_the_pairs_it_chose_and_writes_the_heat_map(tmp_path, capsys):
    from soe.cli import main
    from soe.data.auto_pairs import choose_for_recipe, pair_chooser
    from soe.recipe.builders import build_stitcher
    from soe.recipe.reading import load_recipe

    png = tmp_path / "cka.png"
    over = ["stitch.pairs=auto", "stitch.auto.connectors=2", "stitch.auto.clips=2", "stitch.auto.sigmas=[0.5]", "data.seconds=1.0"]
    assert main(["inspect", str(TINY), *over, "--heatmap", str(png)]) == 0
    out = capsys.readouterr().out
    assert "linear CKA" in out and "chose pairs" in out and png.stat().st_size > 0
    cfg = load_recipe(TINY, over)
    record = choose_for_recipe(cfg)
    assert str([list(p) for p in record["pairs"]]) in out.replace("\n", "")
    st = build_stitcher(cfg, auto_pairs=pair_chooser(cfg))  # what `soe stitch` builds: the same pairs
    assert st.pairs == record["pairs"] and len(st.pairs) == 2
    assert record["similarity"].shape == (st.a.num_blocks, st.b.num_blocks)
    assert ((record["similarity"] >= 0) & (record["similarity"] <= 1 + 1e-9)).all()


def test_auto_connectors_beyond_the_shallower_depth_fail_with_one_line(capsys):
    from soe.cli import main

    assert main(["inspect", str(TINY), "stitch.pairs=auto", "stitch.auto.connectors=9"]) == 2
    err = capsys.readouterr().err
    assert "stitch.auto.connectors" in err and len(err.strip().splitlines()) == 1
