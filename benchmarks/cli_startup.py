"""Start-up time of the `soe` command: `--help`, `experts`, `inspect recipes/universe1.yaml`.

    python benchmarks/cli_startup.py                     # this installation, 3 runs each
    python benchmarks/cli_startup.py --baseline /other/venv/bin/python --repeats 5

Each command runs in a fresh interpreter; runs of this interpreter's soe and of ``--baseline``
(another environment's python, e.g. one with an older soe installed) alternate, so both see the same machine load. Printed: median wall
and CPU seconds per command, the ratio to the baseline, and the heaviest imports of each command
(``python -X importtime``). Timings on a shared machine are noisy; compare ratios.
"""
from __future__ import annotations

import argparse
import os
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).parents[1]
COMMANDS = {"--help": ["--help"], "experts": ["experts"], "inspect universe1": ["inspect", str(ROOT / "recipes" / "universe1.yaml")]}
RUN = "import sys; from soe.cli import main; sys.exit(main())"


def run_once(args: list[str], python: str | None, importtime: bool = False) -> tuple[float, float, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "COLUMNS": "200"}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run([python or sys.executable, *(["-X", "importtime"] if importtime else []), "-c", RUN, *args],
                          env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"`soe {' '.join(args)}` failed ({python or sys.executable}): {proc.stderr.strip()[-400:]}")
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
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--baseline", default=None, help="python of another environment with soe installed, to compare against")
    args = p.parse_args()
    sides = {"this": None, **({"baseline": args.baseline} if args.baseline else {})}
    print(f"{'command':<20}" + "".join(f"{s + ' wall':>14}{s + ' cpu':>13}" for s in sides) + ("     cpu ratio" if args.baseline else ""))
    for name, argv in COMMANDS.items():
        samples = {s: [] for s in sides}
        for _ in range(args.repeats):
            for side, path in sides.items():  # alternate: both see the same load
                samples[side].append(run_once(argv, path)[:2])
        row, cpu = f"{name:<20}", {}
        for side, runs in samples.items():
            wall, cpu[side] = statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)
            row += f"{wall:>13.2f}s{cpu[side]:>12.2f}s"
        if args.baseline:
            row += f"{cpu['this'] / cpu['baseline']:>13.2f}x"
        print(row)
        print(f"{'':<20}imports: {heaviest_imports(run_once(argv, None, importtime=True)[2])}")


if __name__ == "__main__":
    main()
