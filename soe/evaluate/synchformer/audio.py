"""Synchformer's audio feature extractor: an AST (Audio Spectrogram Transformer) over one log-mel segment.

Hand-written because transformers' own AST module names its attention layers differently since v5
(``q_proj`` ...), while the published state dict keeps the v4 names (``attention.attention.query`` ...):
the math is the same pre-norm ViT (LayerNorm eps 1e-12, exact GELU). Input: ``(N, 66, 128)`` (time, mel)
spectrogram segments; 16x16 patches at stride 10 give 12 frequency x 6 time patches, after a CLS and a
distillation token. The final LayerNorm's patch tokens are pooled over frequency, per time step, by a CLS
transformer layer, so a segment becomes 6 tokens. Parameter names and shapes are those of
``afeat_extractor.*`` in av-benchmark's ``synchformer_state_dict.pth``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from soe.evaluate.synchformer.config import SynchformerConfig
from soe.evaluate.synchformer.layers import ClsPool


class _Dense(nn.Module):
    def __init__(self, a: int, b: int):
        super().__init__()
        self.dense = nn.Linear(a, b)


class _SelfAttention(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.query, self.key, self.value = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)


class _Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.attention = _SelfAttention(dim)
        self.output = _Dense(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = (lin(x).reshape(b, n, self.heads, -1).transpose(1, 2)
                   for lin in (self.attention.query, self.attention.key, self.attention.value))  # (B, h, N, dh)
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)
        return self.output.dense(out)


class ASTLayer(nn.Module):
    def __init__(self, dim: int, heads: int, intermediate: int):
        super().__init__()
        self.attention = _Attention(dim, heads)
        self.intermediate = _Dense(dim, intermediate)
        self.output = _Dense(intermediate, dim)
        self.layernorm_before = nn.LayerNorm(dim, eps=1e-12)
        self.layernorm_after = nn.LayerNorm(dim, eps=1e-12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.layernorm_before(x))
        return x + self.output.dense(F.gelu(self.intermediate.dense(self.layernorm_after(x))))


class _PatchEmbeddings(nn.Module):
    def __init__(self, dim: int, patch: int, stride: int):
        super().__init__()
        self.projection = nn.Conv2d(1, dim, patch, stride)


class ASTEmbeddings(nn.Module):
    def __init__(self, cfg: SynchformerConfig):
        super().__init__()
        f, t = cfg.audio_grid
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        self.distillation_token = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        self.patch_embeddings = _PatchEmbeddings(cfg.dim, cfg.audio_patch, cfg.audio_stride)
        self.position_embeddings = nn.Parameter(torch.zeros(1, f * t + 2, cfg.dim))

    def forward(self, spec: torch.Tensor) -> torch.Tensor:  # (N, T, F) -> (N, 2 + f*t, D)
        x = self.patch_embeddings.projection(spec.unsqueeze(1).transpose(2, 3))  # (N, D, f, t)
        x = x.flatten(2).transpose(1, 2)  # (N, f*t, D), frequency-major
        aux = torch.cat([self.cls_token, self.distillation_token], 1).expand(x.shape[0], -1, -1)
        return torch.cat([aux, x], 1) + self.position_embeddings


class _Encoder(nn.Module):
    def __init__(self, cfg: SynchformerConfig):
        super().__init__()
        self.layer = nn.ModuleList(ASTLayer(cfg.dim, cfg.audio_heads, cfg.audio_intermediate) for _ in range(cfg.audio_depth))


class AST(nn.Module):
    def __init__(self, cfg: SynchformerConfig):
        super().__init__()
        self.embeddings = ASTEmbeddings(cfg)
        self.encoder = _Encoder(cfg)
        self.layernorm = nn.LayerNorm(cfg.dim, eps=1e-12)

    def forward(self, spec: torch.Tensor) -> torch.Tensor:
        x = self.embeddings(spec)
        for layer in self.encoder.layer:
            x = layer(x)
        return self.layernorm(x)  # (N, 2 + f*t, D)


class AudioFeatures(nn.Module):
    """``(N, 66, 128)`` normalised log-mel segments -> ``(N, 6, D)``: one token per time patch."""

    def __init__(self, cfg: SynchformerConfig):
        super().__init__()
        self.grid = cfg.audio_grid
        self.ast = AST(cfg)
        self.freq_attn_agg = ClsPool(cfg.dim, cfg.audio_heads, cfg.audio_intermediate)

    def forward(self, spec: torch.Tensor) -> torch.Tensor:
        n, (f, t) = spec.shape[0], self.grid
        x = self.ast(spec)[:, 2:]  # (N, f*t, D) without CLS and distillation tokens
        x = x.reshape(n, f, t, -1).transpose(1, 2).reshape(n * t, f, -1)  # (N*t, f, D): one time step's frequencies
        return self.freq_attn_agg(x).reshape(n, t, -1)  # (N, t, D)
