"""Synchformer: the audio-video offset classifier over both feature extractors' segment tokens.

Hand-written (the published model is on no package index). The offset transformer is minGPT-style (pre-norm
blocks, separate key/query/value projections, LayerNorm eps 1e-5, a 4x GELU MLP) over
``[OFF, video tokens, MOD, audio tokens]`` plus a learned position table sized for exactly 14 segments of each
(1 + 14*8 + 1 + 14*6 = 198 tokens); the OFF token's output, after a final LayerNorm, is classified into 21
offsets. Both modalities' tokens first pass a linear projection (``vproj``, ``aproj``). Parameter names and
shapes are those of av-benchmark's ``synchformer_state_dict.pth``.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from soe.evaluate.synchformer.audio import AudioFeatures
from soe.evaluate.synchformer.config import SynchformerConfig
from soe.evaluate.synchformer.video import VideoFeatures

WEIGHTS = "synchformer_state_dict.pth"


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.key, self.query, self.value, self.proj = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = (lin(x).reshape(b, n, self.heads, -1).transpose(1, 2) for lin in (self.query, self.key, self.value))
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, heads)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim), nn.Dropout(0.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class _PosEmb(nn.Module):
    def __init__(self, length: int, dim: int):
        super().__init__()
        self.pos_emb = nn.Parameter(torch.randn(1, length, dim))


class OffsetTransformer(nn.Module):
    def __init__(self, cfg: SynchformerConfig):
        super().__init__()
        d, length = cfg.dim, 2 + cfg.segments * (cfg.video_tokens + cfg.audio_grid[1])
        self.vis_in_lnorm, self.aud_in_lnorm = nn.LayerNorm(d), nn.LayerNorm(d)
        self.OFF_tok = nn.Parameter(torch.randn(1, 1, d))
        self.MOD_tok = nn.Parameter(torch.randn(1, 1, d))
        self.pos_emb_cfg = _PosEmb(length, d)  # the released name
        self.blocks = nn.Sequential(*(Block(d, cfg.sync_heads) for _ in range(cfg.sync_layers)))
        self.ln_f = nn.LayerNorm(d)
        self.off_head = nn.Linear(d, cfg.offset_classes)

    def forward(self, v: torch.Tensor, a: torch.Tensor) -> torch.Tensor:  # (B, Lv, D), (B, La, D) -> (B, classes)
        b = v.shape[0]
        x = torch.cat([self.OFF_tok.expand(b, -1, -1), self.vis_in_lnorm(v),
                       self.MOD_tok.expand(b, -1, -1), self.aud_in_lnorm(a)], 1)  # (B, 2 + Lv + La, D)
        x = self.ln_f(self.blocks(x + self.pos_emb_cfg.pos_emb))
        return self.off_head(x[:, 0])


class Synchformer(nn.Module):
    def __init__(self, cfg: SynchformerConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or SynchformerConfig()
        self.vfeat_extractor = VideoFeatures(cfg)
        self.afeat_extractor = AudioFeatures(cfg)
        self.vproj, self.aproj = nn.Linear(cfg.dim, cfg.dim), nn.Linear(cfg.dim, cfg.dim)
        self.transformer = OffsetTransformer(cfg)

    def video_features(self, segments: torch.Tensor) -> torch.Tensor:
        """``(S, 16, 3, H, W)`` frames in [-1, 1] -> ``(S, 8, D)``."""
        return self.vfeat_extractor(segments.permute(0, 2, 1, 3, 4))  # the extractor takes (S, C, T, H, W)

    def audio_features(self, mels: torch.Tensor) -> torch.Tensor:
        """``(S, 128, 66)`` normalised log-mels -> ``(S, 6, D)``."""
        return self.afeat_extractor(mels.transpose(1, 2))  # the extractor takes (S, T, F)

    def offset_logits(self, vis: torch.Tensor, aud: torch.Tensor) -> torch.Tensor:
        """``(B, 14, 8, D)`` video and ``(B, 14, 6, D)`` audio segment features -> ``(B, 21)`` offset logits."""
        vis, aud = self.vproj(vis), self.aproj(aud)
        return self.transformer(vis.flatten(1, 2), aud.flatten(1, 2))

    def class_grid(self) -> torch.Tensor:
        """The offset (s) of each class: ``linspace(-2, 2, 21)``."""
        return torch.from_numpy(np.linspace(-self.cfg.max_offset, self.cfg.max_offset, self.cfg.offset_classes)).float()

    @classmethod
    def from_folder(cls, folder, device: str = "cpu") -> "Synchformer":
        """``folder/synchformer_state_dict.pth`` (+ optional ``config.json``), loaded strictly, in eval mode; a file that
        is not this model's state dict is a ``ValueError`` naming the first missing, unexpected or misshapen key."""
        folder = Path(folder)
        model = cls(SynchformerConfig.from_folder(folder))
        try:
            state = torch.load(folder / WEIGHTS, map_location="cpu", weights_only=True)
        except Exception as e:  # pickle/zip errors of a damaged or foreign file
            raise ValueError(f"{folder / WEIGHTS}: not a readable state dict ({' '.join(str(e).split())[:200]})") from None
        if not isinstance(state, dict):
            raise ValueError(f"{folder / WEIGHTS}: expected a state dict (name -> tensor), got {type(state).__name__}")
        own = model.state_dict()
        missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        shapes = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
        if missing or unexpected or shapes:
            what = (f"missing key {missing[0]!r}" if missing else f"unexpected key {unexpected[0]!r}" if unexpected else
                    f"{shapes[0]!r} has shape {tuple(state[shapes[0]].shape)}, expected {tuple(own[shapes[0]].shape)}")
            raise ValueError(f"{folder / WEIGHTS}: not a Synchformer of the sizes in config.json ({what})")
        model.load_state_dict(state, strict=True)
        return model.to(device).eval()
