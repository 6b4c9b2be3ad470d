"""Synchformer's video feature extractor: a Motionformer-style ViT with divided space-time attention.

Hand-written because the published model is not a timm or transformers architecture: each block attends
first across time (a patch position with itself in the other frames), then across space (the patches of one
frame), and the CLS token attends to every token in both. Input: segments of 16 RGB frames, 224 px,
normalised to [-1, 1]; 2x16x16 tubelets give 8 time steps of 14x14 patches. The patch tokens get a spatial
position table tiled over time plus a temporal table repeated over space. After the final LayerNorm each
time step's patches are pooled to one vector by a CLS transformer layer, so a segment becomes 8 tokens.

Parameter names and shapes are those of ``vfeat_extractor.*`` in av-benchmark's ``synchformer_state_dict.pth``
(including ``patch_embed``, a 2D patch projection the released model carries but never uses). The MLP is
timm's ``Mlp`` (fc1, GELU, fc2: the same layer).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import Mlp
from torch import nn

from soe.evaluate.synchformer.config import SynchformerConfig
from soe.evaluate.synchformer.layers import ClsPool


class DividedAttention(nn.Module):
    """Multi-head attention within groups (one frame, or one patch position over time), CLS attending to all."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, frames: int, over_time: bool) -> torch.Tensor:
        b, n_tok, d = x.shape  # n_tok = 1 + frames * patches
        h, patches = self.heads, (n_tok - 1) // frames
        q, k, v = (t.reshape(b, n_tok, h, d // h).transpose(1, 2).reshape(b * h, n_tok, d // h)
                   for t in self.qkv(x).chunk(3, dim=-1))  # (B*h, N, dh)
        cls_out = F.scaled_dot_product_attention(q[:, :1], k, v)  # (B*h, 1, dh): CLS sees every token

        def group(t):  # (B*h, F*P, dh) -> (B*h*G, L, dh): G groups of L tokens
            t = t.reshape(b * h, frames, patches, -1)
            if over_time:
                t = t.transpose(1, 2)  # (B*h, P, F, dh): one patch position across frames
            return t.reshape(-1, t.shape[2], t.shape[3])

        groups = patches if over_time else frames
        q_, k_, v_ = group(q[:, 1:]), group(k[:, 1:]), group(v[:, 1:])
        cls_k = k[:, :1].repeat_interleave(groups, dim=0)  # every group also attends to the CLS token
        cls_v = v[:, :1].repeat_interleave(groups, dim=0)
        out = F.scaled_dot_product_attention(q_, torch.cat([cls_k, k_], 1), torch.cat([cls_v, v_], 1))  # (B*h*G, L, dh)
        out = out.reshape(b * h, groups, -1, d // h)
        if over_time:
            out = out.transpose(1, 2)  # back to (B*h, F, P, dh)
        out = torch.cat([cls_out, out.reshape(b * h, frames * patches, -1)], dim=1)  # (B*h, N, dh)
        out = out.reshape(b, h, n_tok, d // h).transpose(1, 2).reshape(b, n_tok, d)
        return self.proj(out)


class DividedSpaceTimeBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: int):
        super().__init__()
        self.norm1, self.norm2, self.norm3 = (nn.LayerNorm(dim, eps=1e-6) for _ in range(3))
        self.attn, self.timeattn = DividedAttention(dim, heads), DividedAttention(dim, heads)
        self.mlp = Mlp(dim, dim * mlp_ratio)

    def forward(self, x: torch.Tensor, frames: int) -> torch.Tensor:
        x = x + self.timeattn(self.norm3(x), frames, over_time=True)  # time first (norm3, as released)
        x = x + self.attn(self.norm1(x), frames, over_time=False)
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, conv: nn.Module):
        super().__init__()
        self.proj = conv


class VideoFeatures(nn.Module):
    """``(N, 3, 16, 224, 224)`` segments in [-1, 1] -> ``(N, 8, D)``: one token per tubelet time step."""

    def __init__(self, cfg: SynchformerConfig):
        super().__init__()
        d, p = cfg.dim, cfg.patch_size
        self.frames, self.grid = cfg.video_tokens, cfg.image_size // p
        self.patch_embed = PatchEmbed(nn.Conv2d(3, d, p, p))  # unused (kept: it is in the state dict)
        self.patch_embed_3d = PatchEmbed(nn.Conv3d(3, d, (cfg.tubelet, p, p), (cfg.tubelet, p, p)))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid ** 2 + 1, d))
        self.temp_embed = nn.Parameter(torch.zeros(1, self.frames, d))
        self.blocks = nn.ModuleList(DividedSpaceTimeBlock(d, cfg.video_heads, cfg.mlp_ratio) for _ in range(cfg.video_depth))
        self.norm = nn.LayerNorm(d, eps=1e-6)
        self.spatial_attn_agg = ClsPool(d, cfg.video_heads, cfg.mlp_ratio * d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        x = self.patch_embed_3d.proj(x).flatten(2).transpose(1, 2)  # (N, t*h*w, D), time-major
        patches = self.grid ** 2
        pos = self.pos_embed[:, 1:].repeat(1, self.frames, 1) + self.temp_embed.repeat_interleave(patches, dim=1)
        x = torch.cat([self.cls_token.expand(n, -1, -1), x], 1) + torch.cat([self.pos_embed[:, :1], pos], 1)  # (N, 1+t*P, D)
        for blk in self.blocks:
            x = blk(x, self.frames)
        x = self.norm(x[:, 1:])  # (N, t*P, D), CLS dropped
        x = self.spatial_attn_agg(x.reshape(n * self.frames, patches, -1))  # (N*t, D)
        return x.reshape(n, self.frames, -1)  # (N, t, D)
