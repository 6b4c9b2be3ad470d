"""Context parallel on CPU: one forward + backward of a two-way stitch, the video expert's tokens whole on each
rank (context 1) vs split across 2 gloo ranks (context 2), at growing sequence lengths.

Per rank and per length, side by side in the same two processes (both ranks run context 1 at the same time, so the
two cores are as busy as under context 2):

* activations of the split expert kept for backward (MiB): the bytes of every tensor but a parameter that autograd
  saves while the video expert's blocks run (``torch.autograd.graph.saved_tensors_hooks``, each storage counted once) -- the memory that
  context parallel divides; target: context 2 <= 0.6x context 1;
* peak private memory above the state before the step (``RssAnon``, sampled every millisecond): all of it, the
  replicated audio side, the all-to-all buffers and the allocator's slack included;
* wall seconds of the step, context 2 over context 1 (median of ``--repeats`` alternated steps; the box is shared).

Also printed: the bytes each rank sends per step (counted from the shapes: Ulysses' all-to-alls of q, k, v and the
attention output per block and direction of the pass, the gather of the output, the all-reduce of each pooled connector
input), the number that sets the scaling on GPUs (docs/context_parallel.md).

    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/context_parallel.py [--frames 4 8 16 --size 32 --width 256]
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import socket
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parents[1]))  # run as `python benchmarks/x.py` from a checkout
sys.path.insert(0, str(Path(__file__).parent))


def build(args, seed=0):
    from soe import Stitcher, get_expert

    torch.manual_seed(seed)
    heads = args.width // 64
    video = get_expert("wan2.1").from_preset("tiny", num_attention_heads=heads, attention_head_dim=64, ffn_dim=4 * args.width,
                                             num_layers=args.layers, height=args.size * 8, width=args.size * 8, fps=25.0).train()
    audio = get_expert("ace-step-1.5").tiny(1).train()
    torch.manual_seed(seed + 1)
    return Stitcher(video, audio, pairs="linear", direction="both", connector={"init": "trunc_normal"})


class SavedBytes:
    """Bytes autograd saves while the video expert's blocks run (each storage once)."""

    def __init__(self, stitcher):
        self.inside, self.bytes = False, 0
        self.seen = {p.untyped_storage().data_ptr() for p in stitcher.parameters()}  # weights are not activations
        for block in stitcher.a.blocks:
            block.register_forward_pre_hook(lambda *a: setattr(self, "inside", True))
            block.register_forward_hook(lambda *a: setattr(self, "inside", False))

    def pack(self, t):
        if self.inside and isinstance(t, torch.Tensor):
            s = t.untyped_storage()
            if s.data_ptr() not in self.seen:
                self.seen.add(s.data_ptr())
                self.bytes += s.nbytes()
        return t


def step(stitcher, frames, seed=0):
    """One forward + backward; returns (seconds, MiB saved in the video blocks, MiB peak private memory above the start)."""
    from fsdp_host_memory import PeakPrivate, status_mb

    from soe.stitch.context_parallel import scale_split_gradients

    g = torch.Generator().manual_seed(seed)
    seconds = frames / stitcher.a.latent_rate
    ba, bb = stitcher.a.dummy_batch(1, seconds, g), stitcher.b.dummy_batch(1, seconds, g)
    stitcher.zero_grad(set_to_none=True)
    saved = SavedBytes(stitcher)
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap pages back, so the peak counts what this step allocates
    base = status_mb("RssAnon")
    peak = PeakPrivate()
    t = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t):
        preds = scale_split_gradients(stitcher, dict(zip("ab", stitcher(ba, bb))))
    sum((p.float() ** 2).mean() for p in preds.values()).backward()
    secs = time.perf_counter() - t
    return secs, saved.bytes / 2**20, peak.stop() - base


def sent_bytes(stitcher, frames: int, size: int, cp: int) -> dict[str, float]:
    """MiB one rank sends per forward + backward under context ``cp`` (counted from the shapes, float32)."""
    a = stitcher.a
    n = frames * (size // 2) ** 2  # video tokens
    d, blocks = a.hidden_size, a.num_blocks
    ulysses = 4 * (n // cp) * d * 4 * (cp - 1) / cp  # q, k, v out and the attention output back, each (n/cp, d), (cp-1)/cp leaves
    per_pass = blocks * ulysses
    gather = n * a.model.config.out_channels * 4 * 4 * (cp - 1) / cp  # proj_out output (n, C x patch 2x2)
    steps = frames  # one pooled vector per latent frame per connector
    pooled = len(stitcher.pairs) * steps * d * 4 * 2 * (cp - 1) / cp  # ring all-reduce: 2 (cp-1)/cp of the vector
    fwd = per_pass + gather + pooled
    return {"ulysses": 2 * per_pass / 2**20, "gather": 2 * gather / 2**20, "pooled": 2 * pooled / 2**20, "total": 2 * fwd / 2**20}


def worker(rank: int, port: str, args, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    from soe.stitch.context_parallel import split_stitcher, world_mesh

    whole, split = build(args), build(args)
    split_stitcher(split, world_mesh(2))
    rows = []
    for frames in args.frames:
        step(whole, frames), step(split, frames)  # warm-up
        runs = [(step(whole, frames), step(split, frames)) for _ in range(args.repeats)]  # alternated
        one, two = runs[0]
        ratio = statistics.median(b[0] / a[0] for a, b in runs)
        rows.append((frames, one, two, ratio, sent_bytes(split, frames, args.size, 2)))
        dist.barrier()
    Path(f"{out}.{rank}").write_text(json.dumps(rows))
    dist.destroy_process_group()


def main() -> None:
    import tempfile

    import torch.multiprocessing as mp

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--frames", type=int, nargs="+", default=[4, 8, 16], help="latent frames (sequence = frames x (size/2)^2)")
    p.add_argument("--size", type=int, default=32, help="latent height = width (tokens per frame: (size/2)^2)")
    p.add_argument("--width", type=int, default=256, help="video hidden width (64 per head)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3, help="steps per mode, alternated; the time ratio is their median")
    args = p.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(worker, args=(port, args, f"{tmp}/rows"), nprocs=2)
        ranks = [json.loads(Path(f"{tmp}/rows.{r}").read_text()) for r in range(2)]
    print(f"video: width {args.width}, {args.layers} blocks, {(args.size // 2) ** 2} tokens per latent frame; audio: ace-step-1.5 tiny; "
          f"2 gloo ranks, 1 thread each, float32")
    print("| tokens | rank | saved in video blocks, cp1 -> cp2 (MiB) | ratio | peak private above start, cp1 -> cp2 (MiB) | ratio "
          "| step s, cp2 / cp1 | sent per rank per step (MiB) |")
    print("|---:|---:|---|---:|---|---:|---:|---:|")
    for r, rows in enumerate(ranks):
        for frames, one, two, ratio, sent in rows:
            tokens = frames * (args.size // 2) ** 2
            print(f"| {tokens} | {r} | {one[1]:.0f} -> {two[1]:.0f} | {two[1] / one[1]:.2f} | {one[2]:.0f} -> {two[2]:.0f} | "
                  f"{two[2] / max(one[2], 1e-9):.2f} | {ratio:.2f} | {sent['total']:.1f} |")


if __name__ == "__main__":
    main()
