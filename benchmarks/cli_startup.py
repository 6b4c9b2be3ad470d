"""Start-up time of the `soe` command: `--help`, `experts`, `inspect recipes/universe1.yaml` (and `inspect demo`).

    python benchmarks/cli_startup.py                     # this installation, 5 runs each
    python benchmarks/cli_startup.py --baseline /other/venv/bin/python --repeats 5

Each command runs in a fresh interpreter, timed from outside (wall and CPU of the child), next to
the floor every torch-importing command pays: ``python -c "import torch"``. ``experts`` and
``inspect`` run twice over: "first run" with an empty start-up cache (``SOE_CACHE_DIR`` pointing at a
new empty folder: the tables are computed, as after installing soe or changing its code) and
"repeat" with the cache the first run filled (soe/cli/cache.py). A first ``experts`` reads the
plugins' torch-free descriptions (soe/plugin/listing.py); a first ``inspect universe1`` builds shape-only
stand-ins of Wan and ACE-Step v1 (soe/plugin/stand_in.py) and imports torch but no model library; ``inspect
demo`` shows the other path: its ACE-Step 1.5 expert has no stand-in, so diffusers is imported. Runs of this interpreter's soe and
of ``--baseline`` (another environment's python, e.g. one with an older soe installed) alternate, so
both see the same machine load. Printed: median wall and CPU seconds, the ratio to the baseline,
and the heaviest imports of each command (``python -X importtime``). Timings on a shared machine
are noisy: compare CPU seconds and ratios taken in one run.
"""
from __future__ import annotations

import argparse
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).parents[1]
RUN = "import sys; from soe.cli import main; sys.exit(main())"
INSPECT = ["inspect", str(ROOT / "recipes" / "universe1.yaml")]
# name -> (python -c code, argv, start-up cache: None, "empty" or "filled")
COMMANDS = {
    "import torch": ("import torch", [], None),
    "--help": (RUN, ["--help"], None),
    "experts (first run)": (RUN, ["experts"], "empty"),
    "experts (repeat)": (RUN, ["experts"], "filled"),
    "inspect universe1 (first run)": (RUN, INSPECT, "empty"),
    "inspect universe1 (repeat)": (RUN, INSPECT, "filled"),
    "inspect demo (first run)": (RUN, ["inspect", str(ROOT / "recipes" / "demo.yaml")], "empty"),
}


def run_once(code: str, args: list[str], python: str | None, cache_dir: str, importtime: bool = False) -> tuple[float, float, str]:
    os.makedirs(cache_dir, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "COLUMNS": "200", "SOE_CACHE_DIR": cache_dir}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run([python or sys.executable, *(["-X", "importtime"] if importtime else []), "-c", code, *args],
                          env=env, capture_output=True, text=True, cwd=cache_dir)  # not the checkout: its soe/ would shadow the installed one
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"`{code} {' '.join(args)}` failed ({python or sys.executable}): {proc.stderr.strip()[-400:]}")
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), proc.stderr


def heaviest_imports(log: str, n: int = 5) -> str:
    """Top-level packages by cumulative import time, from ``-X importtime`` output."""
    totals = {}
    for line in log.splitlines():
        m = re.match(r"import time:\s+\d+ \|\s+(\d+) \| (\S+)$", line)  # top-level lines only (no indent)
        if m:
            totals[m.group(2)] = int(m.group(1)) / 1e6
    return ", ".join(f"{k} {v:.2f}s" for k, v in sorted(totals.items(), key=lambda kv: -kv[1])[:n])


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--baseline", default=None, help="python of another environment with soe installed, to compare against")
    args = p.parse_args()
    sides = {"this": None, **({"baseline": args.baseline} if args.baseline else {})}
    print(f"{'command':<32}" + "".join(f"{s + ' wall':>14}{s + ' cpu':>13}" for s in sides) + ("     cpu ratio" if args.baseline else ""))
    with tempfile.TemporaryDirectory() as tmp:
        filled = {side: str(Path(tmp) / f"filled-{side}") for side in sides}
        for side, python in sides.items():  # fill each side's cache once (not timed)
            for code, argv, cache in COMMANDS.values():
                if cache == "filled":
                    run_once(code, argv, python, filled[side])
        for name, (code, argv, cache) in COMMANDS.items():
            samples = {s: [] for s in sides}
            for i in range(args.repeats):
                for side, python in sides.items():  # alternate: both see the same load
                    cache_dir = filled[side] if cache == "filled" else tempfile.mkdtemp(dir=tmp)  # a new, empty cache
                    samples[side].append(run_once(code, argv, python, cache_dir)[:2])
            row, cpu = f"{name:<32}", {}
            for side, runs in samples.items():
                wall, cpu[side] = statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)
                row += f"{wall:>13.2f}s{cpu[side]:>12.2f}s"
            if args.baseline:
                row += f"{cpu['this'] / cpu['baseline']:>13.2f}x"
            print(row)
            cache_dir = filled["this"] if cache == "filled" else tempfile.mkdtemp(dir=tmp)
            print(f"{'':<32}imports: {heaviest_imports(run_once(code, argv, None, cache_dir, importtime=True)[2])}", flush=True)


if __name__ == "__main__":
    main()
