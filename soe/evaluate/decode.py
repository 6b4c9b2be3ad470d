"""Finding and decoding the clips ``soe eval`` judges: each clip is decoded once and every metric reads it.

A clip is an mp4 (anything PyAV opens) whose audio is its own audio track, or a ``<stem>.wav`` beside it
when there is one (the sidecar wins: it is what ``soe generate`` and UniVerse-1 write losslessly next to
the AAC track, and what Verse-Bench and TempoTokens read). Frames are RGB ``uint8`` at the stream's own
rate (the rate OpenCV's ``CAP_PROP_FPS`` reports: ``r_frame_rate``); audio is the channel mean (librosa's
``to_mono``) at the stream's own rate. Metrics ask :meth:`Clip.audio_at` for their rate: librosa's
``resample`` (soxr high quality, what ``librosa.load(sr=...)`` does), computed once per rate and clip.

Hand-written: only the folder walk and the container reading loop; decoding is PyAV (libavcodec) and
resampling librosa.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".webm", ".avi")


class DecodeError(Exception):
    """A clip that cannot be decoded; the message is one line naming what is wrong."""


@dataclass
class Clip:
    """One decoded clip: ``frames`` ``(T, H, W, 3)`` uint8 RGB at ``fps``; ``audio`` ``(N,)`` float32 mono at ``sample_rate``."""

    stem: str
    path: Path
    frames: np.ndarray | None
    fps: float
    audio: np.ndarray | None
    sample_rate: int
    _resampled: dict = field(default_factory=dict, repr=False)

    @property
    def seconds(self) -> float:
        if self.frames is not None and self.fps > 0:
            return len(self.frames) / self.fps
        return 0.0 if self.audio is None else len(self.audio) / self.sample_rate

    def audio_at(self, rate: int) -> np.ndarray:
        """Mono float32 at ``rate`` Hz (librosa ``resample``, soxr_hq), cached per rate."""
        if self.audio is None:
            raise DecodeError(f"{self.path.name}: no audio track and no {self.stem}.wav beside it")
        if rate == self.sample_rate:
            return self.audio
        if rate not in self._resampled:
            import librosa

            self._resampled[rate] = librosa.resample(self.audio, orig_sr=self.sample_rate, target_sr=rate).astype(np.float32)
        return self._resampled[rate]


def find_clips(folder) -> dict[str, Path]:
    """``{stem: path}`` of the videos in ``folder``; a run folder (no videos of its own) gives every video under
    its ``generated/`` and ``samples/`` folders, named by their path below the run folder (``generated/x/sample_00``)."""
    folder = Path(folder)
    own = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES)
    if own:
        return {p.stem: p for p in own}
    found = {}
    for sub in ("generated", "samples"):
        for p in sorted((folder / sub).rglob("*")) if (folder / sub).is_dir() else []:
            if p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES:
                found[p.relative_to(folder).with_suffix("").as_posix()] = p
    return found


def _audio_of(container) -> tuple[np.ndarray | None, int]:
    if not container.streams.audio:
        return None, 0
    stream = container.streams.audio[0]
    chunks, rate = [], stream.codec_context.sample_rate or stream.rate
    for frame in container.decode(stream):
        x = frame.to_ndarray()  # planar: (C, n); packed: (1, n * C)
        if not frame.format.is_planar:
            x = x.reshape(-1, len(frame.layout.channels)).T
        if x.dtype.kind == "i":  # s16 / s32 PCM -> [-1, 1]
            x = x.astype(np.float32) / float(np.iinfo(x.dtype).max + 1)
        chunks.append(x.astype(np.float32, copy=False))
    if not chunks:
        return None, 0
    return np.concatenate(chunks, axis=1).mean(axis=0).astype(np.float32), int(rate)


def _frames_of(container) -> tuple[np.ndarray | None, float]:
    if not container.streams.video:
        return None, 0.0
    stream = container.streams.video[0]
    rate = stream.guessed_rate or stream.average_rate
    frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
    if not frames:
        return None, 0.0
    return np.stack(frames), float(rate)


def decode_clip(stem: str, path) -> Clip:
    """Decode ``path`` (and ``<stem>.wav`` beside it) once; :class:`DecodeError` (one line) when it cannot be used."""
    import av

    path = Path(path)
    try:
        with av.open(str(path)) as container:
            frames, fps = _frames_of(container)
        with av.open(str(path)) as container:
            audio, sr = _audio_of(container)
        sidecar = path.with_suffix(".wav")
        if sidecar.is_file():
            with av.open(str(sidecar)) as container:
                audio, sr = _audio_of(container)
    except (av.error.FFmpegError, OSError, ValueError) as e:
        raise DecodeError(f"{path.name}: cannot be decoded ({' '.join(str(e).split()) or type(e).__name__})") from None
    if frames is None:
        raise DecodeError(f"{path.name}: no video frames")
    return Clip(stem, path, frames, fps, audio, sr)


def safe_decode(item: tuple[str, str]) -> Clip | DecodeError:
    """:func:`decode_clip` for worker processes: the error is returned, not raised."""
    try:
        return decode_clip(*item)
    except DecodeError as e:
        return e
