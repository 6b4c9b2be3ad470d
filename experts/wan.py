"""WAN2.1 text-to-video through diffusers ``WanTransformer3DModel``.

Latents ``(B, 16, F, H, W)`` from the Wan VAE (4x temporal, 8x spatial compression), patchified
(1, 2, 2) into tokens ordered (t, h, w). At 25 fps (UniVerse-1) that is 25 / 4 = 6.25 latent
frames per second; Wan's own default is 16 fps (pass ``fps=16``).
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from soe.experts.diffusers_expert import DiffusersExpert
from soe.plugin.expert import TEXT_FILES, Batch, BlockState, TokenLayout, hub_patterns, latent_frames
from soe.plugin.registry import register_expert

if TYPE_CHECKING:
    from diffusers import WanTransformer3DModel

_WAN_COMMON = dict(patch_size=(1, 2, 2), in_channels=16, out_channels=16, text_dim=4096, freq_dim=256,
                   cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6)
EXPERT_KEYS = ("fps", "height", "width", "text_len")  # expert options that are not model config
# WanTransformer3DModel's constructor arguments and their defaults (the stand-in fills them in as the
# model does; tests/test_stand_in.py compares this copy with diffusers' signature).
WAN_MODEL_DEFAULTS = dict(patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128, in_channels=16, out_channels=16,
                          text_dim=4096, freq_dim=256, ffn_dim=13824, num_layers=40, cross_attn_norm=True,
                          qk_norm="rms_norm_across_heads", eps=1e-6, image_dim=None, added_kv_proj_dim=None, rope_max_seq_len=1024,
                          pos_embed_seq_len=None)


@register_expert
class WanExpert(DiffusersExpert):
    expert_keys = EXPERT_KEYS
    model_defaults = WAN_MODEL_DEFAULTS
    name = "wan2.1"
    modality = "video"
    source = "diffusers.WanTransformer3DModel"
    lora_targets = (r"blocks\.\d+\.attn1\.to_(q|k|v|out\.0)$", r"blocks\.\d+\.attn2\.to_(q|k|v|out\.0)$",
                    r"blocks\.\d+\.ffn\.net\.(0\.proj|2)$")
    condition_keys = ("encoder_hidden_states",)
    # a Hub pipeline repo: transformer/ for path, vae/ for codec_path, the umT5-XXL only for text_encoder_path
    hub_files = {**DiffusersExpert.hub_files, "text_encoder_path": hub_patterns("text_encoder", "tokenizer", files=TEXT_FILES)}
    license = "apache-2.0"  # Wan2.1 and Wan2.2 weights
    null_condition = "negative_prompt"  # Wan's pipeline (and UniVerse-1) encode a negative prompt, "" by default
    # "after_self_attn": the residual stream after self-attention; "cross_attn_input": the same after
    # norm2 (what UniVerse-1 pools per latent frame for the audio side).
    tap_points = {"after_self_attn": ("norm2", "input"), "cross_attn_input": ("attn2", "input")}
    flow_shift = 3.0  # Wan2.1 trains/samples with shift 3 at 480p (5 at 720p)
    vae_stride = (4, 8, 8)
    presets = {
        "1.3b": dict(_WAN_COMMON, num_attention_heads=12, attention_head_dim=128, ffn_dim=8960, num_layers=30),
        "14b": dict(_WAN_COMMON, num_attention_heads=40, attention_head_dim=128, ffn_dim=13824, num_layers=40),
        "tiny": dict(_WAN_COMMON, num_attention_heads=2, attention_head_dim=16, ffn_dim=64, num_layers=4,
                     in_channels=4, out_channels=4, text_dim=32, freq_dim=32, height=64, width=64, text_len=8),
    }

    @classmethod
    def model_cls(cls):
        from diffusers import WanTransformer3DModel  # here, not at import: listing experts imports no diffusers model

        return WanTransformer3DModel

    @classmethod
    def stand_in(cls, config: dict):
        """Wan's blocks from its config (soe/plugin/stand_in.py); None for the image-conditioned variants
        (``image_dim``, ``added_kv_proj_dim``, ``pos_embed_seq_len``), which are built instead."""
        from soe.plugin.stand_in import Attention, Params, StandInModel, full_config, linear

        config, opts = cls.split_config(config)
        c = full_config(WAN_MODEL_DEFAULTS, config, "WanTransformer3DModel")
        if any(c[k] is not None for k in ("image_dim", "added_kv_proj_dim", "pos_embed_seq_len")):
            return None
        d, heads, patch = c["num_attention_heads"] * c["attention_head_dim"], c["num_attention_heads"], math.prod(c["patch_size"])
        out = c["out_channels"] or c["in_channels"]

        def attention():
            return Attention(d, d, heads, norm_q=Params(weight=(d,)), norm_k=Params(weight=(d,)))

        def block():
            b = Params(scale_shift_table=(1, 6, d))
            b.norm1, b.attn1, b.attn2 = Params(), attention(), attention()
            b.norm2 = Params(weight=(d,), bias=(d,)) if c["cross_attn_norm"] else nn.Identity()
            b.ffn = Params()
            b.ffn.net = nn.ModuleList([Params(), nn.Dropout(0.0), linear(c["ffn_dim"], d)])
            b.ffn.net[0].proj = linear(d, c["ffn_dim"])
            b.norm3 = Params()
            return b

        outside = (c["in_channels"] * d * patch + d  # patch_embedding (Conv3d)
                   + c["freq_dim"] * d + d + d * d + d  # condition_embedder.time_embedder
                   + d * 6 * d + 6 * d  # condition_embedder.time_proj
                   + c["text_dim"] * d + d + d * d + d  # condition_embedder.text_embedder
                   + d * out * patch + out * patch  # proj_out
                   + 2 * d)  # scale_shift_table
        return cls(StandInModel(c, "blocks", [block() for _ in range(c["num_layers"])], outside), **opts)

    def __init__(self, model: WanTransformer3DModel, fps: float = 25.0, height: int = 480, width: int = 832, text_len: int = 512):
        super().__init__(model)
        self.fps, self.height, self.width, self.text_len = float(fps), int(height), int(width), int(text_len)

    # ---- blocks and split forward --------------------------------------------------------------
    @property
    def blocks(self):
        return self.model.blocks

    @property
    def hidden_size(self) -> int:
        return self.model.config.num_attention_heads * self.model.config.attention_head_dim

    def _model_timestep(self, batch: Batch) -> torch.Tensor:
        return batch["timestep"] * 1000.0  # sigma in [0, 1] -> Wan's timestep in [0, 1000]

    def embed(self, batch: Batch) -> BlockState:
        m, x = self.model, batch["latents"]  # (B, C, F, H, W)
        rotary = m.rope(x)  # (cos, sin), each (1, N, 1, head_dim)
        h = m.patch_embedding(x).flatten(2).transpose(1, 2).contiguous()  # (B, N, D)
        temb, proj, text, _ = m.condition_embedder(self._model_timestep(batch), batch["encoder_hidden_states"], None)
        proj = proj.unflatten(1, (6, -1))  # (B, 6, D)
        return BlockState(h, dict(temb=temb, timestep_proj=proj, text=text, rotary=rotary))

    def run_block(self, i: int, state: BlockState) -> BlockState:
        return self.run_block_module(self.blocks[i], state)

    def run_block_module(self, block, state: BlockState) -> BlockState:
        e = state.extras
        args = (state.hidden, e["text"], e["timestep_proj"], e["rotary"])
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return state.replace(checkpoint(block, *args, use_reentrant=False))
        return state.replace(block(*args))

    @staticmethod
    def attention_qkv(attn, args, kwargs):
        """What diffusers' ``WanAttnProcessor`` forms (T2V: no image keys), as ``(B, H, S, d)``."""
        names = ("hidden_states", "encoder_hidden_states", "attention_mask", "rotary_emb")
        call = {**dict(zip(names, args)), **kwargs}
        x = call["hidden_states"]
        ctx = call.get("encoder_hidden_states")
        ctx = x if ctx is None else ctx
        q = attn.norm_q(attn.to_q(x)).unflatten(2, (attn.heads, -1))  # (B, S, H, d)
        k = attn.norm_k(attn.to_k(ctx)).unflatten(2, (attn.heads, -1))  # (B, L, H, d)
        v = attn.to_v(ctx).unflatten(2, (attn.heads, -1))
        rope = call.get("rotary_emb")
        if rope is not None:
            q, k = _wan_rope(q, *rope), _wan_rope(k, *rope)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), call.get("attention_mask")

    def head(self, state: BlockState, batch: Batch) -> torch.Tensor:
        m, h = self.model, state.hidden  # (B, N, D)
        b, _, f, hh, ww = batch["latents"].shape
        pt, ph, pw = m.config.patch_size
        shift, scale = (m.scale_shift_table + state.extras["temb"].unsqueeze(1)).chunk(2, dim=1)  # (B, 1, D) each
        h = (m.norm_out(h.float()) * (1 + scale) + shift).type_as(h)
        h = m.proj_out(h)  # (B, N, C*pt*ph*pw)
        h = h.reshape(b, f // pt, hh // ph, ww // pw, pt, ph, pw, -1).permute(0, 7, 1, 4, 2, 5, 3, 6)
        return h.flatten(6, 7).flatten(4, 5).flatten(2, 3)  # (B, C, F, H, W)

    def forward(self, batch: Batch) -> torch.Tensor:
        return self.model(hidden_states=batch["latents"], timestep=self._model_timestep(batch),
                          encoder_hidden_states=batch["encoder_hidden_states"], return_dict=False)[0]

    # ---- time and data -------------------------------------------------------------------------
    @property
    def latent_rate(self) -> float:
        return self.fps / self.vae_stride[0]

    def token_layout(self, batch: Batch) -> TokenLayout:
        _, _, f, h, w = batch["latents"].shape
        pt, ph, pw = self.model.config.patch_size
        return TokenLayout((f // pt, h // ph, w // pw), ("t", "h", "w"), self.latent_rate / pt)

    def max_seconds(self) -> float | None:
        cfg = self.model.config  # the rotary table holds rope_max_seq_len positions per axis
        return cfg.rope_max_seq_len * cfg.patch_size[0] / self.latent_rate

    def batch_axes(self):
        cfg = self.model.config
        return {"latents": (("batch", None), ("channels", cfg.in_channels), ("frames", None), ("height", None), ("width", None)),
                "encoder_hidden_states": (("batch", None), ("tokens", None), ("width", cfg.text_dim))}

    def latent_multiples(self) -> dict[int, int]:
        pt, ph, pw = self.model.config.patch_size  # latents (B, C, F, H, W)
        return {2: pt, 3: ph, 4: pw}

    def latent_shape(self, batch_size: int, seconds: float) -> tuple[int, ...]:
        frames = latent_frames(seconds, self.latent_rate)
        return (batch_size, self.model.config.in_channels, frames, self.height // self.vae_stride[1], self.width // self.vae_stride[2])

    def codec(self, path=None, dtype=None):
        from soe.experts.codecs import WanVideoCodec

        if path is None:
            return WanVideoCodec.tiny(self.model.config.in_channels, self.fps, spatial=self.vae_stride[1])
        return WanVideoCodec.load(path, self.fps, dtype)

    def text_encoder(self, path, device=None, dtype=None):
        """UMT5 encoder + tokenizer of a diffusers Wan pipeline folder (``text_encoder/``, ``tokenizer/``)."""
        from soe.experts.text_encoders import WanTextEncoder

        enc = WanTextEncoder.load(path, max_length=self.text_len, device=device, dtype=dtype)
        if enc.encoder.config.d_model != self.model.config.text_dim:
            raise ValueError(f"wan2.1: text encoder at '{path}' is {enc.encoder.config.d_model} wide, the model expects {self.model.config.text_dim}")
        return enc

    def dummy_batch(self, batch_size: int = 1, seconds: float = 1.0, generator=None) -> Batch:
        dev, dt = self.device, self.dtype
        text_dim = self.model.config.text_dim
        return {
            "latents": torch.randn(self.latent_shape(batch_size, seconds), generator=generator).to(dev, dt),
            "timestep": torch.rand(batch_size, generator=generator).to(dev, dt),
            "encoder_hidden_states": torch.randn(batch_size, self.text_len, text_dim, generator=generator).to(dev, dt),
        }


def _wan_rope(x, cos, sin):
    """diffusers' Wan rotary embedding on ``x (B, S, H, d)``: pairs (2i, 2i+1), tables (1, S, 1, d)."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[..., 0::2], sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)
