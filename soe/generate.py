"""``soe generate``: a stitched model (recipe + trained run) -> mp4 with sound + PNG contact sheet.

Conditioning comes, in this order, from precomputed embeddings (``sample.conditions``: a
safetensors file with ``a/<key>`` and ``b/<key>`` tensors, batch axis first), from each expert's
own text encoder (``experts.<side>.text_encoder_path``), or, for experts built from random weights
(tiny presets, the demo), from a deterministic pseudo-embedding of the prompt.

CFG's null branch: experts whose family encodes a negative prompt (``null_condition:
negative_prompt``, Wan) get ``sample.negative_prompt`` (default "") through their own text encoder,
or ``<side>/negative/<key>`` tensors of the conditions file; the others zero their text conditioning.
"""
from __future__ import annotations

from pathlib import Path

import torch
from rich.console import Console
from rich.progress import Progress
from safetensors.torch import load_file, save_file

from soe.config import RecipeError, to_container
from soe.flow import generator_for, stream_seed
from soe.media import contact_sheet, write_mp4
from soe.sampling import SamplingSettings, sample_stitched


def sampling_settings(cfg, seed_offset: int = 0) -> SamplingSettings:
    s = cfg.sample
    return SamplingSettings(steps=s.steps, scheduler=s.scheduler, guidance=dict(to_container(s.guidance)),
                            shifts=dict(to_container(s.shift)), seed=s.seed + seed_offset)


def prompt_conditions(stitcher, cfg, prompt: str, n: int, seconds: float) -> dict:
    """Pseudo text conditioning: each expert's conditioning drawn from a generator seeded by the prompt."""
    out = {}
    for side in ("a", "b"):
        e = getattr(stitcher, side)
        if cfg.experts[side].path is not None:
            raise RecipeError(f"sample.conditions: expert {side} ('{e.name}') has real weights; give precomputed "
                              "conditioning (sample.conditions=FILE.safetensors with a/<key> and b/<key> tensors)")
        g = generator_for(stream_seed(cfg.sample.seed, "prompt", prompt), side)
        out[side] = e.conditioning(n, seconds, generator=g)
    return out


def text_conditions(stitcher, cfg, prompt: str, n: int, negative_prompt: str | None = None) -> tuple[dict, dict]:
    """Each expert's own text encoder, loaded from ``experts.<side>.text_encoder_path``: the prompt's
    conditioning per side, and the negative prompt's for the sides whose null branch uses one."""
    out, negative = {}, {}
    for side in ("a", "b"):
        e = getattr(stitcher, side)
        path = cfg.experts[side].text_encoder_path
        try:
            encode = e.text_encoder(path, device=e.device)
        except NotImplementedError as err:
            raise RecipeError(f"experts.{side}.text_encoder_path: {err}") from None
        except (OSError, ValueError) as err:  # missing files, another model's encoder, a width the expert cannot take
            raise RecipeError(f"experts.{side}.text_encoder_path: cannot use '{path}' for expert '{e.name}': "
                              f"{' '.join(str(err).split())[:300]}") from None
        out[side] = {k: v.to(e.device) for k, v in encode([prompt] * n).items()}
        if negative_prompt is not None and e.null_condition == "negative_prompt":
            negative[side] = {k: v.to(e.device) for k, v in encode([negative_prompt]).items()}
    return out, negative


def file_conditions(stitcher, path, n: int) -> tuple[dict, dict]:
    """``a/<key>``, ``b/<key>`` tensors (and optionally ``<side>/negative/<key>``, the encoded negative prompt)."""
    tensors = load_file(path)
    out, negative = {"a": {}, "b": {}}, {}
    for k, v in tensors.items():
        side, _, key = k.partition("/")
        if side not in out or not key:
            raise RecipeError(f"sample.conditions: tensor '{k}' in '{path}' is not named 'a/<key>' or 'b/<key>'")
        if key.startswith("negative/"):
            e = getattr(stitcher, side)
            negative.setdefault(side, {})[key.removeprefix("negative/")] = v.to(e.device, e.dtype if v.is_floating_point() else v.dtype)
            continue
        out[side][key] = v if v.shape[0] == n else v[:1].expand(n, *v.shape[1:])
    for side in ("a", "b"):
        e = getattr(stitcher, side)
        missing = [k for k in e.condition_keys if k not in out[side]]
        if missing:
            raise RecipeError(f"sample.conditions: '{path}' lacks {side}/{missing[0]} needed by expert '{e.name}'")
        out[side] = {k: v.to(e.device, e.dtype if v.is_floating_point() else v.dtype) for k, v in out[side].items()}
    return out, negative


