"""Several seeds of the sync experiment as one table: mean and 95% t-interval per number.

Each seed is a separate ``benchmarks/sync_experiment.py ... --seed S --out DIR_S`` (the seed changes the
stitching run and the held-out clips). Give the output folders; runs are found by name
(``DIR/stitch`` for the base run, ``DIR/ablations/NAME`` otherwise).

    for s in 0 1 2; do python benchmarks/sync_experiment.py --experts recipes/pretrained --size ablation \\
        --ablation auto_2_pairs --seed $s --out runs/sync_s$s; done
    python benchmarks/sync_seeds.py runs/sync_s0 runs/sync_s1 runs/sync_s2 --runs auto_2_pairs
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from scipy import stats

MODES = ("joint", "v2a", "a2v", "image")


def bootstrap(fn, n: int, draws: int = 300, seed: int = 0) -> tuple[float, float, float]:
    """(value on all ``n`` clips, 2.5th, 97.5th percentile over ``draws`` resamples of the clips with replacement).
    The same ``n`` and ``seed`` draw the same indices, so two calls give paired intervals."""
    rng = np.random.default_rng(seed)
    boot = [fn(rng.integers(0, n, n)) for _ in range(draws)]
    return float(fn(np.arange(n))), float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))


def fmt_bootstrap(v) -> str:
    """``bootstrap``'s (value, lo, hi) as ``value [lo, hi]``."""
    return f"{v[0]:.3f} [{v[1]:.3f}, {v[2]:.3f}]"


def interval(values: list[float]) -> tuple[float, float]:
    """(mean, half-width of the 95% t-interval); half-width 0 for a single value."""
    v = np.asarray(values, float)
    if len(v) < 2:
        return float(v.mean()), 0.0
    return float(v.mean()), float(stats.t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / np.sqrt(len(v)))


def collect(outs: list[Path], name: str) -> list[dict]:
    rel = Path("stitch") if name == "base" else Path("ablations") / name
    return [json.loads((o / rel / "sync_results.json").read_text())["scores"] for o in outs if (o / rel / "sync_results.json").is_file()]


def paired(outs: list[Path], name: str, versus: str) -> str:
    """``name`` minus ``versus`` seed by seed (same seed: same training stream and held-out clips), mean ± 95% t-interval."""
    both = [(a, b) for a, b in zip(collect(outs, name), collect(outs, versus))]
    cells = []
    for m in MODES:
        mean, half = interval([a[m]["sync"] - b[m]["sync"] for a, b in both])
        cells.append(f"{mean:+.3f} ± {half:.3f}")
    mean, half = interval([a["joint"]["frechet_audio"] - b["joint"]["frechet_audio"] for a, b in both])
    cells.append(f"{mean:+.3f} ± {half:.3f}")
    return f"| {name} - {versus} | {len(both)} | " + " | ".join(cells) + " |"


def table(outs: list[Path], names: list[str]) -> str:
    head = "| run | seeds | " + " | ".join(f"sync {m}" for m in ("independent", *MODES)) + " | Frechet audio (joint) | Frechet audio (independent) |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name in names:
        runs = collect(outs, name)
        if not runs:
            continue
        cells = []
        for m in ("independent", *MODES):
            mean, half = interval([r[m]["sync"] for r in runs])
            cells.append(f"{mean:.3f} ± {half:.3f}")
        for m in ("joint", "independent"):
            mean, half = interval([r[m]["frechet_audio"] for r in runs])
            cells.append(f"{mean:.3f} ± {half:.3f}")
        lines.append(f"| {name} | {len(runs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("outs", nargs="+", type=Path, help="--out folders of sync_experiment.py, one per seed")
    p.add_argument("--runs", nargs="+", default=["base"], help="run names: base and/or ablation names")
    p.add_argument("--versus", default=None, help="also each run minus this one, seed by seed (sync per mode, joint audio Frechet)")
    args = p.parse_args(argv)
    text = table(args.outs, args.runs)
    if args.versus:
        text += "\n\n| difference | seeds | " + " | ".join(f"sync {m}" for m in MODES) + " | Frechet audio (joint) |\n"
        text += "|" + "---|" * (len(MODES) + 3) + "\n"
        text += "\n".join(paired(args.outs, n, args.versus) for n in args.runs if n != args.versus)
    print(text)
    return text


if __name__ == "__main__":
    main()
