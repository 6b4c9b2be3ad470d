"""Collect the sync experiment's results (base run + ablations) into a markdown table and plots.

    python benchmarks/sync_experiment.py --report docs/evidence     # reads runs/sync (or --out)
"""
from __future__ import annotations

import json
from pathlib import Path

MODES = ("ground truth", "independent", "joint", "v2a", "a2v", "image")


def _fmt(v) -> str:
    return "given" if v is None else f"{v:.3f}"


def load_results(out: Path) -> dict[str, dict]:
    """name -> result of every finished run under OUT (newest run of each name wins)."""
    found = {}
    for f in sorted([out / "stitch" / "sync_results.json", *out.glob("stitch-*/sync_results.json"),
                     *out.glob("ablations/*/sync_results.json")], key=lambda p: p.stat().st_mtime if p.exists() else 0):
        if f.is_file():
            r = json.loads(f.read_text())
            found[r["name"]] = {**r, "path": str(f.parent)}
    return found


def table(results: dict[str, dict]) -> str:
    lines = ["| run | stitch steps | " + " | ".join(f"sync {m}" for m in MODES[1:]) + " | Frechet video (joint) | Frechet audio (joint) "
             "| Frechet video (a2v) | Frechet audio (v2a) | Frechet video/audio (independent) |",
             "|---" * 12 + "|"]
    for name, r in sorted(results.items(), key=lambda kv: (kv[0] != "base", kv[0])):
        s = r["scores"]
        ind = s["independent"]
        lines.append(f"| {name} | {r['stitch_steps']} | " + " | ".join(_fmt(s[m]["sync"]) for m in MODES[1:])
                     + f" | {_fmt(s['joint']['frechet_video'])} | {_fmt(s['joint']['frechet_audio'])} | {_fmt(s['a2v']['frechet_video'])} "
                     f"| {_fmt(s['v2a']['frechet_audio'])} | {_fmt(ind['frechet_video'])} / {_fmt(ind['frechet_audio'])} |")
    return "\n".join(lines)


def plot_curve(result: dict, path: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = result.get("curve") or []
    if not points:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    for mode in ("joint", "v2a", "a2v"):
        ax.plot([p["step"] for p in points], [p[mode] for p in points], marker="o", label=mode)
    ax.axhline(result["scores"]["ground truth"]["sync"], color="grey", ls="--", lw=1, label="ground truth")
    ax.set_xlabel("stitching steps")
    ax.set_ylabel("AV-Align sync")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    ax.set_title(f"sync vs training steps ({result['name']})", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def report(out: Path, dest: Path, console=None) -> dict:
    results = load_results(out)
    if not results:
        raise SystemExit(f"no sync_results.json under {out}: run benchmarks/sync_experiment.py first")
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "sync_table.md").write_text(table(results) + "\n")
    plots = [plot_curve(r, dest / f"sync_vs_steps_{name}.png") for name, r in results.items()]
    if console is not None:
        console.print(table(results))
        console.print(f"wrote {dest / 'sync_table.md'} and {len([p for p in plots if p])} plot(s)")
    return results
