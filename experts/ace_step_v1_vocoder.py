"""ACE-Step v1's music vocoder (``music_vocoder/`` of the checkpoint): log-mel -> waveform.

A ConvNeXt backbone (1-D, channels ``dims``) turns 128 log-mel bands into features; a HiFi-GAN
generator (weight-normalised transposed convs upsampling by ``prod(upsample_rates) = hop`` and
multi-kernel residual blocks, SiLU activations, tanh output) turns them into samples. One mono
channel per call; the codec runs each stereo channel through it.

Written for the checkpoint's state dict: the same module names, the weight-normalised convs as
``weight_g`` / ``weight_v`` parameters (``w = g * v / ||v||`` over all but the output axis), and the
mel front end's stored ``window`` / ``fb`` buffers under ``mel_transform``. ``load`` is strict and
names the first missing or unexpected key; ``save`` writes the same folder layout
(``config.json`` + ``diffusion_pytorch_model.safetensors``).
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn import functional as F

from soe.errors import CheckpointError
from soe.experts.ace_step_v1_mel import LogMelSpectrogram

CLASS_NAME = "ADaMoSHiFiGANV1"  # ``_class_name`` in the checkpoint's config.json
WEIGHTS = "diffusion_pytorch_model.safetensors"


@dataclass(frozen=True)
class VocoderConfig:
    """``music_vocoder/config.json`` (the defaults are the released model's)."""

    input_channels: int = 128
    depths: tuple = (3, 3, 9, 3)
    dims: tuple = (128, 256, 384, 512)
    drop_path_rate: float = 0.0  # training-only stochastic depth: no effect at inference
    kernel_sizes: tuple = (7,)
    upsample_rates: tuple = (4, 4, 2, 2, 2, 2, 2)
    upsample_kernel_sizes: tuple = (8, 8, 4, 4, 4, 4, 4)
    resblock_kernel_sizes: tuple = (3, 7, 11, 13)
    resblock_dilation_sizes: tuple = ((1, 3, 5),) * 4
    num_mels: int = 512  # the head's input width = dims[-1]
    upsample_initial_channel: int = 1024
    use_template: bool = False
    pre_conv_kernel_size: int = 13
    post_conv_kernel_size: int = 13
    sampling_rate: int = 44100
    n_fft: int = 2048
    win_length: int = 2048
    hop_length: int = 512
    f_min: float = 40
    f_max: float = 16000
    n_mels: int = 128

    def __post_init__(self):
        if math.prod(self.upsample_rates) != self.hop_length:
            raise ValueError(f"upsample_rates multiply to {math.prod(self.upsample_rates)}, hop_length is {self.hop_length}")
        if self.use_template:
            raise ValueError("use_template: true (noise-template input) is not part of the released vocoder")

    @classmethod
    def from_json(cls, path: Path) -> "VocoderConfig":
        raw = json.loads(Path(path).read_text())
        if raw.get("_class_name", CLASS_NAME) != CLASS_NAME:
            raise CheckpointError(f"{path}: _class_name is '{raw['_class_name']}', expected '{CLASS_NAME}' (ACE-Step v1 music vocoder)")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in raw if not k.startswith("_") and k not in names)
        if unknown:
            raise CheckpointError(f"{path}: unknown vocoder config key '{unknown[0]}' (known: {', '.join(sorted(names))})")
        values = {k: _tuples(v) for k, v in raw.items() if k in names}
        try:
            return cls(**values)
        except ValueError as err:
            raise CheckpointError(f"{path}: {err}") from None

    def to_json(self) -> dict:
        return {"_class_name": CLASS_NAME, **json.loads(json.dumps(dataclasses.asdict(self)))}


def _tuples(v):
    return tuple(_tuples(x) for x in v) if isinstance(v, list) else v


# ---- weight-normalised convolutions (the checkpoint's weight_g / weight_v) ---------------------------
class _WeightNorm:
    """Replace ``weight`` by ``weight_g`` (norm, one per output-axis-0 slice) and ``weight_v`` (direction)."""

    def _split_weight(self):
        w = self.weight.detach()
        del self.weight
        self.weight_g = nn.Parameter(torch.norm_except_dim(w, 2, 0))
        self.weight_v = nn.Parameter(w.clone())

    def _weight(self) -> torch.Tensor:
        return torch._weight_norm(self.weight_v, self.weight_g, 0)  # g * v / ||v||, the op torch's weight_norm uses


class WNConv1d(_WeightNorm, nn.Conv1d):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._split_weight()

    def forward(self, x):
        return self._conv_forward(x, self._weight(), self.bias)


class WNConvTranspose1d(_WeightNorm, nn.ConvTranspose1d):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._split_weight()

    def forward(self, x):
        return F.conv_transpose1d(x, self._weight(), self.bias, self.stride, self.padding, self.output_padding, self.groups, self.dilation)


def _same(kernel: int, dilation: int = 1) -> int:
    return (kernel * dilation - dilation) // 2


