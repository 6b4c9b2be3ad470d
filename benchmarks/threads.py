"""torch CPU threads: one training step of the demo at 1 vs 2 threads, alone and next to a busy process.

The competitor is a deliberate ``yes > /dev/null`` (one core at 100%), started and stopped by this
script; conditions are interleaved round by round so a noisy shared machine affects all alike.
Prints the median step time per condition and the ratios soe's thread policy (soe/threads.py) rests on.

    python benchmarks/threads.py                   # ~1 min
    python benchmarks/threads.py --rounds 5 --steps 8
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]


def demo_step_fn(recipe: Path):
    """A closure running one forward + backward + optimizer step of the recipe's stitched model."""
    from soe.data.build import build_datamodule
    from soe.recipe.builders import build_stitcher
    from soe.recipe.reading import load_recipe
    from soe.train.build import apply_training_setup, build_objective

    cfg = load_recipe(recipe, ["data.num_clips=16"])
    stitcher = build_stitcher(cfg)
    apply_training_setup(stitcher, cfg)
    stitcher.train()
    objective = build_objective(cfg, stitcher)
    data = build_datamodule(cfg, stitcher)
    data.setup("fit")
    batch = torch.utils.data.default_collate([data.dataset[(0, i)] for i in range(cfg.data.batch_size)])
    opt = torch.optim.AdamW([p for p in stitcher.parameters() if p.requires_grad], lr=1e-4)

    def step():
        inputs, targets = objective.noised({"a": batch["a"], "b": batch["b"]}, step=0)
        pa, pb = stitcher(inputs["a"], inputs["b"])
        loss, _ = objective({"a": pa, "b": pb}, targets)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def timed(step, threads: int, steps: int) -> float:
    torch.set_num_threads(threads)
    step()  # warm-up at this thread count
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", default=str(ROOT / "recipes" / "demo.yaml"))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=5, help="timed steps per condition and round")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    args = p.parse_args(argv)
    step = demo_step_fn(Path(args.recipe))
    results: dict[tuple[str, int], list[float]] = {}
    for _ in range(args.rounds):
        for load in ("idle", "busy"):
            competitor = subprocess.Popen("exec yes > /dev/null", shell=True) if load == "busy" else None
            try:
                time.sleep(0.2 if competitor else 0)
                for n in args.threads:
                    results.setdefault((load, n), []).append(timed(step, n, args.steps))
            finally:
                if competitor is not None:
                    competitor.kill()
                    competitor.wait()
    med = {k: statistics.median(v) for k, v in results.items()}
    base = med[("idle", args.threads[0])]
    table = Table(title=f"one demo training step, median of {args.rounds} rounds x {args.steps} steps")
    for col in ("machine", "torch threads", "seconds / step", f"vs idle, {args.threads[0]} thread(s)"):
        table.add_column(col, no_wrap=True)
    for (load, n), s in sorted(med.items()):
        table.add_row("+ 1 busy process" if load == "busy" else "as found", str(n), f"{s:.3f}", f"x{s / base:.2f}")
    Console().print(table)
    return med


if __name__ == "__main__":
    main()
