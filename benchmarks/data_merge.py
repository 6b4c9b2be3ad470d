"""Merging the parts of a streamed latent cache: time and peak memory as the number of windows grows.

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/data_merge.py --windows 100000 550000 --parts 8

Writes part logs as ``soe encode --shard I/N`` leaves them (one line per chunk of ``--per-chunk``
windows, index rows with a source path and an 80-character caption) and empty sparse chunk files of
the recorded sizes (the merge only stats them), then runs ``merge_parts`` in a fresh process and
prints its wall time, peak RSS and the bytes of the logs and of the ``index.jsonl`` it writes. No
tensor data is involved: the merge moves none. Numbers are for comparing runs on one machine.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1]))  # run as `python benchmarks/x.py` from a checkout


def fake_cache(folder: Path, windows: int, parts: int, per_chunk: int) -> None:
    from soe.data.stream_format import PARTS, part_name, write_json_atomic

    (folder / PARTS).mkdir(parents=True)
    config = {"chunk_size": 1 << 30, "data_format": ["str", "int", "int", "int", "tensor", "tensor"]}
    write_json_atomic(folder / "meta.json", {"format": 2, "experts": {"a": "x", "b": "y"}, "encode": {}, "storage": {}, "parts": parts})
    for sub in ("windows/5s", "texts/a", "texts/b"):
        (folder / sub).mkdir(parents=True)
    for p in range(parts):
        ids = range(p, windows, parts)
        with open(folder / PARTS / f"{part_name(p, parts)}.jsonl", "w") as log:
            for n, first in enumerate(range(0, len(ids), per_chunk)):
                name = f"chunk-{p}-{n}.bin"
                info = {"filename": name, "chunk_size": per_chunk, "chunk_bytes": 1, "dim": None}
                for sub in ("windows/5s", "texts/a", "texts/b"):
                    (folder / sub / name).write_bytes(b"\0")
                rows = [{"id": f"clip{i // 8:07d}-w{i % 8}", "bucket": "5s", "seconds": 5.0, "chunk": name,
                         "source": f"videos/part{i % 97:03d}/clip{i // 8:07d}.mp4", "start": 5.0 * (i % 8),
                         "caption": f"caption {i // 8:07d} " + "a person plays a guitar on a sunny street corner"[: 64]}
                        for i in ids[first: first + per_chunk]]
                texts = {s: {"chunk": info, "config": config, "keys": [f"{r['id']}{s}" for r in rows[::8]], "lengths": {"t": [512]}}
                         for s in ("a", "b")}
                log.write(json.dumps({"bucket": "5s", "chunk": info, "config": config, "texts": texts, "rows": rows}) + "\n")
        write_json_atomic(folder / PARTS / f"{part_name(p, parts)}.done", {"windows": len(ids)})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--windows", type=int, nargs="+", default=[100_000, 550_000])
    p.add_argument("--parts", type=int, default=8)
    p.add_argument("--per-chunk", type=int, default=64)
    p.add_argument("--merge", metavar="FOLDER", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.merge:
        from soe.data.stream_merge import merge_parts

        t0 = time.perf_counter()
        merge_parts(args.merge)
        print(json.dumps({"s": time.perf_counter() - t0, "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
        return
    print(f"{'windows':>10} {'parts':>5} {'merge s':>8} {'peak RSS MB':>11} {'logs MB':>8} {'index.jsonl MB':>14}")
    for n in args.windows:
        with tempfile.TemporaryDirectory(prefix="soe-merge-") as tmp:
            folder = Path(tmp) / "cache"
            fake_cache(folder, n, args.parts, args.per_chunk)
            out = subprocess.run([sys.executable, __file__, "--merge", str(folder)], capture_output=True, text=True, check=True)
            got = json.loads(out.stdout.strip().splitlines()[-1])
            logs = sum(f.stat().st_size for f in (folder / "parts").glob("*.jsonl")) / 2**20
            index = (folder / "index.jsonl").stat().st_size / 2**20 if (folder / "index.jsonl").exists() else 0.0
            print(f"{n:>10,} {args.parts:>5} {got['s']:>8.1f} {got['rss_mb']:>11.0f} {logs:>8.1f} {index:>14.1f}", flush=True)


if __name__ == "__main__":
    main()
