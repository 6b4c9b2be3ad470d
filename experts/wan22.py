"""WAN2.2 TI2V-5B (text/image-to-video) through diffusers ``WanTransformer3DModel``.

Same transformer code as WAN2.1 with its own config (48 latent channels, width 3072, 30 blocks) and
the Wan2.2 VAE: 4x16x16 compression, so at 24 fps there are 24 / 4 = 6 latent frames per second;
patch (1, 2, 2) gives tokens ``(t, h/2, w/2)`` ordered (t, h, w).

TI2V feeds one timestep per *token* (diffusers' ``expand_timesteps``), which is how the model does
image-to-video: with ``image_latents`` ``(B, 48, 1, H, W)`` in the batch, the first latent frame is
replaced by the clean image latent and its tokens get timestep 0, exactly as
``WanImageToVideoPipeline`` does for this checkpoint. Without it, every token gets the clip's
timestep (text-to-video). soe's conditioning (``frame_timesteps``) uses the same per-token path:
``timestep`` may be ``(B, F)``, one sigma per latent frame.
"""
from __future__ import annotations

import torch

from soe.experts.wan import _WAN_COMMON, WanExpert
from soe.plugin.expert import Batch, BlockState
from soe.plugin.registry import register_expert

_TI2V_COMMON = dict(_WAN_COMMON, in_channels=48, out_channels=48)


@register_expert
class Wan22TI2VExpert(WanExpert):
    name = "wan2.2-ti2v"
    frame_timesteps = True  # per-token timesteps: clean (given) frames get timestep 0
    flow_shift = 5.0  # Wan2.2 TI2V-5B samples with shift 5
    vae_stride = (4, 16, 16)
    presets = {
        "5b": dict(_TI2V_COMMON, num_attention_heads=24, attention_head_dim=128, ffn_dim=14336, num_layers=30),
        "tiny": dict(_TI2V_COMMON, num_attention_heads=2, attention_head_dim=16, ffn_dim=64, num_layers=3,
                     text_dim=32, freq_dim=32, height=128, width=128, text_len=8),
    }

    def __init__(self, model, fps: float = 24.0, height: int = 704, width: int = 1280, text_len: int = 512):
        super().__init__(model, fps=fps, height=height, width=width, text_len=text_len)

    # ---- per-token timesteps (expand_timesteps) ------------------------------------------------
    def _inputs(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """``(latents, timesteps)``: ``(B, C, F, H, W)`` and Wan timesteps per token ``(B, N)``."""
        x = batch["latents"]
        b, _, f, h, w = x.shape
        pt, ph, pw = self.model.config.patch_size
        per_frame = (h // ph) * (w // pw)  # tokens of one latent frame
        t = self._model_timestep(batch)  # (B,) or (B, F): one per latent frame
        t = t[:, ::pt, None] if t.dim() == 2 else t[:, None, None]
        t = t.expand(b, f // pt, per_frame).flatten(1)  # (B, N)
        image = batch.get("image_latents")
        if image is not None:  # image-to-video: clean first frame at timestep 0
            x = torch.cat([image.to(x.dtype), x[:, :, 1:]], dim=2)
            t = torch.cat([torch.zeros_like(t[:, :per_frame]), t[:, per_frame:]], dim=1)
        return x, t

    def embed(self, batch: Batch) -> BlockState:
        m = self.model
        x, t = self._inputs(batch)  # (B, C, F, H, W), (B, N)
        rotary = m.rope(x)  # (cos, sin), each (1, N, 1, head_dim)
        h = m.patch_embedding(x).flatten(2).transpose(1, 2).contiguous()  # (B, N, D)
        temb, proj, text, _ = m.condition_embedder(t.flatten(), batch["encoder_hidden_states"], None,
                                                   timestep_seq_len=t.shape[1])  # temb (B, N, D)
        proj = proj.unflatten(2, (6, -1))  # (B, N, 6, D)
        return BlockState(h, dict(temb=temb, timestep_proj=proj, text=text, rotary=rotary))

    def head(self, state: BlockState, batch: Batch) -> torch.Tensor:
        m, h = self.model, state.hidden  # (B, N, D)
        b, _, f, hh, ww = batch["latents"].shape
        pt, ph, pw = m.config.patch_size
        mod = m.scale_shift_table.unsqueeze(0) + state.extras["temb"].unsqueeze(2)  # (B, N, 2, D)
        shift, scale = (x.squeeze(2) for x in mod.chunk(2, dim=2))  # (B, N, D) each
        h = (m.norm_out(h.float()) * (1 + scale) + shift).type_as(h)
        h = m.proj_out(h)  # (B, N, C*pt*ph*pw)
        h = h.reshape(b, f // pt, hh // ph, ww // pw, pt, ph, pw, -1).permute(0, 7, 1, 4, 2, 5, 3, 6)
        return h.flatten(6, 7).flatten(4, 5).flatten(2, 3)  # (B, C, F, H, W)

    def forward(self, batch: Batch) -> torch.Tensor:
        x, t = self._inputs(batch)
        return self.model(hidden_states=x, timestep=t, encoder_hidden_states=batch["encoder_hidden_states"], return_dict=False)[0]
