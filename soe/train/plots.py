"""Loss curves per modality from the CSV logs of a run, as a PNG in the run folder.

Every (re)start of a run logs into its own ``logs/version_N/metrics.csv``; a resumed run's curves
are the union, later versions winning where steps overlap.
"""
from __future__ import annotations

import csv
import re
from pathlib import Path


def read_metrics(csv_file) -> dict[str, list[tuple[int, float]]]:
    series: dict[str, list[tuple[int, float]]] = {}
    with open(csv_file) as f:
        for row in csv.DictReader(f):
            step = row.get("step")
            for k, v in row.items():
                if k.startswith("loss") and v not in ("", None) and step not in ("", None):
                    series.setdefault(k, []).append((int(step), float(v)))
    return series


def read_run_metrics(run_dir) -> dict[str, list[tuple[int, float]]]:
    """Loss series of a whole run, across the CSV logs of every start."""
    files = sorted(Path(run_dir, "logs").glob("version_*/metrics.csv"), key=lambda p: int(re.sub(r"\D", "", p.parent.name) or 0))
    merged: dict[str, dict[int, float]] = {}
    for f in files:
        for k, points in read_metrics(f).items():
            merged.setdefault(k, {}).update(points)
    return {k: sorted(v.items()) for k, v in merged.items()}


def _label(name: str) -> str:
    """``loss_a_video`` -> ``video loss (expert a)``."""
    parts = name.split("_", 2)
    return f"{parts[2]} loss (expert {parts[1]})" if len(parts) == 3 and parts[0] == "loss" else name


def loss_figure(series: dict[str, list[tuple[int, float]]]):
    """One panel per logged loss, log-scaled y with plain tick labels ("1.45", not "1.45x10^0"), whole steps on x."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    plain = FuncFormatter(lambda v, _: f"{v:.3g}")
    fig, axes = plt.subplots(1, len(series), figsize=(4.5 * len(series), 3.2), squeeze=False)
    for ax, (name, points) in zip(axes[0], series.items()):
        steps, values = zip(*points)
        ax.plot(steps, values)
        ax.set_title(_label(name))
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # optimizer steps: 5, 10, 15, not 2.5, 7.5
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(plain)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def plot_losses(run_dir, out_png) -> Path | None:
    """``loss_curves.png``; None when nothing was logged or matplotlib (``soe[plots]``) is not installed."""
    from soe.extras import has

    if not has("matplotlib"):
        return None
    import matplotlib.pyplot as plt

    series = {k: v for k, v in sorted(read_run_metrics(run_dir).items()) if k != "loss"}
    if not series:  # fewer steps than log_every_n_steps: nothing logged
        return None
    fig = loss_figure(series)
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return Path(out_png)
