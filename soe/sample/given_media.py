"""``soe generate ... image= | video= | audio= | extend=``: media files -> given latents for sampling.

The given media is decoded with PyAV, brought to what the expert's own codec works at (frames
picked at the codec's fps, centre-cropped and resized to its frame size; audio resampled to its
rate) and trimmed to the asked seconds, then encoded by that codec. Which latent frames are given
follows the task (soe/flow/conditioning.py): the whole video (``video=``: video-to-audio), the whole audio
(``audio=``: audio-to-video), the first video latent frame (``image=``), or the first
``sample.extend_seconds`` of both (``extend=``). Every problem is a one-line :class:`GivenMediaError`
raised before anything is sampled or written.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
import torch

from soe.errors import RecipeError, one_line
from soe.flow.conditioning import GivenLatents, TaskError, check_task, given_frames, prefix_mask
from soe.schema.sample import GIVEN_MEDIA

MODES = GIVEN_MEDIA  # sample.<key> -> task


class GivenMediaError(RecipeError):
    """A conditioning file that cannot serve: missing stream, too short, unreadable, wrong mode."""


@dataclass
class Given:
    """What a conditioning file gives: latents per side, the media it came from, and the given seconds."""

    key: str  # image | video | audio | extend
    task: str
    latents: dict[str, GivenLatents]
    media: dict[str, torch.Tensor]  # modality -> (B, 3, F, H, W) video or (B, C, N) audio at the codec's shape
    seconds: dict[str, float]  # modality -> seconds from the start that are given


def requested(cfg) -> tuple[str, str] | None:
    """``(key, path)`` of the one conditioning input of ``sample``, or None."""
    for key in MODES:
        if cfg.sample[key] is not None:
            return key, str(cfg.sample[key])
    return None


def media_shape(codec, latent_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The media shape the codec turns into ``latent_shape`` (read off a decode of zeros: no codec arithmetic)."""
    with torch.no_grad():
        probe = codec.decode(torch.zeros((1, *latent_shape[1:]), device=_device(codec)))
    return tuple(probe.shape[1:])


def _device(module):
    return next(iter(module.parameters()), torch.empty(0)).device


def _streams(path: str, key: str) -> tuple[bool, bool]:
    """Whether a file has a video stream and an audio stream (lengths are checked while reading)."""
    try:
        with av.open(path) as c:
            return bool(c.streams.video), bool(c.streams.audio)
    except (av.FFmpegError, OSError, UnicodeDecodeError) as e:
        raise GivenMediaError(f"sample.{key}: cannot read '{path}': {' '.join(str(e).split())[:200]}") from None


def read_frames(path: str, key: str, n: int, fps: float, size: tuple[int, int]) -> torch.Tensor:
    """``n`` frames from the start at ``fps``, centre-cropped and resized to ``size = (H, W)``: ``(3, n, H, W)`` in [-1, 1]."""
    from soe.data.media_io import read_video

    try:
        with av.open(path) as c:
            frames = read_video(c, np.arange(n) / fps, size)
    except (av.FFmpegError, OSError) as e:
        raise GivenMediaError(f"sample.{key}: cannot decode the video of '{path}': {' '.join(str(e).split())[:200]}") from None
    if any(f is None for f in frames):
        have = sum(f is not None for f in frames)
        raise GivenMediaError(f"sample.{key}: '{path}' has {have / fps:.2f} s of video, shorter than the {n / fps:.2f} s asked")
    x = torch.from_numpy(np.stack(frames)).float()  # (n, H, W, 3)
    return x.permute(3, 0, 1, 2) / 127.5 - 1


def read_image(path: str, key: str, size: tuple[int, int]) -> torch.Tensor:
    """An image file (or a video's first frame) as ``(3, 1, H, W)`` in [-1, 1], centre-cropped and resized."""
    from PIL import Image, UnidentifiedImageError

    from soe.data.media_io import crop_box

    try:
        img = Image.open(path).convert("RGB")
    except Image.DecompressionBombError as e:  # a header claiming a huge size: refused before decoding
        raise GivenMediaError(f"sample.{key}: '{path}' is not a usable image ({one_line(e, 160)})") from None
    except (UnidentifiedImageError, OSError):
        return read_frames(path, key, 1, 1.0, size)  # not an image: a video's first frame
    h, w = size
    x0, y0, cw, ch = crop_box(img.width, img.height, w, h)
    img = img.crop((x0, y0, x0 + cw, y0 + ch)).resize((w, h), Image.Resampling.BOX)
    x = torch.from_numpy(np.asarray(img, dtype=np.float32))  # (H, W, 3)
    return (x.permute(2, 0, 1)[:, None] / 127.5 - 1).contiguous()


def read_samples(path: str, key: str, n: int, rate: int, channels: int) -> torch.Tensor:
    """``n`` samples from the start, resampled to ``rate``: ``(channels, n)`` float in [-1, 1]."""
    try:
        with av.open(path) as c:
            resampler = av.AudioResampler(format="fltp", layout="stereo" if channels > 1 else "mono", rate=rate)
            chunks, got = [], 0
            for frame in c.decode(c.streams.audio[0]):
                for f in resampler.resample(frame):
                    chunks.append(f.to_ndarray())
                    got += chunks[-1].shape[1]
                if got >= n:
                    break
            chunks += [f.to_ndarray() for f in resampler.resample(None)]
    except (av.FFmpegError, OSError) as e:
        raise GivenMediaError(f"sample.{key}: cannot decode the audio of '{path}': {' '.join(str(e).split())[:200]}") from None
    audio = np.concatenate(chunks, axis=1) if chunks else np.zeros((channels, 0), np.float32)
    if audio.shape[1] < n:
        raise GivenMediaError(f"sample.{key}: '{path}' has {audio.shape[1] / rate:.2f} s of audio, shorter than the {n / rate:.2f} s asked")
    return torch.from_numpy(np.clip(audio[:, :n], -1, 1)).float()


