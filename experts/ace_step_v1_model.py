"""ACE-Step v1 music diffusion transformer (``ACEStepTransformer2DModel``), written from its architecture.

The official model (github.com/ace-step/ACE-Step, ``acestep/models/``) is a Sana-style DiT over the
music DCAE latent ``(B, 8, 16, T)``:

- ``proj_in``: a 16x1 patch conv over the 16-high latent -> one token per latent frame ``(B, T, D)``.
- conditioning tokens ``[speaker (1), text (L), lyrics (Ly)]``: speaker embedding (512) and umT5-base
  text states (768) projected to D, lyric tokens through a Conformer encoder then projected to D.
- 24 ``LinearTransformerBlock``s (``ace_step_v1_block``): adaLN-single modulation, ReLU-kernel *linear* self-attention with
  RoPE, *softmax* cross-attention to the conditioning tokens (RoPE on queries and keys, no norm, no
  gate), and a GLUMBConv feed-forward (1x1 conv, depthwise 3-tap conv, SiLU gate, 1x1 conv).
- ``final_layer``: Sana's T2IFinalLayer (modulated RMSNorm + linear + unpatchify).
- ``projectors``: REPA heads used only for the training-time SSL alignment loss (kept because the
  checkpoint holds them).

Module and parameter names match the released ``ace_step_transformer/`` folder, and the config keys
are the released ones plus optional size knobs for the lyric encoder and patch stem (defaults =
released values) so a tiny test model is possible.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.loaders import PeftAdapterMixin
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput
from torch import nn
from torch.utils.checkpoint import checkpoint

from soe.experts.ace_step_v1_block import LinearTransformerBlock, RotaryEmbedding
from soe.experts.ace_step_v1_lyric import LyricConformerEncoder


# ---- stem and head ----------------------------------------------------------------------------------
class PatchEmbed(nn.Module):
    """Latent ``(B, C, 16, T)`` -> tokens ``(B, T, D)``: 16x1 patch conv, GroupNorm, 1x1 conv."""

    def __init__(self, patch_size=(16, 1), in_channels: int = 8, embed_dim: int = 2560, hidden: int | None = None):
        super().__init__()
        hidden = hidden or in_channels * 256  # 2048 in the release
        self.early_conv_layers = nn.Sequential(
            nn.Conv2d(in_channels, hidden, kernel_size=tuple(patch_size), stride=tuple(patch_size), bias=True),
            nn.GroupNorm(num_groups=32, num_channels=hidden, eps=1e-6, affine=True),
            nn.Conv2d(hidden, embed_dim, kernel_size=1, bias=True),
        )

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        return self.early_conv_layers(latent).flatten(2).transpose(1, 2)  # (B, H'*W', D), H' = 1


class T2IFinalLayer(nn.Module):
    """Sana head: modulated RMSNorm by the *embedded* timestep, linear, unpatchify to ``(B, C, 16, T)``."""

    def __init__(self, dim: int, patch_size=(16, 1), out_channels: int = 8):
        super().__init__()
        self.norm_final = nn.RMSNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, patch_size[0] * patch_size[1] * out_channels, bias=True)
        self.scale_shift_table = nn.Parameter(torch.randn(2, dim) / dim**0.5)
        self.patch_size, self.out_channels = tuple(patch_size), out_channels

    def forward(self, x: torch.Tensor, t: torch.Tensor, output_length: int) -> torch.Tensor:
        shift, scale = (self.scale_shift_table[None] + t[:, None]).chunk(2, dim=1)  # (B, 1, D) each
        x = self.linear(self.norm_final(x) * (1 + scale) + shift)  # (B, N, p*q*C)
        B, N, _ = x.shape
        p, q = self.patch_size
        x = x.reshape(B, 1, N, p, q, self.out_channels)  # one token row: (B, h=1, w=N, p, q, C)
        x = torch.einsum("nhwpqc->nchpwq", x).reshape(B, self.out_channels, p, N * q)  # (B, C, 16, T)
        if output_length > N * q:
            x = F.pad(x, (0, output_length - N * q))
        return x[..., :output_length]


@dataclass
class Transformer2DModelOutput(BaseOutput):
    sample: torch.Tensor
    proj_losses: list | None = None


def cross_norm(hidden_states: torch.Tensor, control: torch.Tensor) -> torch.Tensor:
    """Match the per-sample mean/std of a control signal to the hidden states (official controlnet path)."""
    mu_h, std_h = hidden_states.mean(dim=(1, 2), keepdim=True), hidden_states.std(dim=(1, 2), keepdim=True)
    mu_c, std_c = control.mean(dim=(1, 2), keepdim=True), control.std(dim=(1, 2), keepdim=True)
    return (control - mu_c) * (std_h / (std_c + 1e-12)) + mu_h


# ---- the model --------------------------------------------------------------------------------------
class ACEStepTransformer2DModel(ModelMixin, ConfigMixin, PeftAdapterMixin):  # PeftAdapterMixin: load_lora_adapter, as the official model
    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(
        self,
        in_channels: int = 8,
        num_layers: int = 24,
        inner_dim: int = 2560,
        attention_head_dim: int = 128,
        num_attention_heads: int = 20,
        mlp_ratio: float = 2.5,
        out_channels: int = 8,
        max_position: int = 32768,
        rope_theta: float = 1000000.0,
        speaker_embedding_dim: int = 512,
        text_embedding_dim: int = 768,
        ssl_encoder_depths: list[int] = (8, 8),
        ssl_names: list[str] = ("mert", "m-hubert"),
        ssl_latent_dims: list[int] = (1024, 768),
        lyric_encoder_vocab_size: int = 6693,
        lyric_hidden_size: int = 1024,
        patch_size: list[int] = (16, 1),
        max_height: int = 16,
        max_width: int = 32768,
        # Not in the released config (hard-coded there); defaults are the released values.
        lyric_encoder_layers: int = 6,
        lyric_encoder_heads: int = 16,
        lyric_encoder_ff_dim: int = 4096,
        patch_embed_channels: int | None = None,
    ):
        super().__init__()
        dim = num_attention_heads * attention_head_dim  # the official code derives it, ignoring inner_dim
        if inner_dim != dim:
            raise ValueError(f"inner_dim={inner_dim} must equal num_attention_heads*attention_head_dim={dim}")
        self.inner_dim = dim
        self.rotary_emb = RotaryEmbedding(attention_head_dim, rope_theta)
        self.transformer_blocks = nn.ModuleList(
            [LinearTransformerBlock(dim, num_attention_heads, attention_head_dim, mlp_ratio) for _ in range(num_layers)]
        )
        self.time_proj = Timesteps(num_channels=256, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.timestep_embedder = TimestepEmbedding(in_channels=256, time_embed_dim=dim)
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim, bias=True))  # adaLN-single, shared by all blocks

        self.speaker_embedder = nn.Linear(speaker_embedding_dim, dim)
        self.genre_embedder = nn.Linear(text_embedding_dim, dim)  # umT5 text states ("genre" = style prompt)
        self.lyric_embs = nn.Embedding(lyric_encoder_vocab_size, lyric_hidden_size)
        self.lyric_encoder = LyricConformerEncoder(
            in_dim=lyric_hidden_size,
            dim=lyric_hidden_size,
            num_heads=lyric_encoder_heads,
            ff_dim=lyric_encoder_ff_dim,
            num_layers=lyric_encoder_layers,
        )
        self.lyric_proj = nn.Linear(lyric_hidden_size, dim)

        self.projectors = nn.ModuleList(
            [
                nn.Sequential(nn.Linear(dim, 2 * dim), nn.SiLU(), nn.Linear(2 * dim, 2 * dim), nn.SiLU(), nn.Linear(2 * dim, d))
                for d in ssl_latent_dims
            ]
        )
        self.proj_in = PatchEmbed(patch_size, in_channels, dim, hidden=patch_embed_channels)
        self.final_layer = T2IFinalLayer(dim, patch_size=patch_size, out_channels=out_channels)
        self.gradient_checkpointing = False

    # -- conditioning -------------------------------------------------------------------------------
    def forward_lyric_encoder(self, lyric_token_idx: torch.Tensor, lyric_mask: torch.Tensor) -> torch.Tensor:
        x = self.lyric_embs(lyric_token_idx)  # (B, Ly, lyric_hidden)
        return self.lyric_proj(self.lyric_encoder(x, lyric_mask))  # (B, Ly, D)

    def encode(self, encoder_text_hidden_states, text_attention_mask, speaker_embeds, lyric_token_idx, lyric_mask,
               speaker_token: bool = True):
        """Conditioning tokens ``[speaker, text, lyrics]`` ``(B, 1+L+Ly, D)`` and their mask.

        ``speaker_token=False`` leaves the speaker token out: ``[text, lyrics]`` (UniVerse-1), so the
        cross-attention has one key less and the RoPE positions of text and lyrics start at 0.

        Padding never moves a token: the real tokens of each sample are packed to the front (padding
        after them), so a lyric token's RoPE position is the same whether the prompt came padded to a
        fixed length (soe's text encoders, the latent cache) or unpadded (the official pipelines)."""
        B = encoder_text_hidden_states.shape[0]
        text = self.genre_embedder(encoder_text_hidden_states)  # (B, L, D)
        lyrics = self.forward_lyric_encoder(lyric_token_idx, lyric_mask)  # (B, Ly, D)
        states, masks = [text, lyrics], [text_attention_mask.to(text.dtype), lyric_mask.to(text.dtype)]
        if speaker_token:
            states.insert(0, self.speaker_embedder(speaker_embeds)[:, None])  # (B, 1, D)
            masks.insert(0, torch.ones(B, 1, device=text.device, dtype=text.dtype))
        states, mask = torch.cat(states, dim=1), torch.cat(masks, dim=1)  # (B, [1+]L+Ly, D), (B, [1+]L+Ly)
        order = torch.sort((mask == 0).to(torch.int8), dim=1, stable=True).indices  # real tokens first, in order
        return states.gather(1, order[..., None].expand_as(states)), mask.gather(1, order)

    # -- denoiser -----------------------------------------------------------------------------------
    def decode(
        self, hidden_states, attention_mask, encoder_hidden_states, encoder_hidden_mask, timestep,
        ssl_hidden_states=None, output_length: int = 0, block_controlnet_hidden_states=None, controlnet_scale=1.0,
        return_dict: bool = True,
    ):  # fmt: skip
        embedded_timestep = self.timestep_embedder(self.time_proj(timestep).to(hidden_states.dtype))  # (B, D)
        temb = self.t_block(embedded_timestep)  # (B, 6D)
        hidden_states = self.proj_in(hidden_states)  # (B, T, D)
        if block_controlnet_hidden_states is not None:
            hidden_states = hidden_states + cross_norm(hidden_states, block_controlnet_hidden_states) * controlnet_scale

        rope = self.rotary_emb(hidden_states, seq_len=hidden_states.shape[1])
        rope_cross = self.rotary_emb(encoder_hidden_states, seq_len=encoder_hidden_states.shape[1])
        kwargs = dict(attention_mask=attention_mask, encoder_hidden_states=encoder_hidden_states,
                      encoder_attention_mask=encoder_hidden_mask, rotary_freqs_cis=rope,
                      rotary_freqs_cis_cross=rope_cross, temb=temb)  # fmt: skip
        inner = []  # block outputs at the REPA depths
        for i, block in enumerate(self.transformer_blocks):
            if self.training and self.gradient_checkpointing:
                hidden_states = checkpoint(block, hidden_states, use_reentrant=False, **kwargs)
            else:
                hidden_states = block(hidden_states, **kwargs)  # (B, T, D)
            inner += [hidden_states for depth in self.config.ssl_encoder_depths if depth == i]

        proj_losses = self._ssl_losses(inner, ssl_hidden_states) if ssl_hidden_states else []
        output = self.final_layer(hidden_states, embedded_timestep, output_length)  # (B, C, 16, T)
        if not return_dict:
            return output, proj_losses
        return Transformer2DModelOutput(sample=output, proj_losses=proj_losses)

    def _ssl_losses(self, inner, ssl_hidden_states):
        """REPA: cosine loss between projected block states and SSL features (MERT, mHuBERT) per sample."""
        losses = []
        for h, projector, targets, name in zip(inner, self.projectors, ssl_hidden_states, self.config.ssl_names):
            if targets is None:
                continue
            pred = projector(h)  # (B, T, d_ssl)
            loss = 0.0
            for z, z_hat in zip(targets, pred):  # feature rates differ: resample the prediction to len(z)
                z_hat = F.interpolate(z_hat.T[None], size=len(z), mode="linear", align_corners=False)[0].T  # (Tz, d)
                cos = F.cosine_similarity(F.normalize(z, dim=-1), F.normalize(z_hat, dim=-1), dim=-1)  # (Tz,)
                loss = loss + (1 - cos).mean()
            losses.append((name, loss / h.shape[0]))
        return losses

    def forward(
        self, hidden_states, attention_mask, encoder_text_hidden_states, text_attention_mask, speaker_embeds,
        lyric_token_idx, lyric_mask, timestep, ssl_hidden_states=None, block_controlnet_hidden_states=None,
        controlnet_scale=1.0, return_dict: bool = True,
    ):  # fmt: skip
        """Velocity ``(B, 8, 16, T)`` for latent ``hidden_states (B, 8, 16, T)`` at ``timestep`` in [0, 1000]."""
        encoder_hidden_states, encoder_hidden_mask = self.encode(
            encoder_text_hidden_states, text_attention_mask, speaker_embeds, lyric_token_idx, lyric_mask
        )
        return self.decode(
            hidden_states, attention_mask, encoder_hidden_states, encoder_hidden_mask, timestep,
            ssl_hidden_states=ssl_hidden_states, output_length=hidden_states.shape[-1],
            block_controlnet_hidden_states=block_controlnet_hidden_states, controlnet_scale=controlnet_scale,
            return_dict=return_dict,
        )  # fmt: skip
