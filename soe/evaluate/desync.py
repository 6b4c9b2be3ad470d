"""``desync`` and ``sync_offset``: the audio-video offset Synchformer predicts for a clip, as av-benchmark's DeSync.

av-benchmark (hkchengrex/av-benchmark, ``evaluate.py``) computes DeSync from Synchformer features of a clip's
first ``audio_length`` seconds (8 s by default): video and audio cut into 0.64 s segments every 0.32 s (24 of each
in 8 s); the offset transformer, whose position table holds exactly 14 segments (4.8 s), classifies the offset of
the first 14 segments and of the last 14; each prediction is the class grid value ``linspace(-2, 2, 21)[argmax]``
in seconds, and DeSync is the mean of their absolute values (two per clip, the same window twice when the clip has
exactly 14 segments, e.g. 5 s). Here a clip's window is its own length capped at 8 s, so a 5 s clip is measured
as av-benchmark measures it with ``--audio_length 5`` and a longer one as with its default; clips under 4.8 s
have no value (listed under ``failed``). ``sync_offset`` is the mean of the same two predictions with their sign:
positive when the sound comes early (Synchformer's training convention: the audio crop starts ``offset`` seconds
after the video crop).

The weights are av-benchmark's ``synchformer_state_dict.pth`` in ``--models DIR/synchformer/`` (a ``config.json``
with ``"model_type": "synchformer"`` is optional; its other keys override the sizes, see
:class:`soe.evaluate.synchformer.SynchformerConfig`). Audio reaches 16 kHz through :meth:`Clip.audio_at`
(soxr, where av-benchmark uses torchaudio's sinc resampler: the log-mels differ slightly near 8 kHz).
"""
from __future__ import annotations

import numpy as np

MAX_SECONDS = 8.0  # av-benchmark's default --audio_length
SAMPLE_RATE = 16_000  # soe.evaluate.synchformer.preprocess.SAMPLE_RATE
DEFINITION = ("DeSync (av-benchmark): mean |offset| (s) Synchformer predicts on the first and the last 14 of the 0.64 s "
              "segments (every 0.32 s) of a clip's first min(length, 8 s); offsets on the grid linspace(-2, 2, 21)")
OFFSET_DEFINITION = ("signed mean of the two Synchformer offsets (s) of desync's windows; positive: the sound comes early")


def windows(n_segments: int, size: int) -> list[slice]:
    """The first and the last ``size`` segments (the same window twice when ``n_segments == size``)."""
    if n_segments < size:
        raise ValueError(f"{n_segments} segments, Synchformer needs {size}")
    return [slice(0, size), slice(n_segments - size, n_segments)]


class DesyncScorer:
    """Synchformer loaded once from a ``synchformer/`` folder; :meth:`scores` of one decoded clip."""

    def __init__(self, folder, device: str = "cpu", batch_segments: int = 8):
        from soe.evaluate.synchformer import Synchformer

        self.model = Synchformer.from_folder(folder, device)
        self.device, self.batch = device, batch_segments
        self._last: tuple[tuple, dict] | None = None

    def _features(self, fn, segments):
        import torch

        return torch.cat([fn(segments[i: i + self.batch].to(self.device)) for i in range(0, len(segments), self.batch)])

    def offsets(self, frames: np.ndarray, fps: float, mono_16k: np.ndarray) -> list[float]:
        """The signed offset (s) of each window of a clip (frames RGB uint8 at ``fps``, mono audio at 16 kHz)."""
        import torch

        from soe.evaluate.synchformer import preprocess as pre

        with torch.inference_mode():
            return self._offsets(frames, fps, mono_16k, pre)

    def _offsets(self, frames, fps, mono_16k, pre) -> list[float]:
        seconds = min(len(frames) / fps, len(mono_16k) / pre.SAMPLE_RATE, MAX_SECONDS)
        size = self.model.cfg.segments
        if seconds < (pre.SEG_FRAMES + (size - 1) * pre.STEP_FRAMES) / pre.FPS:
            raise ValueError(f"{seconds:.2f} s of audio and video; Synchformer needs at least "
                             f"{(pre.SEG_FRAMES + (size - 1) * pre.STEP_FRAMES) / pre.FPS:.2f} s")
        vis = self._features(self.model.video_features, pre.video_segments(frames, fps, seconds, self.model.cfg.image_size))  # (Sv, 8, D)
        aud = self._features(self.model.audio_features, pre.audio_segments(mono_16k, seconds))  # (Sa, 6, D)
        n = min(len(vis), len(aud))
        grid = self.model.class_grid()
        out = []
        for w in windows(n, size):
            logits = self.model.offset_logits(vis[None, w], aud[None, w])  # (1, classes)
            out.append(float(grid[int(logits.argmax(-1))]))
        return out

    def scores(self, clip) -> dict[str, float]:
        """``{"desync": mean |offset|, "sync_offset": mean offset}`` of a :class:`soe.evaluate.decode.Clip`."""
        key = (clip.stem, str(clip.path))  # desync and sync_offset of one clip come from one computation
        if self._last is None or self._last[0] != key:
            offs = self.offsets(clip.frames, clip.fps, clip.audio_at(SAMPLE_RATE))
            self._last = (key, {"desync": float(np.mean(np.abs(offs))), "sync_offset": float(np.mean(offs))})
        return self._last[1]
