"""ACE-Step 1.5 music DiT through diffusers ``AceStepTransformer1DModel``.

Latents ``(B, T, 64)`` from the Oobleck VAE at 25 frames per second (48 kHz / 1920 hop), with
``context_latents`` ``(B, T, 128)`` (source latents + chunk mask) concatenated on channels and
patchified by 2, so 12.5 tokens per second, one token per time step.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch.utils.checkpoint import checkpoint

from soe.experts.diffusers_expert import DiffusersExpert
from soe.plugin.expert import Batch, BlockState, TokenLayout, latent_frames
from soe.plugin.registry import register_expert

if TYPE_CHECKING:
    from diffusers import AceStepTransformer1DModel

EXPERT_KEYS = ("sample_rate", "hop_length", "text_len")
# AceStepTransformer1DModel's constructor arguments and their defaults (the stand-in fills them in as the
# model does; tests/test_stand_in.py compares this copy with diffusers' signature).
MODEL_DEFAULTS = dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=8,
                      head_dim=128, in_channels=192, audio_acoustic_hidden_dim=64, patch_size=2, rope_theta=1000000.0,
                      attention_bias=False, attention_dropout=0.0, rms_norm_eps=1e-6, sliding_window=128, layer_types=None,
                      encoder_hidden_size=None, is_turbo=False, model_version=None)


@register_expert
class AceStep15Expert(DiffusersExpert):
    expert_keys = EXPERT_KEYS
    model_defaults = MODEL_DEFAULTS
    name = "ace-step-1.5"
    modality = "audio"
    source = "diffusers.AceStepTransformer1DModel"
    lora_targets = (r"layers\.\d+\.self_attn\.(to_q|to_k|to_v|to_out\.0)$", r"layers\.\d+\.cross_attn\.(to_q|to_k|to_v|to_out\.0)$",
                    r"layers\.\d+\.mlp\.(gate_proj|up_proj|down_proj)$")
    condition_keys = ("encoder_hidden_states",)
    flow_shift = 3.0
    presets = {
        "base": dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=24, num_attention_heads=16,
                   num_key_value_heads=8, head_dim=128, in_channels=192, audio_acoustic_hidden_dim=64, patch_size=2),
        "tiny": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1,
                     head_dim=16, in_channels=12, audio_acoustic_hidden_dim=4, patch_size=2, sliding_window=4, text_len=8),
    }

    @classmethod
    def model_cls(cls):
        from diffusers import AceStepTransformer1DModel  # here, not at import: listing experts imports no diffusers model

        return AceStepTransformer1DModel

    @classmethod
    def stand_in(cls, config: dict):
        """ACE-Step 1.5's blocks from its config (soe/plugin/stand_in.py), without importing diffusers."""
        from soe.plugin.stand_in import Attention, Params, StandInModel, full_config, linear

        config, opts = cls.split_config(config)
        c = full_config(MODEL_DEFAULTS, config, "AceStepTransformer1DModel")
        d, hd, bias, patch = c["hidden_size"], c["head_dim"], c["attention_bias"], c["patch_size"]
        heads, kv_heads = c["num_attention_heads"], c["num_key_value_heads"]

        def attention():
            return Attention(d, heads * hd, heads, kv_inner_dim=kv_heads * hd, bias=bias,
                             norm_q=Params(weight=(hd,)), norm_k=Params(weight=(hd,)))

        def block():
            b = Params(scale_shift_table=(1, 6, d))
            b.self_attn_norm, b.self_attn = Params(weight=(d,)), attention()
            b.cross_attn_norm, b.cross_attn = Params(weight=(d,)), attention()
            b.mlp_norm, b.mlp = Params(weight=(d,)), Params()
            b.mlp.gate_proj, b.mlp.up_proj = linear(d, c["intermediate_size"], False), linear(d, c["intermediate_size"], False)
            b.mlp.down_proj = linear(c["intermediate_size"], d, False)
            return b

        time_embed = 256 * d + d + d * d + d + d * 6 * d + 6 * d  # linear_1, linear_2, time_proj
        outside = (c["in_channels"] * d * patch + d  # proj_in_conv
                   + 2 * time_embed  # time_embed, time_embed_r
                   + (c["encoder_hidden_size"] or d) * d + d  # condition_embedder
                   + d  # norm_out
                   + d * c["audio_acoustic_hidden_dim"] * patch + c["audio_acoustic_hidden_dim"]  # proj_out_conv
                   + 2 * d)  # scale_shift_table
        model = StandInModel(c, "layers", [block() for _ in range(c["num_hidden_layers"])], outside, patch_size=patch)
        return cls(model, **opts)

    def __init__(self, model: AceStepTransformer1DModel, sample_rate: int = 48000, hop_length: int = 1920, text_len: int = 64):
        super().__init__(model)
        self.sample_rate, self.hop_length, self.text_len = int(sample_rate), int(hop_length), int(text_len)

    # ---- blocks and split forward --------------------------------------------------------------
    @property
    def blocks(self):
        return self.model.layers

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    @property
    def context_channels(self) -> int:
        return self.model.config.in_channels - self.model.config.audio_acoustic_hidden_dim

    def _context(self, batch: Batch) -> torch.Tensor:
        ctx = batch.get("context_latents")
        if ctx is None:  # plain text-to-music: no source audio, no chunk mask
            x = batch["latents"]
            ctx = x.new_zeros(*x.shape[:2], self.context_channels)
        return ctx

    def embed(self, batch: Batch) -> BlockState:
        m, x, t = self.model, batch["latents"], batch["timestep"]  # x: (B, T, C); t: sigma in [0, 1], the model's own convention
        temb_t, proj_t = m.time_embed(t)
        temb_r, proj_r = m.time_embed_r(t - t)  # timestep_r = t: plain (not mean-flow) inference
        h = torch.cat([self._context(batch), x], dim=-1)  # (B, T, in_channels)
        if h.shape[1] % m.patch_size:
            h = torch.nn.functional.pad(h, (0, 0, 0, m.patch_size - h.shape[1] % m.patch_size))
        h = m.proj_in_conv(h.transpose(1, 2)).transpose(1, 2)  # (B, N, D)
        text = m.condition_embedder(batch["encoder_hidden_states"])  # (B, L, D)
        from diffusers.models.transformers import ace_step_transformer as _ace

        cos_sin = _ace._ace_step_rotary_freqs(h.shape[1], m.head_dim, m.rope_theta, h.device, h.dtype)
        mask = None
        if not _ace._is_flash_attention_backend(m.layers[0].self_attn.processor):
            mask = _ace._create_4d_mask(seq_len=h.shape[1], dtype=h.dtype, device=h.device,
                                        sliding_window=m.config.sliding_window, is_sliding_window=True, is_causal=False)
        return BlockState(h, dict(temb=temb_t + temb_r, timestep_proj=proj_t + proj_r, text=text, rope=cos_sin, sliding_mask=mask))

    def run_block(self, i: int, state: BlockState) -> BlockState:
        return self.run_block_module(self.blocks[i], state)

    def run_block_module(self, block, state: BlockState) -> BlockState:
        e = state.extras
        # a block is a sliding-window block when its self-attention was built with a window
        mask = e["sliding_mask"] if getattr(block.self_attn, "sliding_window", None) is not None else None
        args = (state.hidden, e["rope"], e["timestep_proj"], mask, e["text"], None)
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return state.replace(checkpoint(block, *args, use_reentrant=False))
        return state.replace(block(*args))

    def head(self, state: BlockState, batch: Batch) -> torch.Tensor:
        m, h = self.model, state.hidden  # (B, N, D)
        shift, scale = (m.scale_shift_table + state.extras["temb"].unsqueeze(1)).chunk(2, dim=1)
        h = (m.norm_out(h) * (1 + scale) + shift).type_as(h)
        h = m.proj_out_conv(h.transpose(1, 2)).transpose(1, 2)  # (B, N*patch, C)
        return h[:, : batch["latents"].shape[1], :]

    def forward(self, batch: Batch) -> torch.Tensor:
        t = batch["timestep"]
        return self.model(hidden_states=batch["latents"], timestep=t, timestep_r=t, encoder_hidden_states=batch["encoder_hidden_states"],
                          context_latents=self._context(batch), return_dict=False)[0]

    # ---- time and data -------------------------------------------------------------------------
    @property
    def latent_rate(self) -> float:
        return self.sample_rate / self.hop_length

    def token_layout(self, batch: Batch) -> TokenLayout:
        p = self.model.patch_size
        t = -(-batch["latents"].shape[1] // p)  # ceil: the model pads the last patch
        return TokenLayout((t,), ("t",), self.latent_rate / p)

    def batch_axes(self):
        """Frames need not be a multiple of the patch: like diffusers' forward, ``embed`` pads the last
        patch and ``head`` crops it off again (1 s at 25 frames/s is 25 frames)."""
        cfg = self.model.config
        return {"latents": (("batch", None), ("frames", None), ("channels", cfg.audio_acoustic_hidden_dim)),
                "context_latents": (("batch", None), ("frames", "frames"), ("channels", self.context_channels)),
                "encoder_hidden_states": (("batch", None), ("tokens", None), ("width", cfg.encoder_hidden_size or self.hidden_size))}

    def latent_shape(self, batch_size: int, seconds: float) -> tuple[int, ...]:
        return (batch_size, latent_frames(seconds, self.latent_rate), self.model.config.audio_acoustic_hidden_dim)

    def codec(self, path=None, dtype=None):
        from soe.experts.codecs import OobleckAudioCodec

        if path is None:
            return OobleckAudioCodec.tiny(self.model.config.audio_acoustic_hidden_dim, self.sample_rate, self.hop_length)
        return OobleckAudioCodec.load(path, dtype)

    def text_encoder(self, path, device=None, dtype=None):
        raise NotImplementedError(
            "ace-step-1.5: its text conditioning (Qwen3 embedding of the prompt + lyric embeddings + timbre, merged by "
            "the pipeline's condition encoder) is not implemented in soe yet; leave text_encoder_path null for tiny "
            "experts or give precomputed encoder_hidden_states")

    def conditioning(self, batch_size: int = 1, seconds: float = 1.0, generator=None) -> Batch:
        cond = super().conditioning(batch_size, seconds, generator)
        cond.pop("context_latents")  # text-to-music: no source audio (zeros, see _context)
        return cond

    def dummy_batch(self, batch_size: int = 1, seconds: float = 1.0, generator=None) -> Batch:
        dev, dt = self.device, self.dtype
        shape = self.latent_shape(batch_size, seconds)
        enc = self.model.config.encoder_hidden_size or self.hidden_size
        return {
            "latents": torch.randn(shape, generator=generator).to(dev, dt),
            "timestep": torch.rand(batch_size, generator=generator).to(dev, dt),
            "encoder_hidden_states": torch.randn(batch_size, self.text_len, enc, generator=generator).to(dev, dt),
            "context_latents": torch.randn(*shape[:2], self.context_channels, generator=generator).to(dev, dt),
        }
