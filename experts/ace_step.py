"""ACE-Step v1 (3.5B text/lyrics-to-music DiT) as a soe expert.

Batch keys (all tensors; ``B`` batch, ``T`` latent frames, ``L`` text tokens, ``Ly`` lyric tokens):

- ``latents``            (B, 8, 16, T)  noisy music-DCAE latent
- ``timestep``           (B,)           flow sigma in [0, 1]; the model sees ``sigma * 1000``
- ``text_hidden_states`` (B, L, 768)    umT5-base last hidden states of the style prompt
- ``text_attention_mask`` (B, L)        1 on real text tokens
- ``speaker_embeds``     (B, 512)       speaker/timbre embedding (zeros = none, as in ACE-Step)
- ``lyric_token_ids``    (B, Ly) long   ACE-Step lyric tokenizer ids
- ``lyric_mask``         (B, Ly)        1 on real lyric tokens
- ``attention_mask``     (B, T)         optional, 1 on real latent frames (default: all ones)

One token per latent frame: the 16x1 patch covers the whole 16-high latent, so the token grid is
``(t,)`` at ``sample_rate / 512 / 8`` frames per second (mel hop 512, DCAE 8x time downsampling).

Expert options (``OPTIONS``; ACE-Step's values by default, UniVerse-1's in ``recipes/universe1.yaml``):
``sample_rate`` (44100; UniVerse-1 runs the codec at 25600), ``speaker_token`` (ACE-Step prepends one
speaker-embedding token to the conditioning; UniVerse-1 conditions on ``[text, lyrics]`` only),
``lyric_len`` (lyric tokens kept: 512; UniVerse-1 keeps 128) and ``empty_lyric_tokens`` (no lyrics:
ACE-Step attends to none, UniVerse-1 to 32 tokens of id 0).
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from soe.errors import CheckpointNotFoundError
from soe.plugin.expert import TEXT_FILES, Batch, BlockState, Expert, TokenLayout, hub_patterns, latent_frames
from soe.plugin.registry import register_expert
from soe.plugin.weights import WEIGHTS, FolderWeights, has_weights, load_weights

if TYPE_CHECKING:  # the model module imports diffusers: loaded where a model is built or run
    from soe.experts.ace_step_v1_model import ACEStepTransformer2DModel

SUBFOLDER = "ace_step_transformer"  # the transformer's folder inside an ACE-Step v1 checkpoint
OPTIONS = ("sample_rate", "speaker_token", "lyric_len", "empty_lyric_tokens")  # expert settings, not model config
MEL_HOP, DCAE_TIME_DOWNSAMPLE = 512, 8

# ace_step_transformer/config.json of ACE-Step/ACE-Step-v1-3.5B (minus the _class_name/_diffusers_version keys).
ACE_STEP_V1_3_5B = {
    "in_channels": 8,
    "num_layers": 24,
    "inner_dim": 2560,
    "attention_head_dim": 128,
    "num_attention_heads": 20,
    "mlp_ratio": 2.5,
    "out_channels": 8,
    "max_position": 32768,
    "rope_theta": 1000000.0,
    "speaker_embedding_dim": 512,
    "text_embedding_dim": 768,
    "ssl_encoder_depths": [8, 8],
    "ssl_names": ["mert", "m-hubert"],
    "ssl_latent_dims": [1024, 768],
    "patch_size": [16, 1],
    "max_height": 16,
    "max_width": 32768,
    "lyric_encoder_vocab_size": 6693,
    "lyric_hidden_size": 1024,
}

# ACEStepTransformer2DModel's constructor arguments and their defaults (the stand-in fills them in as
# the model does; tests/test_stand_in.py compares this copy with the model's signature).
MODEL_DEFAULTS = {**ACE_STEP_V1_3_5B, "ssl_encoder_depths": (8, 8), "ssl_names": ("mert", "m-hubert"), "ssl_latent_dims": (1024, 768),
                  "patch_size": (16, 1), "lyric_encoder_layers": 6, "lyric_encoder_heads": 16, "lyric_encoder_ff_dim": 4096,
                  "patch_embed_channels": None}

# Same conditioning interface (umT5 768, speaker 512, lyric vocabulary), everything else tiny.
TINY = {
    **ACE_STEP_V1_3_5B,
    "num_layers": 2,
    "inner_dim": 64,
    "attention_head_dim": 16,
    "num_attention_heads": 4,
    "ssl_encoder_depths": [1, 1],
    "ssl_latent_dims": [16, 12],
    "lyric_hidden_size": 32,
    "lyric_encoder_layers": 1,
    "lyric_encoder_heads": 2,
    "lyric_encoder_ff_dim": 64,
    "patch_embed_channels": 32,
}

# Keyword arguments of LinearTransformerBlock.forward that embed() prepares once for all blocks.
_BLOCK_KWARGS = (
    "attention_mask",
    "encoder_hidden_states",
    "encoder_attention_mask",
    "rotary_freqs_cis",
    "rotary_freqs_cis_cross",
    "temb",
)


@register_expert
class AceStepV1Expert(Expert):
    name = "ace-step"
    modality = "audio"
    source = "soe.experts.ACEStepTransformer2DModel"  # soe's own, official checkpoint names
    presets = {"3.5b": ACE_STEP_V1_3_5B, "tiny": TINY}
    license = "apache-2.0"  # ACE-Step/ACE-Step-v1-3.5B
    # ACE-Step/ACE-Step-v1-3.5B's layout: one folder per part, fetched only for the key that needs it
    hub_files = {"path": hub_patterns(SUBFOLDER), "codec_path": hub_patterns("music_dcae_f8c8", "music_vocoder"),
                 "text_encoder_path": hub_patterns("umt5-base", "lyric_tokenizer", files=TEXT_FILES)}
    flow_shift = 3.0
    flow_loss = "x0"  # ACE-Step v1 trains on x0_pred = x_t - sigma * v
    # CFG's null branch (ACE-Step's pipeline and UniVerse-1 alike): text states, speaker embedding and
    # lyric token ids become zeros; the text and lyric masks stay as they are.
    condition_keys = ("text_hidden_states", "speaker_embeds", "lyric_token_ids")
    # The state after linear self-attention = the input of the softmax cross-attention (no norm between).
    tap_points = {"after_self_attn": ("cross_attn", "input")}
    lora_targets = (
        r"transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v|to_out\.0)",
        r"transformer_blocks\.\d+\.cross_attn\.(to_q|to_k|to_v|to_out\.0)",
        # 1x1 convs of the GLUMBConv feed-forward (the depthwise conv is tiny and grouped).
        r"transformer_blocks\.\d+\.ff\.(inverted_conv|point_conv)\.conv",
    )

    def __init__(self, model: ACEStepTransformer2DModel, sample_rate: int = 44100, speaker_token: bool = True,
                 lyric_len: int = 512, empty_lyric_tokens: int = 0):
        super().__init__(model)
        self.sample_rate = sample_rate  # 44100 for ACE-Step's DCAE; UniVerse-1 runs it at 25600
        self.speaker_token = bool(speaker_token)  # False: conditioning is [text, lyrics] (UniVerse-1)
        if not 0 <= int(empty_lyric_tokens) <= int(lyric_len):
            raise ValueError(f"ace-step: empty_lyric_tokens={empty_lyric_tokens} must be between 0 and lyric_len={lyric_len}")
        self.lyric_len, self.empty_lyric_tokens = int(lyric_len), int(empty_lyric_tokens)

    # ---- construction --------------------------------------------------------------------------
    @classmethod
    def from_config(cls, config: dict, device=None, dtype=None, **options) -> "AceStepV1Expert":
        config = dict(config)
        options = {**{k: config.pop(k) for k in OPTIONS if k in config}, **{k: v for k, v in options.items() if v is not None}}
        from soe.experts.ace_step_v1_model import ACEStepTransformer2DModel

        with torch.device(device or "cpu"):  # build in place: the 3.5B model never exists twice
            model = ACEStepTransformer2DModel(**config)
        if dtype is not None:
            nn.Module.to(model, dtype=dtype)  # ModelMixin.to logs a spurious fp32 warning on every dtype cast
        return cls(model.eval(), **options)

    @classmethod
    def architecture_names(cls) -> list[str]:
        return [k for k in MODEL_DEFAULTS if k not in OPTIONS]

    @classmethod
    def stand_in(cls, config: dict) -> "AceStepV1Expert":
        """ACE-Step v1's blocks from its config (soe/plugin/stand_in.py), without importing diffusers."""
        from soe.experts.ace_step_v1_stand_in import stand_in_model
        from soe.plugin.stand_in import full_config

        config = dict(config)
        options = {k: config.pop(k) for k in OPTIONS if k in config}
        return cls(stand_in_model(full_config(MODEL_DEFAULTS, config, "ACEStepTransformer2DModel")), **options)

    @staticmethod
    def _transformer_folder(path) -> Path:
        root = Path(path)
        for folder in (root / SUBFOLDER, root):
            if (folder / "config.json").is_file():
                if not has_weights(folder):
                    raise CheckpointNotFoundError(f"ACE-Step v1 transformer folder '{folder}' has config.json but no '{WEIGHTS}'")
                return folder
        raise CheckpointNotFoundError(
            f"no ACE-Step v1 transformer at '{root}': expected '{root / SUBFOLDER}/config.json' + '{WEIGHTS}' "
            f"(checkpoint root) or '{root}/config.json' + '{WEIGHTS}' (the {SUBFOLDER} folder itself)"
        )

    @classmethod
    def load(cls, path, dtype=None, device=None, **options) -> "AceStepV1Expert":
        """Load the official ``ace_step_transformer/`` weights (strict: every key must match, none renamed).

        ``dtype=None`` keeps the dtype stored in the checkpoint.
        """
        from soe.experts.ace_step_v1_model import ACEStepTransformer2DModel

        folder = cls._transformer_folder(path)
        config = ACEStepTransformer2DModel.load_config(folder)
        with torch.device("meta"):  # no random init of 3.5B weights that are overwritten anyway
            model = ACEStepTransformer2DModel.from_config(config)
        model.load_state_dict(load_weights(folder, device), strict=True, assign=True)
        if dtype is not None:
            nn.Module.to(model, dtype=dtype)
        return cls(model.eval(), **options)

    @classmethod
    def load_empty(cls, path, dtype=None, **options):
        from accelerate import init_empty_weights

        from soe.experts.ace_step_v1_model import ACEStepTransformer2DModel

        folder = cls._transformer_folder(path)
        # load builds on the meta device and draws nothing from the global RNG: neither may this
        with torch.random.fork_rng(devices=[]), init_empty_weights(include_buffers=False):
            model = ACEStepTransformer2DModel.from_config(ACEStepTransformer2DModel.load_config(folder))
        if dtype is not None:
            nn.Module.to(model, dtype=dtype)
        return cls(model.eval(), **options), FolderWeights(folder)

    def save(self, path) -> None:
        """Write ``path/ace_step_transformer/{config.json, diffusion_pytorch_model.safetensors}``."""
        self.model.save_pretrained(Path(path) / SUBFOLDER, safe_serialization=True)

    # ---- blocks ----------------------------------------------------------------------------------
    @property
    def blocks(self) -> nn.ModuleList:
        return self.model.transformer_blocks

    @property
    def hidden_size(self) -> int:
        return self.model.inner_dim

    @property
    def latent_rate(self) -> float:
        """Latent frames (= tokens) per second."""
        return self.sample_rate / MEL_HOP / DCAE_TIME_DOWNSAMPLE / self.model.config.patch_size[1]

    def _native_inputs(self, batch: Batch) -> dict:
        """The soe batch as keyword arguments of the model's own forward."""
        dtype = self.dtype
        latents = batch["latents"].to(dtype)  # (B, 8, 16, T)
        B, T, device = latents.shape[0], latents.shape[-1], latents.device
        text = batch["text_hidden_states"].to(device, dtype)  # (B, L, 768)
        lyric_ids = batch["lyric_token_ids"].to(device)  # (B, Ly)
        sigma = torch.as_tensor(batch["timestep"], device=device, dtype=torch.float32)
        mask = batch.get("attention_mask")
        text_mask, lyric_mask = batch.get("text_attention_mask"), batch.get("lyric_mask")
        return dict(
            hidden_states=latents,
            attention_mask=torch.ones(B, T, device=device, dtype=dtype) if mask is None else mask.to(device, dtype),
            encoder_text_hidden_states=text,
            text_attention_mask=torch.ones(text.shape[:2], device=device) if text_mask is None else text_mask.to(device),
            speaker_embeds=batch["speaker_embeds"].to(device, dtype),  # (B, 512)
            lyric_token_idx=lyric_ids,
            lyric_mask=torch.ones(lyric_ids.shape, device=device) if lyric_mask is None else lyric_mask.to(device),
            timestep=(sigma * 1000).expand(B),  # ACE-Step timesteps live in [0, 1000]
        )

    def _encode(self, x: dict):
        return self.model.encode(x["encoder_text_hidden_states"], x["text_attention_mask"], x["speaker_embeds"],
                                 x["lyric_token_idx"], x["lyric_mask"], speaker_token=self.speaker_token)

    def embed(self, batch: Batch) -> BlockState:
        m, x = self.model, self._native_inputs(batch)
        enc, enc_mask = self._encode(x)  # (B, [1+]L+Ly, D), (B, [1+]L+Ly)
        latents = x["hidden_states"]
        embedded_timestep = m.timestep_embedder(m.time_proj(x["timestep"]).to(latents.dtype))  # (B, D)
        hidden = m.proj_in(latents)  # (B, T, D)
        extras = dict(
            attention_mask=x["attention_mask"],
            encoder_hidden_states=enc,
            encoder_attention_mask=enc_mask,
            rotary_freqs_cis=m.rotary_emb(hidden, seq_len=hidden.shape[1]),
            rotary_freqs_cis_cross=m.rotary_emb(enc, seq_len=enc.shape[1]),
            temb=m.t_block(embedded_timestep),  # (B, 6D): adaLN-single, shared by every block
            embedded_timestep=embedded_timestep,  # the head modulates with the un-projected embedding
            output_length=latents.shape[-1],
        )
        return BlockState(hidden=hidden, extras=extras)

    def run_block(self, i: int, state: BlockState) -> BlockState:
        return self.run_block_module(self.blocks[i], state)

    def run_block_module(self, block, state: BlockState) -> BlockState:
        kwargs = {k: state.extras[k] for k in _BLOCK_KWARGS}
        if self.gradient_checkpointing and self.model.training and torch.is_grad_enabled():
            hidden = checkpoint(block, state.hidden, use_reentrant=False, **kwargs)  # (B, T, D)
        else:
            hidden = block(state.hidden, **kwargs)  # (B, T, D)
        return state.replace(hidden)

    @staticmethod
    def attention_qkv(attn, args, kwargs):
        """What ``CrossAttnProcessor`` forms: RoPE'd queries and keys, the (query x key) padding mask."""
        names = ("hidden_states", "encoder_hidden_states", "attention_mask", "encoder_attention_mask",
                 "rotary_freqs_cis", "rotary_freqs_cis_cross")
        call = {**dict(zip(names, args)), **kwargs}
        from soe.experts.ace_step_v1_block import CrossAttnProcessor, apply_rope

        if not isinstance(attn.processor.inner if hasattr(attn.processor, "inner") else attn.processor, CrossAttnProcessor):
            raise NotImplementedError("ace-step: attention_kv targets the softmax 'cross_attn' only (self-attention is linear)")
        x, ctx = call["hidden_states"], call["encoder_hidden_states"]
        B, S, _ = x.shape
        q = attn.to_q(x).view(B, S, attn.heads, -1).transpose(1, 2)  # (B, H, S, d)
        k = attn.to_k(ctx).view(B, -1, attn.heads, q.shape[-1]).transpose(1, 2)  # (B, H, L, d)
        v = attn.to_v(ctx).view(B, -1, attn.heads, q.shape[-1]).transpose(1, 2)
        if call.get("rotary_freqs_cis") is not None:
            q = apply_rope(q, call["rotary_freqs_cis"])
            if call.get("rotary_freqs_cis_cross") is not None:
                k = apply_rope(k, call["rotary_freqs_cis_cross"])
        bias, enc_mask = None, call.get("encoder_attention_mask")
        if enc_mask is not None:
            pair = call["attention_mask"][:, :, None] * enc_mask[:, None, :]  # (B, S, L)
            bias = torch.where(pair == 1, 0.0, -torch.inf)[:, None].to(q.dtype)  # (B, 1, S, L)
        return q, k, v, bias

    def head(self, state: BlockState, batch: Batch) -> torch.Tensor:
        e = state.extras
        return self.model.final_layer(state.hidden, e["embedded_timestep"], e["output_length"])  # (B, 8, 16, T)

    def forward(self, batch: Batch) -> torch.Tensor:
        x = self._native_inputs(batch)
        enc, enc_mask = self._encode(x)
        latents = x["hidden_states"]
        return self.model.decode(latents, x["attention_mask"], enc, enc_mask, x["timestep"],
                                 output_length=latents.shape[-1]).sample  # (B, 8, 16, T) velocity

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        super().set_gradient_checkpointing(enabled)  # run_block
        if enabled:  # native forward (blocks and lyric encoder), like the official flag
            self.model.enable_gradient_checkpointing()
        else:
            self.model.disable_gradient_checkpointing()

    # ---- time and data -------------------------------------------------------------------------
    def token_layout(self, batch: Batch) -> TokenLayout:
        height, frames = batch["latents"].shape[-2:]
        ph, pw = self.model.config.patch_size
        if height != ph:  # several patch rows would put frequency, not time, on the outer axis
            raise ValueError(f"ace-step expects latents {ph} high (one token per frame), got height {height}")
        return TokenLayout(grid=(frames // pw,), axes=("t",), time_rate=self.latent_rate)

    def max_seconds(self) -> float | None:
        return self.model.config.max_width / self.latent_rate  # patch-embedding positions along time

    def latent_multiples(self) -> dict[int, int]:
        ph, pw = self.model.config.patch_size  # latents (B, 8, 16, T)
        return {2: ph, 3: pw}

    def latent_shape(self, batch_size: int, seconds: float) -> tuple[int, ...]:
        cfg = self.model.config
        frames = latent_frames(seconds, self.latent_rate)
        return (batch_size, cfg.in_channels, cfg.max_height, frames)

    def codec(self, path=None, dtype=None):
        """ACE-Step v1's music codec (DCAE + vocoder, ``experts.ace_step_v1_codec``) from a checkpoint
        root holding ``music_dcae_f8c8/`` and ``music_vocoder/``, at this expert's sample rate (44.1 kHz,
        or UniVerse-1's 25.6 kHz). ``path=None``: a tiny linear per-frame codec of the same latent shape."""
        if path is not None:
            from soe.experts.ace_step_v1_codec import MusicCodec

            codec = MusicCodec.load(path, sample_rate=self.sample_rate, dtype=dtype)
            self._check_codec(codec, path)
            return codec
        from soe.plugin.codec import FrameAudioCodec

        c, h = self.model.config.in_channels, self.model.config.max_height
        return FrameAudioCodec(self.sample_rate, MEL_HOP * DCAE_TIME_DOWNSAMPLE, (c, h), time_axis=3, channels=2)

    def _check_codec(self, codec, path) -> None:
        from soe.errors import CheckpointError

        cfg, dcae = self.model.config, codec.dcae.config
        height = codec.vocoder.config.n_mels // codec.time_downsample
        if (dcae.latent_channels, height) != (cfg.in_channels, cfg.max_height) or codec.frame_hop != MEL_HOP * DCAE_TIME_DOWNSAMPLE:
            raise CheckpointError(f"{path}: the music codec makes {dcae.latent_channels} x {height} latents every {codec.frame_hop} samples, "
                                  f"the ace-step model takes {cfg.in_channels} x {cfg.max_height} every {MEL_HOP * DCAE_TIME_DOWNSAMPLE}")

    def text_encoder(self, path, device=None, dtype=None):
        """umT5-base (``umt5-base/`` of an ACE-Step v1 checkpoint, or that folder) + ACE-Step's lyric
        vocabulary when the folder has one (``vocab.json``); see ``experts.text_encoders``."""
        from soe.experts.text_encoders import AceStepV1TextEncoder

        cfg = self.model.config
        enc = AceStepV1TextEncoder.load(path, device=device, dtype=dtype, speaker_dim=cfg.speaker_embedding_dim,
                                        lyric_len=self.lyric_len, empty_lyric_tokens=self.empty_lyric_tokens)
        if enc.encoder.config.d_model != cfg.text_embedding_dim:
            raise ValueError(f"ace-step: text encoder at '{path}' is {enc.encoder.config.d_model} wide, the model expects {cfg.text_embedding_dim}")
        return enc

    def dummy_batch(self, batch_size: int = 1, seconds: float = 1.0, generator: torch.Generator | None = None) -> Batch:
        cfg, device = self.model.config, self.device
        text_len, lyric_len = 8, 12
        text_mask = torch.ones(batch_size, text_len, dtype=torch.long)
        lyric_mask = torch.ones(batch_size, lyric_len, dtype=torch.long)
        for b in range(1, batch_size):  # later samples carry some padding, so masks are exercised
            text_mask[b, text_len - min(b, text_len - 1) :] = 0
            lyric_mask[b, lyric_len - min(2 * b, lyric_len - 1) :] = 0
        batch = {
            "latents": torch.randn(self.latent_shape(batch_size, seconds), generator=generator),
            "timestep": torch.rand(batch_size, generator=generator),
            "text_hidden_states": torch.randn(batch_size, text_len, cfg.text_embedding_dim, generator=generator),
            "text_attention_mask": text_mask,
            "speaker_embeds": torch.randn(batch_size, cfg.speaker_embedding_dim, generator=generator),
            "lyric_token_ids": torch.randint(0, cfg.lyric_encoder_vocab_size, (batch_size, lyric_len), generator=generator),
            "lyric_mask": lyric_mask,
        }
        return {k: v.to(device) for k, v in batch.items()}

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, sample_rate={self.sample_rate}, speaker_token={self.speaker_token}"
