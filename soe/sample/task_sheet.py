"""The demo's before/after sheet per task: what the square and the clicks do on one held-out clip.

One row per task (joint, v2a, a2v), two columns (the experts alone at step 0 | stitched). Each panel plots
the square's height above the floor (read off the video latents) and the click loudness (read off the
audio latents) over the same time axis, with the clip's true bounces as dashed lines: a synced model
clicks where the height touches 0. A given modality (the truth itself) is drawn grey.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from soe.sample.held_out_tasks import GIVEN


def _panel(ax, latents: dict, experts: dict, seconds: float, clip: int, bounces: np.ndarray, task: str, title: str) -> None:
    from soe.evaluate import sync_eval

    v, a = sync_eval._sides(experts)
    one = {s: x[clip: clip + 1] for s, x in latents.items()}
    _, _, height, env = next(sync_eval._signals(one, experts))
    th = (np.arange(len(height)) + 0.5) * seconds / len(height)
    ta = (np.arange(len(env)) + 0.5) * seconds / len(env)
    for b in bounces:
        ax.axvline(b, color="black", ls="--", lw=0.8, alpha=0.6)
    ax.plot(th, height, color="grey" if task == "v2a" else "tab:blue", lw=1.5, label="square height" + (" (given)" if task == "v2a" else ""))
    ax.fill_between(ta, 0, env, color="grey" if task == "a2v" else "tab:orange", alpha=0.6,
                    label="click loudness" + (" (given)" if task == "a2v" else ""))
    ax.set_xlim(0, seconds)
    ax.set_ylim(-0.05, 1.15)
    ax.set_title(title, fontsize=9)
    ax.set_yticks([])


def task_sheet(alone: dict, stitched: dict, truth: dict, experts: dict, seconds: float, scores: dict, out,
               clip: int = 0) -> Path:
    """``alone`` / ``stitched``: task -> latents per side of the held-out clips; ``scores``: ``sync.json``'s
    document (per-task means shown in the titles). Writes ``out`` (PNG) for held-out clip ``clip``."""
    from soe.extras import require

    require("matplotlib", "the before/after task sheet (PNG)")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from soe.evaluate import sync_eval

    tasks = list(alone)
    bounces = sync_eval.events({s: x[clip: clip + 1] for s, x in truth.items()}, experts, seconds)[0][1]
    fig, axes = plt.subplots(len(tasks), 2, figsize=(12, 2.5 * len(tasks) + 0.6), squeeze=False, sharex=True)
    for r, task in enumerate(tasks):
        for c, (key, lat) in enumerate((("experts alone", alone), ("stitched", stitched))):
            s = scores[key]["tasks"][task]
            clip_sync = sync_eval.sync_score({k: x[clip: clip + 1] for k, x in lat[task].items()}, experts, seconds)
            mean = f"{scores['clips']} clips: sync {s['sync']:.2f}" + (f", AV-Align {s['av_align']:.2f}" if "av_align" in s else "")
            _panel(axes[r, c], lat[task], experts, seconds, clip, bounces, task,
                   f"{task} (given {GIVEN[task]}) · {key}\nthis clip: sync {clip_sync:.2f} · {mean}")
    axes[0, 0].legend(loc="upper right", fontsize=7)
    axes[-1, 0].set_xlabel("seconds (dashed: the true bounces)")
    axes[-1, 1].set_xlabel("seconds (dashed: the true bounces)")
    fig.suptitle(f"held-out clip {clip}: the experts alone (step 0, left) vs stitched (right); "
                 "synced = clicks where the square touches the floor", fontsize=10)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out