def _fit_time(latent: torch.Tensor, shape: tuple[int, ...], axis: int) -> torch.Tensor:
    """Crop or zero-pad the time axis of an encoded latent to the expert's latent length."""
    t = shape[axis]
    if latent.shape[axis] >= t:
        return latent.narrow(axis, 0, t)
    pad = list(latent.shape)
    pad[axis] = t - latent.shape[axis]
    return torch.cat([latent, latent.new_zeros(pad)], dim=axis)


@torch.no_grad()
def load_given(stitcher, cfg, codecs: dict, n: int, seconds: float) -> Given | None:
    """Encode the recipe's conditioning file (if any) into given latents for ``n`` samples of ``seconds``."""
    req = requested(cfg)
    if req is None:
        return None
    key, path = req
    task = MODES[key]
    experts = {"a": stitcher.a, "b": stitcher.b}
    try:
        check_task(task, {s: e.modality for s, e in experts.items()}, key=f"sample.{key}")
    except TaskError as err:
        raise GivenMediaError(f"{err} (this task: {task})") from None
    has_video, has_audio = (True, False) if key == "image" and _is_image(path) else _streams(path, key)
    extend = cfg.sample.extend_seconds if cfg.sample.extend_seconds is not None else seconds / 2
    if key == "extend" and not extend < seconds:
        raise GivenMediaError(f"sample.extend_seconds: {extend} s given leaves nothing to generate in a {seconds} s clip")
    latents, media, spans = {}, {}, {}
    for side, e in experts.items():
        shape = tuple(e.latent_shape(1, seconds))
        axis = e.latent_time_axis
        count = given_frames(task, e.modality, shape[axis], e.latent_rate, extend)
        if not count:
            continue
        given_s = count / e.latent_rate  # what the given latent frames cover
        codec = codecs[side]
        mshape = media_shape(codec, shape)  # (3, F, H, W) or (C, N)
        if e.modality == "video":
            if not has_video:
                raise GivenMediaError(f"sample.{key}: '{path}' has no video stream")
            fps, (f, h, w) = codec.rate, mshape[1:]
            if key == "image":
                x = read_image(path, key, (h, w)).expand(-1, f, -1, -1)  # a still clip: its first latent frame is the image's
            else:
                k = f if count == shape[axis] else min(f, int(np.ceil(given_s * fps - 1e-6)) + 1)
                x = read_frames(path, key, k, fps, (h, w))
                x = torch.cat([x, x[:, -1:].expand(-1, f - k, -1, -1)], dim=1)  # frames past the given seconds: held (not given)
            spans["video"] = given_s
        else:
            if not has_audio:
                raise GivenMediaError(f"sample.{key}: '{path}' has no audio stream")
            ch, total = mshape
            k = total if count == shape[axis] else min(total, int(np.ceil(given_s * codec.rate)))
            x = read_samples(path, key, k, int(codec.rate), ch)
            x = torch.nn.functional.pad(x, (0, total - k))  # silence past the given seconds (not given)
            spans["audio"] = given_s
        x = x[None].to(_device(codec))
        z = _fit_time(codec.encode(x).float(), shape, axis)  # (1, ...)
        if z.shape[1:] != shape[1:]:
            raise GivenMediaError(f"sample.{key}: expert {side}'s codec encodes this media to {tuple(z.shape[1:])}, "
                                  f"the expert takes {shape[1:]}")
        z = z.expand(n, *z.shape[1:]).to(e.device)
        mask = prefix_mask(torch.full((n,), count), shape[axis]).to(e.device)
        latents[side] = GivenLatents(z, mask, axis, uncond=cfg.sample.given_uncond)
        media[e.modality] = x.expand(n, *x.shape[1:]).cpu()
    return Given(key, task, latents, media, spans)


def _is_image(path: str) -> bool:
    return Path(path).suffix.lower() in (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def paste_given_media(given: Given, video: torch.Tensor, audio: torch.Tensor, fps: float, sample_rate: float):
    """The written tracks: the input media over the given seconds, the decoded samples elsewhere.

    Only where the decoded media has the input's shape (a preview decoder draws something else)."""
    if "video" in given.media and given.media["video"].shape == video.shape:
        k = max(1, int(np.ceil(given.seconds["video"] * fps - 1e-6))) if given.key != "video" else video.shape[2]
        video = video.clone()
        video[:, :, :k] = given.media["video"][:, :, :k].to(video)
    if "audio" in given.media and given.media["audio"].shape == audio.shape:
        k = int(np.ceil(given.seconds["audio"] * sample_rate)) if given.key != "audio" else audio.shape[2]
        audio = audio.clone()
        audio[:, :, :k] = given.media["audio"][:, :, :k].to(audio)
    return video, audio
