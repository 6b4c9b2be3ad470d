"""``stitch.pairs: auto`` from a recipe: the paired clips the experts run on, and the chosen pairs' record.

The clips are the recipe's own data: the first ``stitch.auto.clips`` synthetic clips of its training stream,
or the first clips of its latent cache. :func:`pair_chooser` gives ``soe.recipe.builders.build_stitcher`` the
``auto_pairs(a, b)`` it calls once both experts are built; the CKA matrix is kept for ``soe inspect``'s
heat map (:func:`write_heatmap`).
"""
from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig

from soe.recipe.builders import auto_connectors
from soe.schema import build
from soe.schema.stitch import StitchConfig
from soe.stitch.auto_pairs import choose_pairs


def paired_clips(cfg: DictConfig, a, b, n: int) -> tuple[dict, dict]:
    """Batches ``(batch_a, batch_b)`` of ``n`` paired clean clips of the recipe's data (same clips, same order)."""
    experts = {"a": a, "b": b}
    if cfg.data.kind == "synthetic":
        from soe.data.datamodule import SyntheticAVDataModule

        data = SyntheticAVDataModule(experts, seconds=cfg.data.seconds, num_clips=max(n, 1), batch_size=n, seed=cfg.seed)
        clips = [data.make_clip(i) for i in range(n)]
        return tuple({k: torch.stack([c[s][k] for c in clips]).to(experts[s].device) for k in clips[0][s]} for s in ("a", "b"))
    from soe.data.build import build_datamodule

    class _Sides:  # build_datamodule reads only the two experts off the stitcher
        pass

    sides = _Sides()
    sides.a, sides.b = a, b
    dm = build_datamodule(cfg, sides)
    dm.setup("fit")
    got = {"a": [], "b": []}
    for batch in dm.train_dataloader():
        for s in got:
            got[s].append(batch[s])
        if sum(x["latents"].shape[0] for x in got["a"]) >= n:
            break
    return tuple({k: torch.cat([x[k] for x in got[s]])[:n].to(experts[s].device) for k in got[s][0] if torch.is_tensor(got[s][0][k])}
                 for s in ("a", "b"))


def pair_chooser(cfg: DictConfig, record: dict | None = None):
    """``auto_pairs(a, b) -> pairs`` for ``build_stitcher``; ``record`` (optional) receives ``pairs`` and ``similarity``."""
    s: StitchConfig = build(StitchConfig, cfg.stitch, "stitch")

    def auto_pairs(a, b):
        with torch.random.fork_rng(devices=[]):  # the connectors drawn next get the same random numbers as with fixed pairs
            batch_a, batch_b = paired_clips(cfg, a, b, s.auto.clips)
            pairs, sim = choose_pairs(a, b, batch_a, batch_b, auto_connectors(s, a.num_blocks, b.num_blocks),
                                      sigmas=tuple(s.auto.sigmas), seed=cfg.seed)
        if record is not None:
            record.update(pairs=pairs, similarity=sim, names=(a.name, b.name))
        return pairs

    return auto_pairs


def choose_for_recipe(cfg: DictConfig) -> dict:
    """Build both experts of the recipe (with their weights) and choose the pairs: the ``record`` of :func:`pair_chooser`."""
    from soe.recipe.builders import build_expert

    record: dict = {}
    torch.manual_seed(cfg.seed)  # preset (random-weight) experts come out as in training
    a, b = (build_expert(cfg, side) for side in ("a", "b"))
    pair_chooser(cfg, record)(a, b)
    return record


def write_heatmap(record: dict, out) -> Path:
    """The CKA matrix as a heat map PNG, the chosen pairs circled."""
    from soe.extras import require

    require("matplotlib", "the block-similarity heat map (PNG)")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sim = record["similarity"].numpy()
    fig, ax = plt.subplots(figsize=(1.2 + 0.5 * sim.shape[1], 1.0 + 0.5 * sim.shape[0]), dpi=100)
    im = ax.imshow(sim, cmap="viridis", vmin=0, vmax=1)
    for i, j in record["pairs"]:
        ax.scatter([j], [i], s=120, facecolors="none", edgecolors="red", linewidths=2)
    for (i, j), v in ((ij, sim[ij]) for ij in ((i, j) for i in range(sim.shape[0]) for j in range(sim.shape[1]))):
        ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color="white" if v < 0.6 else "black")
    a, b = record.get("names", ("a", "b"))
    ax.set_xlabel(f"b: {b} block")
    ax.set_ylabel(f"a: {a} block")
    ax.set_xticks(range(sim.shape[1]))
    ax.set_yticks(range(sim.shape[0]))
    ax.set_title("linear CKA (red: chosen pairs)", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out
