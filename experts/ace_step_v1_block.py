"""One transformer block of ACE-Step v1 (``LinearTransformerBlock``) and its parts: rotary tables,
the two attention processors (ReLU-kernel linear self-attention, softmax cross-attention, both with
RoPE), and the GLUMBConv feed-forward. Written from the architecture; module and parameter names
match the released ``ace_step_transformer/`` folder. The model around it: ``ace_step_v1_model``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention
from diffusers.models.normalization import RMSNorm
from torch import nn

from soe.plugin.attention import attend

RopeTables = tuple[torch.Tensor, torch.Tensor]  # (cos, sin), each (S, head_dim)


# ---- rotary position embedding --------------------------------------------------------------------
class RotaryEmbedding(nn.Module):
    """cos/sin tables of the official (Qwen2-style) RoPE: frequencies repeated as ``cat(f, f)``."""

    def __init__(self, dim: int, base: float):
        super().__init__()
        self.dim, self.base = dim, base  # no buffers: tables are cheap and never meet the meta device

    def forward(self, x: torch.Tensor, seq_len: int) -> RopeTables:
        # Computed in float32 on CPU like the official init-time cache, then cast to x's dtype.
        inv_freq = 1.0 / (self.base ** (torch.arange(0, self.dim, 2, dtype=torch.int64).float() / self.dim))
        freqs = torch.outer(torch.arange(seq_len, dtype=torch.int64).float(), inv_freq)  # (S, dim/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (S, dim)
        return emb.cos().to(x.device, x.dtype), emb.sin().to(x.device, x.dtype)


def apply_rope(x: torch.Tensor, rope: RopeTables) -> torch.Tensor:
    """Rotate interleaved channel pairs (2i, 2i+1) of ``x (B, H, S, d)``, as the official processors do.

    Note the official pairing: interleaved pairs with the ``cat(f, f)`` table, so the two members of a
    pair see different frequencies. Reproduced as is, since the checkpoint was trained with it.
    """
    cos, sin = rope  # (S, d)
    x1, x2 = x.reshape(*x.shape[:-1], -1, 2).unbind(-1)  # (B, H, S, d/2) each
    rotated = torch.stack([-x2, x1], dim=-1).flatten(-2)  # (B, H, S, d)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


# ---- attention processors (diffusers Attention holds the projections, these do the math) -----------
class LinearAttnProcessor:
    """Self-attention with a ReLU kernel (Sana's LiteLA): O(N) in the number of latent frames."""

    eps = 1e-15

    def __call__(self, attn: Attention, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_freqs_cis=None):
        B, S, _ = hidden_states.shape
        dtype = hidden_states.dtype
        H = attn.heads
        q = attn.to_q(hidden_states).view(B, S, H, -1).transpose(1, 2)  # (B, H, S, d)
        k = attn.to_k(hidden_states).view(B, S, H, -1).transpose(1, 2)  # (B, H, S, d)
        v = attn.to_v(hidden_states).view(B, S, H, -1).transpose(1, 2)  # (B, H, S, d)
        if rotary_freqs_cis is not None:
            q, k = apply_rope(q, rotary_freqs_cis), apply_rope(k, rotary_freqs_cis)
        if attention_mask is not None:  # padded frames neither attend nor are attended to
            m = attention_mask[:, None, :, None].to(k.dtype)  # (B, 1, S, 1)
            q, k, v = q * m, k * m, v * m
        q, k = F.relu(q).float(), F.relu(k).float()
        v = F.pad(v.float().transpose(-1, -2), (0, 0, 0, 1), value=1.0)  # (B, H, d+1, S): ones row -> normaliser
        out = (v @ k) @ q.transpose(-1, -2)  # (B, H, d+1, S)
        out = out[:, :, :-1] / (out[:, :, -1:] + self.eps)  # (B, H, d, S)
        out = out.reshape(B, -1, S).transpose(1, 2).to(dtype)  # (B, S, H*d)
        out = attn.to_out[1](attn.to_out[0](out))  # linear, dropout
        if torch.get_autocast_dtype("cuda") == torch.float16:  # the official fp16 overflow guard
            out = out.clip(-65504, 65504)
        return out


class CrossAttnProcessor:
    """Softmax cross-attention from latent frames to conditioning tokens, RoPE on both sides; the kernel is
    diffusers' attention dispatcher's (``_attention_backend``, set by ``sample.attention_backend``)."""

    _attention_backend = None  # None: the dispatcher's active backend (torch SDPA by default)

    def __call__(
        self, attn: Attention, hidden_states, encoder_hidden_states=None, attention_mask=None,
        encoder_attention_mask=None, rotary_freqs_cis=None, rotary_freqs_cis_cross=None,
    ):  # fmt: skip
        B, S, _ = hidden_states.shape
        H = attn.heads
        q = attn.to_q(hidden_states).view(B, S, H, -1).transpose(1, 2)  # (B, H, S, d)
        k = attn.to_k(encoder_hidden_states).view(B, -1, H, q.shape[-1]).transpose(1, 2)  # (B, H, L, d)
        v = attn.to_v(encoder_hidden_states).view(B, -1, H, q.shape[-1]).transpose(1, 2)  # (B, H, L, d)
        if rotary_freqs_cis is not None:
            q = apply_rope(q, rotary_freqs_cis)
            if rotary_freqs_cis_cross is not None:
                k = apply_rope(k, rotary_freqs_cis_cross)
        bias = None
        if encoder_attention_mask is not None:  # a pair attends only if both tokens are real
            pair = attention_mask[:, :, None] * encoder_attention_mask[:, None, :]  # (B, S, L)
            bias = torch.where(pair == 1, 0.0, -torch.inf)[:, None].to(q.dtype)  # (B, 1, S, L)
        out = attend(q, k, v, bias, self._attention_backend)  # (B, H, S, d)
        out = out.transpose(1, 2).reshape(B, S, -1)  # (B, S, H*d)
        return attn.to_out[1](attn.to_out[0](out))


# ---- feed-forward -----------------------------------------------------------------------------------
class ConvLayer(nn.Module):
    """Conv1d over tokens (channels first) with an optional SiLU; wrapper kept for checkpoint names."""

    def __init__(self, in_dim: int, out_dim: int, kernel_size: int = 1, groups: int = 1, bias: bool = False, act: bool = False):
        super().__init__()
        self.conv = nn.Conv1d(in_dim, out_dim, kernel_size, padding=kernel_size // 2, groups=groups, bias=bias)
        self.act = nn.SiLU() if act else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        return self.act(x) if self.act is not None else x


class GLUMBConv(nn.Module):
    """Sana's gated inverted-bottleneck conv FFN: 1x1 up (x2, SiLU), depthwise k=3, SiLU gate, 1x1 down."""

    def __init__(self, dim: int, hidden: int, kernel_size: int = 3):
        super().__init__()
        self.glu_act = nn.SiLU()
        self.inverted_conv = ConvLayer(dim, 2 * hidden, 1, bias=True, act=True)
        self.depth_conv = ConvLayer(2 * hidden, 2 * hidden, kernel_size, groups=2 * hidden, bias=True)
        self.point_conv = ConvLayer(hidden, dim, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.depth_conv(self.inverted_conv(x.transpose(1, 2)))  # (B, 2*hidden, N): mixes neighbouring frames
        x, gate = x.chunk(2, dim=1)  # (B, hidden, N) each
        return self.point_conv(x * self.glu_act(gate)).transpose(1, 2)  # (B, N, D)


# ---- transformer block ------------------------------------------------------------------------------
class LinearTransformerBlock(nn.Module):
    """adaLN-single block: x += g1*LinAttn(mod(norm(x))); x += CrossAttn(x); x += g2*FFN(mod(norm(x)))."""

    def __init__(self, dim: int, num_heads: int, head_dim: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = RMSNorm(dim, eps=1e-6, elementwise_affine=False)
        self.attn = Attention(
            query_dim=dim, dim_head=head_dim, heads=num_heads, out_dim=dim, bias=True, processor=LinearAttnProcessor()
        )
        # added_kv_proj_dim/context_pre_only make diffusers also create add_{q,k,v}_proj and to_add_out:
        # unused by the forward, but the released checkpoint holds them.
        self.cross_attn = Attention(
            query_dim=dim,
            cross_attention_dim=dim,
            added_kv_proj_dim=dim,
            dim_head=head_dim,
            heads=num_heads,
            out_dim=dim,
            context_pre_only=False,
            bias=True,
            processor=CrossAttnProcessor(),
        )
        self.norm2 = RMSNorm(dim, eps=1e-6, elementwise_affine=False)
        self.ff = GLUMBConv(dim, int(dim * mlp_ratio))
        self.scale_shift_table = nn.Parameter(torch.randn(6, dim) / dim**0.5)

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        rotary_freqs_cis: RopeTables | None = None,
        rotary_freqs_cis_cross: RopeTables | None = None,
        temb: torch.Tensor | None = None,
    ) -> torch.Tensor:
        B = hidden_states.shape[0]
        mod = self.scale_shift_table[None] + temb.reshape(B, 6, -1)  # (B, 6, D)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.chunk(6, dim=1)  # (B, 1, D) each

        h = self.norm1(hidden_states) * (1 + scale_msa) + shift_msa  # (B, N, D)
        h = self.attn(h, attention_mask=attention_mask, rotary_freqs_cis=rotary_freqs_cis)  # (B, N, D)
        hidden_states = hidden_states + gate_msa * h

        hidden_states = hidden_states + self.cross_attn(  # (B, N, D); no norm, no gate (as released)
            hidden_states, encoder_hidden_states=encoder_hidden_states, attention_mask=attention_mask,
            encoder_attention_mask=encoder_attention_mask, rotary_freqs_cis=rotary_freqs_cis,
            rotary_freqs_cis_cross=rotary_freqs_cis_cross,
        )  # fmt: skip

        h = self.norm2(hidden_states) * (1 + scale_mlp) + shift_mlp  # (B, N, D)
        return hidden_states + gate_mlp * self.ff(h)  # (B, N, D)
