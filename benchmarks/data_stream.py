"""Streaming latent cache: memory and throughput of the training loader as the cache grows.

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/data_stream.py               # 1k, 10k, 50k windows
    python benchmarks/data_stream.py --sizes 1000 5000 --batch-size 16
    python benchmarks/data_stream.py --sizes 2000 --scale 64 --shard-size 8      # 590 KB windows

For each size a synthetic cache of small windows (9.2 KB of float32 latents; ``--scale`` multiplies
their last axis) is written through ``PartWriter`` (what ``soe encode`` uses: two buckets, 4 windows
per caption, ``--shard-size`` windows per chunk, 256 by default). Then, each in a fresh
process so peaks do not mix, one epoch of three readers of the same chunks:

- "loader": the training loader as ``StreamingLatentDataModule`` builds it with ``data.num_workers: 0``
  (``StreamBatchSampler`` + ``StreamDataLoader`` over ``StreamingCache``: shuffled chunk order, the
  bounded shuffle buffer, batches within a bucket, text states joined and padded back, collate);
- "raw read" (the baseline of the target): every window and text chunk once, in file order, through
  litdata's own sequential iterator, decoded to the tensors training gets (latents stacked B windows
  at a time as float32, text states as float32), nothing else: no shuffle, no join, no padding;
- "raw batches": the loader's product without its order (consecutive windows in file order).

The raw read stacks the latents it reads: litdata hands out tensors that are views of the mapped
chunk file, so a read that only iterated them would never touch the latent bytes the loader has to
copy into its batches. Before timing, each process runs a full garbage collection and freezes what
it holds (``gc.freeze``): a full collection scans the ~0.5 M objects of importing torch and
Lightning (0.2-0.5 s on a 2-core box) and fell by chance into one reader's epoch or the other's.
Modes alternate over ``--repeats`` processes; printed: the median windows/s and the highest peak
RSS of each, the loader's RSS relative to the smallest cache and its speed relative to the raw read,
by the clock and by the process's CPU time (steadier where other work shares the cores: all three
readers run in one thread, ``data.num_workers: 0``).
Numbers are ratios taken side by side on one machine; nothing here passes or fails on time.
"""
from __future__ import annotations

import argparse
import json
import math
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1]))  # run as `python benchmarks/x.py` from a checkout

SHAPES = {"a": (4, 6, 8, 8), "b": (8, 16, 6)}  # latents: a tiny Wan window, an ACE-Step-like audio window
TEXT = {"a": (12, 32), "b": (10, 24)}


def universe1_window_bytes(wan_tokens: int = 80, ace_tokens: int = 60, lyric_tokens: int = 0, windows_per_caption: int = 1) -> dict:
    """Bytes of one 5 s UniVerse-1 window (Wan2.1 1.3B 480x832 + ACE-Step v1 at 25.6 kHz), computed from
    the shapes with the cache's own pack/trim: format 1 (float32, text padded, per window) vs format 2."""
    import torch

    from soe.data.stream_format import latent_dtype_for, pack, trim

    def text(n, length, dim=None, dtype=torch.float32):
        t = torch.zeros((length, dim) if dim else (length,), dtype=dtype)
        t[:n] = 1
        return t

    latents = {"wan": torch.zeros(16, 31, 60, 104), "ace": torch.zeros(8, 16, 31)}
    texts = {"encoder_hidden_states": text(wan_tokens, 512, 4096), "text_hidden_states": text(ace_tokens, 256, 768),
             "text_attention_mask": text(ace_tokens, 256, dtype=torch.long), "speaker_embeds": torch.zeros(512),
             "lyric_token_ids": text(lyric_tokens, 512, dtype=torch.long), "lyric_mask": text(lyric_tokens, 512, dtype=torch.long)}
    before = sum(t.nbytes for t in (*latents.values(), *texts.values()))
    dtype = latent_dtype_for("bf16-mixed")  # recipes/universe1.yaml trains in bf16-mixed
    after_latents = sum(pack(t, dtype).nbytes for t in latents.values())
    after_text = sum(pack(trim(t), "bfloat16").nbytes for t in texts.values()) / windows_per_caption
    return {"before": before, "after": after_latents + after_text, "latents": after_latents, "text": after_text}


def write(folder: Path, n: int, scale: int = 1, shard_size: int = 256) -> None:
    from soe.data.stream_synthetic import random_record, write_cache

    shapes = {side: (*shape[:-1], shape[-1] * scale) for side, shape in SHAPES.items()}
    records = (random_record(i, shapes, TEXT, durations=(1.0, 2.0)) for i in range(n))
    write_cache(folder, records, {"a": "video", "b": "audio"}, shard_size=shard_size)


