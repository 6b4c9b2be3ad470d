"""The CLS pooling layer both Synchformer feature extractors end with: one pre-norm ``nn.TransformerEncoderLayer``
(GELU, eps 1e-6) over a token group with a learned CLS token prepended; the CLS output is the group's summary.

The video extractor pools each frame's spatial patches this way, the audio extractor each time step's
frequency patches. Parameter names are torch's own plus ``cls_token``, as in the published state dict.
"""
from __future__ import annotations

import torch
from torch import nn


class ClsPool(nn.TransformerEncoderLayer):
    def __init__(self, dim: int, heads: int, ffn: int):
        super().__init__(d_model=dim, nhead=heads, dim_feedforward=ffn, dropout=0.0, activation=nn.GELU(),
                         layer_norm_eps=1e-6, batch_first=True, norm_first=True)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        nn.init.trunc_normal_(self.cls_token, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, L, D) -> (N, D)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)  # (N, 1 + L, D)
        return super().forward(x)[:, 0]
