"""Evidence that stitching syncs: a CPU-scale audio-visual experiment with measured metrics.

On synthetic clips where each bounce of a square makes a click (random timing per clip):
  1. pretrain a tiny video expert on video alone and a tiny audio expert on audio alone
     (recipes/sync_pretrain.yaml, soe's single-expert path), save both in their official formats
     (or take finished ones: --experts DIR holding video_expert/ and audio_expert/);
  2. load them and stitch them with a task mixture (recipes/sync_stitch.yaml: joint, v2a, a2v, image);
  3. sample held-out clips in every mode, same seeds and conditioning: independent experts, joint
     stitched, v2a (true video given), a2v (true audio given), image (true first video frame given);
  4. score sync with AV-Align (soe.evaluate.metrics.av_align) and per-modality quality with a Frechet distance
     on simple features vs the true clips; a curve of sync against stitching steps from the checkpoints.

    python benchmarks/sync_experiment.py --experts recipes/pretrained   # base run on the shipped experts (docs/evidence.md)
    python benchmarks/sync_experiment.py                           # base run: pretrain + stitch + score
    python benchmarks/sync_experiment.py --reuse-experts --ablation detach_off   # one ablation (see ABLATIONS)
    python benchmarks/sync_experiment.py --reuse-experts --ablation all          # every ablation in turn
    python benchmarks/sync_experiment.py --report docs/evidence             # table + plots of what ran
    python benchmarks/sync_experiment.py --quick                   # < 1 min; only shows the pipeline runs
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).parent))  # sync_eval next to this file
sys.path.insert(0, str(Path(__file__).parents[1]))  # the checkout

import sync_eval as E  # noqa: E402

from soe.cli.stitch import run_training  # noqa: E402
from soe.data.datamodule import SyntheticAVDataModule  # noqa: E402
from soe.evaluate.sync_eval import held_out  # noqa: E402
from soe.recipe.builders import build_expert, build_sampler  # noqa: E402
from soe.recipe.reading import load_recipe  # noqa: E402
from soe.train.single import pretrain_expert  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SIZES = {  # pretrain steps, stitch steps, eval clips, sampling steps, training clips, curve: checkpoint every / clips
    # default: pretrain=None is recipes/sync_pretrain.yaml's trainer.max_steps (3,000), how the shipped experts were made;
    # 800 steps each left experts under which no sync target held (joint 0.579 / v2a 0.746 / a2v 0.842, docs/evidence.md)
    "default": dict(pretrain=None, stitch=1500, clips=32, steps=24, num_clips=1024, curve_every=250, curve_clips=16),
    "small": dict(pretrain=300, stitch=400, clips=16, steps=16, num_clips=512, curve_every=100, curve_clips=8),  # a busy 2-core box
    "ablation": dict(pretrain=300, stitch=200, clips=12, steps=10, num_clips=512, curve_every=10**6, curve_clips=8),  # one per choice
    "quick": dict(pretrain=8, stitch=6, clips=2, steps=3, num_clips=16, curve_every=6, curve_clips=2),
}
QUICK_ARCH = {  # --quick: the smallest experts that still run the pipeline
    "experts.a.architecture.num_layers": 2, "experts.b.architecture.num_hidden_layers": 2, "data.seconds": 1.0, "data.batch_size": 2,
}
# Each ablation changes one design choice of the base recipe (recipes/sync_stitch.yaml).
ABLATIONS = {
    "reference": [],  # the base recipe at the ablations' size: what each ablation is compared with
    "detach_off": ["stitch.detach_source=false"],  # gradients cross modalities through connectors
    "independent_timesteps": ["flow.timesteps=independent"],  # a flow time per modality (MOVA) vs shared
    "every_2nd_block": ["stitch.pairs={every: 2}"],  # connectors at every 2nd block pair only
    "attention_kv": ["stitch.inject={b_to_a: {mode: attention_kv, targets: [{attention: attn2, mode: concat}]}}"],  # audio->video as k/v
    "connectors_only": ["experts.a.train=frozen", "experts.b.train=frozen"],  # no LoRA
    "trunc_normal_init": ["stitch.connector.init=trunc_normal"],  # connectors not zero-initialised
    "joint_only": ["flow.tasks={joint: 1.0, v2a: 0, a2v: 0, image: 0}"],  # no task mixture (mappings merge: zero the others)
    "mean_pool": ["stitch.connector.pool=mean"],  # connectors average each time step (UniVerse-1): where the square is is lost
    "auto_2_pairs": ["stitch.pairs=auto", "stitch.auto.connectors=2"],  # 2 pairs chosen by CKA (same budget as every_2nd_block)
}


def pretrain(out: Path, size: dict, seed: int, reuse: bool, quick: bool, console: Console) -> None:
    """Step 1: each expert alone on its own modality, saved in its official format under OUT."""
    overrides = [f"seed={seed}", f"data.num_clips={size['num_clips']}"] + ([f"{k}={v}" for k, v in QUICK_ARCH.items()] if quick else [])
    pre = load_recipe(ROOT / "recipes" / "sync_pretrain.yaml", overrides)
    steps = size["pretrain"] or pre.trainer.max_steps
    torch.manual_seed(seed)
    experts = {"a": build_expert(pre, "a"), "b": build_expert(pre, "b")}
    data = SyntheticAVDataModule(experts, seconds=pre.data.seconds, num_clips=size["num_clips"], batch_size=pre.data.batch_size, seed=seed)
    for side, name in (("a", "video_expert"), ("b", "audio_expert")):
        if reuse and (out / name / "transformer" / "config.json").is_file():
            console.print(f"[bold]1. reusing[/] {out / name}")
            continue
        console.print(f"[bold]1. pretraining the {experts[side].modality} expert alone[/] ({steps} steps)")
        pretrain_expert(experts[side], data, side, steps, lr=pre.optim.lr, warmup_steps=pre.optim.warmup_steps,
                        schedule=pre.optim.schedule, seed=seed, accelerator="cpu")
        experts[side].save(out / name)


def curve(stitcher, run_dir: Path, alone, cond, truth, seconds, settings, tol) -> list[dict]:
    """Sync of joint / v2a / a2v at step 0 (the experts alone: zero-init connectors and LoRA add nothing)
    and at every saved checkpoint of the stitch."""
    from soe.train.checkpoint import read_checkpoint

    final = {k: v.clone() for k, v in stitcher.state_dict().items()}
    points = [{"step": 0, **{m: E.sync_score(E.generate(m, None, alone, cond, truth, seconds, settings), alone, seconds, tol)
                             for m in ("joint", "v2a", "a2v")}}]
    for path in sorted((run_dir / "checkpoints").glob("step-*.ckpt")):
        sd = read_checkpoint(path)["state_dict"]
        stitcher.load_state_dict({k.removeprefix("stitcher."): v for k, v in sd.items() if k.startswith("stitcher.")}, strict=False)
        points.append({"step": int(path.stem.split("-")[1]),
                       **{m: E.sync_score(E.generate(m, stitcher, alone, cond, truth, seconds, settings), alone, seconds, tol)
                          for m in ("joint", "v2a", "a2v")}})
    stitcher.load_state_dict(final)
    return points


def run(args, size: dict, console: Console) -> dict:
    out, t0 = Path(args.out), time.time()
    experts_dir = Path(args.experts) if args.experts else out
    if not args.experts:
        pretrain(out, size, args.seed, args.reuse_experts or args.ablation is not None, args.quick, console)
    name = args.ablation or "base"
    run_dir = out / ("stitch" if name == "base" else f"ablations/{name}")
    if (run_dir / "checkpoints").is_dir():
        run_dir = run_dir.with_name(f"{run_dir.name}-{int(time.time())}")
    console.print(f"[bold]2. stitching[/] ({name}, {size['stitch']} steps) -> {run_dir}")
    quick = [f"{k}={v}" for k, v in QUICK_ARCH.items()] if args.quick else []
    base = [f"experts.a.path={experts_dir / 'video_expert'}", f"experts.b.path={experts_dir / 'audio_expert'}", *quick]
    stitch = run_training(ROOT / "recipes" / "sync_stitch.yaml", [
        f"seed={args.seed}", f"run_dir={run_dir}", *base, f"trainer.max_steps={size['stitch']}",
        f"data.num_clips={size['num_clips']}", f"trainer.checkpoint_every_n_steps={size['curve_every']}",
        *ABLATIONS.get(name, []), *args.overrides], console=console, progress=False)
    return evaluate(stitch["module"].stitcher.eval(), stitch["run_dir"], name, size["stitch"], args, size, console, t0)


def load_run(run_dir: Path):
    """The stitched model of a (possibly unfinished) run folder at its latest checkpoint, and its step."""
    from soe.recipe.builders import build_stitcher
    from soe.train.build import apply_training_setup
    from soe.train.checkpoint import read_checkpoint

    cfg = load_recipe(run_dir / "recipe.yaml")
    torch.manual_seed(cfg.seed)
    from soe.data.auto_pairs import pair_chooser

    stitcher = build_stitcher(cfg, auto_pairs=pair_chooser(cfg) if cfg.stitch.pairs == "auto" else None)  # as training chose
    apply_training_setup(stitcher, cfg)
    ckpt = read_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    stitcher.load_state_dict({k.removeprefix("stitcher."): v for k, v in ckpt["state_dict"].items() if k.startswith("stitcher.")}, strict=False)
    return stitcher.eval(), int(ckpt["global_step"])


def evaluate(stitcher, run_dir: Path, name: str, steps: int, args, size: dict, console: Console, t0: float) -> dict:
    """Steps 3 and 4: sample every mode on held-out clips, score, curve, previews; writes RUN_DIR/sync_results.json."""
    out = Path(args.out)
    cfg = load_recipe(run_dir / "recipe.yaml", [o for o in args.overrides if o.startswith("sample.")])  # --eval-run R sample.k=v
    seconds = cfg.data.seconds
    alone = {"a": build_expert(cfg, "a").eval(), "b": build_expert(cfg, "b").eval()}

    console.print(f"[bold]3. generating[/] {size['clips']} clips in each of {', '.join(E.MODES)}")
    cond, truth = held_out(alone, seconds, size["clips"], args.seed)
    # the recipe's sampling keys (sample.lora_off, sample.cross_guidance, ...), with the experiment's steps, scheduler, seed, CFG
    settings = replace(build_sampler(cfg), steps=size["steps"], scheduler="unipc", seed=args.seed,
                       guidance={"a": args.guidance, "b": args.guidance})
    rows = {mode: E.generate(mode, stitcher, alone, cond, truth, seconds, settings) for mode in E.MODES}
    tol = 1.5 / min(alone["a"].latent_rate, alone["b"].latent_rate)
    scores = E.score(rows, truth, alone, seconds, tol)
    points = []
    if (name == "base" and not args.no_curve) or args.curve:
        c_cond, c_truth = held_out(alone, seconds, size["curve_clips"], args.seed + 1)
        points = curve(stitcher, run_dir, alone, c_cond, c_truth, seconds, settings, tol)
    result = {"name": name, "size": "quick" if args.quick else args.size, "stitch_steps": steps, "clips": size["clips"],
              "sampling_steps": size["steps"], "guidance": args.guidance, "tolerance_s": tol, "scores": scores, "curve": points,
              "overrides": ABLATIONS.get(name, []) + list(args.overrides), "seconds": time.time() - t0}
    print_table(result, console)
    folder = run_dir
    (folder / "sync_results.json").write_text(json.dumps(result, indent=1))
    if name == "base":
        (out / "sync_results.json").write_text(json.dumps(result, indent=1))
    E.write_previews(folder / "previews", rows | {"ground truth": truth}, alone, n=1 if args.quick else 2)
    console.print(f"results: {folder / 'sync_results.json'}; previews (mp4 + contact sheets): {folder / 'previews'}; "
                  f"{time.time() - t0:.0f} s in all")
    return result


def print_table(result: dict, console: Console) -> None:
    table = Table(title=f"{result['name']}: AV-Align sync (tolerance {result['tolerance_s']:.2f} s) over {result['clips']} clips, "
                        f"{result['stitch_steps']} stitch steps")
    for col in ("mode", "sync", "Frechet video", "Frechet audio"):
        table.add_column(col)
    for mode, s in result["scores"].items():
        fmt = lambda v: "given" if v is None else f"{v:.3f}"  # noqa: E731
        table.add_row(mode, f"{s['sync']:.3f}", fmt(s["frechet_video"]), fmt(s["frechet_audio"]))
    console.print(table)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes: shows the pipeline runs (< 1 min), numbers mean nothing")
    p.add_argument("--size", choices=list(SIZES), default="default", help="steps and clips (SIZES); --quick = --size quick")
    p.add_argument("--out", default="runs/sync")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--experts", default=None, help="folder with finished video_expert/ and audio_expert/ (skips step 1)")
    p.add_argument("--reuse-experts", action="store_true", help="skip step 1 when OUT already holds both pretrained experts")
    p.add_argument("--stitch-steps", type=int, default=None, help="override the stitching steps of the size")
    p.add_argument("--ablation", choices=[*ABLATIONS, "all"], default=None, help="stitch with one design choice changed")
    p.add_argument("--curve", action="store_true", help="also score every checkpoint of an ablation (the base run always does)")
    p.add_argument("--no-curve", action="store_true", help="leave out the base run's curve (repeat seeds: the table only)")
    p.add_argument("--pretrain-steps", type=int, default=None, help="override the pretraining steps of the size (default: the recipe's)")
    p.add_argument("--guidance", type=float, default=1.0, help="CFG scale of both modalities while sampling")
    p.add_argument("--eval-run", default=None, metavar="RUN_DIR", help="only score this stitch run folder at its latest checkpoint")
    p.add_argument("--report", default=None, metavar="DIR", help="collect OUT's results into DIR/sync_table.md + plots and stop")
    p.add_argument("overrides", nargs="*", help="key=value overrides of recipes/sync_stitch.yaml, e.g. optim.lr=2e-3 (with --eval-run: "
                   "its sample.* keys, e.g. 'sample.lora_off={b: [joint, image]}')")
    args = p.parse_args(argv)
    console = Console()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", 2)))
    if args.eval_run:  # score a finished or unfinished stitch run at its latest checkpoint
        run_dir = Path(args.eval_run)
        stitcher, step = load_run(run_dir)
        size = dict(SIZES[args.size])
        name = args.ablation or ("base" if run_dir.name.startswith("stitch") else run_dir.name)
        return evaluate(stitcher, run_dir, name, step, args, size, console, time.time())
    if args.report:
        from sync_report import report

        return report(Path(args.out), Path(args.report), console)
    args.quick = args.quick or args.size == "quick"
    size = dict(SIZES["quick" if args.quick else args.size])
    if args.stitch_steps:
        size["stitch"] = args.stitch_steps
    if args.pretrain_steps:
        size["pretrain"] = args.pretrain_steps
    if args.ablation == "all":
        results = {}
        for name in ABLATIONS:
            args.ablation = name
            results[name] = run(args, size, console)
        return results
    return run(args, size, console)


if __name__ == "__main__":
    main()
