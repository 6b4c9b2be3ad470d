"""Seeded random streams. Every random draw soe makes (noise, timesteps, tasks, batches, shuffles, synthetic
clips) comes from a generator seeded by ``(seed, labels...)``, so what is drawn depends on what it is for, never
on how many draws came before: batch k is a function of (seed, k, rank), a resumed run draws exactly what an
uninterrupted one would, and audio and video noise are never correlated. Written here (a blake2b hash of the
labels): no library offers label-addressed streams.
"""
from __future__ import annotations

import hashlib

import torch


def stream_seed(seed: int, *parts) -> int:
    """A 63-bit seed derived from ``seed`` and any labels (modality, step, rank): independent streams."""
    h = hashlib.blake2b(repr((int(seed), *parts)).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


def generator_for(seed: int, *parts, device="cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(stream_seed(seed, *parts))

