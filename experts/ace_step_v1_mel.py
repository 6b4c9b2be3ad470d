"""The log-mel front end of ACE-Step v1's music codec, in plain torch (no torchaudio).

What the vocoder checkpoint stores and the codec computes: a periodic Hann window of ``win_length``,
reflect padding of ``(win - hop) / 2`` samples on each side, ``torch.stft`` with ``center=False``,
magnitude ``sqrt(re^2 + im^2 + 1e-6)``, a slaney-scale, slaney-normalised mel filterbank, then
``log(max(x, 1e-5))``. Module and buffer names follow the checkpoint (``spectrogram.window``,
``mel_scale.fb``) so the stored buffers load strictly and are the ones used.
"""
from __future__ import annotations

import math

import torch
from torch import nn

MAGNITUDE_EPS = 1e-6  # added to re^2 + im^2 before the square root
LOG_FLOOR = 1e-5  # magnitudes are clamped here before the log

# Slaney's mel scale: linear below 1 kHz (200/3 Hz per mel), logarithmic above (27 mels per factor 6.4).
_F_SP, _MIN_LOG_HZ, _LOGSTEP = 200.0 / 3, 1000.0, math.log(6.4) / 27.0
_MIN_LOG_MEL = _MIN_LOG_HZ / _F_SP


def hz_to_mel(hz: float) -> float:
    return _MIN_LOG_MEL + math.log(hz / _MIN_LOG_HZ) / _LOGSTEP if hz >= _MIN_LOG_HZ else hz / _F_SP


def mel_to_hz(mel: torch.Tensor) -> torch.Tensor:
    return torch.where(mel >= _MIN_LOG_MEL, _MIN_LOG_HZ * torch.exp(_LOGSTEP * (mel - _MIN_LOG_MEL)), _F_SP * mel)


def slaney_mel_filterbank(n_freqs: int, sample_rate: int, f_min: float, f_max: float, n_mels: int) -> torch.Tensor:
    """Triangular filters equally spaced on the slaney mel scale, each divided by its width in Hz / 2
    (constant energy per band). Returns ``(n_freqs, n_mels)`` float32: ``spectrum @ fb`` gives mels."""
    f64 = dict(dtype=torch.float64, device="cpu")  # computed on the CPU even while a model is built on "meta"
    freqs = torch.linspace(0, sample_rate // 2, n_freqs, **f64)  # (F,) STFT bin centres
    edges = mel_to_hz(torch.linspace(hz_to_mel(f_min), hz_to_mel(f_max), n_mels + 2, **f64))  # (M+2,) band edges in Hz
    width = edges[1:] - edges[:-1]  # (M+1,)
    to_edge = edges[None, :] - freqs[:, None]  # (F, M+2)
    rising = -to_edge[:, :-2] / width[:-1]  # (F, M): from the lower edge up to the centre
    falling = to_edge[:, 2:] / width[1:]  # (F, M): from the centre down to the upper edge
    fb = torch.clamp(torch.minimum(rising, falling), min=0.0)
    fb = fb * (2.0 / (edges[2:] - edges[:-2]))[None, :]
    return fb.float()


class LinearSpectrogram(nn.Module):
    """|STFT| of reflect-padded audio: ``(N, samples)`` -> ``(N, n_fft/2 + 1, samples // hop)``."""

    def __init__(self, n_fft: int = 2048, win_length: int = 2048, hop_length: int = 512):
        super().__init__()
        self.n_fft, self.win_length, self.hop_length = n_fft, win_length, hop_length
        self.register_buffer("window", torch.hann_window(win_length, periodic=True))

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        pad = self.win_length - self.hop_length
        x = nn.functional.pad(audio.float()[:, None], (pad // 2, (pad + 1) // 2), mode="reflect")[:, 0]  # (N, S + pad)
        spec = torch.stft(x, self.n_fft, hop_length=self.hop_length, win_length=self.win_length, window=self.window.float(),
                          center=False, normalized=False, onesided=True, return_complex=True)  # (N, F, frames)
        spec = torch.view_as_real(spec)
        return torch.sqrt(spec.pow(2).sum(-1) + MAGNITUDE_EPS)


class MelScale(nn.Module):
    def __init__(self, n_mels: int, sample_rate: int, f_min: float, f_max: float, n_freqs: int):
        super().__init__()
        self.register_buffer("fb", slaney_mel_filterbank(n_freqs, sample_rate, f_min, f_max, n_mels))  # (F, M)

    def forward(self, spec: torch.Tensor) -> torch.Tensor:  # (N, F, frames) -> (N, M, frames)
        return torch.matmul(spec.transpose(-1, -2), self.fb.float()).transpose(-1, -2)


class LogMelSpectrogram(nn.Module):
    """``(N, samples)`` audio -> ``(N, n_mels, frames)`` natural-log mel magnitudes, computed in fp32.

    ``frames = samples // hop`` for ``samples >= win - hop``; ``sample_rate`` only places the
    filterbank (UniVerse-1 feeds 25.6 kHz audio through the 44.1 kHz filterbank, as released).
    """

    def __init__(self, sample_rate: int = 44100, n_fft: int = 2048, win_length: int = 2048, hop_length: int = 512,
                 n_mels: int = 128, f_min: float = 0.0, f_max: float | None = None):
        super().__init__()
        self.sample_rate, self.hop_length = sample_rate, hop_length
        self.spectrogram = LinearSpectrogram(n_fft, win_length, hop_length)
        self.mel_scale = MelScale(n_mels, sample_rate, f_min, f_max or sample_rate // 2, n_fft // 2 + 1)

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        mel = self.mel_scale(self.spectrogram(audio))  # (N, M, frames)
        return torch.log(torch.clamp(mel, min=LOG_FLOOR))
