"""Issue 31's GPU table in one process: s / clip, peak memory and latent PSNR vs the exact run per speed switch.

    bash benchmarks/gpu_speed.sh                     # on a GPU machine (installs carried wheels, then runs this)
    python benchmarks/gpu_speed.py --tiny            # CPU check of the whole path at toy widths, a few steps

UniVerse-1 at full size with random weights (recipes/universe1.yaml, bf16, built on the device), 5 s at 480x832,
UniPC, CFG video 1.2 / audio 5.0. One build serves the switches that hooks can add and take back, in this order:

* ``none``: the exact run, whole trajectory (the reference of every PSNR);
* ``cfg two forwards`` / ``attention <backend>`` / ``compile``: ``--timed-steps`` steps after one warm-up step,
  s / clip = median step x ``--steps``; their PSNR is against an exact run over the same short grid;
* ``guidance interval``, ``cache <t>``, ``all``: whole trajectories (their cost changes from step to step);
  ``all`` = compile + cache + the attention backend + the guidance interval (+ batched CFG).

Then a fresh build for ``offload_blocks + fp8`` (peak memory; connectors and key/value projections in bf16 now) and
``benchmarks/train_step.py`` (one 480p training step, bf16 and with the attention backend). The attention backend
is the first of ``--backends`` whose package is installed. Everything goes to ``--json`` after every row, so a run
stopped by its time limit keeps what it measured.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

import _common as C  # noqa: F401  (puts the checkout on sys.path)
import torch
from generate_speed import Clock, recipe

from soe.recipe.builders import build_stitcher
from soe.sample.sampler import sample_stitched
from soe.sample.speed import apply_speed, compile_blocks, set_attention_backend
from soe.sample.step_cache import apply_step_cache, stitched_blocks
from soe.schema import SamplerConfig, SpeedConfig
from soe.schema.sample import missing_attention_package


def psnr(x: torch.Tensor, ref: torch.Tensor) -> float:
    mse = float(((x.float() - ref.float()) ** 2).mean())
    return float("inf") if mse == 0 else 10 * float(torch.log10(ref.float().abs().max() ** 2 / mse))


def sampler(cfg, steps: int, **kw) -> SamplerConfig:
    s = cfg.sample
    return SamplerConfig(steps=steps, scheduler=s.scheduler, guidance=dict(s.guidance), shift=dict(s.shift), seed=0, **kw)


class Bench:
    def __init__(self, args, device):
        self.args, self.device, self.rows = args, device, []
        self.meta = {"device": str(device), "torch": torch.__version__,
                     "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None, "args": vars(args) | {"json": str(args.json)}}

    def save(self):
        if self.args.json:
            Path(self.args.json).write_text(json.dumps({**self.meta, "rows": self.rows}, indent=1, default=str))

    def sample(self, st, cond, settings, whole: bool):
        """(latents, s / clip, s / step median, first step s, peak GB)."""
        if self.device.type == "cuda":
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        clock = Clock(self.device)
        clock()
        lat = sample_stitched(st, cond, self.args.seconds, settings, progress=clock)
        per = [b - a for a, b in zip(clock.marks, clock.marks[1:])]
        warm = sorted(per[1:]) or per
        med = warm[len(warm) // 2]
        clip = clock.marks[-1] - clock.marks[0] if whole else med * self.args.steps
        peak = torch.cuda.max_memory_allocated() / 1e9 if self.device.type == "cuda" else None
        return {k: v.float().cpu() for k, v in lat.items()}, clip, med, per[0], peak

    def row(self, name, fn):
        t = time.perf_counter()
        try:
            r = {"mode": name, **fn()}
        except Exception as err:  # one failing row must not lose the others
            r = {"mode": name, "error": f"{type(err).__name__}: {err}", "trace": traceback.format_exc()[-1500:]}
        r["wall_s"] = time.perf_counter() - t
        self.rows.append(r)
        print(json.dumps({k: v for k, v in r.items() if k != "trace"}, default=str), flush=True)
        self.save()
        return r


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="CPU check: toy widths (same structure), 1 s, 4 steps")
    p.add_argument("--device", default=None)
    p.add_argument("--steps", type=int, default=35)
    p.add_argument("--timed-steps", type=int, default=4)
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--threshold", type=float, default=0.3, help="step cache threshold for the cache and all rows")
    p.add_argument("--interval", type=float, nargs=2, default=[0.0, 0.9], help="guidance interval (lo, hi] in sigma")
    p.add_argument("--backends", nargs="+", default=["_flash_3", "sage", "flash", "_native_cudnn"])
    p.add_argument("--skip", nargs="*", default=[], help="rows to leave out: two_forwards backend compile interval cache all offload train")
    p.add_argument("--json", type=Path, default=Path("gpu_speed.json"))
    args = p.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() and not args.tiny else "cpu"))
    if args.tiny:
        args.steps, args.timed_steps, args.seconds = min(args.steps, 4), min(args.timed_steps, 2), min(args.seconds, 1.0)
        args.backends = ["_native_math"]  # the GPU kernels do not run on a CPU
    size = "tiny" if args.tiny else "full"
    cfg = recipe(size)
    cfg.sample.seconds = args.seconds
    bench = Bench(args, device)
    backend = next((b for b in args.backends if missing_attention_package(b) is None), None)
    bench.meta |= {"size": size, "backend": backend, "missing": {b: missing_attention_package(b) for b in args.backends}}
    short = args.timed_steps + 1
    compile_kw = {"backend": "eager"} if args.tiny else {}  # --tiny checks the path, not inductor's C++ builds on a CPU

    torch.manual_seed(0)
    t0 = time.perf_counter()
    with torch.no_grad():
        st = build_stitcher(cfg, device=device, load_weights=False).eval()
    apply_speed(st, SpeedConfig(), device)  # connectors and key/value projections in the experts' dtype
    bench.meta["build_s"] = time.perf_counter() - t0
    g = torch.Generator().manual_seed(1)
    cond = {s: {k: v.to(device) for k, v in getattr(st, s).conditioning(1, args.seconds, generator=g).items()} for s in ("a", "b")}
    ref, ref_short = {}, {}

    def measure(settings, whole, reference):
        lat, clip, med, first, peak = bench.sample(st, cond, settings, whole)
        out = {"s_per_clip": clip, "s_per_step": med, "first_step_s": first, "peak_gb": peak, "whole": whole}
        if reference:
            out["psnr"] = {k: psnr(lat[k], reference[k]) for k in lat}
        return out, lat

    def exact():
        out, lat = measure(sampler(cfg, args.steps), True, None)
        ref.update(lat)
        ref_short.update(bench.sample(st, cond, sampler(cfg, short), False)[0])
        return out

    bench.row("none", exact)
    if "two_forwards" not in args.skip:
        bench.row("cfg two forwards", lambda: measure(sampler(cfg, short, cfg_batched=False), False, ref_short)[0])
    if "interval" not in args.skip:
        bench.row(f"guidance interval {args.interval}",
                  lambda: measure(sampler(cfg, args.steps, guidance_interval=args.interval), True, ref)[0])

    def cached():
        cache = apply_step_cache(st, args.threshold)
        try:
            out = measure(sampler(cfg, args.steps), True, ref)[0]
            return out | {"cache": {k: v for k, v in cache.stats.items() if k != "changes"}}
        finally:
            cache.remove()
            for e in (st.a, st.b):
                del e._soe_step_cache

    if "cache" not in args.skip:
        bench.row(f"cache {args.threshold}", cached)
    if backend is not None and "backend" not in args.skip:
        def with_backend():
            names = set_attention_backend([st.a, st.b, *([st.fusion] if st.fusion is not None else [])], backend)
            return measure(sampler(cfg, short), False, ref_short)[0] | {"attentions": len(names)}

        bench.row(f"attention {backend}", with_backend)
    if "compile" not in args.skip:
        def compiled():
            compile_blocks([b for bl in stitched_blocks(st).values() for b in bl], **compile_kw)
            return measure(sampler(cfg, short), False, ref_short)[0]

        bench.row("compile" + (f" + attention {backend}" if backend else ""), compiled)
    if "all" not in args.skip:
        def everything():
            compile_blocks([b for bl in stitched_blocks(st).values() for b in bl], **compile_kw)  # no-op when compiled above
            cache = apply_step_cache(st, args.threshold)
            out = measure(sampler(cfg, args.steps, guidance_interval=args.interval), True, ref)[0]
            return out | {"cache": {k: v for k, v in cache.stats.items() if k != "changes"}}

        bench.row(f"all: compile + {backend} + cache {args.threshold} + interval {args.interval}", everything)
    st = None  # free the first build before the offloaded one
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()

    if "offload" not in args.skip:
        st2 = {}

        def offloaded(batched):
            if not st2:
                torch.manual_seed(0)
                with torch.no_grad():
                    st2["m"] = build_stitcher(cfg, device=device, load_weights=False).eval()
                apply_speed(st2["m"], SpeedConfig(memory="offload_blocks", storage_dtype="float8_e4m3fn"), device)
            m = st2["m"]
            lat, clip, med, _first, peak = bench.sample(m, cond, sampler(cfg, short, cfg_batched=batched), False)
            stitch_gb = sum(p.numel() * p.element_size() for mod in (m.connectors, m.fusion) if mod is not None
                            for n, p in mod.named_parameters() if not n.startswith("inserted")) / 1e9
            return {"s_per_clip": clip, "s_per_step": med, "peak_gb": peak, "connectors_kv_gb": stitch_gb,
                    "psnr": {k: psnr(lat[k], ref_short[k]) for k in lat}}

        bench.row("offload_blocks + fp8, CFG two forwards (auto)", lambda: offloaded(False))
        bench.row("offload_blocks + fp8, CFG batched", lambda: offloaded(True))
        st2.clear()
        gc.collect()
    if "train" not in args.skip:
        def train():
            out = Path(str(args.json) + ".train.json")
            cmd = [sys.executable, str(Path(__file__).with_name("train_step.py")), "--device", device.type, "--variants", "bf16",
                   "--reps", "1" if args.tiny else "2", "--json", str(out)] + (["--size", "tiny"] if args.tiny else [])
            env = dict(os.environ)
            if backend is not None and not backend.lstrip("_").startswith("sage"):  # sage has no backward
                env["DIFFUSERS_ATTN_BACKEND"] = backend  # the dispatcher's default: every processor without its own backend
            subprocess.run(cmd, check=True, timeout=400, env=env)
            return {"train_step": json.loads(out.read_text()), "attention": env.get("DIFFUSERS_ATTN_BACKEND", "native")}

        bench.row("train_step 480p (bf16, LoRA r=64, checkpointing)", train)
    bench.save()
    print(json.dumps({r["mode"]: {k: r.get(k) for k in ("s_per_clip", "peak_gb", "psnr", "error")} for r in bench.rows}, indent=1, default=str))


if __name__ == "__main__":
    main()
