"""Frechet distance between two sets of embeddings (``fd_audio``: CLAP audio, ``fd_video``: DINO frames).

The formula is the one av-benchmark (MMAudio), Verse-Bench and pytorch-fid share: Gaussians fitted with
the sample mean and ``np.cov`` (unbiased), ``||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr(sqrtm(S1 S2))`` with
scipy's ``sqrtm``; when that square root is not finite, ``eps`` is added to both diagonals and it is taken
again; a small imaginary part from round-off is dropped (a large one is an error). ``fd_video`` is a
Frechet distance of DINO frame embeddings, not FVD (which uses I3D clip features).

Hand-written: the three lines of the formula around scipy's ``sqrtm`` (torchmetrics' FID hard-wires an
Inception network and takes images, not embeddings).
"""
from __future__ import annotations

import numpy as np

DEFINITION = ("Frechet distance of Gaussian fits (mean, np.cov) with scipy sqrtm, eps 1e-6 retry "
              "(av-benchmark / pytorch-fid formula)")


def gaussian(embeddings: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sample mean ``(D,)`` and unbiased covariance ``(D, D)`` of ``embeddings`` ``(N, D)``."""
    x = np.asarray(embeddings, dtype=np.float64)
    return x.mean(axis=0), np.atleast_2d(np.cov(x, rowvar=False))


def frechet_from_stats(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    from scipy import linalg

    diff = np.atleast_1d(mu1) - np.atleast_1d(mu2)
    covmean, _ = linalg.sqrtm(sigma1 @ sigma2, disp=False)
    if not np.isfinite(covmean).all():  # a nearly singular product: regularise both and retry
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"Frechet distance: sqrtm has an imaginary component {np.abs(covmean.imag).max():.3g}")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def frechet_distance(x: np.ndarray, y: np.ndarray) -> float:
    """Frechet distance between the Gaussian fits of ``x`` ``(N, D)`` and ``y`` ``(M, D)`` (N, M >= 2)."""
    if len(x) < 2 or len(y) < 2:
        raise ValueError(f"Frechet distance needs at least 2 embeddings per set, got {len(x)} and {len(y)}")
    return frechet_from_stats(*gaussian(x), *gaussian(y))
