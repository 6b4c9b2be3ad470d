"""Stable Audio Open 1.0 through diffusers ``StableAudioDiTModel``.

Latents ``(B, 64, T)`` from the Oobleck VAE at 44.1 kHz / 2048 hop = 21.53 frames per second, one
token per frame (no patching). The model prepends ONE global token (duration conditioning plus the
timestep embedding) to the audio tokens; soe's hidden state is the audio tokens only, the global
token travels in ``BlockState.extras`` and is re-attached around every block, so connectors read and
write audio frames and the token layout stays ``(t,)``.

Batch keys (``L`` text tokens of T5-base, as ``StableAudioPipeline`` builds them):

- ``latents``               (B, 64, T)        noisy latent
- ``timestep``              (B,)              rectified-flow sigma in [0, 1] (see below)
- ``encoder_hidden_states`` (B, L + 2, 768)   T5 states + seconds_start + seconds_end embeddings
                                              (``StableAudioProjectionModel`` outputs, concatenated)
- ``global_hidden_states``  (B, 1, 1536)      seconds_start and seconds_end embeddings, concatenated on channels

Flow convention: Stable Audio Open is a v-objective model on a cosine schedule
(``z = cos(phi) x0 + sin(phi) eps``, prediction ``v = cos(phi) eps - sin(phi) x0``, model time
``phi * 2 / pi``). soe speaks rectified flow (``x_t = (1 - s) x0 + s eps``, velocity ``eps - x0``).
Both are the same family of Gaussian paths, so the plugin converts exactly: the RF point at ``s`` has
the same signal-to-noise ratio as the cosine point at ``phi = atan2(s, 1 - s)`` and differs only by
the scale ``sqrt((1 - s)^2 + s^2)``; the predicted ``v`` is turned into ``eps - x0``. The pretrained
model therefore sees exactly its own inputs, and ``forward`` returns a rectified-flow velocity.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from soe.experts.diffusers_expert import DiffusersExpert
from soe.plugin.expert import Batch, BlockState, TokenLayout, latent_frames
from soe.plugin.registry import register_expert

if TYPE_CHECKING:
    from diffusers import StableAudioDiTModel

EXPERT_KEYS = ("sample_rate", "hop_length", "text_len")
GLOBAL_TOKENS = 1  # the model prepends one global token to the audio tokens

# transformer/config.json of stabilityai/stable-audio-open-1.0 (1057M parameters).
STABLE_AUDIO_OPEN_1_0 = dict(sample_size=1024, in_channels=64, num_layers=24, attention_head_dim=64, num_attention_heads=24,
                             num_key_value_attention_heads=12, out_channels=64, cross_attention_dim=768, time_proj_dim=256,
                             global_states_input_dim=1536, cross_attention_input_dim=768)


@register_expert
class StableAudioExpert(DiffusersExpert):
    expert_keys = EXPERT_KEYS
    name = "stable-audio-open"
    modality = "audio"
    source = "diffusers.StableAudioDiTModel"
    lora_targets = (r"transformer_blocks\.\d+\.attn1\.(to_q|to_k|to_v|to_out\.0)$",
                    r"transformer_blocks\.\d+\.attn2\.(to_q|to_k|to_v|to_out\.0)$",
                    r"transformer_blocks\.\d+\.ff\.net\.(0\.proj|2)$")
    condition_keys = ("encoder_hidden_states",)  # the pipeline's CFG zeroes text+duration states, keeps the global token
    flow_shift = 1.0  # trained with uniform t on the cosine schedule
    presets = {
        "1.0": STABLE_AUDIO_OPEN_1_0,
        "tiny": dict(sample_size=64, in_channels=4, num_layers=3, attention_head_dim=16, num_attention_heads=2,
                     num_key_value_attention_heads=1, out_channels=4, cross_attention_dim=32, time_proj_dim=32,
                     global_states_input_dim=24, cross_attention_input_dim=16, text_len=6),
    }

    @classmethod
    def stand_in(cls, config: dict):
        """Stable Audio Open's blocks from its config (soe/plugin/stand_in.py), without importing diffusers."""
        from soe.plugin.stand_in import Attention, Params, StandInModel, full_config, linear

        config, opts = cls.split_config(config)
        c = full_config({**STABLE_AUDIO_OPEN_1_0}, config, "StableAudioDiTModel")  # the release's config = the defaults
        heads, hd, cross = c["num_attention_heads"], c["attention_head_dim"], c["cross_attention_dim"]
        d, ff = heads * hd, 4 * heads * hd  # diffusers' FeedForward: 4x wide (SwiGLU: its input projection twice that)

        def block():
            b = Params()
            b.norm1, b.attn1 = Params(weight=(d,), bias=(d,)), Attention(d, d, heads, bias=False)
            b.norm2 = Params(weight=(d,), bias=(d,))
            b.attn2 = Attention(d, d, heads, kv_dim=cross, kv_inner_dim=c["num_key_value_attention_heads"] * hd, bias=False)
            b.norm3, b.ff = Params(weight=(d,), bias=(d,)), Params()
            b.ff.net = nn.ModuleList([Params(), nn.Dropout(0.0), linear(ff, d)])
            b.ff.net[0].proj, b.ff.net[0].activation = linear(d, 2 * ff), nn.SiLU()
            return b

        n_in, n_out, tp = c["in_channels"], c["out_channels"], c["time_proj_dim"]
        outside = (tp // 2  # time_proj (a fixed Fourier table, stored as a parameter)
                   + tp * d + d + d * d + d  # timestep_proj
                   + c["global_states_input_dim"] * d + d * d  # global_proj
                   + c["cross_attention_input_dim"] * cross + cross * cross  # cross_attention_proj
                   + n_in * n_in + n_in * d + d * n_out + n_out * n_out)  # preprocess_conv, proj_in, proj_out, postprocess_conv
        model = StandInModel(c, "transformer_blocks", [block() for _ in range(c["num_layers"])], outside, inner_dim=d)
        return cls(model, **opts)

    @classmethod
    def model_cls(cls):
        from diffusers import StableAudioDiTModel  # here, not at import: listing experts imports no diffusers model

        return StableAudioDiTModel

    def __init__(self, model: StableAudioDiTModel, sample_rate: int = 44100, hop_length: int = 2048, text_len: int = 128):
        super().__init__(model)
        self.sample_rate, self.hop_length, self.text_len = int(sample_rate), int(hop_length), int(text_len)

    # ---- blocks: the global token is not part of the hidden state soe sees ---------------------
    @property
    def blocks(self):
        return self.model.transformer_blocks

    @property
    def hidden_size(self) -> int:
        return self.model.inner_dim

    @staticmethod
    def block_output_hidden(output: torch.Tensor) -> torch.Tensor:
        return output[:, GLOBAL_TOKENS:]  # (B, T, D): audio tokens only

    @staticmethod
    def with_block_output_hidden(output: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        return torch.cat([output[:, :GLOBAL_TOKENS], hidden], dim=1)  # (B, 1 + T, D)

    # ---- flow convention: rectified flow outside, v-objective cosine schedule inside ------------
    @staticmethod
    def _sigma(batch: Batch) -> torch.Tensor:
        s = batch["timestep"]  # (B,) rectified-flow sigma, in at least float32
        return s.to(torch.promote_types(s.dtype, torch.float32))

    @classmethod
    def _angle(cls, batch: Batch) -> torch.Tensor:
        s = cls._sigma(batch)
        return torch.atan2(s, 1 - s)  # same signal-to-noise ratio on the cosine schedule

    def _model_inputs(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """``(z, t)``: the cosine-schedule latent and the model's own time in [0, 1]."""
        x, s = batch["latents"], self._sigma(batch)
        scale = torch.rsqrt((1 - s) ** 2 + s ** 2)  # (1 - s) x0 + s eps -> cos(phi) x0 + sin(phi) eps
        return x * scale[:, None, None].to(x.dtype), self._angle(batch) * (2 / math.pi)

    def _velocity(self, v: torch.Tensor, z: torch.Tensor, batch: Batch) -> torch.Tensor:
        """``eps - x0`` from the model's ``v`` and its input ``z`` (both ``(B, C, T)``)."""
        phi = self._angle(batch)[:, None, None]
        out = (torch.sin(phi) - torch.cos(phi)) * z.to(phi.dtype) + (torch.cos(phi) + torch.sin(phi)) * v.to(phi.dtype)
        return out.to(batch["latents"].dtype)

    # ---- split forward -------------------------------------------------------------------------
    def embed(self, batch: Batch) -> BlockState:
        m = self.model
        z, t = self._model_inputs(batch)  # (B, C, T), (B,)
        text = m.cross_attention_proj(batch["encoder_hidden_states"])  # (B, L + 2, D_cross)
        glob = m.global_proj(batch["global_hidden_states"])  # (B, 1, D)
        glob = glob + m.timestep_proj(m.time_proj(t.to(m.dtype))).unsqueeze(1)  # (B, 1, D)
        h = (m.preprocess_conv(z) + z).transpose(1, 2)  # (B, T, C)
        h = m.proj_in(h)  # (B, T, D)
        rotary = self._rotary(h.shape[1] + GLOBAL_TOKENS, h.device)  # (cos, sin), each (1 + T, head_dim / 2)
        return BlockState(h, dict(global_token=glob, text=text, rotary=rotary, model_input=z))

    def _rotary(self, length: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        # What StableAudioPipeline builds: rotary on half of each head, over the global + audio tokens.
        from diffusers.models.embeddings import get_1d_rotary_pos_embed

        cos, sin = get_1d_rotary_pos_embed(self.model.config.attention_head_dim // 2, length, use_real=True,
                                           repeat_interleave_real=False)
        return cos.to(device), sin.to(device)

    def run_block(self, i: int, state: BlockState) -> BlockState:
        return self.run_block_module(self.blocks[i], state)

    def run_block_module(self, block, state: BlockState) -> BlockState:
        e = state.extras
        h = torch.cat([e["global_token"], state.hidden], dim=1)  # (B, 1 + T, D)
        args = (h, None, e["text"], None, e["rotary"])  # attention_mask, encoder_attention_mask unused
        if self.gradient_checkpointing and torch.is_grad_enabled():
            h = checkpoint(block, *args, use_reentrant=False)
        else:
            h = block(*args)
        return BlockState(h[:, GLOBAL_TOKENS:], {**e, "global_token": h[:, :GLOBAL_TOKENS]})

    def head(self, state: BlockState, batch: Batch) -> torch.Tensor:
        m = self.model
        h = torch.cat([state.extras["global_token"], state.hidden], dim=1)  # (B, 1 + T, D)
        h = m.proj_out(h).transpose(1, 2)[:, :, GLOBAL_TOKENS:]  # (B, C, T)
        v = m.postprocess_conv(h) + h
        return self._velocity(v, state.extras["model_input"], batch)

    def forward(self, batch: Batch) -> torch.Tensor:
        z, t = self._model_inputs(batch)
        rotary = self._rotary(z.shape[-1] + GLOBAL_TOKENS, z.device)
        v = self.model(z, t, encoder_hidden_states=batch["encoder_hidden_states"],
                       global_hidden_states=batch["global_hidden_states"], rotary_embedding=rotary, return_dict=False)[0]
        return self._velocity(v, z, batch)

    # ---- time and data -------------------------------------------------------------------------
    @property
    def latent_rate(self) -> float:
        return self.sample_rate / self.hop_length

    def token_layout(self, batch: Batch) -> TokenLayout:
        return TokenLayout((batch["latents"].shape[-1],), ("t",), self.latent_rate)

    def latent_shape(self, batch_size: int, seconds: float) -> tuple[int, ...]:
        return (batch_size, self.model.config.in_channels, latent_frames(seconds, self.latent_rate))

    def codec(self, path=None, dtype=None):
        """The Oobleck VAE (``vae/`` of the pipeline folder); latents stay unscaled, as in StableAudioPipeline."""
        from soe.experts.codecs import OobleckAudioCodec

        if path is None:
            return OobleckAudioCodec.tiny(self.model.config.in_channels, self.sample_rate, self.hop_length, time_last=True)
        return OobleckAudioCodec.load(path, dtype, time_last=True)

    def dummy_batch(self, batch_size: int = 1, seconds: float = 1.0, generator=None) -> Batch:
        dev, dt, cfg = self.device, self.dtype, self.model.config
        return {
            "latents": torch.randn(self.latent_shape(batch_size, seconds), generator=generator).to(dev, dt),
            "timestep": torch.rand(batch_size, generator=generator).to(dev, dt),
            "encoder_hidden_states": torch.randn(batch_size, self.text_len + 2, cfg.cross_attention_input_dim,
                                                 generator=generator).to(dev, dt),
            "global_hidden_states": torch.randn(batch_size, 1, cfg.global_states_input_dim, generator=generator).to(dev, dt),
        }
