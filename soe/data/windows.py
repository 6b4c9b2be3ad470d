"""Cutting clips into training windows, and the media each window needs for each codec.

A window of ``seconds`` becomes, per expert, exactly the latent length the expert expects for that
many seconds (``expert.latent_shape``, rounded up by ``soe.plugin.expert.latent_frames``): for a Wan-style
causal video VAE with temporal stride s that is ``1 + s * (T - 1)`` frames, and the audio spans the
same time as those frames (more only if the audio expert needs more latents). So a UniVerse-1 window
of 5 s is 125 frames at 25 fps -> 32 latent frames, and 128000 samples at 25.6 kHz -> 32 latent
frames (the codec prepends a quarter latent so its first latent lines up with the first frame).
"""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class WindowSpec:
    """What one window length needs: latent lengths per side and media lengths to decode."""

    seconds: float
    video_frames: int
    audio_samples: int
    latent_frames: dict  # side -> latent time length


def latent_length(expert, seconds: float) -> int:
    return expert.latent_shape(1, seconds)[expert.latent_time_axis]


def window_spec(seconds: float, video: tuple, audio: tuple, fps: float, sample_rate: int) -> WindowSpec:
    """``video``/``audio`` = ``(side, expert)``. Media lengths from each expert's latent length."""
    (vs, ve), (as_, ae) = video, audio
    tv, ta = latent_length(ve, seconds), latent_length(ae, seconds)
    stride = getattr(ve, "vae_stride", (1,))[0]  # causal VAE: first frame alone, then `stride` frames per latent
    frames = 1 + stride * (tv - 1) if stride > 1 else tv
    hop = sample_rate / ae.latent_rate
    samples = int(round(frames / fps * sample_rate))  # the time the video frames span
    if math.ceil(round(samples / hop, 6)) < ta:
        samples = max(int(round(seconds * sample_rate)), math.ceil(ta * hop))
    return WindowSpec(float(seconds), frames, samples, {vs: tv, as_: ta})


def window_specs(durations, video: tuple, audio: tuple, fps: float, sample_rate: int) -> list[WindowSpec]:
    """One spec per distinct window length, longest first (the order ``plan_windows`` tries them in)."""
    return [window_spec(d, video, audio, fps, sample_rate) for d in sorted({float(d) for d in durations}, reverse=True)]


def plan_record(specs: list[WindowSpec], fps: float, sample_rate: int) -> dict:
    """All that decides where ``plan_windows`` cuts a clip: two commands cut alike when these are equal."""
    return {"fps": float(fps), "sample_rate": int(sample_rate), "windows": [[s.seconds, s.video_frames, s.audio_samples] for s in specs]}


def plan_windows(clip_seconds: float, specs: list[WindowSpec], fps: float, sample_rate: int) -> list[tuple[float, WindowSpec]]:
    """Consecutive, non-overlapping windows from the clip's start: at each position the longest
    window length that still fits (``specs`` longest first). Empty if not even the shortest fits."""
    def fits(start, spec):
        need = max(spec.video_frames / fps, spec.audio_samples / sample_rate)
        return start + need <= clip_seconds + 1e-3

    out, t = [], 0.0
    while True:
        spec = next((s for s in specs if fits(t, s)), None)
        if spec is None:
            return out
        out.append((round(t, 6), spec))
        t += spec.seconds


def bucket_name(seconds: float, size: tuple[int, int]) -> str:
    """Duration and resolution bucket: the data module batches within one (``5s@480x832``)."""
    return f"{seconds:g}s@{size[0]}x{size[1]}"


def nearest_resolution(width: int, height: int, resolutions: list[tuple[int, int]]) -> tuple[int, int]:
    """The ``(H, W)`` bucket whose aspect ratio is closest (in log ratio) to the clip's."""
    aspect = math.log(width / height)
    return min(resolutions, key=lambda hw: abs(math.log(hw[1] / hw[0]) - aspect))
