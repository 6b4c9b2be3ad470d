"""Stitching overhead: forward+backward of the stitched pair / the two experts alone, same batch.

    python benchmarks/stitch_overhead.py                      # CPU, float32, tiny + mid size
    python benchmarks/stitch_overhead.py --device cuda        # GPU, bfloat16, CUDA events
    python benchmarks/stitch_overhead.py --sizes mid --reps 9 --profile

"alone" runs each expert's own native forward and backward, one after the other; "hooks" is the
one-way engine (video -> audio, capture + injection hooks on the native forwards); "lockstep" the
two-way engine (split forwards side by side, both directions). Expert weights train in all three so
backward does the same work; the stitched runs add connectors. Variants take turns; medians are
reported. ``--profile`` shows where the extra time goes (connectors, time alignment, hooks).
"""
from __future__ import annotations

import argparse
import functools

import _common as C
import torch
from rich.console import Console
from rich.table import Table
from torch.profiler import ProfilerActivity, profile, record_function

import soe.stitch.connector as connector_mod
from soe.stitch.stitcher import Stitcher

ENGINES = {"hooks": "a_to_b", "lockstep": "both"}


def step_alone(a, b, ba, bb):
    def run():
        for e, batch in ((a, ba), (b, bb)):
            e(batch).float().square().mean().backward()
    return run


def step_stitched(st, ba, bb):
    def run():
        pa, pb = st(ba, bb)
        (pa.float().square().mean() + pb.float().square().mean()).backward()
    return run


def zero_grads(*modules):
    for m in modules:
        m.zero_grad(set_to_none=True)


def measure(size: str, device, dtype, batch_size: int, reps: int, checkpointing: bool = False) -> dict:
    a, b = C.build_pair(size, device, dtype, checkpointing=checkpointing)
    ba, bb = C.batches(a, b, batch_size, C.SIZES[size]["seconds"])
    stitchers = {name: Stitcher(a, b, pairs="linear", direction=d, device=device, dtype=dtype) for name, d in ENGINES.items()}
    for st in stitchers.values():
        st.unstitch()  # hooks stay off while other variants run; re-installed around each stitched call

    def with_hooks(st, fn):
        def run():
            st.restitch()
            try:
                fn()
            finally:
                st.unstitch()
        return run

    variants = {"alone": step_alone(a, b, ba, bb)}
    for name, st in stitchers.items():
        variants[name] = with_hooks(st, step_stitched(st, ba, bb))
    timer = C.Timer(device)
    med = C.interleaved({k: (lambda f=f: (zero_grads(a, b, *stitchers.values()), f())) for k, f in variants.items()}, timer, reps)
    flops = None
    if torch.device(device).type == "cuda":  # FLOPs of one stitched step (lockstep), for the MFU
        from torch.utils.flop_counter import FlopCounterMode

        zero_grads(a, b, *stitchers.values())  # the timed runs' gradients would sit beside this run's (OOM at full size)
        torch.cuda.empty_cache()
        counter = FlopCounterMode(display=False)
        with counter:
            variants["lockstep"]()
        zero_grads(a, b, *stitchers.values())
        flops = counter.get_total_flops()
    la, lb = a.token_layout(ba), b.token_layout(bb)
    conn = sum(p.numel() for p in stitchers["lockstep"].connectors.parameters())
    return dict(size=size, med=med, flops=flops, tokens=(la.num_tokens, lb.num_tokens), hidden=(a.hidden_size, b.hidden_size),
                blocks=(a.num_blocks, b.num_blocks), pairs=len(stitchers["lockstep"].pairs), connector_params=conn,
                experts=(a, b), batches=(ba, bb), stitchers=stitchers, with_hooks=with_hooks)


# ---- where the time goes ---------------------------------------------------------------------------
LABELS = {"connector (all)": None, "align.pool_time_steps": "pool_time_steps", "align.resample_time": "resample_time",
          "align.broadcast_to_grid": "broadcast_to_grid"}


def _labelled(fn, label):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with record_function(label):
            return fn(*args, **kwargs)
    return wrapper


