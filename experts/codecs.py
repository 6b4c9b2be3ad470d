"""The diffusers autoencoders behind soe's built-in experts, wrapped as ``soe.plugin.codec.LatentCodec``s."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import AutoencoderKLWan, AutoencoderOobleck
from torch import nn

from soe.errors import CheckpointError, one_line


def _vae_folder(path, cls, subfolder: str = "vae") -> Path:
    """The folder of a ``cls`` autoencoder: ``path/vae`` or ``path`` itself; another family's folder is refused."""
    path = Path(path)
    folder = path / subfolder if (path / subfolder / "config.json").is_file() else path
    cfg = folder / "config.json"
    if not cfg.is_file():
        raise CheckpointError(f"{path}: no {cls.__name__} folder: expected '{path}/{subfolder}/config.json' or '{path}/config.json'")
    try:
        name = json.loads(cfg.read_text()).get("_class_name")
    except (ValueError, AttributeError) as err:
        raise CheckpointError(f"{cfg}: not a diffusers model config ({one_line(err)})") from None
    if name != cls.__name__:
        raise CheckpointError(f"{cfg}: _class_name is '{name}', expected '{cls.__name__}' for this expert's codec")
    return folder


def _from_pretrained(cls, folder: Path, dtype):
    try:
        return cls.from_pretrained(folder, torch_dtype=dtype or torch.float32).eval()
    except (OSError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"{folder}: cannot load {cls.__name__}: {one_line(err)}") from None


class WanVideoCodec(nn.Module):
    """``AutoencoderKLWan`` with Wan's latent normalisation: latents = (z - mean) / std."""

    modality = "video"

    def __init__(self, vae: AutoencoderKLWan, fps: float):
        super().__init__()
        self.vae, self.rate = vae, float(fps)
        c = vae.config.z_dim
        self.register_buffer("mean", torch.tensor(vae.config.latents_mean[:c]).view(1, c, 1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(vae.config.latents_std[:c]).view(1, c, 1, 1, 1), persistent=False)

    @classmethod
    def load(cls, path, fps: float, dtype=None) -> "WanVideoCodec":
        return cls(_from_pretrained(AutoencoderKLWan, _vae_folder(path, AutoencoderKLWan), dtype), fps)

    @classmethod
    def tiny(cls, z_dim: int, fps: float, seed: int = 0, spatial: int = 8) -> "WanVideoCodec":
        """Tiny random Wan VAE: the Wan2.1 layout (4x8x8) or, with ``spatial=16``, Wan2.2's
        (residual blocks + 2x2 pixel patchify: 4x16x16)."""
        wan22 = dict(is_residual=True, patch_size=2, in_channels=12, out_channels=12, scale_factor_spatial=16, decoder_base_dim=16)
        with torch.random.fork_rng(devices=[]):  # seeded weights without touching the caller's RNG
            torch.manual_seed(seed)
            vae = AutoencoderKLWan(base_dim=16 if spatial == 16 else 8, z_dim=z_dim, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                   latents_mean=[0.0] * z_dim, latents_std=[1.0] * z_dim, **(wan22 if spatial == 16 else {}))
        return cls(vae.eval(), fps)

    def encode(self, video: torch.Tensor) -> torch.Tensor:  # (B, 3, F, H, W) -> (B, C, 1 + (F-1)/4, H/8, W/8)
        z = self.vae.encode(video.to(self.vae.dtype)).latent_dist.mode()
        return (z - self.mean.to(z)) / self.std.to(z)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:  # inverse; frames = 1 + 4 * (latent frames - 1)
        z = latents.to(self.vae.dtype) * self.std.to(self.vae.dtype) + self.mean.to(self.vae.dtype)
        return self.vae.decode(z).sample.clamp(-1, 1)


class OobleckAudioCodec(nn.Module):
    """``AutoencoderOobleck`` (ACE-Step 1.5, Stable Audio): latents ``(B, T, C)`` <-> audio ``(B, 2, samples)``."""

    modality = "audio"

    def __init__(self, vae: AutoencoderOobleck, time_last: bool = False):
        super().__init__()
        self.vae, self.rate, self.time_last = vae, float(vae.config.sampling_rate), time_last

    @classmethod
    def load(cls, path, dtype=None, time_last: bool = False) -> "OobleckAudioCodec":
        return cls(_from_pretrained(AutoencoderOobleck, _vae_folder(path, AutoencoderOobleck), dtype), time_last)

    @classmethod
    def tiny(cls, latent_dim: int, sample_rate: int, hop: int, seed: int = 0, time_last: bool = False) -> "OobleckAudioCodec":
        ratios = _factor_hop(hop)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            # the encoder's output holds mean and scale: 2 * latent_dim channels
            vae = AutoencoderOobleck(encoder_hidden_size=2 * latent_dim, downsampling_ratios=ratios, channel_multiples=[1] * len(ratios),
                                     decoder_channels=8, decoder_input_channels=latent_dim, audio_channels=2, sampling_rate=sample_rate)
        return cls(vae.eval(), time_last)

    def encode(self, audio: torch.Tensor) -> torch.Tensor:
        if audio.shape[1] == 1:
            audio = audio.expand(-1, 2, -1)
        z = self.vae.encode(audio.to(self.vae.dtype)).latent_dist.mode()  # (B, C, T)
        return z if self.time_last else z.transpose(1, 2)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        z = latents if self.time_last else latents.transpose(1, 2)
        return self.vae.decode(z.to(self.vae.dtype)).sample.clamp(-1, 1)


def _factor_hop(hop: int) -> list[int]:
    """Split a hop length into Oobleck stride factors (e.g. 1920 -> [2, 4, 4, 6, 10])."""
    factors, n = [], hop
    for f in (10, 8, 6, 5, 4, 3, 2):
        while n % f == 0 and len(factors) < 6:
            factors.append(f)
            n //= f
    if n != 1:
        raise ValueError(f"cannot split hop length {hop} into Oobleck strides")
    return sorted(factors)