# ---- ConvNeXt backbone -----------------------------------------------------------------------------
class ChannelsFirstLayerNorm(nn.Module):
    """LayerNorm over axis 1 of ``(N, C, T)``."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight, self.bias, self.eps = nn.Parameter(torch.ones(dim)), nn.Parameter(torch.zeros(dim)), eps

    def forward(self, x):
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        return self.weight[:, None] * ((x - u) / torch.sqrt(s + self.eps)) + self.bias[:, None]


class ConvNeXtBlock(nn.Module):
    """Depthwise conv -> LayerNorm -> MLP (x4, GELU) -> layer scale ``gamma``."""

    def __init__(self, dim: int, kernel_size: int = 7, mlp_ratio: float = 4.0):
        super().__init__()
        self.dwconv = nn.Conv1d(dim, dim, kernel_size, padding=(kernel_size - 1) // 2, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, int(mlp_ratio * dim))
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(int(mlp_ratio * dim), dim)
        self.gamma = nn.Parameter(torch.full((dim,), 1e-6))

    def branch(self, x):  # (N, C, T) -> (N, C, T), without the residual
        h = self.dwconv(x).transpose(1, 2)  # (N, T, C)
        h = self.pwconv2(self.act(self.pwconv1(self.norm(h))))
        return (self.gamma * h).transpose(1, 2)

    def forward(self, x):
        return x + self.branch(x)


class ParallelConvNeXtBlock(nn.Module):
    """Several kernel sizes side by side: ``x + sum_k branch_k(x)``."""

    def __init__(self, dim: int, kernel_sizes: tuple):
        super().__init__()
        self.blocks = nn.ModuleList(ConvNeXtBlock(dim, k) for k in kernel_sizes)

    def forward(self, x):
        return x + sum(b.branch(x) for b in self.blocks)


class ConvNeXtBackbone(nn.Module):
    def __init__(self, c: VocoderConfig):
        super().__init__()
        dims = c.dims
        stem = nn.Sequential(nn.Conv1d(c.input_channels, dims[0], 7, padding=3, padding_mode="replicate"), ChannelsFirstLayerNorm(dims[0]))
        mids = [nn.Sequential(ChannelsFirstLayerNorm(dims[i]), nn.Conv1d(dims[i], dims[i + 1], 1)) for i in range(len(dims) - 1)]
        self.channel_layers = nn.ModuleList([stem, *mids])

        def block(dim):
            return ConvNeXtBlock(dim, c.kernel_sizes[0]) if len(c.kernel_sizes) == 1 else ParallelConvNeXtBlock(dim, c.kernel_sizes)

        self.stages = nn.ModuleList(nn.Sequential(*[block(d) for _ in range(n)]) for d, n in zip(dims, c.depths))
        self.norm = ChannelsFirstLayerNorm(dims[-1])

    def forward(self, x):  # (N, mels, T) -> (N, dims[-1], T)
        for channel_layer, stage in zip(self.channel_layers, self.stages):
            x = stage(channel_layer(x))
        return self.norm(x)


# ---- HiFi-GAN head ---------------------------------------------------------------------------------
class ResBlock(nn.Module):
    """Three (dilated conv, conv) pairs with SiLU before each conv, each pair residual."""

    def __init__(self, channels: int, kernel_size: int, dilations: tuple):
        super().__init__()
        self.convs1 = nn.ModuleList(WNConv1d(channels, channels, kernel_size, dilation=d, padding=_same(kernel_size, d)) for d in dilations)
        self.convs2 = nn.ModuleList(WNConv1d(channels, channels, kernel_size, padding=_same(kernel_size)) for _ in dilations)

    def forward(self, x):
        for c1, c2 in zip(self.convs1, self.convs2):
            x = x + c2(F.silu(c1(F.silu(x))))
        return x


class HiFiGANHead(nn.Module):
    def __init__(self, c: VocoderConfig):
        super().__init__()
        ch0 = c.upsample_initial_channel
        self.conv_pre = WNConv1d(c.num_mels, ch0, c.pre_conv_kernel_size, padding=_same(c.pre_conv_kernel_size))
        self.ups = nn.ModuleList(
            WNConvTranspose1d(ch0 // 2**i, ch0 // 2 ** (i + 1), k, u, padding=(k - u) // 2)
            for i, (u, k) in enumerate(zip(c.upsample_rates, c.upsample_kernel_sizes))
        )
        self.resblocks = nn.ModuleList(
            ResBlock(ch0 // 2 ** (i + 1), k, d)
            for i in range(len(self.ups)) for k, d in zip(c.resblock_kernel_sizes, c.resblock_dilation_sizes)
        )
        self.num_kernels = len(c.resblock_kernel_sizes)
        self.conv_post = WNConv1d(ch0 // 2 ** len(self.ups), 1, c.post_conv_kernel_size, padding=_same(c.post_conv_kernel_size))

    def forward(self, x):  # (N, num_mels, T) -> (N, 1, T * hop)
        x = self.conv_pre(x)
        for i, up in enumerate(self.ups):
            x = up(F.silu(x))  # (N, C_i, T * prod(rates[:i+1]))
            blocks = self.resblocks[i * self.num_kernels : (i + 1) * self.num_kernels]
            x = sum(b(x) for b in blocks) / self.num_kernels  # mean of the multi-kernel residual blocks
        return torch.tanh(self.conv_post(F.silu(x)))


class MusicVocoder(nn.Module):
    """``mel_transform`` (audio -> log-mel) and ``decode`` (log-mel -> audio, windowed when long)."""

    def __init__(self, config: VocoderConfig | None = None):
        super().__init__()
        c = self.config = config or VocoderConfig()
        self.backbone = ConvNeXtBackbone(c)
        self.head = HiFiGANHead(c)
        self.mel_transform = LogMelSpectrogram(c.sampling_rate, c.n_fft, c.win_length, c.hop_length, c.n_mels, c.f_min, c.f_max)

    @property
    def hop_length(self) -> int:
        return self.config.hop_length

    def forward(self, mel: torch.Tensor) -> torch.Tensor:  # (N, n_mels, T) -> (N, 1, T * hop)
        return self.head(self.backbone(mel))

    def receptive_field(self) -> int:
        """Mel frames on each side that can reach an output sample (a bound, from the kernel sizes)."""
        c = self.config
        frames = 3 + sum(n * (max(c.kernel_sizes) - 1) // 2 for n in c.depths) + c.pre_conv_kernel_size // 2
        rate = 1
        for u, k in zip(c.upsample_rates, c.upsample_kernel_sizes):
            rate *= u
            res = max(sum((kk - 1) // 2 * dd for dd in d) + len(d) * ((kk - 1) // 2) for kk, d in zip(c.resblock_kernel_sizes, c.resblock_dilation_sizes))
            frames += math.ceil(k / u) + math.ceil(res / rate)
        return frames + math.ceil(c.post_conv_kernel_size / rate)

    @torch.no_grad()
    def decode(self, mel: torch.Tensor, window: int = 1024) -> torch.Tensor:
        """``(N, n_mels, T)`` -> ``(N, 1, T * hop)``. Longer than ``window`` frames: windows of
        ``window`` frames plus a margin of at least the receptive field each side, margins dropped,
        so the result equals the whole-clip call (to float rounding) at bounded memory."""
        T, hop = mel.shape[-1], self.hop_length
        margin = self.receptive_field() + 8
        if T <= window + 2 * margin:
            return self(mel)
        out = []
        for start in range(0, T, window):
            lo, hi = max(0, start - margin), min(T, start + window + margin)
            y = self(mel[..., lo:hi])  # (N, 1, (hi - lo) * hop)
            keep = min(window, T - start)
            out.append(y[..., (start - lo) * hop : (start - lo + keep) * hop])
        return torch.cat(out, dim=-1)


def load_vocoder(folder, dtype=None, device=None) -> MusicVocoder:
    """Strictly load ``folder/{config.json, diffusion_pytorch_model.safetensors}``."""
    folder = Path(folder)
    cfg_file, weights = folder / "config.json", folder / WEIGHTS
    for f in (cfg_file, weights):
        if not f.is_file():
            raise CheckpointError(f"{f}: missing (an ACE-Step v1 music_vocoder folder holds config.json and {WEIGHTS})")
    config = VocoderConfig.from_json(cfg_file)
    with torch.device("meta"):
        model = MusicVocoder(config)
    state = load_file(weights, device=str(device or "cpu"))
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        what = f"missing key '{missing[0]}'" if missing else f"unexpected key '{unexpected[0]}'"
        raise CheckpointError(f"{weights}: {what} ({len(missing)} missing, {len(unexpected)} unexpected; "
                              f"config.json describes a vocoder of {len(expected)} tensors)")
    wrong = next((k for k, v in expected.items() if tuple(state[k].shape) != tuple(v.shape)), None)
    if wrong is not None:
        raise CheckpointError(f"{weights}: '{wrong}' has shape {tuple(state[wrong].shape)}, config.json implies {tuple(expected[wrong].shape)}")
    model.load_state_dict(state, strict=True, assign=True)
    if dtype is not None:
        model.to(dtype)
        model.mel_transform.float()  # the window and filterbank stay fp32 (the STFT runs in fp32 anyway)
    return model.eval()


def save_vocoder(model: MusicVocoder, folder) -> None:
    """Write the checkpoint layout ``load_vocoder`` (and ACE-Step's own loader) reads."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(model.config.to_json(), indent=2) + "\n")
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(folder / WEIGHTS))


def tiny_vocoder_config(**overrides) -> VocoderConfig:
    """A few-thousand-parameter vocoder with the released mel front end (128 mels, hop 512)."""
    small = dict(depths=(1, 1), dims=(16, 24), upsample_rates=(8, 8, 8), upsample_kernel_sizes=(16, 16, 16),
                 resblock_kernel_sizes=(3, 5), resblock_dilation_sizes=((1, 3, 5), (1, 3, 5)), num_mels=24,
                 upsample_initial_channel=32, pre_conv_kernel_size=7, post_conv_kernel_size=7)
    return VocoderConfig(**{**small, **overrides})

