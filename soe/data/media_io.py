"""PyAV decoding for ``soe encode``: probe a clip, read windows of frames and samples at target rates.

Video frames are picked nearest-in-time at the target fps (so 30 -> 25 fps drops frames, 24 -> 25
repeats one), centre-cropped to the target aspect ratio and resized with swscale's area filter.
Audio is resampled (libswresample) to the target rate as stereo float in [-1, 1]. Times are on the
clip's own timeline: 0 is the first video frame. Everything here runs in decode worker processes,
so it needs only ``av`` and ``numpy``.
"""
from __future__ import annotations

from collections import deque
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context

import av
import numpy as np

AUDIO_SLACK = 0.05  # seconds of missing audio at a clip's very end that are zero-padded (AAC frame edges)


class MediaError(Exception):
    """A clip that cannot be used; ``reason`` is the report's category (``unreadable``, ``no audio``, ...)."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


@dataclass(frozen=True)
class MediaInfo:
    seconds: float  # usable length: where both video and audio exist
    width: int
    height: int
    fps: float
    sample_rate: int


def _stream_seconds(stream, container, measured: dict | None = None) -> float:
    """The stream's length: its own duration; else its real extent measured from its packets (``measured``);
    else the container's duration (which may run past this stream's end: other streams, trailing metadata)."""
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if measured and stream.index in measured:
        return measured[stream.index] - _start(stream)
    if container.duration is not None:
        return container.duration / av.time_base
    return 0.0


def _measure_ends(container, streams) -> dict:
    """``{stream index: end in seconds}`` (last packet's pts + its duration) of ``streams``, by demuxing
    packets only (no decoding): for streams without a duration (Matroska/WebM, variable frame rate)."""
    ends: dict = {}
    for packet in container.demux(*streams):
        if packet.pts is None or packet.time_base is None:
            continue
        end = float((packet.pts + (packet.duration or 0)) * packet.time_base)
        i = packet.stream.index
        ends[i] = max(ends.get(i, end), end)
    return ends


def _start(stream) -> float:
    return float(stream.start_time * stream.time_base) if stream.start_time is not None else 0.0


def probe(path) -> MediaInfo:
    """Stream metadata only (no decoding). Raises :class:`MediaError` for unusable clips."""
    try:
        with av.open(str(path)) as c:
            if not c.streams.video:
                raise MediaError("no video", "the file has no video stream")
            if not c.streams.audio:
                raise MediaError("no audio", "the file has no audio stream")
            v, a = c.streams.video[0], c.streams.audio[0]
            fps = float(v.average_rate or v.guessed_rate or 0)
            if not fps or not v.codec_context.width:
                raise MediaError("corrupt", "video stream without frame rate or size")
            offset = _start(a) - _start(v)
            lacking = [s for s in (v, a) if s.duration is None or s.time_base is None]
            measured = _measure_ends(c, lacking) if lacking else None
            seconds = min(_stream_seconds(v, c, measured), _stream_seconds(a, c, measured) + offset)
            return MediaInfo(seconds, v.codec_context.width, v.codec_context.height, fps, a.codec_context.sample_rate or a.rate)
    except MediaError:
        raise
    except (av.FFmpegError, OSError, UnicodeDecodeError) as e:
        raise MediaError("unreadable", _short(e)) from None


def _short(e: BaseException) -> str:
    return " ".join(str(e).split())[:200] or type(e).__name__


def crop_box(width: int, height: int, out_w: int, out_h: int) -> tuple[int, int, int, int]:
    """Centre crop ``(x, y, w, h)`` of a ``width x height`` frame with the aspect ratio of ``out_w x out_h``."""
    if width * out_h > height * out_w:  # too wide: crop the sides
        w = max(1, round(height * out_w / out_h))
        return (width - w) // 2, 0, w, height
    h = max(1, round(width * out_h / out_w))
    return 0, (height - h) // 2, width, h


def _to_target(frame: av.VideoFrame, size: tuple[int, int]) -> np.ndarray:
    """One decoded frame -> ``(H, W, 3)`` uint8 at ``size = (H, W)``: centre crop, then area resize."""
    out_h, out_w = size
    rgb = frame.to_ndarray(format="rgb24")  # (h, w, 3)
    x, y, w, h = crop_box(rgb.shape[1], rgb.shape[0], out_w, out_h)
    rgb = np.ascontiguousarray(rgb[y: y + h, x: x + w])
    if (h, w) == (out_h, out_w):
        return rgb
    small = av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(width=out_w, height=out_h, format="rgb24", interpolation="AREA")
    return small.to_ndarray()


def read_video(container, targets: np.ndarray, size: tuple[int, int]) -> list[np.ndarray | None]:
    """Frames nearest to each target time (seconds, sorted ascending); None past the clip's end."""
    v = container.streams.video[0]
    origin = _start(v)
    src_fps = float(v.average_rate or v.guessed_rate)
    out: list[np.ndarray | None] = [None] * len(targets)
    if targets[0] > 1.0:  # jump to the keyframe before the first target
        container.seek(int((origin + targets[0]) / v.time_base), stream=v, backward=True)
    j, prev, prev_t, last = 0, None, None, [None, None]

    def pick(frame, t):
        # one conversion per decoded frame, however many targets it serves; the frame itself is kept with it,
        # because an id() alone is reused by the next frame once this one is freed (stale frames, at random)
        if last[0] is not frame:
            last[:] = [frame, _to_target(frame, size)]
        return last[1]

    for frame in container.decode(v):
        t = (frame.pts * v.time_base if frame.pts is not None else frame.time) - origin
        t = float(t)
        while j < len(targets) and targets[j] <= t:
            use_prev = prev is not None and targets[j] - prev_t < t - targets[j]
            out[j] = pick(prev, prev_t) if use_prev else pick(frame, t)
            j += 1
        prev, prev_t = frame, t
        if j == len(targets):
            break
    while j < len(targets) and prev is not None and targets[j] - prev_t <= 1.0 / src_fps + 1e-6:
        out[j] = pick(prev, prev_t)  # the last frame is shown for one source frame period
        j += 1
    return out


def read_audio(container, until: float, sample_rate: int) -> tuple[np.ndarray, float]:
    """Stereo float32 ``(2, N)`` at ``sample_rate`` from the start up to ``until`` seconds, and the time of sample 0."""
    a, origin = container.streams.audio[0], _start(container.streams.video[0])
    resampler = av.AudioResampler(format="fltp", layout="stereo", rate=sample_rate)
    chunks, first, n = [], None, 0
    for frame in container.decode(a):
        if first is None:
            first = float(frame.pts * a.time_base) - origin if frame.pts is not None else 0.0
        for f in resampler.resample(frame):
            chunks.append(f.to_ndarray())
            n += chunks[-1].shape[1]
        if first + n / sample_rate > until + 0.1:
            break
    chunks += [f.to_ndarray() for f in resampler.resample(None)]  # flush the resampler's delay
    audio = np.concatenate(chunks, axis=1) if chunks else np.zeros((2, 0), np.float32)
    return audio.astype(np.float32, copy=False), first or 0.0


def read_windows(path, windows: list[tuple[float, int, int]], fps: float, size: tuple[int, int], sample_rate: int,
                 each: bool = False):
    """Decode ``windows`` = ``[(start s, video frames, audio samples)]`` of one clip (in time order).

    Returns ``[(video (F, H, W, 3) uint8, audio (2, N) float32)]``. Raises :class:`MediaError` when the
    file is corrupt or ends before a window does; with ``each``, a window the file ends before is a
    ``MediaError("truncated window")`` in its place, and the other windows are returned as usual.
    """
    try:
        with av.open(str(path)) as c:
            end = max(s + n / sample_rate for s, _, n in windows)
            audio, first = read_audio(c, end, sample_rate)
        with av.open(str(path)) as c:
            targets = np.concatenate([s + np.arange(f) / fps for s, f, _ in windows])
            frames = read_video(c, targets, size)
    except MediaError:
        raise
    except (av.FFmpegError, OSError, ValueError) as e:
        raise MediaError("corrupt", _short(e)) from None
    out, k = [], 0
    for start, n_frames, n_samples in windows:
        clip = frames[k: k + n_frames]
        k += n_frames
        if any(f is None for f in clip):
            missing = sum(f is None for f in clip)
            error = MediaError("truncated", f"video ends {missing} frame(s) before the window at {start:.2f}s does")
            if not each:
                raise error
            out.append(MediaError("truncated window", error.detail))
            continue
        i0 = int(round((start - first) * sample_rate))
        piece = audio[:, max(0, i0): max(0, i0 + n_samples)]
        lead = max(0, -i0)  # audio starting after the first video frame: pad the gap with silence
        short = n_samples - lead - piece.shape[1]
        if short > AUDIO_SLACK * sample_rate:
            error = MediaError("truncated", f"audio ends {short / sample_rate:.2f}s before the window at {start:.2f}s does")
            if not each:
                raise error
            out.append(MediaError("truncated window", error.detail))
            continue
        piece = np.pad(piece, ((0, 0), (lead, max(0, short))))[:, :n_samples]
        out.append((np.stack(clip), np.clip(piece, -1.0, 1.0)))
    return out


def read_speech(path, sample_rate: int = 16000) -> tuple[np.ndarray, float]:
    """The whole audio track as mono float32 ``(N,)`` at ``sample_rate`` (speech recognisers take 16 kHz), and
    the time of its first sample on the clip's timeline (add it to times measured in the track)."""
    try:
        with av.open(str(path)) as c:
            audio, first = read_audio(c, float("inf"), sample_rate)
    except (av.FFmpegError, OSError, ValueError) as e:
        raise MediaError("corrupt", _short(e)) from None
    return audio.mean(axis=0), first


# ---- worker entry points (module level, importable without torch: they run in decode processes) ----
def safe_probe(path) -> MediaInfo | MediaError:
    try:
        return probe(path)
    except MediaError as e:
        return e


def safe_read_windows(task: tuple) -> list | MediaError:
    """``task = (path, windows, fps, size, sample_rate)``; a MediaError is returned, not raised: for the whole
    task (a corrupt file), or in a window's place (``truncated window``: the file ends before that window does)."""
    try:
        return read_windows(*task, each=True)
    except MediaError as e:
        return e


def ordered_map(fn, items, workers: int):
    """``fn`` over ``items`` in order; with workers, in decode processes with a bounded queue."""
    if workers <= 0:
        for x in items:
            yield x, fn(x)
        return
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
        queue, it = deque(), iter(items)
        for x in it:
            queue.append((x, pool.submit(fn, x)))
            if len(queue) >= 2 * workers:
                break
        end = object()  # an item may itself be None (or falsy): only the exhausted iterator ends the refill
        while queue:
            x, fut = queue.popleft()
            nxt = next(it, end)
            if nxt is not end:
                queue.append((nxt, pool.submit(fn, nxt)))
            yield x, fut.result()
