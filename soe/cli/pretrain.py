"""Pretrain each expert of a recipe alone on the synthetic task and save it in its family's format.

This is how the demo's experts (recipes/pretrained/) were made; rerun it to regenerate them:

    python -m soe.cli.pretrain recipes/sync_pretrain.yaml --out recipes/pretrained --dtype float16

Each expert trains fully (``train: full``) on its own side of the recipe's synthetic clips with
its own flow objective (soe/train/single.py), for ``trainer.max_steps`` steps with the recipe's
``optim`` section, and is saved with ``Expert.save`` (a diffusers folder + ``soe_expert.json``).
Then both are judged on held-out clips: per-modality Frechet distance to the ground truth and
AV-Align of the two sampled independently (chance level: they were never trained together).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from soe.schema import Dtype

FOLDERS = {"video": "video_expert", "audio": "audio_expert"}


def pretrain(recipe, out, overrides=(), dtype: str = "float32", sides=("a", "b"), console=None) -> dict:
    from soe.console import make_console
    from soe.data.datamodule import SyntheticAVDataModule
    from soe.recipe.builders import build_expert
    from soe.recipe.reading import load_recipe
    from soe.recipe.validate import validate_recipe
    from soe.train.single import pretrain_expert

    console = console or make_console()
    cfg = load_recipe(recipe, overrides)
    validate_recipe(cfg)
    torch.manual_seed(cfg.seed)
    experts = {"a": build_expert(cfg, "a"), "b": build_expert(cfg, "b")}
    d = cfg.data
    data = SyntheticAVDataModule(experts, seconds=d.seconds, num_clips=d.num_clips, batch_size=d.batch_size, seed=cfg.seed)
    out = Path(out)
    for side in sides:
        e = experts[side]
        t0 = time.perf_counter()
        console.print(f"pretraining the {e.modality} expert ({e.name}) alone: {cfg.trainer.max_steps} steps")
        pretrain_expert(e, data, side, cfg.trainer.max_steps, lr=cfg.optim.lr, warmup_steps=cfg.optim.warmup_steps,
                        schedule=cfg.optim.schedule, seed=cfg.seed, accelerator=cfg.trainer.accelerator)
        folder = out / FOLDERS[e.modality]
        torch.nn.Module.to(e.model, Dtype(dtype).torch)  # plain cast (diffusers' .to() warns about fp32-kept modules)
        e.save(folder)
        torch.nn.Module.to(e.model, torch.float32)
        console.print(f"  saved {folder} ({time.perf_counter() - t0:.0f} s)")
    return experts


def judge(experts: dict, seconds: float, n: int = 32, steps: int = 20, seed: int = 0) -> dict:
    """Frechet distance per modality and AV-Align of the experts sampled independently, on ``n`` held-out clips."""
    from soe.evaluate import sync_eval
    from soe.sample.sampler import sample
    from soe.schema import SamplerConfig

    cond, truth = sync_eval.held_out(experts, seconds, n, seed)
    with torch.no_grad():
        latents = sample({s: e.eval() for s, e in experts.items()}, cond, seconds, SamplerConfig(steps=steps, seed=seed))
    return {"frechet": sync_eval.frechet(latents, truth, experts, seconds), "sync": sync_eval.sync_score(latents, experts, seconds),
            "sync_truth": sync_eval.sync_score(truth, experts, seconds), "latents": latents, "truth": truth}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m soe.cli.pretrain", description=__doc__.splitlines()[0])
    p.add_argument("recipe", help="recipe with the two experts' architectures and the synthetic data (e.g. recipes/sync_pretrain.yaml)")
    p.add_argument("--out", required=True, help="folder for video_expert/ and audio_expert/")
    p.add_argument("--dtype", choices=sorted(d.value for d in Dtype), default="float32", help="dtype of the saved weights")
    p.add_argument("--eval-clips", type=int, default=32, help="held-out clips for the Frechet/AV-Align check (0: skip)")
    p.add_argument("overrides", nargs="*", help="key=value recipe overrides, e.g. trainer.max_steps=100")
    args = p.parse_intermixed_args(argv)  # options before or after the key=value overrides
    from soe.console import make_console
    from soe.threads import configure_threads

    configure_threads()
    console = make_console()
    experts = pretrain(args.recipe, args.out, args.overrides, dtype=args.dtype, console=console)
    if not args.eval_clips:
        return {}
    from soe.recipe.reading import load_recipe

    cfg = load_recipe(args.recipe, args.overrides)
    result = judge(experts, cfg.data.seconds, n=args.eval_clips, seed=cfg.seed)
    f = result["frechet"]
    console.print(f"held-out check ({args.eval_clips} clips): Frechet video {f['video']:.3f}, audio {f['audio']:.3f} "
                  f"(0 = like the ground truth); AV-Align of the experts sampled independently {result['sync']:.3f} "
                  f"(ground truth {result['sync_truth']:.3f})")
    return result


if __name__ == "__main__":
    main()
