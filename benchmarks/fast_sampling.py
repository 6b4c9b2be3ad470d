"""Does faster sampling keep sync? The step cache's thresholds and CFG's guidance interval on a trained synthetic run.

Samples ``--clips`` held-out clips of a `soe stitch` run on synthetic data (recipes/demo.yaml) jointly, same
conditioning and noise, with:

* ``exact``: the recipe's sampler as is (the reference);
* ``cache T``: `sample.cache: first_block` at each ``--thresholds`` T (steps computed / skipped counted);
* ``CFG g`` (with ``--guidance g``): guidance g on both experts at every step, one batched forward (the interval
  reference), with ``--two-forwards`` also two forwards per step (must equal it), then ``CFG g, interval [lo, hi]`` per ``--intervals``.

For each: latent sync (`soe.evaluate.sync_eval`, AV-Align on latents) with a 95% bootstrap interval over the clips,
the paired difference to its reference (same clips, resampled together) and whether that interval holds 0
("within noise"), Frechet distances of video and audio features to the true clips, latent PSNR to the reference,
model forwards per clip, and with ``--av-align N`` `soe eval`'s AV-Align on the first N clips decoded to mp4.

    soe stitch recipes/demo.yaml run_dir=runs/demo
    python benchmarks/fast_sampling.py runs/demo --clips 64 --thresholds 0.1 0.2 0.3 0.4 --guidance 2.0 \\
        --intervals 0.0,0.5 0.5,1.0 0.2,0.8 --av-align 16 --json fast_sampling.json
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).parents[1]))  # the checkout
sys.path.insert(0, str(Path(__file__).parent))  # sync_seeds

from sync_seeds import bootstrap, fmt_bootstrap

from soe.evaluate import sync_eval
from soe.evaluate.metrics import frechet_distance


def psnr(x: torch.Tensor, ref: torch.Tensor) -> float:
    mse = float(((x.float() - ref.float()) ** 2).mean())
    return float("inf") if mse == 0 else 10 * np.log10(float(ref.float().abs().max()) ** 2 / mse)


def per_clip_sync(lat: dict, experts: dict, seconds: float) -> np.ndarray:
    n = next(iter(lat.values())).shape[0]
    return np.array([sync_eval.sync_score({k: v[i:i + 1] for k, v in lat.items()}, experts, seconds) for i in range(n)])


def run(stitcher, cond, seconds, settings) -> tuple[dict, int]:
    """Latents and the model's work in forwards of one batch of clips (a batched CFG call counts 2)."""
    from soe.sample.sampler import sample, stitched_predictor

    inner, calls, n = stitched_predictor(stitcher), [0], next(iter(cond["a"].values())).shape[0]

    def predict(inputs, mask):
        calls[0] += inputs["a"]["latents"].shape[0] // n
        return inner(inputs, mask)

    lat = sample({"a": stitcher.a, "b": stitcher.b}, cond, seconds, settings, predict)
    return {k: v.float() for k, v in lat.items()}, calls[0]


