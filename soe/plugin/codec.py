"""Latent codecs: how an expert's latents turn into pixels or samples and back.

Every expert plugin declares its codec through ``Expert.codec(path=None)``: the family's real
autoencoder from a local folder, or (``path=None``) a tiny random one of the same latent shape for
tests and the demo. Media conventions: video ``(B, 3, F, H, W)`` and audio ``(B, channels, samples)``,
both in [-1, 1].
"""
from __future__ import annotations

import math
from typing import Protocol, runtime_checkable

import torch
from torch import nn


@runtime_checkable
class LatentCodec(Protocol):
    modality: str  # "video" | "audio"
    rate: float  # frames per second (video) or samples per second (audio)

    def encode(self, media: torch.Tensor) -> torch.Tensor: ...

    def decode(self, latents: torch.Tensor) -> torch.Tensor: ...


class FrameAudioCodec(nn.Module):
    """A linear per-frame audio codec: ``hop`` samples of every channel <-> one latent frame.

    Used as the tiny codec of audio experts whose real autoencoder soe does not ship. ``encode``
    is a fixed random projection; ``decode`` its pseudo-inverse, so decode(encode(x)) is the
    projection of x onto the codec's subspace (exact when the latent frame is at least as wide).
    ``frame_shape`` is the latent's per-frame shape and ``time_axis`` where time sits in the
    batched latent (e.g. ACE-Step v1: frame (8, 16), latent (B, 8, 16, T), time_axis 3).
    """

    modality = "audio"

    def __init__(self, sample_rate: int, hop: int, frame_shape: tuple[int, ...], time_axis: int, channels: int = 1, seed: int = 0):
        super().__init__()
        self.rate, self.hop, self.frame_shape, self.time_axis, self.channels = float(sample_rate), hop, tuple(frame_shape), time_axis, channels
        width = math.prod(frame_shape)
        g = torch.Generator().manual_seed(seed)
        proj = torch.randn(hop * channels, width, generator=g) / math.sqrt(hop * channels)
        self.register_buffer("proj", proj)  # (hop*ch, F)
        self.register_buffer("inverse", torch.linalg.pinv(proj))  # (F, hop*ch)

    def encode(self, audio: torch.Tensor) -> torch.Tensor:
        b, ch, n = audio.shape
        audio = audio[:, : self.channels] if ch >= self.channels else audio.expand(b, self.channels, n)
        t = max(1, math.ceil(n / self.hop))  # whole latents covering the clip (zero-padded), like the real codecs
        audio = torch.nn.functional.pad(audio, (0, t * self.hop - n))
        frames = audio.reshape(b, self.channels, t, self.hop).permute(0, 2, 1, 3).reshape(b, t, -1)
        z = frames @ self.proj  # (B, T, F)
        z = z.reshape(b, t, *self.frame_shape)  # (B, T, *frame)
        return z.movedim(1, self.time_axis)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        z = latents.movedim(self.time_axis, 1)
        b, t = z.shape[:2]
        frames = z.reshape(b, t, -1) @ self.inverse  # (B, T, hop*ch)
        return frames.reshape(b, t, self.channels, self.hop).permute(0, 2, 1, 3).reshape(b, self.channels, t * self.hop).clamp(-1, 1)