def media_sides(stitcher) -> tuple[str, str]:
    mods = {side: getattr(stitcher, side).modality for side in ("a", "b")}
    video = [s for s, m in mods.items() if m == "video"]
    audio = [s for s, m in mods.items() if m == "audio"]
    if len(video) != 1 or len(audio) != 1:
        raise RecipeError(f"generate: an mp4 with sound needs one video and one audio expert, got {mods}")
    return video[0], audio[0]


@torch.no_grad()
def render_samples(stitcher, cfg, out_dir, codecs: dict | None = None, seed_offset: int = 0, progress=None,
                   write: bool = True) -> list[Path]:
    """Sample, decode through each expert's codec, write ``sample_NN.mp4`` + ``sample_NN.png`` + latents.

    Under a sharded strategy every rank must sample (the forward gathers parameters); only the
    rank with ``write=True`` writes files."""
    out_dir = Path(out_dir)
    seconds = cfg.sample.seconds or cfg.data.seconds
    n = cfg.sample.num_samples
    v_side, a_side = media_sides(stitcher)
    negative = None
    if cfg.sample.conditions is not None:
        conditions, negative = file_conditions(stitcher, cfg.sample.conditions, n)
    elif all(cfg.experts[side].text_encoder_path for side in ("a", "b")):
        conditions, negative = text_conditions(stitcher, cfg, cfg.sample.prompt, n, cfg.sample.negative_prompt)
    else:
        conditions = prompt_conditions(stitcher, cfg, cfg.sample.prompt, n, seconds)
    was_training = stitcher.training
    stitcher.eval()
    try:
        latents = sample_stitched(stitcher, conditions, seconds, sampling_settings(cfg, seed_offset), progress=progress,
                                  negative=negative)
    finally:
        stitcher.train(was_training)
    codecs = codecs or load_codecs(stitcher, cfg)
    video = codecs[v_side].decode(latents[v_side].to(_device_of(codecs[v_side])))  # (B, 3, F, H, W)
    audio = codecs[a_side].decode(latents[a_side])  # (B, C, N)
    fps, sr = codecs[v_side].rate, int(codecs[a_side].rate)
    if not write:
        return []
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for i in range(n):
        mp4 = write_mp4(out_dir / f"sample_{i:02d}.mp4", video[i], fps, audio[i], sr)
        png = contact_sheet(out_dir / f"sample_{i:02d}.png", video[i], fps, audio[i], sr)
        written += [mp4, png]
    save_file({f"{side}/latents": latents[side].float().cpu().contiguous() for side in latents}, out_dir / "latents.safetensors")
    return written


def _device_of(module) -> torch.device:
    return next(iter(module.parameters()), torch.empty(0)).device


def load_codecs(stitcher, cfg) -> dict:
    codecs = {}
    for side in ("a", "b"):
        e = getattr(stitcher, side)
        if cfg.sample.decode == "synthetic_preview":  # the synthetic task's own readout (demo)
            from soe.train.synthetic import SyntheticPreviewCodec

            codecs[side] = SyntheticPreviewCodec(e)
            continue
        try:
            codecs[side] = e.codec(cfg.experts[side].codec_path).to(e.device)
        except NotImplementedError as err:
            raise RecipeError(f"experts.{side}.codec_path: {err}") from None
    return codecs


def generate(cfg, console: Console | None = None) -> list[Path]:
    """Build the recipe's stitched model, load the trained run, render the samples."""
    from soe.builders import build_stitcher
    from soe.train.checkpoint import load_trained

    console = console or Console()
    torch.manual_seed(cfg.seed)
    stitcher = build_stitcher(cfg)
    if cfg.sample.ckpt is not None:
        folder = Path(cfg.sample.ckpt)
        folder = folder / "trained" if (folder / "trained").is_dir() else folder
        try:
            load_trained(stitcher, folder)
        except FileNotFoundError as err:
            raise RecipeError(f"sample.ckpt: {err}") from None
    out = Path(cfg.sample.out or Path(cfg.run_dir) / "samples")
    with Progress(console=console, transient=True) as bar:
        task = bar.add_task("sampling", total=cfg.sample.steps)
        files = render_samples(stitcher, cfg, out, progress=lambda i, total: bar.update(task, completed=i))
    for f in files:
        console.print(f"wrote [bold]{f}[/]")
    return files
