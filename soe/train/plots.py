"""Loss curves per modality from the CSV log, as a PNG in the run folder."""
from __future__ import annotations

import csv
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


def plot_losses(csv_file, out_png) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not Path(csv_file).is_file():  # fewer steps than log_every_n_steps: nothing logged
        return None
    series = {k: v for k, v in read_metrics(csv_file).items() if k != "loss"}
    if not series:
        return None
    fig, axes = plt.subplots(1, len(series), figsize=(4.5 * len(series), 3.2), squeeze=False)
    for ax, (name, points) in zip(axes[0], sorted(series.items())):
        steps, values = zip(*points)
        ax.plot(steps, values)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return Path(out_png)
