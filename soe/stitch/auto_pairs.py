"""``stitch.pairs: auto``: block pairs chosen from the experts themselves.

Both experts run their split forward on the same paired clips (noised at a few flow times); each block's
output is pooled to one vector per time step (:func:`soe.stitch.align.pool_time_steps`) and brought to the
slower expert's time steps by seconds, so row ``n`` of every block's feature matrix is the same moment of
the same clip. Linear CKA (Kornblith et al., 2019) between every block of ``a`` and every block of ``b``
gives a similarity matrix; :func:`monotone_pairs` picks the ``count`` pairs, strictly increasing in both
experts (so the lockstep engine can run them), whose total similarity is largest (dynamic programming).
"""
from __future__ import annotations

import torch

from soe.stitch.align import DepthMapError, Pairs, pool_time_steps, resample_time


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA of two feature matrices with the same rows: ``x`` (N, D1), ``y`` (N, D2) -> [0, 1].

    ``||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F)`` with column-centred ``Xc``, ``Yc``; invariant to
    orthogonal transforms and isotropic scaling of either side, so experts of different widths compare."""
    x = x.double() - x.double().mean(0, keepdim=True)
    y = y.double() - y.double().mean(0, keepdim=True)
    num = (y.T @ x).square().sum()
    den = (x.T @ x).square().sum().sqrt() * (y.T @ y).square().sum().sqrt()
    return float(num / den) if den > 0 else 0.0


@torch.no_grad()
def block_features(expert, batch: dict) -> list[torch.Tensor]:
    """Each block's output pooled per time step: ``num_blocks`` tensors ``(B, T, D)`` (float32, CPU)."""
    layout = expert.token_layout(batch)
    state = expert.embed(batch)
    out = []
    for i in range(expert.num_blocks):
        state = expert.run_block(i, state)
        out.append(pool_time_steps(state.hidden.float(), layout).cpu())  # (B, T, D)
    return out


def similarity(feats_a: list[torch.Tensor], layout_a, feats_b: list[torch.Tensor], layout_b) -> torch.Tensor:
    """``(n_a, n_b)`` linear CKA between every block of ``a`` and every block of ``b``; the faster expert's
    time steps are resampled onto the slower one's by seconds first (soe/stitch/align.py)."""
    if layout_a.time_rate > layout_b.time_rate:
        feats_a = [resample_time(f, layout_a, layout_b) for f in feats_a]
    elif layout_b.time_rate > layout_a.time_rate:
        feats_b = [resample_time(f, layout_b, layout_a) for f in feats_b]
    rows_a = [f.reshape(-1, f.shape[-1]) for f in feats_a]
    rows_b = [f.reshape(-1, f.shape[-1]) for f in feats_b]
    if rows_a and rows_b and rows_a[0].shape[0] != rows_b[0].shape[0]:
        raise DepthMapError(f"stitch.pairs auto: the experts' time steps do not line up ({rows_a[0].shape[0]} vs "
                            f"{rows_b[0].shape[0]} rows); give clips of the same seconds to both")
    return torch.tensor([[linear_cka(x, y) for y in rows_b] for x in rows_a], dtype=torch.float64)


def monotone_pairs(sim: torch.Tensor, count: int) -> Pairs:
    """The ``count`` pairs ``(i, j)``, strictly increasing in ``i`` and in ``j``, of largest total ``sim[i, j]``.

    ``best[k][i][j]``: the largest total of ``k`` pairs using blocks ``< i`` of ``a`` and ``< j`` of ``b``;
    ``O(count * n_a * n_b)``. Ties go to the earlier blocks."""
    n_a, n_b = sim.shape
    if not isinstance(count, int) or isinstance(count, bool) or not 1 <= count <= min(n_a, n_b):
        raise DepthMapError(f"stitch.auto.connectors: expected 1..{min(n_a, n_b)} pairs (the shallower depth), got {count!r}")
    s = sim.tolist()
    neg = float("-inf")
    best = [[[0.0 if k == 0 else neg] * (n_b + 1) for _ in range(n_a + 1)] for k in range(count + 1)]
    take = [[[False] * (n_b + 1) for _ in range(n_a + 1)] for _ in range(count + 1)]
    for k in range(1, count + 1):
        for i in range(1, n_a + 1):
            for j in range(1, n_b + 1):
                skip = max(best[k][i - 1][j], best[k][i][j - 1])
                use = best[k - 1][i - 1][j - 1] + s[i - 1][j - 1]
                best[k][i][j], take[k][i][j] = (use, True) if use > skip + 1e-12 else (skip, False)
    pairs, k, i, j = [], count, n_a, n_b
    while k > 0:  # walk back: where was the k-th pair taken?
        if take[k][i][j]:
            pairs.append((i - 1, j - 1))
            k, i, j = k - 1, i - 1, j - 1
        elif best[k][i - 1][j] >= best[k][i][j - 1]:
            i -= 1
        else:
            j -= 1
    return pairs[::-1]


def noised(batch: dict, expert, sigma: float, generator: torch.Generator) -> dict:
    """``batch`` with its clean ``latents`` noised to flow time ``sigma`` (``x = (1 - s) x0 + s eps``)."""
    x0 = batch["latents"].float()
    eps = torch.randn(x0.shape, generator=generator).to(x0.device)
    x = (1 - sigma) * x0 + sigma * eps
    t = torch.full((x0.shape[0],), float(sigma), device=x0.device)
    return {**batch, "latents": x.to(expert.dtype), "timestep": t.to(expert.dtype)}


def choose_pairs(a, b, batch_a: dict, batch_b: dict, count: int, sigmas=(0.25, 0.5, 0.75), seed: int = 0) -> tuple[Pairs, torch.Tensor]:
    """(pairs, CKA matrix) for experts ``a`` and ``b`` on the paired clean clips ``batch_a`` / ``batch_b``
    (same clips, same order), features of every flow time in ``sigmas`` stacked as more rows."""
    g = torch.Generator().manual_seed(seed)
    fa, fb = [], []
    for sigma in sigmas:
        fa.append(block_features(a, noised(batch_a, a, sigma, g)))
        fb.append(block_features(b, noised(batch_b, b, sigma, g)))
    feats_a = [torch.cat([f[i] for f in fa]) for i in range(a.num_blocks)]  # (len(sigmas) * B, T, D)
    feats_b = [torch.cat([f[j] for f in fb]) for j in range(b.num_blocks)]
    sim = similarity(feats_a, a.token_layout(batch_a), feats_b, b.token_layout(batch_b))
    return monotone_pairs(sim, count), sim