def av_align(lat: dict, experts: dict, n: int) -> float | None:
    if n <= 0:
        return None
    from soe.sample.held_out_tasks import eval_av_align, write_media

    with tempfile.TemporaryDirectory() as d:
        write_media({k: v[:n] for k, v in lat.items()}, experts, Path(d))
        return eval_av_align(Path(d))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", type=Path, help="run folder of `soe stitch` on synthetic data")
    p.add_argument("--clips", type=int, default=64)
    p.add_argument("--thresholds", type=float, nargs="*", default=[0.1, 0.2, 0.3, 0.4])
    p.add_argument("--guidance", type=float, default=None, help="CFG scale on both experts for the guidance-interval rows")
    p.add_argument("--intervals", nargs="*", default=["0.0,0.5", "0.5,1.0", "0.2,0.8"], help="lo,hi sigma intervals")
    p.add_argument("--two-forwards", action="store_true", help="also CFG in two forwards per step (must equal batched)")
    p.add_argument("--av-align", type=int, default=0, help="also soe eval's AV-Align on the first N clips decoded to mp4")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    from soe.recipe.builders import build_sampler, build_stitcher
    from soe.recipe.reading import load_recipe
    from soe.sample.speed import apply_speed
    from soe.schema import SamplerConfig, SpeedConfig
    from soe.train.trained import load_trained

    cfg = load_recipe(args.run / "recipe.yaml")
    torch.manual_seed(cfg.seed)
    st = build_stitcher(cfg)
    step = load_trained(st, args.run / "trained")
    st.eval()
    experts = {"a": st.a, "b": st.b}
    seconds = cfg.sample.seconds or cfg.data.seconds
    cond, truth = sync_eval.held_out(experts, seconds, args.clips, cfg.seed)
    truth_feats = sync_eval.features(truth, experts, seconds)
    base = build_sampler(cfg)
    rows, n = {}, args.clips

    def score(name, lat, calls, ref_name, extra=""):
        feats, sync = sync_eval.features(lat, experts, seconds), per_clip_sync(lat, experts, seconds)
        r = {"sync": bootstrap(lambda i: sync[i].mean(), n), "per_clip": sync.tolist(), "calls": calls, "note": extra,
             "frechet_video": frechet_distance(feats["video"], truth_feats["video"]),
             "frechet_audio": frechet_distance(feats["audio"], truth_feats["audio"]), "latents": lat, "ref": ref_name}
        if ref_name is not None:
            ref = rows[ref_name]
            d = sync - np.asarray(ref["per_clip"])
            r["diff"] = bootstrap(lambda i: d[i].mean(), n)
            r["psnr"] = {k: psnr(lat[k], ref["latents"][k]) for k in lat}
        r["av_align"] = av_align(lat, experts, args.av_align)
        rows[name] = r
        print(f"{name}: sync {r['sync'][0]:.3f}, forwards {calls}, {extra}", flush=True)

    score("exact", *run(st, cond, seconds, base), None)
    cache = None
    for t in args.thresholds:
        if cache is None:
            cache = apply_speed(st, SpeedConfig(cache="first_block", cache_threshold=t), "cpu").cache
        cache.state.threshold = t
        lat, calls = run(st, cond, seconds, base)
        score(f"cache {t}", lat, calls, "exact", f"{cache.stats['computed']} computed / {cache.stats['skipped']} skipped")
    if cache is not None:
        cache.remove()
        for e in (st.a, st.b):
            del e._soe_step_cache
    if args.guidance is not None:
        g = {"a": args.guidance, "b": args.guidance}
        fields = {f: getattr(base, f) for f in ("steps", "scheduler", "shift", "seed")}
        ref = f"CFG {args.guidance}"
        score(ref, *run(st, cond, seconds, SamplerConfig(**fields, guidance=g, cfg_batched=True)), "exact")
        if args.two_forwards:
            score(f"{ref}, two forwards", *run(st, cond, seconds, SamplerConfig(**fields, guidance=g, cfg_batched=False)), ref)
        for iv in args.intervals:
            lo, hi = (float(x) for x in iv.split(","))
            s = SamplerConfig(**fields, guidance=g, guidance_interval=[lo, hi])
            score(f"{ref}, interval ({lo}, {hi}]", *run(st, cond, seconds, s), ref)
    out = {"run": str(args.run), "step": step, "clips": n, "steps": base.steps, "rows": {}}
    t = Table(title=f"{args.run} (step {step}), {n} held-out clips, {base.steps} {base.scheduler} steps; 95% bootstrap intervals")
    for col in ("variant", "forwards / batch", "latent sync", "vs its reference", "within noise", "Frechet video", "Frechet audio",
                "PSNR video / audio", "AV-Align (mp4)", "note"):
        t.add_column(col)
    fmt = fmt_bootstrap
    for name, r in rows.items():
        within = None if "diff" not in r else bool(r["diff"][1] <= 0 <= r["diff"][2])
        ps = r.get("psnr", {})
        t.add_row(name, str(r["calls"]), fmt(r["sync"]), f"{r['ref']}: {r['diff'][0]:+.3f} [{r['diff'][1]:+.3f}, {r['diff'][2]:+.3f}]"
                  if "diff" in r else "-", "-" if within is None else ("yes" if within else "NO"), f"{r['frechet_video']:.3f}",
                  f"{r['frechet_audio']:.3f}", " / ".join(f"{v:.1f}" for v in ps.values()) or "-",
                  "-" if r["av_align"] is None else f"{r['av_align']:.3f}", r["note"])
        out["rows"][name] = {k: v for k, v in r.items() if k not in ("latents", "per_clip")} | {"within_noise": within}
    Console(width=250).print(t)
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
