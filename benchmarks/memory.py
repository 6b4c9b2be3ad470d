"""Memory: peak of one training step, stitched vs the two experts alone; universe1's trainable share.

    python benchmarks/memory.py                    # CPU: peak RSS of a step, each variant in its own process
    python benchmarks/memory.py --device cuda      # GPU: torch.cuda.max_memory_allocated, bfloat16
    python benchmarks/memory.py --skip-step        # only the universe1 table (meta device, seconds)

Training step = forward, backward and an AdamW step with LoRA (r=8) on both experts plus the
connectors (stitched). "alone" runs both experts on the same batch with one summed loss and one
backward, so both graphs are alive together exactly as in the stitched step. The universe1 table is
built on the meta device at full size: no weights are allocated.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import _common as C
import torch
from rich.console import Console
from rich.table import Table

from soe.lora.adapters import set_trainable
from soe.schema import LoraConfig
from soe.stitch.stitcher import Stitcher

UNIVERSE1 = Path(__file__).parents[1] / "recipes" / "universe1.yaml"


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def train_step(variant: str, size: str, device, dtype, batch_size: int, checkpointing: bool = False) -> dict:
    a, b = C.build_pair(size, device, dtype, checkpointing=checkpointing)
    for e in (a, b):
        set_trainable(e, "lora", LoraConfig(r=8, alpha=8))
    st = Stitcher(a, b, pairs="linear", direction="both", device=device, dtype=dtype) if variant == "stitched" else None
    ba, bb = C.batches(a, b, batch_size, C.SIZES[size]["seconds"])
    params = [p for m in (a, b, *( [st.connectors] if st else [])) for p in m.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    cuda = torch.device(device).type == "cuda"
    C.peak_memory_reset(device)
    before = torch.cuda.memory_allocated() if cuda else _rss_bytes()
    pa, pb = st(ba, bb) if st else (a(ba), b(bb))
    (pa.float().square().mean() + pb.float().square().mean()).backward()
    opt.step()
    if cuda:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux
    return {"peak_over_start": peak - before, "trainable": sum(p.numel() for p in params)}


def measure_step(variant: str, args) -> dict:
    if args.device.startswith("cuda"):  # one process, peak stats reset between variants
        device, dtype = C.device_and_dtype(args.device)
        return train_step(variant, args.size, device, dtype, args.batch_size, args.checkpointing)
    # CPU: ru_maxrss never goes down, so every variant gets a fresh process
    cmd = [sys.executable, __file__, "--_child", variant, "--size", args.size, "--batch-size", str(args.batch_size)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


# ---- universe1 at full size on the meta device --------------------------------------------------------
def universe1_counts(overrides=()) -> dict:
    from soe.recipe.builders import build_stitcher
    from soe.recipe.reading import load_recipe
    from soe.train.build import apply_training_setup

    cfg = load_recipe(UNIVERSE1, list(overrides))
    with torch.device("meta"):
        st = build_stitcher(cfg, device="meta", load_weights=False)
        apply_training_setup(st, cfg)
    rows = {}
    for side in ("a", "b"):
        e = getattr(st, side)
        frozen = [p for p in e.parameters() if not p.requires_grad]
        lora = [p for p in e.parameters() if p.requires_grad]
        rows[f"{side}:{e.name}"] = dict(frozen=sum(p.numel() for p in frozen), frozen_bytes=sum(p.numel() * p.element_size() for p in frozen),
                                        trainable=sum(p.numel() for p in lora), trainable_bytes=sum(p.numel() * p.element_size() for p in lora))
    stitch = {"connectors": list(st.connectors.parameters())}
    if st.fusion is not None:  # UniVerse-1's inserted blocks and new key/value projections train too
        stitch["fusion"] = list(st.fusion.parameters())
    for name, params in stitch.items():
        rows[name] = dict(frozen=0, frozen_bytes=0, trainable=sum(p.numel() for p in params),
                          trainable_bytes=sum(p.numel() * p.element_size() for p in params))
    return rows


def universe1_table(console: Console) -> float:
    rows = universe1_counts()
    t = Table(title="universe1 at full size (meta device): what trains and what a checkpoint holds")
    for col in ("part", "frozen params", "frozen bytes", "trainable params", "trainable bytes", "in last.ckpt (+ AdamW)"):
        t.add_column(col, justify="right" if col != "part" else "left")
    tot = {k: sum(r[k] for r in rows.values()) for k in ("frozen", "frozen_bytes", "trainable", "trainable_bytes")}
    for name, r in [*rows.items(), ("total", tot)]:
        ckpt = r["trainable_bytes"] + 8 * r["trainable"]  # two float32 AdamW moments per trainable parameter
        t.add_row(name, f"{r['frozen'] / 1e9:.3f}B", C.fmt_bytes(r["frozen_bytes"]), f"{r['trainable'] / 1e6:.1f}M",
                  C.fmt_bytes(r["trainable_bytes"]), C.fmt_bytes(ckpt))
    console.print(t)
    share = tot["trainable"] / (tot["frozen"] + tot["trainable"])
    fused = rows.get("fusion", {}).get("trainable", 0)
    console.print(f"universe1: {tot['trainable'] / 1e6:.1f}M trainable (connectors {rows['connectors']['trainable'] / 1e6:.1f}M + "
                  f"fusion {fused / 1e6:.1f}M + LoRA) "
                  f"vs {tot['frozen'] / 1e9:.2f}B frozen = {100 * share:.2f}% trains; export (trained/) "
                  f"{C.fmt_bytes(tot['trainable_bytes'])}, last.ckpt ~{C.fmt_bytes(tot['trainable_bytes'] + 8 * tot['trainable'])}, "
                  f"vs {C.fmt_bytes(tot['frozen_bytes'])} of frozen weights never written")
    return share


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--size", default="mid", choices=list(C.SIZES))
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--skip-step", action="store_true", help="only the universe1 meta-device table")
    p.add_argument("--checkpointing", action="store_true", help="gradient checkpointing in both experts (full size)")
    p.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._child:
        print(json.dumps(train_step(args._child, args.size, torch.device("cpu"), torch.float32, args.batch_size)))
        return
    console = Console(width=180)  # tables stay readable when piped
    universe1_table(console)
    if args.skip_step:
        return
    res = {v: measure_step(v, args) for v in ("alone", "stitched")}
    how = "torch.cuda.max_memory_allocated" if args.device.startswith("cuda") else "peak RSS (ru_maxrss), fresh process each"
    t = Table(title=f"peak memory of one training step ({args.size}, batch {args.batch_size}, {args.device}; {how}; above the built models)")
    for col in ("variant", "trainable params", "peak over start"):
        t.add_column(col, justify="right")
    for v, r in res.items():
        t.add_row(v, f"{r['trainable'] / 1e6:.2f}M", C.fmt_bytes(r["peak_over_start"]))
    console.print(t)
    console.print(f"ratio: stitched / alone peak step memory = {res['stitched']['peak_over_start'] / res['alone']['peak_over_start']:.3f}")


if __name__ == "__main__":
    main()
