"""Step cache: speed-up of joint sampling and drift of the result, per threshold (CPU-measurable).

    python benchmarks/step_cache.py                        # mid-size UniVerse-1 fusion, 35 UniPC steps, CPU
    python benchmarks/step_cache.py --device cuda --size full

Same model, conditioning and noise for every run; the uncached run is the reference. Reported per
``sample.cache_threshold``: wall time and speed-up over the uncached run, steps computed / skipped,
and PSNR of each modality's clean latents against the reference (peak = the reference's range).
Random weights: the drift numbers say how far the cache moves the sampler's result, not how good
the samples are.
"""
from __future__ import annotations

import argparse
import math
import time

import _common as C  # noqa: F401  (puts the checkout on sys.path)
import torch
from generate_speed import recipe, settings
from rich.console import Console
from rich.table import Table

from soe.recipe.builders import build_stitcher
from soe.sample.sampler import sample_stitched
from soe.sample.step_cache import apply_step_cache


def psnr(x: torch.Tensor, ref: torch.Tensor) -> float:
    mse = (x.float() - ref.float()).pow(2).mean().item()
    peak = (ref.max() - ref.min()).item()
    return math.inf if mse == 0 else 10 * math.log10(peak ** 2 / mse)


def timed(fn, cuda: bool):
    if cuda:
        torch.cuda.synchronize()
    t = time.perf_counter()
    out = fn()
    if cuda:
        torch.cuda.synchronize()
    return out, time.perf_counter() - t


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--size", default="mid", choices=["mid", "full"])
    p.add_argument("--seconds", type=float, default=2.0)
    p.add_argument("--steps", type=int, default=35)
    p.add_argument("--thresholds", type=float, nargs="+", default=[0.05, 0.1, 0.2])
    args = p.parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    cfg = recipe(args.size)
    torch.manual_seed(0)
    with torch.no_grad():
        st = build_stitcher(cfg, device=device, load_weights=False).eval()
    g = torch.Generator().manual_seed(1)
    cond = {s: {k: v.to(device) for k, v in getattr(st, s).conditioning(1, args.seconds, generator=g).items()} for s in ("a", "b")}
    run = lambda steps=args.steps: sample_stitched(st, cond, args.seconds, settings(cfg, steps))  # noqa: E731
    if cuda:  # the first run on a GPU pays for kernel selection and allocator growth: two steps are enough
        timed(lambda: run(2), cuda)
    ref, t_ref = timed(run, cuda)
    cache = apply_step_cache(st, 0.0)
    console = Console(width=160)
    table = Table(title=f"step cache ({args.size}, {device.type}): {args.seconds:g} s clip, {args.steps} UniPC steps, CFG 1.2 / 5.0")
    for col in ("threshold", "seconds", "speed-up", "computed / skipped", "PSNR video latents dB", "PSNR audio latents dB"):
        table.add_column(col, justify="right")
    table.add_row("off", f"{t_ref:.1f}", "1.00", f"{args.steps} / 0", "-", "-")
    console.print(f"off: {t_ref:.1f} s")
    for th in args.thresholds:
        cache.state.threshold = th
        got, t = timed(run, cuda)
        st_ = cache.stats
        row = (f"{th:g}", f"{t:.1f}", f"{t_ref / t:.2f}", f"{st_['computed']} / {st_['skipped']}",
               f"{psnr(got['a'], ref['a']):.1f}", f"{psnr(got['b'], ref['b']):.1f}")
        table.add_row(*row)
        console.print("threshold " + ", ".join(row))  # each row as it comes: a run cut short keeps the rows so far
    console.print(table)


if __name__ == "__main__":
    main()