def profile_breakdown(r: dict, engine: str, device, steps: int = 3) -> list[tuple[str, float]]:
    """Forward CPU-side time inside labelled regions (ms per step) and the hooks' own share."""
    saved = {n: getattr(connector_mod, n) for n in ("pool_time_steps", "resample_time", "broadcast_to_grid")}
    saved_fwd = connector_mod.Connector.forward
    try:
        for label, name in LABELS.items():
            if name:
                setattr(connector_mod, name, _labelled(saved[name], label))
        connector_mod.Connector.forward = _labelled(saved_fwd, "connector (all)")
        st, (ba, bb) = r["stitchers"][engine], r["batches"]
        run = r["with_hooks"](st, step_stitched(st, ba, bb))
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.device(device).type == "cuda" else [])
        with profile(activities=acts) as prof:
            for _ in range(steps):
                with record_function("step (fwd+bwd)"):
                    run()
    finally:
        for n, fn in saved.items():
            setattr(connector_mod, n, fn)
        connector_mod.Connector.forward = saved_fwd
    events = {e.key: e for e in prof.key_averages()}
    cuda = torch.device(device).type == "cuda"
    total = lambda e: (getattr(e, "device_time_total", 0) if cuda else e.cpu_time_total) / 1e3 / steps  # ms per step
    rows = [(k, total(events[k])) for k in ("step (fwd+bwd)", *LABELS) if k in events]
    hook_ms = sum(total(e) for k, e in events.items() if "hook" in k.lower())
    if hook_ms:
        rows.append(("hooks (torch dispatch)", hook_ms))
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--sizes", nargs="+", default=["tiny", "mid"], choices=list(C.SIZES))
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--profile", action="store_true", help="torch.profiler breakdown of the stitched step (mid size)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--checkpointing", action="store_true", help="gradient checkpointing in both experts (full size)")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak for the MFU (H100/H200 SXM datasheet)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = C.device_and_dtype(args.device)
    console = Console(width=180)  # tables stay readable when piped
    table = Table(title=f"stitch overhead: fwd+bwd, {device.type}, {str(dtype).replace('torch.', '')}, batch {args.batch_size}, "
                        f"median of {args.reps} interleaved reps")
    for col in ("size", "hidden v/a", "blocks v/a", "tokens v/a", "pairs", "connector params", "alone ms", "hooks ms", "lockstep ms",
                "hooks / alone", "lockstep / alone"):
        table.add_column(col, justify="right")
    results = []
    for size in args.sizes:
        r = measure(size, device, dtype, args.batch_size, args.reps, args.checkpointing)
        m = r["med"]
        results.append(r)
        table.add_row(size, "%d/%d" % r["hidden"], "%d/%d" % r["blocks"], "%d/%d" % r["tokens"], str(r["pairs"]),
                      f"{r['connector_params'] / 1e6:.2f}M", f"{m['alone'] * 1e3:.1f}", f"{m['hooks'] * 1e3:.1f}",
                      f"{m['lockstep'] * 1e3:.1f}", f"{m['hooks'] / m['alone']:.3f}", f"{m['lockstep'] / m['alone']:.3f}")
    console.print(table)
    if args.profile:
        r = results[-1]
        for engine in ENGINES:
            rows = profile_breakdown(r, engine, device)
            t = Table(title=f"where the time goes: {r['size']}, engine {engine} (profiler, ms per step, forward regions)")
            t.add_column("region")
            t.add_column("ms / step", justify="right")
            t.add_column("% of step", justify="right")
            step_ms = rows[0][1] if rows else 1.0
            for k, v in rows:
                t.add_row(k, f"{v:.2f}", f"{100 * v / step_ms:.1f}")
            console.print(t)
    for r in results:
        if r["flops"]:
            t = r["med"]["lockstep"]
            console.print(f"{r['size']}: stitched step {r['flops'] / 1e12:.1f} TFLOP in {t:.2f} s = {r['flops'] / t / 1e12:.0f} TFLOP/s, "
                          f"MFU {100 * r['flops'] / t / (args.peak_tflops * 1e12):.1f}% of {args.peak_tflops:g} TFLOP/s")
    last = results[-1]["med"]
    console.print(f"ratio ({results[-1]['size']}, {device.type}): hooks {last['hooks'] / last['alone']:.3f}, "
                  f"lockstep {last['lockstep'] / last['alone']:.3f}  (target <= 1.05)")


if __name__ == "__main__":
    main()
