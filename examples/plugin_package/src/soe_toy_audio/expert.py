"""A toy 1-D audio DiT and its soe expert plugin.

The model (``ToyAudioDiT``) stands for "your model": it exists on its own, with its own forward,
and the plugin (``ToyAudioExpert``) only *describes* it to soe: its block list, a split forward that
re-runs the model's own pieces, and how its tokens map to time.

Latents ``(B, C, T)`` at 16 kHz / 320 hop = 50 frames per second, patchified by 2: 25 tokens/s.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from torch import nn
from torch.utils.checkpoint import checkpoint

from soe import BlockState, Expert, TokenLayout, register_expert


# ---- the model: knows nothing about soe ------------------------------------------------------------
class ToyBlock(nn.Module):
    """Pre-norm self-attention + MLP, modulated by the conditioning vector (adaLN)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False)
        self.attn = nn.ModuleDict(dict(qkv=nn.Linear(dim, 3 * dim), proj=nn.Linear(dim, dim)))
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False)
        self.mlp = nn.ModuleDict(dict(fc1=nn.Linear(dim, int(dim * mlp_ratio)), fc2=nn.Linear(int(dim * mlp_ratio), dim)))
        self.modulation = nn.Linear(dim, 6 * dim)

    def forward(self, hidden_states: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        b, n, d = hidden_states.shape
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(F.silu(cond))[:, None].chunk(6, dim=-1)  # (B, 1, D) each
        x = self.norm1(hidden_states) * (1 + scale1) + shift1
        q, k, v = self.attn["qkv"](x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)  # (B, H, N, d)
        x = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)
        hidden_states = hidden_states + gate1 * self.attn["proj"](x)  # (B, N, D)
        x = self.norm2(hidden_states) * (1 + scale2) + shift2
        return hidden_states + gate2 * self.mlp["fc2"](F.gelu(self.mlp["fc1"](x)))  # (B, N, D)


class ToyAudioDiT(ModelMixin, ConfigMixin):
    @register_to_config
    def __init__(self, in_channels: int = 8, hidden_size: int = 32, num_layers: int = 2, num_heads: int = 2,
                 patch_size: int = 2, text_dim: int = 16):
        super().__init__()
        self.patch_embed = nn.Conv1d(in_channels, hidden_size, patch_size, stride=patch_size)
        self.time_proj = Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embed = TimestepEmbedding(256, hidden_size)
        self.text_embed = nn.Linear(text_dim, hidden_size)
        self.blocks = nn.ModuleList([ToyBlock(hidden_size, num_heads) for _ in range(num_layers)])
        self.norm_out = nn.LayerNorm(hidden_size, elementwise_affine=False)
        self.proj_out = nn.ConvTranspose1d(hidden_size, in_channels, patch_size, stride=patch_size)
        self.gradient_checkpointing = False

    def condition(self, timestep: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
        temb = self.time_embed(self.time_proj(timestep).to(text_embeds.dtype))  # (B, D)
        return temb + self.text_embed(text_embeds).mean(dim=1)  # (B, D)

    def patchify(self, latents: torch.Tensor) -> torch.Tensor:
        p = self.config.patch_size
        x = F.pad(latents, (0, -latents.shape[-1] % p))  # (B, C, ceil(T/p)*p)
        return self.patch_embed(x).transpose(1, 2)  # (B, N, D)

    def unpatchify(self, hidden_states: torch.Tensor, length: int) -> torch.Tensor:
        return self.proj_out(self.norm_out(hidden_states).transpose(1, 2))[..., :length]  # (B, C, T)

    def forward(self, latents: torch.Tensor, timestep: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
        cond = self.condition(timestep, text_embeds)
        h = self.patchify(latents)
        for block in self.blocks:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                h = checkpoint(block, h, cond, use_reentrant=False)
            else:
                h = block(h, cond)
        return self.unpatchify(h, latents.shape[-1])


# ---- the plugin: describes the model to soe ------------------------------------------------------
@register_expert
class ToyAudioExpert(Expert):
    name = "toy-audio-dit"
    modality = "audio"
    source = "soe_toy_audio.ToyAudioDiT"
    lora_targets = (r"blocks\.\d+\.attn\.(qkv|proj)$", r"blocks\.\d+\.mlp\.(fc1|fc2)$")
    condition_keys = ("text_embeds",)
    presets = {
        "base": dict(in_channels=64, hidden_size=1024, num_layers=16, num_heads=16, text_dim=768),
        "tiny": dict(in_channels=8, hidden_size=32, num_layers=2, num_heads=2, text_dim=16),
    }
    sample_rate, hop_length = 16000, 320

    @classmethod
    def from_config(cls, config: dict, device=None, dtype=None) -> "ToyAudioExpert":
        with torch.device(device or "cpu"):  # on "meta" no memory is allocated (`soe inspect`)
            model = ToyAudioDiT(**config)
        return cls(model.to(dtype) if dtype is not None else model)

    @classmethod
    def load(cls, path, dtype=None, device=None) -> "ToyAudioExpert":
        if not (Path(path) / "config.json").is_file():
            raise FileNotFoundError(f"{cls.name}: no ToyAudioDiT at '{path}' (expected config.json)")
        model = ToyAudioDiT.from_pretrained(path, torch_dtype=dtype)
        return cls(model.to(device) if device is not None else model)

    def save(self, path) -> None:
        self.model.save_pretrained(path)

    # the block list and split forward: the model's own pieces, in the model's own order
    @property
    def blocks(self) -> nn.ModuleList:
        return self.model.blocks

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    def embed(self, batch) -> BlockState:
        m = self.model
        cond = m.condition(batch["timestep"] * 1000, batch["text_embeds"])  # sigma -> the model's [0, 1000]
        return BlockState(m.patchify(batch["latents"]), dict(cond=cond))  # hidden (B, N, D)

    def run_block(self, i: int, state: BlockState) -> BlockState:
        args = (state.hidden, state.extras["cond"])
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return state.replace(checkpoint(self.blocks[i], *args, use_reentrant=False))
        return state.replace(self.blocks[i](*args))

    def head(self, state: BlockState, batch) -> torch.Tensor:
        return self.model.unpatchify(state.hidden, batch["latents"].shape[-1])

    def forward(self, batch) -> torch.Tensor:
        return self.model(batch["latents"], batch["timestep"] * 1000, batch["text_embeds"])

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        super().set_gradient_checkpointing(enabled)  # split forward (run_block)
        self.model.gradient_checkpointing = enabled  # native forward

    # time and data
    @property
    def latent_rate(self) -> float:
        return self.sample_rate / self.hop_length  # 50 latent frames per second

    def token_layout(self, batch) -> TokenLayout:
        p = self.model.config.patch_size
        return TokenLayout((math.ceil(batch["latents"].shape[-1] / p),), ("t",), self.latent_rate / p)

    def latent_shape(self, batch_size: int, seconds: float) -> tuple[int, ...]:
        return (batch_size, self.model.config.in_channels, max(1, round(seconds * self.latent_rate)))

    def dummy_batch(self, batch_size: int = 1, seconds: float = 1.0, generator=None):
        dev, dt = self.device, self.dtype
        return {
            "latents": torch.randn(self.latent_shape(batch_size, seconds), generator=generator).to(dev, dt),
            "timestep": torch.rand(batch_size, generator=generator).to(dev, dt),
            "text_embeds": torch.randn(batch_size, 6, self.model.config.text_dim, generator=generator).to(dev, dt),
        }
