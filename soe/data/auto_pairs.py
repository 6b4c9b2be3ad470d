"""``stitch.pairs: auto`` from a recipe: the paired clips the experts run on, and the chosen pairs' record.

The clips are the recipe's own data: the first ``stitch.auto.clips`` synthetic clips of its training stream,
or the first clips of its latent cache. :func:`pair_chooser` gives ``soe.recipe.builders.build_stitcher`` the
``auto_pairs(a, b)`` it calls once both experts are built; the CKA matrix is kept for ``soe inspect``'s
heat map (:func:`write_heatmap`).

A training run records what it chose in its run folder (``auto_pairs.json``: the pairs, the CKA matrix, the
experts' names and depths, the connector count and a checksum; ``auto_pairs.png`` beside it when matplotlib is
installed) at its first build, and every later build of that run (resume, ``soe generate``, ``soe export``) reads
the pairs from there instead of choosing again: the connectors it trained belong to those pairs, whatever the
data is now. A record changed by hand, or one made for other experts or another connector count, is one line.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from omegaconf import DictConfig

from soe.errors import RecipeError
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
            record.update(pairs=pairs, similarity=sim, names=(a.name, b.name), blocks=(a.num_blocks, b.num_blocks))
        return pairs

    return auto_pairs


RECORD = "auto_pairs.json"


def _checksum(body: dict) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def write_record(record: dict, folder) -> Path:
    """``folder/auto_pairs.json`` (written atomically) from a :func:`pair_chooser` record, + its heat map when possible."""
    from soe.extras import has

    folder = Path(folder)
    body = {"pairs": [list(map(int, p)) for p in record["pairs"]], "similarity": [[round(float(v), 6) for v in row]
            for row in record["similarity"].tolist()], "experts": list(record["names"]), "blocks": list(record["blocks"])}
    body["checksum"] = _checksum(body)
    out, tmp = folder / RECORD, folder / f".{RECORD}.tmp"
    tmp.write_text(json.dumps(body, indent=1))
    os.replace(tmp, out)
    if has("matplotlib"):
        write_heatmap(record, folder / "auto_pairs.png")
    return out


def read_record(file: Path, cfg: DictConfig, a, b) -> list[tuple[int, int]]:
    """The pairs of a run's ``auto_pairs.json``, checked against its checksum and against this recipe's experts and
    ``stitch.auto.connectors``; :class:`RecipeError` (one line) otherwise."""
    try:
        body = json.loads(Path(file).read_text())
        pairs = [(int(i), int(j)) for i, j in body["pairs"]]
        experts, blocks, checksum = list(body["experts"]), [int(n) for n in body["blocks"]], body.pop("checksum")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise RecipeError(f"stitch.pairs: '{file}' is not a readable record of the run's chosen pairs ({type(e).__name__}: "
                          f"{' '.join(str(e).split())[:120]})") from None
    if checksum != _checksum(body):
        raise RecipeError(f"stitch.pairs: '{file}' was changed after the run chose its pairs (checksum mismatch); restore it: "
                          "the run's connectors were trained at the pairs it recorded")
    s: StitchConfig = build(StitchConfig, cfg.stitch, "stitch")
    ours = {"experts": [a.name, b.name], "blocks": [a.num_blocks, b.num_blocks],
            "connectors": auto_connectors(s, a.num_blocks, b.num_blocks)}
    theirs = {"experts": experts, "blocks": blocks, "connectors": len(pairs)}
    for key in ours:
        if ours[key] != theirs[key]:
            raise RecipeError(f"stitch.pairs: '{file}' holds pairs chosen for {key} {theirs[key]}, this recipe has {ours[key]}; "
                              "use the run's recipe (its recipe.yaml), or a new run_dir to choose again")
    return pairs


def find_record(trained) -> Path | None:
    """The ``auto_pairs.json`` of the run a ``trained/`` folder (or run folder) belongs to, if it recorded one."""
    if trained is None:
        return None
    trained = Path(trained)
    for folder in (trained, trained.parent):
        if (folder / RECORD).is_file():
            return folder / RECORD
    return None


def recorded_pair_chooser(cfg: DictConfig, file: Path | None, record: dict | None = None):
    """``auto_pairs(a, b)`` for ``build_stitcher``: the pairs recorded in ``file`` when it exists, else chosen now
    (:func:`pair_chooser`, filling ``record`` for :func:`write_record`)."""
    if file is None or not Path(file).is_file():
        return pair_chooser(cfg, record)
    return lambda a, b: read_record(Path(file), cfg, a, b)


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
