"""Why is the jointly sampled audio quieter than the audio expert's alone? Measured on a trained run.

Samples ``--clips`` held-out clips jointly (same seeds, conditioning and noise) with:

* ``alone``: the run's recipe with untrained connectors and adapters (the experts alone, step 0);
* ``stitched``: the trained run as is;
* ``v->a off above S``: the trained run with the video -> audio connector outputs zeroed while the flow
  time is above S (the audio reads the video only once the video has formed); S = 1 is "as is";
* ``v->a off``: those connectors zeroed at every step (the audio expert with its LoRA, the video stitched);
* ``v2a``: the true video given (the audio reads a finished video at every step);
* ``a2v``: the true audio given (the video reads the finished clicks);
* with ``--lora-off``: the trained run with the audio expert's LoRA disabled (connectors on; and with v->a off
  too, which must give the experts-alone audio back), and with both experts' LoRAs disabled.

For each: sync (latent AV-Align), Frechet distances of the per-clip features to the true clips with a 95%
bootstrap interval (clips resampled with replacement, 300 draws), onsets per clip and mean click loudness
(``soe.evaluate.sync_eval``), and the mean ratio |v->a connector output| / |audio hidden state| per flow
time bin (what the audio side receives from the video at high and low noise). Each variant's Frechet distances and
onsets are also given minus the experts alone's on the same bootstrap draws of clips (a paired interval: "no worse
than alone" holds where that interval reaches 0 or below).

    python benchmarks/joint_audio.py runs/demo --clips 96
    python benchmarks/joint_audio.py runs/demo "sample.cross_guidance={b: 1.75}" --clips 96   # sampling keys over the run's
    python benchmarks/joint_audio.py --seeds S0.json S1.json S2.json   # runs of several seeds (--json): mean ± 95% t-interval
                                                   # (A.json+B.json: one seed's variants from two runs)
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
sys.path.insert(0, str(Path(__file__).parent))  # sync_seeds

from sync_seeds import bootstrap, fmt_bootstrap  # noqa: E402

from soe.evaluate import sync_eval  # noqa: E402
from soe.evaluate.metrics import audio_onsets, frechet_distance  # noqa: E402


class Gate:
    """Forward hooks on the a_to_b (video -> audio) connectors: output times 0 while the flow time is above ``above``;
    records |connector output| / |host hidden| per flow time."""

    def __init__(self, stitcher, above: float | None):
        self.above, self.sigma, self.ratios = above, 1.0, {}
        self.handles = [c.register_forward_hook(self.hook) for c in stitcher.connectors["a_to_b"].values()] \
            if "a_to_b" in stitcher.connectors else []

    def hook(self, module, args, output):
        self.ratios.setdefault(round(self.sigma, 2), []).append(float(output.float().norm() / max(args[0].float().norm(), 1e-12)))
        if self.above is not None and self.sigma > self.above:
            return output * 0
        return output

    def remove(self):
        for h in self.handles:
            h.remove()


def run_variant(model, cfg, cond, truth, seconds, above=None, task="joint", lora_off=(), window=None, steps=None) -> tuple[dict, dict]:
    """``lora_off``: the sides sampled without their LoRA (else the recipe's ``sample.lora_off`` decides);
    ``window``: (lo, hi): the audio LoRA is off only at steps whose flow time lies in (lo, hi]."""
    from soe.flow.conditioning import given_for_task
    from soe.lora.task_gate import LoraGate, loras_off
    from soe.recipe.builders import build_sampler
    from soe.sample.sampler import lora_off_sides, sample, stitched_predictor

    gate = Gate(model, above)
    predict = stitched_predictor(model)
    lora_b = LoraGate(model.b) if window is not None else None

    def gated(inputs, mask):
        gate.sigma = float(inputs["b"]["timestep"].float().flatten()[0])
        if lora_b is not None:
            lora_b.enabled = not (window[0] < gate.sigma <= window[1])
        return predict(inputs, mask)

    experts = {"a": model.a, "b": model.b}
    given = given_for_task(task, experts, truth) if task != "joint" else None
    settings = build_sampler(cfg)
    if steps:
        settings.steps = steps
    off = list(lora_off) if lora_off else lora_off_sides(settings, given, experts)  # else the recipe's, as soe samples
    try:
        with loras_off(experts, off):
            lat = sample(experts, cond, seconds, settings, gated, given=given)
    finally:
        gate.remove()
        if lora_b is not None:
            lora_b.remove()
    return {k: v.float() for k, v in lat.items()}, {s: float(np.mean(r)) for s, r in sorted(gate.ratios.items())}


def scores(lat: dict, truth_feats: dict, experts: dict, seconds: float) -> tuple[dict, dict]:
    feats = sync_eval.features(lat, experts, seconds)
    n = len(feats["audio"])
    per_clip_sync = np.array([sync_eval.sync_score({k: v[i:i + 1] for k, v in lat.items()}, experts, seconds) for i in range(n)])
    onsets = np.array([len(audio_onsets(env, len(env) / seconds)) for _, _, _, env in sync_eval._signals(lat, experts)])
    loud = np.array([float(env.mean()) for _, _, _, env in sync_eval._signals(lat, experts)])
    return {"sync": bootstrap(lambda i: per_clip_sync[i].mean(), n),
            "frechet_video": bootstrap(lambda i: frechet_distance(feats["video"][i], truth_feats["video"][i]), n),
            "frechet_audio": bootstrap(lambda i: frechet_distance(feats["audio"][i], truth_feats["audio"][i]), n),
            "onsets": bootstrap(lambda i: onsets[i].mean(), n), "loudness": bootstrap(lambda i: loud[i].mean(), n)}, \
        {"feats": feats, "onsets": onsets}


def minus_alone(mine: dict, alone: dict, truth_feats: dict) -> dict:
    """A variant's Frechet distances and onsets minus the experts alone's, on the same bootstrap draws of clips
    (``bootstrap`` draws the same indices for the same ``n``: a paired interval)."""
    n = len(mine["onsets"])

    def diff(modality):
        return lambda i: (frechet_distance(mine["feats"][modality][i], truth_feats[modality][i])
                          - frechet_distance(alone["feats"][modality][i], truth_feats[modality][i]))
    return {"frechet_video": bootstrap(diff("video"), n), "frechet_audio": bootstrap(diff("audio"), n),
            "onsets": bootstrap(lambda i: mine["onsets"][i].mean() - alone["onsets"][i].mean(), n)}


def load_run(parser: argparse.ArgumentParser, run: Path, overrides: list[str]):
    """(recipe with the ``sample.*`` overrides, the stitch at step 0 = the experts alone, the trained stitch, its step);
    any other override is a parser error (a run's training keys are what it was trained with)."""
    from soe.recipe.builders import build_stitcher
    from soe.recipe.reading import load_recipe
    from soe.train.trained import load_trained

    bad = [o for o in overrides if not o.startswith("sample.")]
    if bad:
        parser.error(f"{bad[0]}: expected a sample.* override (the run's training keys are what it was trained with)")
    cfg = load_recipe(run / "recipe.yaml", overrides)
    torch.manual_seed(cfg.seed)
    alone, stitched = build_stitcher(cfg).eval(), build_stitcher(cfg)
    step = load_trained(stitched, run / "trained")
    return cfg, alone, stitched.eval(), step


def seeds_table(files: list[Path]) -> str:
    """Per variant over the ``--json`` files of several seeds: mean ± 95% t-interval of each number (the bootstrap
    intervals of one seed are left aside: the spread between seeds is the interval here)."""
    from sync_seeds import interval

    runs = []
    for f in files:  # A.json+B.json: one seed's variants from two runs of this script
        parts = [json.loads(Path(x).read_text()) for x in str(f).split("+")]
        runs.append({"variants": {k: v for part in parts for k, v in part["variants"].items()}})
    names = [n for n in runs[0]["variants"] if all(n.split(" (step")[0] in {m.split(" (step")[0] for m in r["variants"]} for r in runs)]
    keys = ("sync", "frechet_video", "frechet_audio", "onsets", "loudness")
    lines = ["| variant | seeds | " + " | ".join(keys) + " |", "|" + "---|" * (len(keys) + 2)]
    for name in names:
        base = name.split(" (step")[0]
        rows = [next(v for m, v in r["variants"].items() if m.split(" (step")[0] == base) for r in runs]
        cells = [f"{m:.3f} ± {h:.3f}" for m, h in (interval([row[k][0] for row in rows]) for k in keys)]
        lines.append(f"| {base} | {len(rows)} | " + " | ".join(cells) + " |")
    for name in names:  # each seed's paired difference to the experts alone (its point value), over seeds
        base = name.split(" (step")[0]
        rows = [next(v for m, v in r["variants"].items() if m.split(" (step")[0] == base) for r in runs]
        if all("minus_alone" in row for row in rows):
            cells = [f"{m:+.3f} ± {h:.3f}" if k in rows[0]["minus_alone"] else "" for k in keys
                     for m, h in [interval([row["minus_alone"][k][0] for row in rows]) if k in rows[0]["minus_alone"] else (0, 0)]]
            lines.append(f"| {base} - experts alone, seed by seed | {len(rows)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    if argv is None:
        argv = sys.argv[1:]
    if argv and argv[0] == "--seeds":
        print(seeds_table([Path(f) for f in argv[1:]]))
        return {}
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", type=Path, help="run folder of `soe stitch` on synthetic data")
    p.add_argument("--clips", type=int, default=96)
    p.add_argument("--above", type=float, nargs="*", default=[0.8, 0.5], help="flow times above which v->a is zeroed")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the run's sample.steps)")
    p.add_argument("--lora-off", action="store_true", help="also: the audio LoRA disabled (with and without v->a), and both LoRAs")
    p.add_argument("--lora-window", nargs="*", default=[], metavar="LO:HI",
                   help="also: the audio LoRA off only at flow times in (LO, HI] (e.g. 0.5:1 = the noisier half)")
    p.add_argument("--skip", nargs="*", default=[], help="variants to leave out: alone, stitched, v2a, a2v, gated, off, audio_lora, both_lora, audio_lora_va")
    p.add_argument("overrides", nargs="*", default=[], metavar="sample.KEY=VALUE",
                   help="sampling keys over the run's recipe, right after RUN (--skip takes what follows it), "
                        "e.g. 'sample.cross_guidance={b: 1.75}'")
    args = p.parse_args(argv)
    cfg, alone, stitched, step = load_run(p, args.run, args.overrides)
    experts = {"a": stitched.a, "b": stitched.b}
    seconds = cfg.sample.seconds or cfg.data.seconds
    cond, truth = sync_eval.held_out(experts, seconds, args.clips, cfg.seed)
    truth_feats = sync_eval.features(truth, experts, seconds)
    variants = [("experts alone (step 0)", alone, None, "joint", ()), (f"stitched (step {step})", stitched, None, "joint", ()),
                *((f"stitched, v->a off above sigma {s}", stitched, s, "joint", ()) for s in args.above),
                ("stitched, v->a off", stitched, -1.0, "joint", ()), ("stitched v2a (true video given)", stitched, None, "v2a", ()),
                ("stitched a2v (true audio given)", stitched, None, "a2v", ())]
    if args.lora_off:
        variants += [("stitched, audio LoRA off", stitched, None, "joint", ("b",)),
                     ("stitched, both LoRAs off", stitched, None, "joint", ("a", "b")),
                     ("stitched, audio LoRA off, v->a off", stitched, -1.0, "joint", ("b",))]
    skip = {"alone": "experts alone", "v2a": "stitched v2a", "off": "stitched, v->a off", "gated": "stitched, v->a off above",
            "stitched": "stitched (step", "a2v": "stitched a2v", "audio_lora": "stitched, audio LoRA off",
            "both_lora": "stitched, both LoRAs off", "audio_lora_va": "stitched, audio LoRA off, v->a off"}
    exact = {"off", "audio_lora"}  # these names begin other variants' names
    variants = [v for v in variants if not any(v[0] == skip[k] if k in exact else v[0].startswith(skip[k]) for k in args.skip)]
    out = {"run": str(args.run), "step": step, "clips": args.clips, "truth_onsets": float(np.mean(
        [len(audio_onsets(env, len(env) / seconds)) for _, _, _, env in sync_eval._signals(truth, experts)])), "variants": {}}
    per_clip = {}
    for s in args.lora_window:
        lo, hi = (float(x) for x in s.split(":"))
        variants.append((f"stitched, audio LoRA off at flow times in ({lo}, {hi}]", stitched, None, "joint", (), (lo, hi)))
    for name, model, above, task, lora_off, *window in variants:
        lat, ratios = run_variant(model, cfg, cond, truth, seconds, above, task, lora_off, window[0] if window else None, args.steps)
        out["variants"][name], per_clip[name] = scores(lat, truth_feats, experts, seconds)
        out["variants"][name]["v_to_a_ratio"] = ratios
    alone_name = variants[0][0] if variants and variants[0][0].startswith("experts alone") else None
    for name in (n for n in per_clip if alone_name and n != alone_name):
        out["variants"][name]["minus_alone"] = minus_alone(per_clip[name], per_clip[alone_name], truth_feats)
    t = Table(title=f"{args.run} joint audio, {args.clips} held-out clips (95% bootstrap intervals); truth onsets/clip "
                    f"{out['truth_onsets']:.2f}")
    for col in ("variant", "sync", "Frechet video", "Frechet audio", "onsets/clip", "loudness", "|v->a|/|h| hi / lo sigma"):
        t.add_column(col)
    fmt = fmt_bootstrap
    for name, r in out["variants"].items():
        ratios = r["v_to_a_ratio"]
        hi = np.mean([v for s, v in ratios.items() if s > 0.5] or [0])
        lo = np.mean([v for s, v in ratios.items() if s <= 0.5] or [0])
        t.add_row(name, fmt(r["sync"]), fmt(r["frechet_video"]), fmt(r["frechet_audio"]), fmt(r["onsets"]), fmt(r["loudness"]),
                  f"{hi:.3f} / {lo:.3f}")
    Console(width=250).print(t)
    if alone_name:
        d = Table(title="minus the experts alone, same bootstrap draws (<= 0: no worse than alone)")
        for col in ("variant", "Frechet video", "Frechet audio", "onsets/clip"):
            d.add_column(col)
        for name, r in out["variants"].items():
            if "minus_alone" in r:
                m = r["minus_alone"]
                d.add_row(name, fmt(m["frechet_video"]), fmt(m["frechet_audio"]), fmt(m["onsets"]))
        Console(width=250).print(d)
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
