"""Shared plumbing of the benchmarks: the expert pairs, device/dtype selection and timers.

Every benchmark runs on CPU by default (float32, wall clock) and on a GPU with ``--device cuda``
(bfloat16, CUDA events). Numbers are printed as ratios measured side by side in one process; no
benchmark passes or fails on time.
"""
from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[1]))  # run as `python benchmarks/x.py` from a checkout

from soe import get_expert  # noqa: E402

# Mid size: hidden 384, 8 video blocks / 6 audio blocks, 1728 video tokens vs 12 audio tokens per clip.
SIZES = {
    "tiny": dict(
        video=dict(preset="tiny", overrides={}),
        audio=dict(preset="tiny", overrides={"sample_rate": 25600}),
        seconds=1.0,
    ),
    "mid": dict(
        video=dict(preset="tiny", overrides=dict(num_attention_heads=4, attention_head_dim=96, ffn_dim=1536, num_layers=8,
                                                 in_channels=16, out_channels=16, text_dim=256, freq_dim=256,
                                                 height=192, width=192, text_len=32)),
        audio=dict(preset="tiny", overrides=dict(num_layers=6, inner_dim=384, num_attention_heads=4, attention_head_dim=96,
                                                 sample_rate=25600)),
        seconds=2.0,
    ),
    # UniVerse-1's experts at their real size: Wan2.1-T2V-1.3B at 480x832 / 25 fps, ACE-Step v1 3.5B at 25.6 kHz, 5 s.
    "full": dict(
        video=dict(preset="1.3b", overrides=dict(fps=25, height=480, width=832)),
        audio=dict(preset="3.5b", overrides=dict(sample_rate=25600)),
        seconds=5.0,
    ),
}
VIDEO, AUDIO = "wan2.1", "ace-step"  # the UniVerse-1 pair at reduced size


def device_and_dtype(name: str) -> tuple[torch.device, torch.dtype]:
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but no CUDA device is visible")
    return dev, (torch.bfloat16 if dev.type == "cuda" else torch.float32)


def build_pair(size: str, device, dtype, seed: int = 0, checkpointing: bool = False):
    """The two experts of ``size`` on ``device`` in ``dtype`` (random weights, train mode)."""
    spec = SIZES[size]
    torch.manual_seed(seed)
    experts = []
    for name, key in ((VIDEO, "video"), (AUDIO, "audio")):
        cls = get_expert(name)
        e = cls.from_preset(spec[key]["preset"], device=device, dtype=dtype, **spec[key]["overrides"])
        e.set_gradient_checkpointing(checkpointing)
        experts.append(e.train())
    return experts


def batches(a, b, batch_size: int, seconds: float, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ba, bb = a.dummy_batch(batch_size, seconds, g), b.dummy_batch(batch_size, seconds, g)
    cast = lambda batch, e: {k: (v.to(e.device, e.dtype) if v.is_floating_point() else v.to(e.device)) for k, v in batch.items()}
    return cast(ba, a), cast(bb, b)


class Timer:
    """Seconds of ``fn()``: wall clock on CPU, CUDA events on a GPU."""

    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"

    def __call__(self, fn) -> float:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / 1e3
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t


def interleaved(variants: dict, timer: Timer, reps: int, warmup: int = 1) -> dict[str, float]:
    """Median seconds per variant, the variants taking turns so drift in machine load hits all alike."""
    for fn in variants.values():
        for _ in range(warmup):
            fn()
    times = {k: [] for k in variants}
    for r in range(reps):
        order = list(variants) if r % 2 == 0 else list(reversed(variants))
        for k in order:
            times[k].append(timer(variants[k]))
    return {k: statistics.median(v) for k, v in times.items()}


def peak_memory_reset(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def fmt_bytes(n: float) -> str:
    for unit in ("TB", "GB", "MB", "KB"):
        size = {"TB": 1e12, "GB": 1e9, "MB": 1e6, "KB": 1e3}[unit]
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"
