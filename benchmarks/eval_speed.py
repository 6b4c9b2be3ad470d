"""`soe eval` throughput: clips/s per metric and the speed-up of 2 workers over 1, side by side in one run.

N synthetic clips of 5 s (default 100; a square that jumps at seeded times, clicks at those times, 44.1 kHz AAC) are
written once (K distinct clips copied to N files, so decoding costs what N distinct files cost without writing N), then
each metric is evaluated through ``soe.evaluate.run`` (``plan`` + ``evaluate``, what ``soe eval`` calls) with
``--workers 1`` and ``2`` in alternation, ``--repeats`` times; the median seconds per setting are printed as clips/s and
as the ratio t(1 worker) / t(2 workers). Workers decode clips and compute the weight-free metrics (AV-Align); models
run in the main process, so for model metrics only decoding is shared out. Nothing passes or fails on time.

Model metrics need ``--models DIR`` (weights); ``--random-synchformer`` times ``desync`` with a full-size Synchformer
of random weights instead (same cost as the published one). The load average is printed before and after: other
processes on the box depress the 2-worker ratio.

    python benchmarks/eval_speed.py --clips 100                     # av_align, 100 clips of 5 s at 240x416
    python benchmarks/eval_speed.py --clips 4 --metrics desync --random-synchformer
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[1]))  # run as `python benchmarks/x.py` from a checkout

from soe.evaluate.run import evaluate, plan  # noqa: E402
from soe.media import write_mp4  # noqa: E402

FPS, SR = 25, 44_100


def synthetic_clip(path: Path, seconds: float, height: int, width: int, seed: int) -> None:
    """A white square on grey that jumps at seeded frames, with a 10 ms click of noise at each jump."""
    g = torch.Generator().manual_seed(seed)
    n = int(seconds * FPS)
    jumps = sorted(torch.randperm(n - 2, generator=g)[: max(1, int(seconds * 2))].add(1).tolist())
    video = torch.full((3, n, height, width), -0.5)
    side, x, y = height // 4, width // 8, height // 3
    for f in range(n):
        if f in jumps:
            x = (x + side // 2) % (width - side)
        video[:, f, y: y + side, x: x + side] = 1.0
    audio = torch.zeros(1, int(seconds * SR))
    for f in jumps:
        i = int(f / FPS * SR)
        audio[0, i: i + SR // 100] = 0.8 * (2 * torch.rand(SR // 100, generator=g) - 1)
    write_mp4(path, video, FPS, audio, SR)


def random_synchformer(folder: Path) -> None:
    from soe.evaluate.synchformer import WEIGHTS, Synchformer

    torch.manual_seed(0)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(Synchformer().state_dict(), folder / WEIGHTS)


def time_eval(samples: Path, metric: str, workers: int, models: str | None, device: str) -> float:
    p = plan(samples, metrics=metric, models=models, out=samples.parent / "eval.json", force=True)
    if metric not in p["run"]:
        raise SystemExit(f"error: {metric}: {p['skipped'].get(metric, 'not run')}")
    start = time.perf_counter()
    result = evaluate(p, workers=workers, device=device)
    elapsed = time.perf_counter() - start
    if result["failed"]:
        raise SystemExit(f"error: {metric}: failed clips {result['failed']}")
    return elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clips", type=int, default=100, help="N clips evaluated per setting")
    ap.add_argument("--distinct", type=int, default=4, help="K distinct clips written (copied to N files)")
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--size", type=int, nargs=2, default=[240, 416], metavar=("H", "W"), help="frame size (480x832 halved)")
    ap.add_argument("--metrics", default="av_align", help="comma-separated soe eval metrics, each timed on its own")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=1, help="alternating rounds; the median seconds per setting is printed")
    ap.add_argument("--models", default=None, help="--models DIR for model metrics")
    ap.add_argument("--random-synchformer", action="store_true", help="desync with a full-size random Synchformer")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", default=None, help="also write the numbers here")
    args = ap.parse_args()

    load_before = os.getloadavg()
    tmp = Path(tempfile.mkdtemp(prefix="soe_eval_speed_"))
    try:
        samples = tmp / "clips"
        samples.mkdir()
        for k in range(min(args.distinct, args.clips)):
            synthetic_clip(samples / f"clip_{k:04d}.mp4", args.seconds, *args.size, seed=k)
        for i in range(args.distinct, args.clips):
            shutil.copyfile(samples / f"clip_{i % args.distinct:04d}.mp4", samples / f"clip_{i:04d}.mp4")
        models = args.models
        if args.random_synchformer:
            models = str(tmp / "models")
            random_synchformer(tmp / "models" / "synchformer")
        rows = []
        for metric in [m.strip() for m in args.metrics.split(",") if m.strip()]:
            times = {w: [] for w in args.workers}
            for _ in range(args.repeats):
                for w in args.workers:
                    times[w].append(time_eval(samples, metric, w, models, args.device))
            med = {w: statistics.median(t) for w, t in times.items()}
            for w in args.workers:
                rows.append({"metric": metric, "workers": w, "seconds": med[w], "clips_per_s": args.clips / med[w],
                             "speedup_vs_1": med[args.workers[0]] / med[w]})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    load_after = os.getloadavg()
    print(f"{args.clips} clips of {args.seconds:g} s at {args.size[0]}x{args.size[1]}, {os.cpu_count()} CPUs, torch threads "
          f"{torch.get_num_threads()}; load average before {load_before[0]:.2f} / after {load_after[0]:.2f} (1 min)")
    print(f"{'metric':<14}{'workers':>8}{'seconds':>10}{'clips/s':>10}{'speed-up':>10}")
    for r in rows:
        print(f"{r['metric']:<14}{r['workers']:>8}{r['seconds']:>10.2f}{r['clips_per_s']:>10.2f}{r['speedup_vs_1']:>9.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "load_before": load_before, "load_after": load_after,
                                               "clips": args.clips, "seconds": args.seconds, "size": args.size}, indent=2))


if __name__ == "__main__":
    main()
