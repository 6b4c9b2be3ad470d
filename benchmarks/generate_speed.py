"""Sampling speed and peak memory of UniVerse-1 per memory/speed mode, next to each expert sampled alone.

    python benchmarks/generate_speed.py --device cuda                  # full size: Wan2.1-1.3B + ACE-Step v1 3.5B + fusion
    python benchmarks/generate_speed.py --size mid --modes none cache  # CPU smoke test at mid size

The model is recipes/universe1.yaml with random weights (the real cost), built directly on the
device; 5 s at 480x832, UniPC, CFG video 1.2 / audio 5.0, shift 15, bf16 on a GPU. Each mode is a
fresh build (offloading moves weights). Modes sampled over all ``--steps`` are timed end to end;
the others over ``--timed-steps`` steps after one warm-up step, and "s / clip" is then seconds per
step x ``--steps`` (a UniPC step costs the same at every step, so only cached runs need the whole
trajectory). Peak memory = torch.cuda.max_memory_allocated during sampling (+ VAE decode when
``--decode``). Results also go to ``--json``.
"""
from __future__ import annotations

import argparse
import gc
import json
import time
import traceback
from pathlib import Path

import _common as C  # noqa: F401  (puts the checkout on sys.path)
import torch
from rich.console import Console
from rich.table import Table

from soe.recipe.builders import build_stitcher
from soe.recipe.reading import load_recipe
from soe.sample.sampler import sample, sample_stitched
from soe.sample.speed import apply_speed
from soe.schema import SamplerConfig, SpeedConfig

ROOT = Path(__file__).resolve().parents[1]
MID = ["experts.a.architecture={num_attention_heads: 4, attention_head_dim: 64, ffn_dim: 1024, num_layers: 6, text_dim: 256}",
       "experts.a.options={fps: 25, height: 192, width: 192, text_len: 32}",
       "experts.b.architecture={num_layers: 4, inner_dim: 256, num_attention_heads: 4, attention_head_dim: 64, "
       "ssl_encoder_depths: [1, 1], ssl_latent_dims: [16, 12], lyric_hidden_size: 32, lyric_encoder_layers: 1, "
       "lyric_encoder_heads: 2, lyric_encoder_ff_dim: 64, patch_embed_channels: 32}",
       "stitch.depth.every=2", "experts.a.dtype=float32", "experts.b.dtype=float32"]
# the same structure (fusion, depth, injection) at toy widths: a CPU check of a benchmark's whole path (gpu_speed.py --tiny)
TINY = ["experts.a.architecture={num_attention_heads: 2, attention_head_dim: 16, ffn_dim: 64, num_layers: 6, text_dim: 32}",
        "experts.a.options={fps: 25, height: 64, width: 64, text_len: 8}",
        "experts.b.architecture={num_layers: 4, inner_dim: 32, num_attention_heads: 2, attention_head_dim: 16, "
        "ssl_encoder_depths: [1, 1], ssl_latent_dims: [16, 12], lyric_hidden_size: 16, lyric_encoder_layers: 1, "
        "lyric_encoder_heads: 2, lyric_encoder_ff_dim: 32, patch_embed_channels: 32}", *MID[-3:]]
# name -> (SpeedConfig keys, whole trajectory?)
MODES = {
    "none": (dict(), True),
    "cache": (dict(cache="first_block", cache_threshold=0.05), True),
    "offload_blocks": (dict(memory="offload_blocks"), False),
    "offload_blocks+fp8": (dict(memory="offload_blocks", storage_dtype="float8_e4m3fn"), False),
    "offload_blocks+fp8+cache": (dict(memory="offload_blocks", storage_dtype="float8_e4m3fn", cache="first_block"), True),
    "fp8": (dict(storage_dtype="float8_e4m3fn"), False),
    "offload_model": (dict(memory="offload_model"), False),
    "compile": (dict(compile=True), False),
    "cudnn_attention": (dict(attention_backend="_native_cudnn"), False),
}


