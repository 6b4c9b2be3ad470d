"""What Synchformer sees of a clip, as av-benchmark prepares it for DeSync, in torch (no torchvision/torchaudio).

* video: resampled to 25 fps by ffmpeg's ``fps`` filter rule (output frame ``n`` shows the last input frame whose
  timestamp, rounded to the 1/25 s grid, is <= n), the first ``floor(25 * seconds)`` frames kept; each frame's
  shorter side resized to 224 (bicubic, antialiased, by torch's uint8 kernel, as torchvision's ``v2.Resize`` does
  with uint8 input; longer side ``int(224 * long / short)``), centre-cropped to 224, scaled to [0, 1] and
  normalised with mean 0.5, std 0.5; segments of 16 frames every 8 frames;
* audio: mono at 16 kHz, the first ``floor(16000 * seconds)`` samples; segments of 10,240 samples every 5,120
  (0.64 s every 0.32 s, aligned with the video's); per segment a power mel spectrogram (n_fft 1024, Hann window
  of 400 padded to 1024, hop 160, centred with reflection, 128 HTK mel bands 0-8 kHz without normalisation: torchaudio's
  ``MelSpectrogram`` defaults), ``log(x + 1e-6)``, zero-padded from 65 to 66 frames, then ``(x + 4.2677393) / (2 * 4.5689974)``.

Hand-written: all of it (a few lines each), so that no torchvision/torchaudio build is needed; the mel filter bank
is checked against librosa's HTK bank in the tests.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

FPS = 25.0
SAMPLE_RATE = 16_000
SIZE = 224
SEG_FRAMES, STEP_FRAMES = 16, 8
SEG_SAMPLES, STEP_SAMPLES = 10_240, 5_120
N_FFT, WIN, HOP, N_MELS = 1024, 400, 160, 128
MEL_FRAMES = 66
MEAN, STD = -4.2677393, 4.5689974


def num_segments(length: int, size: int, step: int) -> int:
    """``(length - size) // step + 1`` segments (0 when shorter than one)."""
    return 0 if length < size else (length - size) // step + 1


def segment(x: torch.Tensor, size: int, step: int) -> torch.Tensor:
    """``(T, ...)`` -> ``(S, size, ...)``: windows ``x[i*step : i*step + size]``."""
    n = num_segments(x.shape[0], size, step)
    return torch.stack([x[i * step: i * step + size] for i in range(n)])


def resample_indices(n_frames: int, fps: float, out_fps: float = FPS) -> np.ndarray:
    """Input frame index of each output frame under ffmpeg's ``fps`` filter (round to nearest, ties away from 0)."""
    pts = np.floor(np.arange(n_frames) * out_fps / fps + 0.5).astype(np.int64)  # each input frame on the output grid
    n_out = int(math.floor(n_frames * out_fps / fps + 0.5))
    out = np.searchsorted(pts, np.arange(pts[0], pts[0] + n_out), side="right") - 1  # last frame with pts <= n
    return out


def resize_crop(frames: np.ndarray, size: int = SIZE) -> torch.Tensor:
    """``(T, H, W, 3)`` uint8 -> ``(T, 3, size, size)`` float in [-1, 1]."""
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2)  # (T, 3, H, W) uint8
    h, w = x.shape[-2:]
    short, long = min(h, w), max(h, w)
    new = (size, int(size * long / short)) if h <= w else (int(size * long / short), size)
    top, left = int(round((new[0] - size) / 2.0)), int(round((new[1] - size) / 2.0))
    out = []
    for chunk in x.split(16):  # bounded memory for long clips at 480p+
        if (h, w) != new:  # torch's uint8 kernel (what torchvision's v2.Resize runs on uint8 frames), not float + round
            chunk = F.interpolate(chunk.contiguous(), size=new, mode="bicubic", align_corners=False, antialias=True)
        out.append((chunk[..., top: top + size, left: left + size].float() / 255.0 - 0.5) / 0.5)
    return torch.cat(out)


def mel_filters(n_freqs: int = N_FFT // 2 + 1, n_mels: int = N_MELS, sample_rate: int = SAMPLE_RATE) -> torch.Tensor:
    """``(n_freqs, n_mels)`` triangular HTK mel filters from 0 Hz to Nyquist, unnormalised."""
    hz_to_mel = lambda f: 2595.0 * math.log10(1.0 + f / 700.0)
    freqs = torch.linspace(0, sample_rate // 2, n_freqs)
    mels = torch.linspace(hz_to_mel(0.0), hz_to_mel(sample_rate / 2), n_mels + 2)
    f_pts = 700.0 * (10 ** (mels / 2595.0) - 1.0)
    diff = f_pts[1:] - f_pts[:-1]
    slopes = f_pts.unsqueeze(0) - freqs.unsqueeze(1)  # (n_freqs, n_mels + 2)
    down, up = -slopes[:, :-2] / diff[:-1], slopes[:, 2:] / diff[1:]
    return torch.clamp(torch.minimum(down, up), min=0.0)


def log_mels(segments: torch.Tensor) -> torch.Tensor:
    """``(S, 10240)`` waveforms -> ``(S, 128, 66)`` normalised log-mel spectrograms."""
    window = torch.hann_window(WIN, dtype=segments.dtype)
    spec = torch.stft(segments, N_FFT, HOP, WIN, window, center=True, pad_mode="reflect", return_complex=True)
    power = spec.abs() ** 2  # (S, 513, 65)
    mel = (power.transpose(1, 2) @ mel_filters().to(power.dtype)).transpose(1, 2)  # (S, 128, 65)
    x = torch.log(mel + 1e-6)
    x = F.pad(x, (0, MEL_FRAMES - x.shape[-1])) if x.shape[-1] < MEL_FRAMES else x[..., :MEL_FRAMES]
    return (x - MEAN) / (2 * STD)


def video_segments(frames: np.ndarray, fps: float, seconds: float, size: int = SIZE) -> torch.Tensor:
    """``(S, 16, 3, size, size)`` of a clip's first ``seconds`` at 25 fps."""
    idx = resample_indices(len(frames), fps)[: int(FPS * seconds)]
    return segment(resize_crop(frames[idx], size), SEG_FRAMES, STEP_FRAMES)


def audio_segments(mono_16k: np.ndarray, seconds: float) -> torch.Tensor:
    """``(S, 128, 66)`` log-mels of the first ``seconds`` of a 16 kHz mono track."""
    x = torch.from_numpy(np.asarray(mono_16k, dtype=np.float32)[: int(SAMPLE_RATE * seconds)])
    return log_mels(segment(x, SEG_SAMPLES, STEP_SAMPLES))
