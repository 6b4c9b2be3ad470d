"""Evidence that stitching works: a CPU-scale audio-visual sync experiment with a measured metric.

On synthetic clips where each bounce of a square makes a click (random timing per clip):
  1. pretrain a tiny video expert on video alone and a tiny audio expert on audio alone
     (recipes/sync_pretrain.yaml, same flow objective, soe's single-expert path), save both in
     their official (diffusers) formats;
  2. load them as experts and stitch them (connectors + LoRA, recipes/sync_stitch.yaml);
  3. generate N clips from (a) the two experts independently and (b) the stitched model, same
     seeds and conditioning;
  4. score sync with soe.metrics.av_align (audio onsets vs video impacts, IoU within a tolerance)
     and per-modality quality with a Frechet distance on simple features vs ground-truth clips.

    python benchmarks/sync_experiment.py            # default size, ~12 min on 2 CPU cores
    python benchmarks/sync_experiment.py --quick    # < 3 min; only shows the pipeline runs
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from soe.builders import build_expert
from soe.config import load_recipe
from soe.sampling import SamplingSettings, sample, sample_stitched
from soe.train.data import SyntheticAVDataModule
from soe.train.run import run_training
from soe.threads import configure_threads
from soe.train.single import pretrain_expert
from soe.train import sync_eval

ROOT = Path(__file__).resolve().parents[1]
SIZES = {  # pretrain steps, stitch steps, eval clips, sampling steps, training clips
    "default": dict(pretrain=800, stitch=3000, clips=32, steps=24, num_clips=1024),
    "quick": dict(pretrain=30, stitch=20, clips=4, steps=6, num_clips=64),
}


def write_previews(folder: Path, rows: dict, experts: dict, n: int) -> None:
    """What the latents mean, as video with sound (soe.train.synthetic.SyntheticPreviewCodec)."""
    from soe.media import contact_sheet, write_mp4
    from soe.train.synthetic import SyntheticPreviewCodec

    v_codec, a_codec = SyntheticPreviewCodec(experts["a"]), SyntheticPreviewCodec(experts["b"])
    folder.mkdir(parents=True, exist_ok=True)
    for name, lat in rows.items():
        video, audio = v_codec.decode(lat["a"][:n]), a_codec.decode(lat["b"][:n])
        for i in range(n):
            stem = f"{name.split()[0]}_{i:02d}"
            write_mp4(folder / f"{stem}.mp4", video[i], v_codec.rate, audio[i], int(a_codec.rate))
            contact_sheet(folder / f"{stem}.png", video[i], v_codec.rate, audio[i], int(a_codec.rate))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default="runs/sync")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--reuse-experts", action="store_true", help="skip step 1 when OUT already holds both pretrained experts")
    p.add_argument("--stitch-steps", type=int, default=None, help="override the stitching steps of the size")
    p.add_argument("overrides", nargs="*", help="key=value overrides of recipes/sync_stitch.yaml, e.g. optim.lr=2e-3")
    args = p.parse_args(argv)
    size = dict(SIZES["quick" if args.quick else "default"])
    if args.stitch_steps:
        size["stitch"] = args.stitch_steps
    out = Path(args.out)
    console = Console()
    configure_threads()
    t0 = time.time()

    # 1. pretrain each expert alone on its own modality, save in its official format
    pre = load_recipe(ROOT / "recipes" / "sync_pretrain.yaml", [f"seed={args.seed}", f"data.num_clips={size['num_clips']}"])
    torch.manual_seed(args.seed)
    experts = {"a": build_expert(pre, "a"), "b": build_expert(pre, "b")}
    seconds = pre.data.seconds
    data = SyntheticAVDataModule(experts, seconds=seconds, num_clips=size["num_clips"], batch_size=pre.data.batch_size, seed=args.seed)
    for side, name in (("a", "video_expert"), ("b", "audio_expert")):
        if args.reuse_experts and (out / name / "transformer" / "config.json").is_file():
            console.print(f"[bold]1. reusing[/] {out / name}")
            continue
        console.print(f"[bold]1. pretraining the {experts[side].modality} expert alone[/] ({size['pretrain']} steps)")
        pretrain_expert(experts[side], data, side, size["pretrain"], lr=pre.optim.lr, seed=args.seed, accelerator="cpu")
        experts[side].save(out / name)

    # 2. load them from their folders and stitch (connectors + LoRA)
    console.print(f"[bold]2. stitching[/] ({size['stitch']} steps)")
    stitch = run_training(ROOT / "recipes" / "sync_stitch.yaml", [
        f"seed={args.seed}", f"run_dir={out / ('stitch-' + str(int(time.time())) if args.reuse_experts else 'stitch')}", f"experts.a.path={out / 'video_expert'}",
        f"experts.b.path={out / 'audio_expert'}", f"trainer.max_steps={size['stitch']}", f"data.num_clips={size['num_clips']}",
        "trainer.checkpoint_every_n_steps=1000000", *args.overrides], console=console, progress=False)
    stitcher = stitch["module"].stitcher.eval()
    cfg = stitch_cfg = load_recipe(ROOT / "recipes" / "sync_stitch.yaml", [f"experts.a.path={out / 'video_expert'}", f"experts.b.path={out / 'audio_expert'}"])
    alone = {"a": build_expert(stitch_cfg, "a").eval(), "b": build_expert(stitch_cfg, "b").eval()}

    # 3. generate from held-out conditioning with the same seeds
    console.print(f"[bold]3. generating[/] {size['clips']} clips each")
    cond, truth = sync_eval.held_out(alone, seconds, size["clips"], args.seed)
    settings = SamplingSettings(steps=size["steps"], scheduler="unipc", seed=args.seed)
    with torch.no_grad():
        independent = sample(alone, cond, seconds, settings)
        stitched = sample_stitched(stitcher, cond, seconds, settings)

    # 4. score
    tol = sync_eval.tolerance(alone)
    rows = {"ground truth": truth, "independent experts": independent, "stitched": stitched}
    scores = {name: sync_eval.sync_score(lat, alone, seconds) for name, lat in rows.items()}
    fd = {name: sync_eval.frechet(lat, truth, alone, seconds) for name, lat in rows.items() if name != "ground truth"}

    table = Table(title=f"audio-visual sync (AV-Align IoU, tolerance {tol:.2f} s) over {size['clips']} clips")
    for col in ("clips", "sync score", "Frechet video vs truth", "Frechet audio vs truth"):
        table.add_column(col)
    for name, s in scores.items():
        f = fd.get(name, {"video": 0.0, "audio": 0.0})
        table.add_row(name, f"{s:.3f}", f"{f['video']:.3f}", f"{f['audio']:.3f}")
    console.print(table)
    ratio = scores["stitched"] / max(scores["independent experts"], 1e-9)
    console.print(f"stitched / independent sync ratio: {ratio:.2f}  (ground truth {scores['ground truth']:.3f}; "
                  f"{time.time() - t0:.0f} s in all)")
    result = {"size": "quick" if args.quick else "default", "sync": scores, "frechet": fd, "ratio": ratio, "tolerance_s": tol,
              "seconds": time.time() - t0}
    (out / "sync_results.json").write_text(json.dumps(result, indent=1))
    write_previews(out / "previews", rows, alone, n=min(2, size["clips"]))
    console.print(f"previews (mp4 + contact sheet of the first clips, watch and listen): {out / 'previews'}")
    return result


if __name__ == "__main__":
    main()
