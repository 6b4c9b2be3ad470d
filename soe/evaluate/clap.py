"""CLAP embeddings: ``clap_score`` (text-audio agreement per clip) and the audio side of ``fd_audio``.

transformers' ``ClapModel`` + ``ClapProcessor`` from a local folder (LAION's fused 630k checkpoint,
``laion/clap-htsat-fused``, is the one Verse-Bench loads through laion_clap). The audio is prepared the way
Verse-Bench's ``clap_inferencer.py`` prepares it: mono at 48 kHz, peak-normalised to -1 dBFS (pyloudnorm's
``normalize.peak``: a gain of ``10^(-1/20) / max|x|``), then rounded through 16-bit integers. The fused model's
long-audio handling (four random 10 s crops + a downsampled whole for clips over 10 s) is the feature
extractor's ``truncation="fusion"``, as in laion_clap; its crops are drawn from numpy's global RNG, which
``ClapEmbedder`` seeds per call so a clip's score is reproducible.

Hand-written: the peak normalisation and the 16-bit rounding (two lines; pyloudnorm is not a dependency
for one line) and the cosine.
"""
from __future__ import annotations

import numpy as np
import torch

SAMPLE_RATE = 48_000
PEAK_DBFS = -1.0


def prepare_audio(mono_48k: np.ndarray) -> np.ndarray:
    """Peak-normalise to -1 dBFS and round through int16 (Verse-Bench's CLAP input)."""
    x = np.asarray(mono_48k, dtype=np.float32)
    peak = float(np.abs(x).max()) if x.size else 0.0
    if peak > 0:
        x = x * (10 ** (PEAK_DBFS / 20) / peak)
    q = (np.clip(x, -1.0, 1.0) * 32767.0).astype(np.int16)
    return (q / 32767.0).astype(np.float32)


class ClapEmbedder:
    """CLAP text and audio embeddings (L2-normalised, as ``ClapModel.get_*_features`` return them projected)."""

    def __init__(self, folder, device: str = "cpu", batch_size: int = 8):
        from transformers import ClapModel, ClapProcessor

        self.model = ClapModel.from_pretrained(folder).to(device).eval()
        self.processor = ClapProcessor.from_pretrained(folder)
        self.device, self.batch_size = device, batch_size

    @torch.no_grad()
    def text(self, texts: list[str]) -> np.ndarray:
        out = []
        for i in range(0, len(texts), self.batch_size):
            inputs = self.processor.tokenizer(texts[i: i + self.batch_size], padding=True, truncation=True, return_tensors="pt")
            out.append(_features(self.model.get_text_features(**inputs.to(self.device))))
        return np.concatenate(out) if out else np.zeros((0, self.model.config.projection_dim), np.float32)

    @torch.no_grad()
    def audio(self, tracks: list[np.ndarray], seed: int = 0) -> np.ndarray:
        """Embeddings ``(N, D)`` of mono 48 kHz tracks (prepared here)."""
        out = []
        for i in range(0, len(tracks), self.batch_size):
            np.random.seed(seed + i)  # the fused feature extractor crops long audio with numpy's global RNG
            batch = [prepare_audio(t) for t in tracks[i: i + self.batch_size]]
            inputs = self.processor.feature_extractor(batch, sampling_rate=SAMPLE_RATE, return_tensors="pt")
            out.append(_features(self.model.get_audio_features(**inputs.to(self.device))))
        return np.concatenate(out) if out else np.zeros((0, self.model.config.projection_dim), np.float32)


def _features(out) -> np.ndarray:
    t = out if isinstance(out, torch.Tensor) else out.pooler_output  # transformers >= 5 returns a model output
    return torch.nn.functional.normalize(t.float(), dim=-1).cpu().numpy()


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine of two ``(N, D)`` arrays."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a * b).sum(-1) / np.maximum(np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1), 1e-8)
