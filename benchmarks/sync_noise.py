"""How far the demo's held-out numbers can be trusted: the same scores on many groups of clips.

The demo (``sample.sync_clips``, soe/sample/callbacks.py) scores the experts alone and the stitched
model on a handful of held-out clips. This samples ``--clips`` held-out clips with both (same seeds,
same conditioning; the experts alone are the run's recipe with untrained connectors and adapters,
i.e. the stitch at step 0), splits them into groups of the demo's size and prints, per group and
over all clips, AV-Align and the Frechet distances to the true clips, and in how many groups the
stitched model scores worse than the experts alone.

    soe stitch recipes/demo.yaml                                     # writes runs/demo
    python benchmarks/sync_noise.py runs/demo --clips 96 --group 8    # ~1 min on 2 cores
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).parents[1]))  # the checkout

from soe.evaluate import sync_eval  # noqa: E402
from soe.evaluate.metrics import frechet_distance  # noqa: E402

MODELS = ("alone", "stitched")


def group_scores(feats: dict, sync: dict, truth: dict, rows: slice) -> dict:
    """Scores of the clips ``rows``: ``{model: {"sync", "video", "audio"}}`` (Frechet vs the same true clips)."""
    return {m: {"sync": float(np.mean(sync[m][rows])),
                **{mod: frechet_distance(feats[m][mod][rows], truth[mod][rows]) for mod in ("video", "audio")}}
            for m in MODELS}


def worse(score: dict) -> dict:
    """Which scores the stitched model loses to the experts alone (higher Frechet, lower sync)."""
    a, s = score["alone"], score["stitched"]
    return {"sync": s["sync"] < a["sync"], "video": s["video"] > a["video"], "audio": s["audio"] > a["audio"]}


@torch.no_grad()
def measure(run_dir: Path, clips: int, group: int, overrides: list[str]) -> dict:
    from soe.recipe.builders import build_sampler, build_stitcher
    from soe.recipe.reading import load_recipe
    from soe.sample.sampler import sample_stitched
    from soe.train.trained import load_trained

    cfg = load_recipe(run_dir / "recipe.yaml", overrides)
    torch.manual_seed(cfg.seed)
    models = {"alone": build_stitcher(cfg), "stitched": build_stitcher(cfg)}
    step = load_trained(models["stitched"], run_dir / "trained")
    experts = {"a": models["stitched"].a, "b": models["stitched"].b}
    seconds = cfg.sample.seconds or cfg.data.seconds
    cond, truth = sync_eval.held_out(experts, seconds, clips, cfg.seed)
    feats, sync = {}, {}
    for name, model in models.items():
        lat = {k: v.float() for k, v in sample_stitched(model.eval(), cond, seconds, build_sampler(cfg)).items()}
        feats[name] = sync_eval.features(lat, experts, seconds)
        sync[name] = np.array([sync_eval.sync_score({k: v[i:i + 1] for k, v in lat.items()}, experts, seconds) for i in range(clips)])
    ref = sync_eval.features(truth, experts, seconds)
    groups = [group_scores(feats, sync, ref, slice(g, g + group)) for g in range(0, clips - group + 1, group)]
    return {"run": str(run_dir), "step": step, "clips": clips, "group": group, "groups": groups,
            "all": group_scores(feats, sync, ref, slice(0, clips)),
            "stitched_worse": {k: sum(worse(g)[k] for g in groups) for k in ("sync", "video", "audio")}}


def table(result: dict) -> Table:
    t = Table(title=f"{result['run']} (step {result['step']}): experts alone -> stitched, groups of {result['group']} held-out clips")
    for col in ("clips", "AV-Align", "Frechet video", "Frechet audio"):
        t.add_column(col, no_wrap=True, justify="left" if col == "clips" else "right")
    rows = [(f"{i * result['group']}-{(i + 1) * result['group'] - 1}", g) for i, g in enumerate(result["groups"])]
    for label, g in rows + [(f"all {result['clips']}", result["all"])]:
        t.add_row(label, *(f"{g['alone'][k]:.3f} -> {g['stitched'][k]:.3f}" for k in ("sync", "video", "audio")))
    n, w = len(result["groups"]), result["stitched_worse"]
    t.add_row("stitched worse in", *(f"{w[k]}/{n} groups" for k in ("sync", "video", "audio")))
    return t


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", type=Path, help="run folder of `soe stitch` on synthetic data (holds recipe.yaml and trained/)")
    p.add_argument("--clips", type=int, default=96)
    p.add_argument("--group", type=int, default=None, help="clips per group (default: the recipe's sample.sync_clips)")
    p.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    p.add_argument("overrides", nargs="*", help="recipe overrides (key=value), e.g. sample.steps=32")
    args = p.parse_args(argv)
    if args.group is None:
        from soe.recipe.reading import load_recipe

        args.group = load_recipe(args.run / "recipe.yaml").sample.sync_clips or 8
    result = measure(args.run, args.clips, args.group, args.overrides)
    Console().print(table(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