def recipe(size: str):
    over = ["experts.a.path=null", "experts.b.path=null"] + {"mid": MID, "tiny": TINY}.get(size, [])
    return load_recipe(ROOT / "recipes" / "universe1.yaml", over)


def settings(cfg, steps: int) -> SamplerConfig:
    s = cfg.sample
    return SamplerConfig(steps=steps, scheduler=s.scheduler, guidance=dict(s.guidance), shift=dict(s.shift), seed=0)


class Clock:
    """Wall time per sampling step (synchronised on a GPU)."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"
        self.marks = []

    def __call__(self, i=None, total=None):
        if self.cuda:
            torch.cuda.synchronize()
        self.marks.append(time.perf_counter())


def run_mode(name: str, cfg, device, args, console) -> dict:
    keys, whole = MODES[name]
    spec = SpeedConfig(**keys)
    build_dev = device if spec.memory == "none" else device  # built on the device: fast random init
    torch.manual_seed(0)
    t0 = time.perf_counter()
    with torch.no_grad():
        st = build_stitcher(cfg, device=build_dev, load_weights=False).eval()
    setup = apply_speed(st, spec, device)
    build_s = time.perf_counter() - t0
    seconds = cfg.sample.seconds
    g = torch.Generator().manual_seed(1)
    cond = {s: {k: v.to(device) for k, v in getattr(st, s).conditioning(1, seconds, generator=g).items()} for s in ("a", "b")}
    steps = args.steps if whole else args.timed_steps + 1
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    clock = Clock(device)
    clock()
    lat = sample_stitched(st, cond, seconds, settings(cfg, steps), progress=clock)
    per_step = [b - a for a, b in zip(clock.marks, clock.marks[1:])]
    if whole:
        clip_s = clock.marks[-1] - clock.marks[0]
        warm = sorted(per_step[1:])
    else:
        warm = sorted(per_step[1:])
        clip_s = warm[len(warm) // 2] * args.steps
    out = dict(mode=name, spec=keys, steps_run=steps, extrapolated=not whole, s_per_clip=clip_s,
               s_per_step_median=warm[len(warm) // 2] if warm else per_step[0], first_step_s=per_step[0], build_s=build_s,
               latents={k: list(v.shape) for k, v in lat.items()})
    if setup.cache is not None:
        out["cache"] = {k: v for k, v in setup.cache.stats.items() if k != "changes"}
    if device.type == "cuda":
        out["peak_gb"] = torch.cuda.max_memory_allocated() / 1e9
        out["reserved_gb"] = torch.cuda.max_memory_reserved() / 1e9
    if args.decode and name in args.decode_modes:
        out.update(decode(st, lat, setup, device))
    out["latent_rms"] = {k: v.float().pow(2).mean().sqrt().item() for k, v in lat.items()}
    if name == "none" and args.alone:
        out["alone"] = alone(st, cond, cfg, device, args)
    del st, setup, lat
    return out


def alone(st, cond, cfg, device, args) -> dict:
    """Each expert sampled by itself (its own native forward, its own CFG), same weights and steps."""
    res = {}
    for side in ("a", "b"):
        e = getattr(st, side)
        whole = side == "b" or args.timed_steps >= args.steps
        steps = args.steps if whole else args.timed_steps + 1
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        clock = Clock(device)
        clock()
        sample({side: e}, {side: cond[side]}, cfg.sample.seconds, settings(cfg, steps), progress=clock)
        per = [b - a for a, b in zip(clock.marks, clock.marks[1:])]
        med = sorted(per[1:])[len(per[1:]) // 2]
        res[f"{side}:{e.name}"] = dict(s_per_clip=(clock.marks[-1] - clock.marks[0]) if whole else med * args.steps,
                                       s_per_step_median=med, extrapolated=not whole,
                                       peak_gb=torch.cuda.max_memory_allocated() / 1e9 if device.type == "cuda" else None)
    return res


def decode(st, lat, setup, device) -> dict:
    """Decode the video latents through a Wan2.1 VAE of the real size (random weights)."""
    from diffusers import AutoencoderKLWan

    from soe.experts.codecs import WanVideoCodec

    with torch.device(device):
        vae = AutoencoderKLWan().to(st.a.dtype if device.type == "cuda" else torch.float32).eval()
    codec = setup.prepare_codecs({"a": WanVideoCodec(vae, 25.0)})["a"]
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    with torch.no_grad():
        video = codec.decode(lat["a"].to(device))
    if device.type == "cuda":
        torch.cuda.synchronize()
    return dict(decode_s=time.perf_counter() - t, decode_tiled=bool(getattr(vae, "use_tiling", False)), video=list(video.shape),
                peak_with_decode_gb=torch.cuda.max_memory_allocated() / 1e9 if device.type == "cuda" else None)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--size", default=None, choices=["full", "mid"], help="default: full on cuda, mid on cpu")
    p.add_argument("--modes", nargs="+", default=["none", "cache", "offload_blocks", "offload_blocks+fp8", "offload_model"],
                   choices=list(MODES))
    p.add_argument("--steps", type=int, default=35)
    p.add_argument("--timed-steps", type=int, default=4)
    p.add_argument("--no-alone", dest="alone", action="store_false")
    p.add_argument("--decode", action="store_true", help="also decode video through a full-size Wan VAE (random weights)")
    p.add_argument("--decode-modes", nargs="+", default=["none", "offload_blocks+fp8"])
    p.add_argument("--seconds", type=float, default=None, help="clip length (default: the recipe's 5 s)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    size = args.size or ("full" if device.type == "cuda" else "mid")
    cfg = recipe(size)
    if args.seconds:
        cfg.sample.seconds = args.seconds
    console = Console(width=200)
    results = []
    for name in args.modes:
        try:
            r = run_mode(name, cfg, device, args, console)
        except Exception as err:  # one failing mode must not lose the others' numbers
            r = dict(mode=name, error=f"{type(err).__name__}: {err}", trace=traceback.format_exc()[-2000:])
            console.print(f"[red]{name}: {r['error']}[/]")
        results.append(r)
        console.print(json.dumps({k: v for k, v in r.items() if k != "trace"}))
        if args.json:
            Path(args.json).write_text(json.dumps(dict(size=size, device=str(device), torch=torch.__version__,
                                                       gpu=torch.cuda.get_device_name() if device.type == "cuda" else None,
                                                       results=results), indent=1))
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    t = Table(title=f"UniVerse-1 sampling ({size}, {device.type}): {cfg.sample.seconds:g} s clip, {args.steps} UniPC steps, CFG 1.2 / 5.0")
    for col in ("mode", "s / clip", "s / step", "peak GB", "skipped steps", "note"):
        t.add_column(col, justify="right" if col != "mode" else "left")
    for r in results:
        if "error" in r:
            t.add_row(r["mode"], "-", "-", "-", "-", r["error"][:60])
            continue
        skipped = f"{r['cache']['skipped']}/{r['steps_run']}" if "cache" in r else "-"
        peak = f"{r['peak_gb']:.1f}" if "peak_gb" in r else "-"
        t.add_row(r["mode"], f"{r['s_per_clip']:.1f}", f"{r['s_per_step_median']:.2f}", peak, skipped,
                  "x steps" if r["extrapolated"] else "whole run")
        for k, v in r.get("alone", {}).items():
            peak = f"{v['peak_gb']:.1f}" if v["peak_gb"] else "-"
            t.add_row(f"  {k} alone", f"{v['s_per_clip']:.1f}", f"{v['s_per_step_median']:.2f}", peak, "-",
                      "x steps" if v["extrapolated"] else "whole run")
    console.print(t)


if __name__ == "__main__":
    main()