def measure(folder: str, mode: str, batch_size: int) -> dict:
    import gc

    import torch
    from litdata import StreamingDataset

    from soe.data.stream_format import unpack
    from soe.data.stream_read import StreamingCache
    from soe.data.streaming import StreamBatchSampler, StreamDataLoader, StreamWindows, collate_batch

    torch.set_num_threads(1)
    cache = StreamingCache(folder, buffer_chunks=8)
    storage = cache.storage
    gc.collect()
    gc.freeze()  # see the module docstring: full collections of the import-time objects are not the data path's
    t0, cpu0, windows = time.perf_counter(), time.process_time(), 0
    if mode == "loader":  # what StreamingLatentDataModule.train_dataloader builds (data.num_workers: 0)
        sizes = {b: cache.chunk_sizes(b) for b in cache.buckets}
        sampler = StreamBatchSampler(sizes, batch_size, seed=0, length=1)
        loader = iter(StreamDataLoader(StreamWindows(cache), batch_sampler=sampler, num_workers=0, collate_fn=collate_batch))
        for _ in range(sampler.batches_per_epoch()):  # one epoch (the sampler runs on until training stops)
            windows += next(loader)["a"]["latents"].shape[0]
    elif mode == "raw-batches":  # the loader's product without its order: consecutive windows in file order, no DataLoader
        for bucket in cache.buckets:
            n = sum(cache.chunk_sizes(bucket))
            for first in range(0, n - batch_size + 1, batch_size):
                windows += cache.batch(bucket, list(range(first, first + batch_size)))["a"]["latents"].shape[0]
    else:  # raw: every chunk once, in file order, through litdata's own iterator, decoded to the tensors training gets
        for bucket in cache.buckets:
            batch: dict = {"a": [], "b": []}
            for item in StreamingDataset(str(cache.folder / "windows" / bucket)):
                for side in batch:
                    batch[side].append(item[side])
                if len(batch["a"]) == batch_size:
                    windows += _collate(batch, storage["latents"])
            windows += _collate(batch, storage["latents"])
        for side in ("a", "b"):  # every text state once, as float32 (not joined to windows, not padded)
            for item in StreamingDataset(str(cache.folder / "texts" / side)):
                for v in item.values():
                    unpack(v, storage["text"])
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    return {"windows": windows, "per_s": windows / elapsed, "per_cpu_s": windows / cpu,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def _collate(batch: dict, dtype: str) -> int:
    """The raw read's batch: each side's latents stacked and decoded to float32 (the bytes are read,
    as for the loader), then the lists emptied; returns the number of windows."""
    import torch

    from soe.data.stream_format import unpack

    n = len(batch["a"])
    for side, tensors in batch.items():
        if tensors:
            unpack(torch.stack(tensors), dtype)
        tensors.clear()
    return n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 50000])
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--scale", type=int, default=1, help="multiply the latents' last axis (the bytes per window) by this")
    p.add_argument("--shard-size", type=int, default=256, help="windows per chunk")
    p.add_argument("--repeats", type=int, default=3, help="fresh processes per mode and size; the median windows/s is printed")
    p.add_argument("--measure", nargs=2, metavar=("FOLDER", "MODE"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.measure:
        print(json.dumps(measure(*args.measure, args.batch_size)))
        return
    from rich.console import Console
    from rich.table import Table

    rows = []
    with tempfile.TemporaryDirectory(prefix="soe-stream-") as tmp:
        for n in args.sizes:
            folder = Path(tmp) / f"cache-{n}"
            write(folder, n, args.scale, args.shard_size)
            runs: dict = {}
            for _ in range(args.repeats):  # the modes alternate, so a burst of load on the machine hits them alike
                for mode in ("loader", "raw-batches", "raw"):
                    out = subprocess.run([sys.executable, __file__, "--measure", str(folder), mode, "--batch-size", str(args.batch_size)],
                                         capture_output=True, text=True, check=True)
                    runs.setdefault(mode, []).append(json.loads(out.stdout.strip().splitlines()[-1]))
            got = {mode: {"per_s": statistics.median(r["per_s"] for r in rs), "per_cpu_s": statistics.median(r["per_cpu_s"] for r in rs),
                          "peak_rss_mb": max(r["peak_rss_mb"] for r in rs)} for mode, rs in runs.items()}
            size = sum(f.stat().st_size for f in folder.rglob("*.bin"))
            rows.append((n, size, got))
    base = rows[0][2]["loader"]["peak_rss_mb"]
    kb = sum(4 * math.prod(shape) for shape in SHAPES.values()) * args.scale / 1024
    t = Table(title=f"streaming latent cache, {kb:.1f} KB windows, {args.shard_size} per chunk, batch {args.batch_size}, one epoch: "
                    f"median of {args.repeats} processes (windows/s), highest peak RSS")
    for c in ("windows", "cache MB", "loader RSS MB", "RSS vs first", "loader win/s", "raw batches win/s", "loader / raw batches",
              "raw read win/s", "loader / raw read", "same, CPU time"):
        t.add_column(c, justify="right")
    for n, size, g in rows:
        lo, rb, raw = g["loader"], g["raw-batches"], g["raw"]
        t.add_row(f"{n:,}", f"{size / 2**20:.1f}", f"{lo['peak_rss_mb']:.0f}", f"{lo['peak_rss_mb'] / base:.3f}", f"{lo['per_s']:.0f}",
                  f"{rb['per_s']:.0f}", f"{lo['per_s'] / rb['per_s']:.2f}", f"{raw['per_s']:.0f}", f"{lo['per_s'] / raw['per_s']:.2f}",
                  f"{lo['per_cpu_s'] / raw['per_cpu_s']:.2f}")
    Console(width=160).print(t)
    u = Table(title="bytes per 5 s UniVerse-1 window (Wan2.1 1.3B 480x832 + ACE-Step v1 25.6 kHz), from the shapes")
    for c in ("captions", "format 1 (f32, padded)", "format 2", "of which latents", "of which text", "ratio"):
        u.add_column(c, justify="right")
    for label, kw in (("80 + 60 tokens, no lyrics, 1 window each", {}),
                      ("80 + 60 tokens, 300 lyric tokens, 1 window each", {"lyric_tokens": 300}),
                      ("80 + 60 tokens, no lyrics, 4 windows each", {"windows_per_caption": 4})):
        b = universe1_window_bytes(**kw)
        u.add_row(label, f"{b['before']:,}", f"{b['after']:,.0f}", f"{b['latents']:,}", f"{b['text']:,.0f}", f"{b['before'] / b['after']:.2f}x")
    Console().print(u)


if __name__ == "__main__":
    main()
