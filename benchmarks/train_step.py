"""One training step of recipes/universe1.yaml on one GPU: peak memory and seconds per step.

    python benchmarks/train_step.py --device cuda                         # full size, random weights
    python benchmarks/train_step.py --device cuda --variants bf16 fp8     # + frozen expert weights in fp8
    python benchmarks/train_step.py --size mid                            # CPU smoke test

What StitchModule.training_step does, without Lightning around it: the recipe's fused model (LoRA
r=64 on both experts + connectors, gradient checkpointing), its flow objective on one 5 s clip of
random latents, bf16 autocast (Lightning's bf16-mixed), backward, AdamW step. The recipe accumulates
4 micro-batches per optimizer step; "s / optimizer step" is 4 x the measured micro-step.
benchmarks/scale.md predicts 65.0 GB and 19.1 s per optimizer step on one H100 (fsdp+ac row); one H200
measured 74.8 GB and 23.2 s (benchmarks/README.md).
"""
from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import time
import traceback
from contextlib import nullcontext
from pathlib import Path

import _common as C  # noqa: F401  (puts the checkout on sys.path)
import torch
from generate_speed import recipe
from omegaconf import OmegaConf

from soe.recipe.builders import build_stitcher
from soe.train.build import apply_storage_dtypes, apply_training_setup, build_objective

VARIANTS = {"bf16": [], "fp8": ["experts.a.storage_dtype=float8_e4m3fn", "experts.b.storage_dtype=float8_e4m3fn"]}


def measure(variant: str, size: str, device, reps: int) -> dict:
    cfg = recipe(size)
    for kv in VARIANTS[variant]:
        key, value = kv.split("=")
        OmegaConf.update(cfg, key, value)
    torch.manual_seed(0)
    st = build_stitcher(cfg, device=device, load_weights=False)
    apply_training_setup(st, cfg)
    apply_storage_dtypes(st, cfg)
    st.train()
    objective = build_objective(cfg, st).to(device)
    params = [p for p in st.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01)
    g = torch.Generator().manual_seed(0)
    seconds = cfg.data.seconds
    clean = {}
    for s in ("a", "b"):
        e = getattr(st, s)
        batch = e.conditioning(1, seconds, generator=g)
        batch["latents"] = torch.randn(e.latent_shape(1, seconds), generator=g)
        clean[s] = {k: v.to(device, e.dtype) if v.is_floating_point() else v.to(device) for k, v in batch.items()}
    cuda = device.type == "cuda"
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else nullcontext()

    def step(i):
        inputs, targets = objective.noised(clean, step=i)
        with autocast:
            pa, pb = st(inputs["a"], inputs["b"])
            loss, _ = objective({"a": pa, "b": pb}, targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    if cuda:
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for i in range(reps + 1):
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        losses.append(step(i))
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    warm = sorted(times[1:])
    med = warm[len(warm) // 2]
    frozen = sum(p.numel() * p.element_size() for p in st.parameters() if not p.requires_grad)
    out = dict(variant=variant, size=size, s_per_micro_step=med, s_per_optimizer_step=med * cfg.trainer.accumulate_grad_batches,
               first_step_s=times[0], losses=losses, trainable=sum(p.numel() for p in params), frozen_gb=frozen / 1e9,
               peak_gb=torch.cuda.max_memory_allocated() / 1e9 if cuda else None,
               reserved_gb=torch.cuda.max_memory_reserved() / 1e9 if cuda else None)
    del st, opt, objective
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--size", default=None, choices=["full", "mid", "tiny"])
    p.add_argument("--variants", nargs="+", default=["bf16", "fp8"], choices=list(VARIANTS))
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--json", default=None)
    p.add_argument("--_child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    size = args.size or ("full" if device.type == "cuda" else "mid")
    results = []
    for v in args.variants:
        if len(args.variants) > 1:  # one process per variant: the previous variant's model must not count in the peak
            cmd = [sys.executable, __file__, "--device", args.device, "--size", size, "--reps", str(args.reps), "--variants", v, "--_child"]
            out = subprocess.run(cmd, capture_output=True, text=True)
            lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
            r = json.loads(lines[-1]) if lines else dict(variant=v, error=f"child exit {out.returncode}", trace=out.stderr[-2000:])
        else:
            try:
                r = measure(v, size, device, args.reps)
            except Exception as err:
                r = dict(variant=v, error=f"{type(err).__name__}: {err}", trace=traceback.format_exc()[-2000:])
        if args._child:
            print(json.dumps(r), flush=True)
            return
        results.append(r)
        print(json.dumps({k: x for k, x in r.items() if k != "trace"}), flush=True)
        if "trace" in r:
            print(r["trace"])
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1))
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    for r in results:
        if "error" not in r:
            peak = f"{r['peak_gb']:.1f} GB" if r["peak_gb"] else "-"
            print(f"{r['variant']:>5}: {r['s_per_micro_step']:.2f} s / micro-batch, {r['s_per_optimizer_step']:.1f} s / optimizer step "
                  f"(x4), peak {peak}, frozen weights {r['frozen_gb']:.1f} GB, {r['trainable'] / 1e6:.0f}M trainable "
                  "(scale.md: 65.0 GB, 19.1 s)")


if __name__ == "__main__":
    main()
