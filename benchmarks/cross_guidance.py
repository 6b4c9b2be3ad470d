"""Joint sampling under cross-modal guidance: which scale, where in the flow, which side; and the video-first cascade.

Samples ``--clips`` held-out clips of a trained run (``soe stitch`` on synthetic data) with the same seeds,
conditioning and noise in every variant, with the run's sampling keys (``--set sample.KEY=VALUE`` over them, e.g. the
current recipe's ``sample.lora_off``), and scores them as benchmarks/joint_audio.py does (sync, Frechet distances,
onsets and loudness with 95% bootstrap intervals; the paired difference to the experts alone). Variants:

* ``W`` (e.g. ``1.75``): joint, ``sample.cross_guidance={b: W}`` through soe's sampler (``1``: no cross guidance);
* ``WaV``: the video guided by V as well (``sample.cross_guidance={a: V, b: W}``);
* ``W@LO:HI``: the audio guided by W only at steps whose flow time lies in (LO, HI] (no recipe key does this: a
  predictor here adds ``(W - 1) x (stitched - the audio expert alone)`` on those steps);
* ``first:joint`` / ``first:off`` / ``first:alone``: the video sampled first (stitched with both LoRAs / with the run's
  keys / by the experts alone), then the audio sampled from it as v2a with the run's keys (a cascade, twice the cost).

    python benchmarks/cross_guidance.py OUT/stitch 1 1.5 1.75 2 3 2@0.25:1 1.5a1.5 first:joint --clips 96 \\
        --set "sample.lora_off={b: [joint, image]}" --json G.json
    python benchmarks/cross_guidance.py OUT/stitch 1 1.75 --clip-offset 7919 ...   # another stream of held-out clips
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1]))  # the checkout
sys.path.insert(0, str(Path(__file__).parent))  # joint_audio, sync_seeds

from joint_audio import load_run, minus_alone, scores  # noqa: E402

from soe.evaluate import sync_eval  # noqa: E402


def audio_guided_in_window(stitcher, w: float, lo: float, hi: float):
    """Stitched predictor whose audio velocity gains ``(w - 1) x (stitched - the audio expert alone)`` at flow times in (lo, hi]."""
    from soe.sample.sampler import stitched_predictor

    plain = stitched_predictor(stitcher)

    def predict(inputs, mask):
        out = plain(inputs, mask)
        sigma = float(inputs["b"]["timestep"].float().flatten()[0])
        if lo < sigma <= hi:
            alone = stitcher.b(inputs["b"]).float()
            out = {**out, "b": out["b"] + (w - 1.0) * (out["b"].float() - alone).to(out["b"].dtype)}
        return out

    return predict


def run_variant(name: str, stitched, alone, settings, cond, truth, seconds) -> dict:
    from dataclasses import replace

    from soe.flow.conditioning import given_for_task
    from soe.lora.task_gate import loras_off
    from soe.sample.sampler import lora_off_sides, sample, sample_stitched, stitched_predictor

    experts = {"a": stitched.a, "b": stitched.b}
    if name == "alone":
        return sample({"a": alone.a, "b": alone.b}, cond, seconds, settings, stitched_predictor(alone))
    if name.startswith("first:"):
        how = name.split(":", 1)[1]
        if how == "alone":
            video = sample({"a": alone.a, "b": alone.b}, cond, seconds, settings, stitched_predictor(alone))["a"]
        else:
            video = sample_stitched(stitched, cond, seconds, settings if how == "off" else replace(settings, lora_off={}))["a"]
        given = given_for_task("v2a", experts, {"a": video, "b": truth["b"]})
        return sample_stitched(stitched, cond, seconds, settings, given=given)
    spec, window = (name.split("@") + [None])[:2]
    w_b, _, w_a = spec.partition("a")
    if window is None:
        crossed = replace(settings, cross_guidance={"a": float(w_a or 1.0), "b": float(w_b)})
        return sample_stitched(stitched, cond, seconds, crossed)
    lo, hi = (float(x) for x in window.split(":"))
    with loras_off(experts, lora_off_sides(settings, None, experts)):
        return sample(experts, cond, seconds, settings, audio_guided_in_window(stitched, float(w_b), lo, hi))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", type=Path, help="run folder of `soe stitch` on synthetic data")
    p.add_argument("variants", nargs="+", help="W, WaV, W@LO:HI, first:joint|off|alone (the experts alone always come first)")
    p.add_argument("--clips", type=int, default=96)
    p.add_argument("--steps", type=int, default=24, help="sampling steps (the sync experiment's 24)")
    p.add_argument("--clip-offset", type=int, default=0, help="held-out clips of seed + this (0: those of every other benchmark)")
    p.add_argument("--set", action="append", default=[], metavar="sample.KEY=VALUE", help="sampling keys over the run's recipe")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    from soe.recipe.builders import build_sampler

    cfg, alone, stitched, _ = load_run(p, args.run, args.set)
    experts = {"a": stitched.a, "b": stitched.b}
    seconds = cfg.sample.seconds or cfg.data.seconds
    cond, truth = sync_eval.held_out(experts, seconds, args.clips, cfg.seed + args.clip_offset)
    truth_feats = sync_eval.features(truth, experts, seconds)
    settings = build_sampler(cfg)
    settings.steps = args.steps
    out, per_clip = {"run": str(args.run), "clips": args.clips, "clip_offset": args.clip_offset, "set": args.set, "variants": {}}, {}
    print("| variant | sync | Frechet audio | Frechet video | onsets/clip | loudness | "
          "- alone: Frechet audio | - alone: Frechet video | - alone: onsets |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in ["alone", *[v for v in args.variants if v != "alone"]]:
        lat = {k: v.float() for k, v in run_variant(name, stitched, alone, settings, cond, truth, seconds).items()}
        r, per_clip[name] = scores(lat, truth_feats, experts, seconds)
        if name != "alone":
            r["minus_alone"] = minus_alone(per_clip[name], per_clip["alone"], truth_feats)
        out["variants"][name] = r
        m = r.get("minus_alone", {})
        diffs = [f"{m[k][0]:+.3f} [{m[k][1]:+.3f}, {m[k][2]:+.3f}]" if m else "" for k in ("frechet_audio", "frechet_video", "onsets")]
        print(f"| {name} | {r['sync'][0]:.3f} [{r['sync'][1]:.3f}, {r['sync'][2]:.3f}] | {r['frechet_audio'][0]:.3f} | "
              f"{r['frechet_video'][0]:.3f} | {r['onsets'][0]:.2f} | {r['loudness'][0]:.3f} | " + " | ".join(diffs) + " |", flush=True)
        if args.json:
            args.json.write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
