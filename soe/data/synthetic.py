"""Synthetic audio-visual clips where sound and motion are causally tied.

A square bounces on the floor of the frame with a random period and phase while drifting sideways;
every bounce makes a click whose pitch follows the square's horizontal position. Clips are rendered
straight into each expert's latent shape (video ``(C, T, H, W)``; audio: time plus any feature axes),
deterministically from (seed, clip index), so a stitched model can learn when sound follows motion.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from soe.rng import generator_for


@dataclass(frozen=True)
class BounceClip:
    period: float  # seconds between bounces
    phase: float  # time of the first bounce
    x0: float  # horizontal start in [0, 1]
    vx: float  # horizontal speed, frame widths per second (reflects at the walls)

    @classmethod
    def sample(cls, seed: int, index: int) -> "BounceClip":
        g = generator_for(seed, "clip", index)
        u = torch.rand(4, generator=g).tolist()
        period = 0.35 + 0.45 * u[0]
        return cls(period=period, phase=period * u[1], x0=0.15 + 0.7 * u[2], vx=0.6 * (u[3] - 0.5))

    def x(self, t: torch.Tensor) -> torch.Tensor:
        p = (self.x0 + self.vx * t) % 2.0  # reflect between the walls 0 and 1
        return torch.where(p > 1, 2 - p, p)

    def height(self, t: torch.Tensor) -> torch.Tensor:
        """Height above the floor in [0, 1]; zero exactly at a bounce."""
        return torch.sin(math.pi * (t - self.phase) / self.period).abs()

    def bounce_times(self, seconds: float) -> torch.Tensor:
        k = torch.arange(0, math.ceil(seconds / self.period) + 1)
        t = self.phase + k * self.period
        return t[t < seconds]


def _times(n: int, rate: float) -> torch.Tensor:
    return (torch.arange(n, dtype=torch.float32) + 0.5) / rate


def blob_colour(channels: int, device=None) -> torch.Tensor:
    """The square's fixed colour over the video latent channels, ``(C, 1, 1, 1)``."""
    return torch.linspace(1.5, -1.5, channels, device=device).view(channels, 1, 1, 1)


def blob_map(latent: torch.Tensor) -> torch.Tensor:
    """``(C, T, H, W)`` -> ``(T, H, W)``: the latent projected on the blob colour, ~1 on the square and
    0 on the background (the inverse of ``render_video``'s colouring)."""
    mix = blob_colour(latent.shape[0], latent.device)
    return ((latent.float() * mix).sum(0) / (mix**2).sum() + 0.5).clamp(min=0)


def click_features(latent: torch.Tensor, time_axis: int) -> torch.Tensor:
    """An audio latent rendered like ``render_audio`` -> ``(T, F)``: the click bump per latent frame
    (~its loudness at its pitch position, ~0 elsewhere)."""
    x = latent.float().movedim(time_axis, 0)
    return ((x.reshape(x.shape[0], -1) + 0.3) / 2).clamp(min=0)


def render_video(clip: BounceClip, shape: tuple[int, ...], rate: float) -> torch.Tensor:
    """A blob at the square's position in every latent frame: ``(C, T, H, W)``."""
    c, t, h, w = shape
    times = _times(t, rate)
    cx = clip.x(times) * (w - 1)  # (T,)
    cy = (1 - 0.85 * clip.height(times)) * (h - 1)  # floor at the bottom row
    yy = torch.arange(h, dtype=torch.float32)[None, :, None]
    xx = torch.arange(w, dtype=torch.float32)[None, None, :]
    blob = torch.exp(-((yy - cy[:, None, None]) ** 2 + (xx - cx[:, None, None]) ** 2) / (2 * 0.6**2))  # (T, H, W)
    mix = blob_colour(c)  # a fixed colour over latent channels
    return mix * blob[None] - 0.5 * mix  # (C, T, H, W), background -0.5*mix, blob +mix


def render_audio(clip: BounceClip, shape: tuple[int, ...], time_axis: int, rate: float, seconds: float) -> torch.Tensor:
    """Decaying clicks at the bounce times; the click's pitch (feature position) follows x."""
    t = shape[time_axis]
    feat_shape = tuple(s for i, s in enumerate(shape) if i != time_axis)
    n_feat = math.prod(feat_shape)
    times = _times(t, rate)
    env = torch.zeros(t)
    pitch = torch.zeros(t)
    for tb in clip.bounce_times(seconds).tolist():
        after = times >= tb - 0.5 / rate
        e = torch.where(after, torch.exp(-(times - tb).clamp(min=0) / 0.08), torch.zeros_like(times))
        pitch = torch.where(e > env, clip.x(torch.tensor(tb)).expand_as(times), pitch)
        env = torch.maximum(env, e)
    pos = torch.arange(n_feat, dtype=torch.float32)[None, :] / max(n_feat - 1, 1)
    bump = torch.exp(-((pos - pitch[:, None]) ** 2) / (2 * 0.12**2))  # (T, F)
    x = 2.0 * env[:, None] * bump - 0.3  # (T, F)
    x = x.reshape(t, *feat_shape)
    return x.movedim(0, time_axis)


