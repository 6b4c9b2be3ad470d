"""ACE-Step v1's music codec: stereo audio <-> ``(B, 8, 16, T)`` latents, as ``soe.plugin.codec.LatentCodec``.

encode: each channel -> log-mel (``MusicVocoder.mel_transform``: 128 bands, hop 512, fp32) ->
rescaled from [-11, 3] to [-1, 1] -> the music DCAE's encoder (diffusers ``AutoencoderDC``, 2 mel
channels in, 8 x 16 latent out, 8x down in time and frequency) -> ``(z + 1.9091) * 0.1786``.
decode: the inverse normalisation -> the DCAE's decoder -> mel back to [-11, 3] -> the vocoder,
each channel separately -> ``(B, 2, samples)``. One latent frame = 8 mel frames = 4096 samples.

Two rate conventions, both with the 44.1 kHz filterbank the vocoder stores:
- 44.1 kHz (ACE-Step v1): audio is zero-padded on the right to a multiple of 4096 samples.
- 25.6 kHz (UniVerse-1, 6.25 latent frames/s = Wan's 25 fps / 4): unless the length is already a
  multiple of 4096, the first 1024 samples (one video frame) are put in front three times, so the
  first latent frame covers the video's first frame alone, as Wan's causal VAE does; a clip of
  ``1 + 4k`` frames then gives ``k + 1`` latent frames, Wan's count. ``decode`` drops that 3072-sample
  prelude again, so decoded audio starts with the first video frame. (Lengths the released code
  cannot encode, prelude included more than 511 samples past a multiple of 4096, are zero-padded.)
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import AutoencoderDC
from safetensors.torch import load_file
from torch import nn

from soe.errors import CheckpointError, SoeError
from soe.experts.ace_step_v1_vocoder import ConvNeXtBlock, MusicVocoder, load_vocoder, save_vocoder, tiny_vocoder_config

DCAE_FOLDER, VOCODER_FOLDER = "music_dcae_f8c8", "music_vocoder"  # inside an ACE-Step v1 checkpoint root
DCAE_WEIGHTS = "diffusion_pytorch_model.safetensors"
MEL_MIN, MEL_MAX = -11.0, 3.0  # log-mel range mapped onto [-1, 1] for the DCAE
LATENT_SHIFT, LATENT_SCALE = -1.9091, 0.1786  # latents = (z - shift) * scale
UNIVERSE1_RATE = 25600
VIDEO_FRAME_SAMPLES = 1024  # 25.6 kHz / 25 fps
PRELUDE_REPEATS = 3  # Wan's temporal stride 4, minus the frame itself


class SampleRateError(SoeError, ValueError):
    """A sample rate the ACE-Step v1 music codec has no convention for."""


class MusicCodec(nn.Module):
    """``dcae`` (diffusers ``AutoencoderDC`` as stored) + ``vocoder`` (``MusicVocoder``) at ``rate``."""

    modality = "audio"

    def __init__(self, dcae: AutoencoderDC, vocoder: MusicVocoder, sample_rate: int, decode_window: int = 512):
        super().__init__()
        native = vocoder.config.sampling_rate
        if int(sample_rate) not in (native, UNIVERSE1_RATE):
            raise SampleRateError(f"sample_rate: the ACE-Step v1 music codec serves {native} Hz (ACE-Step v1) or {UNIVERSE1_RATE} Hz "
                                  f"(UniVerse-1, 6.25 latent frames/s), not {sample_rate}; set the expert's options.sample_rate")
        self.dcae, self.vocoder, self.rate = dcae, vocoder, float(sample_rate)
        self.frame_hop = vocoder.hop_length * self.time_downsample  # samples per latent frame (4096)
        self.prelude = 0 if int(sample_rate) == native else PRELUDE_REPEATS * VIDEO_FRAME_SAMPLES
        self.decode_window = decode_window  # latent frames per DCAE decoder call for long clips

    @property
    def time_downsample(self) -> int:
        return 2 ** (len(self.dcae.config.encoder_block_out_channels) - 1)

    # ---- lengths -------------------------------------------------------------------------------------
    def _framed_length(self, samples: int) -> tuple[int, int]:
        """(prelude samples put in front, zeros put behind) for a clip of ``samples``."""
        hop, mel_hop = self.frame_hop, self.vocoder.hop_length
        if self.prelude and samples % hop:
            front = PRELUDE_REPEATS * min(samples, self.prelude // PRELUDE_REPEATS)
            n = samples + front
            return front, 0 if n % hop < mel_hop and n >= hop else -n % hop  # the reflect pad covers < one mel hop
        return 0, -samples % hop

    def latent_frames(self, samples: int) -> int:
        """Latent frames ``encode`` gives for a clip of ``samples``."""
        front, back = self._framed_length(samples)
        return (front + samples + back) // self.frame_hop

    def clip_samples(self, latent_frames: int) -> int:
        """Samples of a clip that encodes to ``latent_frames`` with nothing padded, and the length
        ``decode`` returns: ``T * 4096`` at 44.1 kHz; ``1024 * (1 + 4 (T - 1))`` at 25.6 kHz, the
        audio of Wan's ``1 + 4 (T - 1)`` frames at 25 fps."""
        return latent_frames * self.frame_hop - self.prelude

    # ---- encode / decode -----------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, audio: torch.Tensor) -> torch.Tensor:  # (B, 1|2, samples) in [-1, 1] -> (B, 8, 16, T)
        if audio.ndim != 3 or audio.shape[1] not in (1, 2):
            raise ValueError(f"ace-step codec: expected audio (B, 1 or 2, samples), got {tuple(audio.shape)}")
        audio = audio.float().expand(-1, 2, -1)  # mono = the same signal on both channels
        front, back = self._framed_length(audio.shape[-1])
        if front:
            audio = torch.cat([audio[..., : front // PRELUDE_REPEATS].repeat(1, 1, PRELUDE_REPEATS), audio], dim=-1)
        if back:
            audio = nn.functional.pad(audio, (0, back))
        B = audio.shape[0]
        mel = self.vocoder.mel_transform(audio.reshape(2 * B, -1))  # (2B, 128, frames), fp32
        mel = mel.reshape(B, 2, *mel.shape[1:])  # (B, 2, 128, frames): frames a multiple of 8
        mel = ((mel - MEL_MIN) / (MEL_MAX - MEL_MIN) - 0.5) / 0.5  # [-11, 3] -> [-1, 1]
        z = self.dcae.encoder(mel.to(self.dcae.dtype)).float()  # (B, 8, 16, frames / 8)
        return (z - LATENT_SHIFT) * LATENT_SCALE

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:  # (B, 8, 16, T) -> (B, 2, T * 4096 - prelude)
        z = latents.float() / LATENT_SCALE + LATENT_SHIFT
        mel = self._dcae_decode(z.to(self.dcae.dtype)).float()  # (B, 2, 128, 8T), in [-1, 1]
        mel = (mel * 0.5 + 0.5) * (MEL_MAX - MEL_MIN) + MEL_MIN
        B, C, M, F = mel.shape
        wav = self.vocoder.decode(mel.reshape(B * C, M, F).to(self._vocoder_dtype)).float()  # (2B, 1, 512 F)
        return wav.reshape(B, C, -1)[..., self.prelude :]

    @property
    def _vocoder_dtype(self):
        return self.vocoder.head.conv_pre.weight_v.dtype

    def _dcae_decode(self, z: torch.Tensor) -> torch.Tensor:
        """The DCAE decoder over the whole clip, or for clips longer than ``decode_window`` latent
        frames over windows that overlap by half, keeping each window's central half."""
        T, W = z.shape[-1], self.decode_window
        if T <= W:
            return self.dcae.decoder(z)
        ctx, core, up = W // 4, W - W // 2, self.time_downsample
        out = []
        for start in range(0, T, core):
            lo, hi = max(0, start - ctx), min(T, start + core + ctx)
            keep = min(core, T - start)
            mel = self.dcae.decoder(z[..., lo:hi])  # (B, 2, 128, (hi - lo) * 8)
            out.append(mel[..., (start - lo) * up : (start - lo + keep) * up])
        return torch.cat(out, dim=-1)

    # ---- folders -------------------------------------------------------------------------------------
    @classmethod
    def load(cls, path, sample_rate: int, dtype=None, device=None) -> "MusicCodec":
        """From an ACE-Step v1 checkpoint root holding ``music_dcae_f8c8/`` and ``music_vocoder/``."""
        root = Path(path)
        if root.name in (DCAE_FOLDER, VOCODER_FOLDER) and (root.parent / DCAE_FOLDER).is_dir():
            root = root.parent
        dcae_cfg = root / DCAE_FOLDER / "config.json"
        if not dcae_cfg.is_file() or not (root / VOCODER_FOLDER).is_dir():
            raise CheckpointError(f"{root}: not an ACE-Step v1 checkpoint root: expected {DCAE_FOLDER}/config.json and "
                                  f"{VOCODER_FOLDER}/ inside it{_what_is_there(root)}")
        dcae = _load_dcae(root / DCAE_FOLDER, dtype, device)
        vocoder = load_vocoder(root / VOCODER_FOLDER, dtype=dtype, device=device)
        if dcae.config.in_channels != 2 or vocoder.config.n_mels % (2 ** (len(dcae.config.encoder_block_out_channels) - 1)):
            raise CheckpointError(f"{dcae_cfg}: in_channels {dcae.config.in_channels} / {len(dcae.config.encoder_block_out_channels)} "
                                  f"blocks do not fit {vocoder.config.n_mels}-band stereo mels (expected in_channels 2)")
        return cls(dcae, vocoder, sample_rate).eval()

    def save(self, root) -> None:
        """Write ``root/music_dcae_f8c8`` and ``root/music_vocoder`` in the checkpoint's layout."""
        self.dcae.save_pretrained(Path(root) / DCAE_FOLDER, safe_serialization=True)
        save_vocoder(self.vocoder, Path(root) / VOCODER_FOLDER)

    @classmethod
    def tiny(cls, sample_rate: int = 44100, seed: int = 0) -> "MusicCodec":
        """Random weights, the released layout and interfaces (128 stereo mel bands -> 8 x 16 latents)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            dcae = AutoencoderDC(**TINY_DCAE)
            vocoder = MusicVocoder(tiny_vocoder_config())
            for block in vocoder.modules():  # ConvNeXt's 1e-6 layer scale would leave its MLPs untested
                if isinstance(block, ConvNeXtBlock):
                    block.gamma.data.normal_(0, 0.5)
        return cls(dcae.eval(), vocoder.eval(), sample_rate)


# AutoencoderDC arguments with the released music DCAE's structure (2 mel channels, 8 latent channels,
# 4 stages = 8x down: three ResBlock stages, one EfficientViT stage; Conv down, interpolate up), tiny widths.
TINY_DCAE = dict(
    in_channels=2, latent_channels=8, attention_head_dim=8,
    encoder_block_types=["ResBlock", "ResBlock", "ResBlock", "EfficientViTBlock"],
    decoder_block_types=["ResBlock", "ResBlock", "ResBlock", "EfficientViTBlock"],
    encoder_block_out_channels=[8, 8, 16, 16], decoder_block_out_channels=[8, 8, 16, 16],
    encoder_layers_per_block=[1, 1, 1, 1], decoder_layers_per_block=[1, 1, 1, 1],
    encoder_qkv_multiscales=[[], [], [5], [5]], decoder_qkv_multiscales=[[], [], [5], [5]],
    upsample_block_type="interpolate", downsample_block_type="Conv",
    decoder_norm_types="rms_norm", decoder_act_fns="silu", scaling_factor=0.41407,
)


def _load_dcae(folder: Path, dtype, device) -> AutoencoderDC:
    """``AutoencoderDC`` from its folder, strictly (every stored key used, none missing)."""
    cfg_file, weights = folder / "config.json", folder / DCAE_WEIGHTS
    config = json.loads(cfg_file.read_text())
    if config.get("_class_name") != "AutoencoderDC":
        raise CheckpointError(f"{cfg_file}: _class_name is '{config.get('_class_name')}', expected 'AutoencoderDC' (ACE-Step v1 music DCAE)")
    if not weights.is_file():
        raise CheckpointError(f"{weights}: missing")
    with torch.device("meta"):
        dcae = AutoencoderDC.from_config(config)
    state, expected = load_file(weights, device=str(device or "cpu")), dcae.state_dict()
    missing, unexpected = [k for k in expected if k not in state], [k for k in state if k not in expected]
    if missing or unexpected:
        what = f"missing key '{missing[0]}'" if missing else f"unexpected key '{unexpected[0]}'"
        raise CheckpointError(f"{weights}: {what} ({len(missing)} missing, {len(unexpected)} unexpected for its config.json)")
    wrong = next((k for k, v in expected.items() if tuple(state[k].shape) != tuple(v.shape)), None)
    if wrong is not None:
        raise CheckpointError(f"{weights}: '{wrong}' has shape {tuple(state[wrong].shape)}, config.json implies {tuple(expected[wrong].shape)}")
    dcae.load_state_dict(state, strict=True, assign=True)
    if dtype is not None:
        nn.Module.to(dcae, dtype=dtype)
    return dcae.eval()


def _what_is_there(root: Path) -> str:
    """A hint when the folder belongs to another family (a diffusers pipeline or a single model)."""
    for cfg in (root / "model_index.json", root / "config.json", root / "vae" / "config.json"):
        if cfg.is_file():
            try:
                name = json.loads(cfg.read_text()).get("_class_name")
            except (ValueError, OSError):
                name = None
            if name:
                return f" ('{cfg}' describes a {name}, not ACE-Step v1's music DCAE + vocoder)"
    return ""

