"""What a connector can see: how much of the square's height and of its bounces the video expert's
pooled per-time-step states carry, per pooling choice (``connector.pool``), block and noise level.

A ridge probe is fitted on the pooled states of 64 held-out synthetic clips and scored (R^2) on 32
others: targets are the square's height per latent frame and a bounce indicator. ``mean`` is what
UniVerse-1's connectors read; ``moments`` adds first moments along rows and columns
(soe.stitch.align.pool_time_moments); ``flatten`` (every token of the step side by side) is the upper bound
a fixed-size pooling can aim for.

    python benchmarks/pooled_states.py                       # the shipped video expert
    python benchmarks/pooled_states.py --expert runs/sync/video_expert
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from soe.data.datamodule import SyntheticAVDataModule  # noqa: E402
from soe.data.synthetic import BounceClip  # noqa: E402
from soe.evaluate.sync_eval import HELD_OUT_SEED_OFFSET  # noqa: E402
from soe.recipe.builders import build_expert  # noqa: E402
from soe.recipe.reading import load_recipe  # noqa: E402
from soe.stitch.align import pool_time_moments, pool_time_steps  # noqa: E402

POOLS = {"mean": pool_time_steps, "moments": pool_time_moments, "flatten": None}


def ridge_r2(x: np.ndarray, y: np.ndarray, train: slice, test: slice, lam: float = 1e-3) -> float:
    """R^2 on the test clips of a ridge regression fitted on the train clips (features standardised)."""
    xtr, xte = x[train].reshape(-1, x.shape[-1]), x[test].reshape(-1, x.shape[-1])
    mu, sd = xtr.mean(0), xtr.std(0) + 1e-6
    xtr, xte = np.c_[(xtr - mu) / sd, np.ones(len(xtr))], np.c_[(xte - mu) / sd, np.ones(len(xte))]
    w = np.linalg.solve(xtr.T @ xtr + lam * len(xtr) * np.eye(xtr.shape[1]), xtr.T @ y[train].ravel())
    pred, truth = xte @ w, y[test].ravel()
    return float(1 - ((pred - truth) ** 2).mean() / truth.var())


def targets(n: int, frames: int, rate: float, seconds: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    times = (torch.arange(frames) + 0.5) / rate
    height, bounce = np.zeros((n, frames)), np.zeros((n, frames))
    for i in range(n):
        clip = BounceClip.sample(seed, i)
        height[i] = clip.height(times).numpy()
        for tb in clip.bounce_times(seconds).tolist():
            bounce[i, min(frames - 1, int(tb * rate))] = 1
    return height, bounce


@torch.no_grad()
def probe(expert_path: str, sigmas=(0.0, 0.5, 0.9), clips: int = 96, seconds: float = 2.0) -> list[dict]:
    cfg = load_recipe(ROOT / "recipes" / "demo.yaml", [f"experts.a.path={Path(expert_path).resolve()}", "experts.a.train=full"])
    torch.manual_seed(0)
    e = build_expert(cfg, "a").float().eval()
    seed = cfg.seed + HELD_OUT_SEED_OFFSET
    data = SyntheticAVDataModule({"a": e}, seconds=seconds, num_clips=clips, batch_size=1, seed=seed)
    items = [data.make_clip(i)["a"] for i in range(clips)]
    batch = {k: torch.stack([c[k] for c in items]) for k in items[0]}
    x0 = batch["latents"]
    height, bounce = targets(clips, x0.shape[2], e.latent_rate, seconds, seed)
    train, test = slice(0, 2 * clips // 3), slice(2 * clips // 3, clips)
    rows = []
    for sigma in sigmas:
        noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
        b = dict(batch, latents=(1 - sigma) * x0 + sigma * noise, timestep=torch.full((clips,), sigma))
        state, layout = e.embed(b), e.token_layout(b)
        for block in range(e.num_blocks):
            state = e.run_block(block, state)
            h = state.hidden
            for name, pool in POOLS.items():
                x = (pool(h, layout) if pool else h.reshape(clips, layout.num_steps, -1)).double().numpy()
                rows.append({"sigma": sigma, "block": block, "pool": name,
                             "height_r2": ridge_r2(x, height, train, test), "bounce_r2": ridge_r2(x, bounce, train, test)})
    return rows


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--expert", default=str(ROOT / "recipes" / "pretrained" / "video_expert"), help="a saved wan2.1 video expert folder")
    p.add_argument("--clips", type=int, default=96)
    args = p.parse_args(argv)
    rows = probe(args.expert, clips=args.clips)
    print("| sigma | block | " + " | ".join(f"{p} height / bounce R^2" for p in POOLS) + " |")
    print("|---" * (2 + len(POOLS)) + "|")
    for i in range(0, len(rows), len(POOLS)):
        r = rows[i:i + len(POOLS)]
        print(f"| {r[0]['sigma']} | {r[0]['block']} | " + " | ".join(f"{x['height_r2']:.2f} / {x['bounce_r2']:.2f}" for x in r) + " |")
    return rows


if __name__ == "__main__":
    main()