def render_for_expert(expert, clip: BounceClip, seconds: float) -> torch.Tensor:
    """Clean latent ``(...)`` (no batch axis) of this clip at ``expert``'s latent shape."""
    shape = tuple(expert.latent_shape(1, seconds))[1:]
    axis = expert.latent_time_axis - 1
    rate = expert.latent_rate
    if expert.modality == "video":
        if axis != 1 or len(shape) != 4:
            raise ValueError(f"synthetic video needs latents (C, T, H, W); expert '{expert.name}' has {shape} with time axis {axis}")
        return render_video(clip, shape, rate)
    return render_audio(clip, shape, axis, rate, seconds)


# ---- reading events back out of (generated) latents ----------------------------------------------
def video_height_from_latent(latent: torch.Tensor) -> torch.Tensor:
    """Height above the floor per latent frame, read off a ``(C, T, H, W)`` latent rendered (or
    generated) like ``render_video``: project on the blob colour, take the row centre of mass."""
    c, t, h, w = latent.shape
    blob = blob_map(latent)  # (T, H, W), ~1 on the square
    rows = torch.arange(h, dtype=torch.float32).view(1, h, 1)
    cy = (blob * rows).sum((1, 2)) / blob.sum((1, 2)).clamp(min=1e-6)  # (T,)
    return 1 - cy / (h - 1)  # 0 on the floor


def audio_envelope_from_latent(latent: torch.Tensor, time_axis: int) -> torch.Tensor:
    """Click envelope per latent frame of an audio latent rendered like ``render_audio``."""
    return click_features(latent, time_axis).amax(dim=1)


# ---- previews: latents of the synthetic task as watchable video and audible clicks ---------------
class SyntheticPreviewCodec(torch.nn.Module):
    """Decode-only "codec" for the synthetic task: shows what a (generated) latent *means*.

    Video: the square's blob map upsampled to pixels, frames repeated up to ``fps``. Audio: a
    decaying tone per latent frame whose loudness is the click envelope and whose pitch follows the
    click's feature position (as rendered by ``render_audio``). Sync can be judged by eye and ear.
    """

    def __init__(self, expert, fps: float = 25.0, sample_rate: int = 16000, scale: int = 8, gate: float = 0.0):
        super().__init__()
        self.gate = gate  # click loudness below this is silence (true clips: 0 between clicks, a click ~1)
        self.modality, self.expert_rate = expert.modality, expert.latent_rate
        self.time_axis = expert.latent_time_axis - 1  # in an unbatched latent
        self.scale = scale
        self.rate = float(fps) if self.modality == "video" else float(sample_rate)

    def encode(self, media):
        raise NotImplementedError("the synthetic preview codec only decodes")

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return torch.stack([self._video(x) if self.modality == "video" else self._audio(x) for x in latents])

    def _video(self, latent: torch.Tensor) -> torch.Tensor:  # (C, T, H, W) -> (3, F, H*s, W*s)
        t = latent.shape[1]
        blob = blob_map(latent).clamp(max=1)  # (T, H, W)
        frames = max(1, round(t * self.rate / self.expert_rate))
        idx = (torch.arange(frames) * self.expert_rate / self.rate).long().clamp(max=t - 1)
        img = torch.nn.functional.interpolate(blob[idx][:, None], scale_factor=self.scale, mode="nearest")[:, 0]  # (F, H', W')
        return (img * 2 - 1)[None].expand(3, -1, -1, -1)  # grey square on black, in [-1, 1]

    def _audio(self, latent: torch.Tensor) -> torch.Tensor:  # (..T..) -> (1, N)
        feats = click_features(latent, self.time_axis)  # (T, F): the rendered bump, ~0 elsewhere
        t = feats.shape[0]
        env = feats.amax(dim=1)  # (T,)
        if self.gate > 0:  # a generated latent's faint hum, whose pitch hops from frame to frame, is no click
            env = torch.where(env >= self.gate, env, torch.zeros_like(env))
        pitch = feats.argmax(dim=1).float() / max(feats.shape[1] - 1, 1)  # (T,) in [0, 1]
        hop = int(round(self.rate / self.expert_rate))
        # per sample: loudness interpolated between latent frames, pitch held, phase continuous, so a
        # click sounds (and shows in the spectrogram) as one decaying tone, not a buzz of frame edges
        env_s = torch.nn.functional.interpolate(env.clamp(max=1)[None, None], size=t * hop, mode="linear", align_corners=False)[0, 0]
        freq = (300.0 + 900.0 * pitch).repeat_interleave(hop)  # 300-1200 Hz, (T*hop,)
        phase = torch.cumsum(2 * torch.pi * freq / self.rate, dim=0)
        return (0.8 * torch.sin(phase) * env_s)[None].clamp(-1, 1)  # (1, T*hop)
