"""The lyric encoder of ACE-Step v1: a Conformer-style Transformer encoder over lyric tokens.

ACE-Step v1 reuses the CosyVoice/WeNet encoder layout with relative-position self-attention
(Transformer-XL style, ESPnet positional table), pre-norm, no macaron feed-forward and no
convolution module. The official instance is hard-coded 1024 wide, 16 heads, 4096 FF, 6 layers;
here those are constructor arguments (defaulting to the official values) so tests can build a
small one. Module and parameter names follow the official checkpoint
(``lyric_encoder.embed.out.0``, ``lyric_encoder.encoders.3.self_attn.linear_pos``, ...).
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


class RelPositionTable(nn.Module):
    """Sinusoidal table for relative positions ``T-1, T-2, ..., -(T-1)`` (ESPnet "rel_pos_espnet").

    Holds no state dict entries: the table is a plain cache, so meta-device construction and
    ``load_state_dict(assign=True)`` never meet an uninitialised buffer.
    """

    def __init__(self, d_model: int, dropout_rate: float):
        super().__init__()
        self.d_model = d_model
        self.dropout = nn.Dropout(dropout_rate)
        self._table: torch.Tensor | None = None  # (2L-1, d) in float32 on CPU, L = longest seen

    def _positions(self, size: int) -> torch.Tensor:
        if self._table is None or self._table.shape[0] < 2 * size - 1:
            n = max(size, 5000)  # the official table starts at 5000 positions
            pos = torch.arange(n - 1, -n, -1, dtype=torch.float32)[:, None]  # (2n-1, 1), n-1 .. -(n-1)
            inv = torch.exp(torch.arange(0, self.d_model, 2, dtype=torch.float32) * -(math.log(10000.0) / self.d_model))
            table = torch.zeros(2 * n - 1, self.d_model)
            table[:, 0::2] = torch.sin(pos * inv)
            table[:, 1::2] = torch.cos(pos * inv)
            self._table = table
        centre = self._table.shape[0] // 2  # row of relative position 0
        return self._table[centre - size + 1 : centre + size]  # (2T-1, d)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pos = self._positions(x.shape[1]).to(device=x.device, dtype=x.dtype)[None]  # (1, 2T-1, d)
        x = x * math.sqrt(self.d_model)  # ESPnet scales the embedding before adding position terms
        return self.dropout(x), self.dropout(pos)


class LinearEmbed(nn.Module):
    """Input layer: Linear -> LayerNorm -> Dropout, then the relative position table."""

    def __init__(self, in_dim: int, out_dim: int, dropout_rate: float):
        super().__init__()
        self.out = nn.Sequential(nn.Linear(in_dim, out_dim), nn.LayerNorm(out_dim, eps=1e-5), nn.Dropout(dropout_rate))
        self.pos_enc = RelPositionTable(out_dim, dropout_rate)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.pos_enc(self.out(x))


class RelPositionAttention(nn.Module):
    """Multi-head self-attention with learned content/position biases (Transformer-XL section 3.3)."""

    def __init__(self, num_heads: int, dim: int, dropout_rate: float = 0.0):
        super().__init__()
        assert dim % num_heads == 0, f"lyric encoder width {dim} must be divisible by {num_heads} heads"
        self.h, self.d_k = num_heads, dim // num_heads
        self.linear_q = nn.Linear(dim, dim)
        self.linear_k = nn.Linear(dim, dim)
        self.linear_v = nn.Linear(dim, dim)
        self.linear_out = nn.Linear(dim, dim)
        self.linear_pos = nn.Linear(dim, dim, bias=False)
        self.pos_bias_u = nn.Parameter(torch.empty(self.h, self.d_k))
        self.pos_bias_v = nn.Parameter(torch.empty(self.h, self.d_k))
        nn.init.xavier_uniform_(self.pos_bias_u)
        nn.init.xavier_uniform_(self.pos_bias_v)
        self.dropout = nn.Dropout(dropout_rate)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.linear_q(x).view(B, T, self.h, self.d_k)  # (B, T, H, dk)
        k = self.linear_k(x).view(B, T, self.h, self.d_k).transpose(1, 2)  # (B, H, T, dk)
        v = self.linear_v(x).view(B, T, self.h, self.d_k).transpose(1, 2)  # (B, H, T, dk)
        p = self.linear_pos(pos).view(1, -1, self.h, self.d_k).transpose(1, 2)  # (1, H, 2T-1, dk)

        content = (q + self.pos_bias_u).transpose(1, 2) @ k.transpose(-2, -1)  # (B, H, T, T)
        position = (q + self.pos_bias_v).transpose(1, 2) @ p.transpose(-2, -1)  # (B, H, T, 2T-1)
        # Column k of `position` is relative offset T-1-k; query i / key j needs offset i-j.
        idx = (T - 1) - torch.arange(T, device=x.device)[:, None] + torch.arange(T, device=x.device)[None]  # (T, T)
        position = position.gather(-1, idx.expand(B, self.h, T, T))  # (B, H, T, T)
        scores = (content + position) / math.sqrt(self.d_k)  # (B, H, T, T)

        pad = ~mask[:, None]  # (B, 1, 1, T): True on padded keys
        scores = scores.masked_fill(pad, -float("inf"))
        attn = torch.softmax(scores, dim=-1).masked_fill(pad, 0.0)  # all-padded rows give zeros, not NaN
        out = self.dropout(attn) @ v  # (B, H, T, dk)
        return self.linear_out(out.transpose(1, 2).reshape(B, T, self.h * self.d_k))  # (B, T, D)


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int, dropout_rate: float, act_layer: type[nn.Module] = nn.SiLU):
        super().__init__()
        self.w_1 = nn.Linear(dim, hidden)
        self.activation = act_layer()
        self.dropout = nn.Dropout(dropout_rate)
        self.w_2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_2(self.dropout(self.activation(self.w_1(x))))


class ConformerLayer(nn.Module):
    """Pre-norm layer: x + MHA(LN(x)), then x + FF(LN(x)) (the official config has no conv module)."""

    def __init__(self, dim: int, num_heads: int, ff_dim: int, dropout_rate: float):
        super().__init__()
        self.self_attn = RelPositionAttention(num_heads, dim)
        self.feed_forward = FeedForward(dim, ff_dim, dropout_rate)
        self.norm_ff = nn.LayerNorm(dim, eps=1e-5)
        self.norm_mha = nn.LayerNorm(dim, eps=1e-5)
        self.dropout = nn.Dropout(dropout_rate)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        x = x + self.dropout(self.self_attn(self.norm_mha(x), mask, pos))  # (B, T, D)
        return x + self.dropout(self.feed_forward(self.norm_ff(x)))  # (B, T, D)


class LyricConformerEncoder(nn.Module):
    """Lyric token embeddings ``(B, T, in_dim)`` + padding mask ``(B, T)`` -> ``(B, T, dim)``."""

    def __init__(
        self,
        in_dim: int = 1024,
        dim: int = 1024,
        num_heads: int = 16,
        ff_dim: int = 4096,
        num_layers: int = 6,
        dropout_rate: float = 0.1,
    ):
        super().__init__()
        self.embed = LinearEmbed(in_dim, dim, dropout_rate)
        self.encoders = nn.ModuleList([ConformerLayer(dim, num_heads, ff_dim, dropout_rate) for _ in range(num_layers)])
        self.after_norm = nn.LayerNorm(dim, eps=1e-5)
        self.gradient_checkpointing = False  # set by ModelMixin.enable_gradient_checkpointing, like the official one

    def forward(self, x: torch.Tensor, pad_mask: torch.Tensor) -> torch.Tensor:
        mask = pad_mask.to(torch.bool)[:, None]  # (B, 1, T): True on real tokens
        x, pos = self.embed(x)  # (B, T, D), (1, 2T-1, D)
        for layer in self.encoders:
            if self.gradient_checkpointing and self.training:
                x = checkpoint(layer, x, mask, pos, use_reentrant=False)
            else:
                x = layer(x, mask, pos)
        return self.after_norm(x)  # (B, T, D)

