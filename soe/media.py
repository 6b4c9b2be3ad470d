"""Writing what a stitched model makes: mp4 (H.264 + AAC via PyAV) and a PNG contact sheet."""
from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch


def media_sides(experts: dict, what: str) -> tuple[str, str]:
    """``(video side, audio side)`` of ``{side: expert}``: the one video and the one audio expert that an
    mp4 with sound needs; otherwise a one-line ``RecipeError`` beginning with ``what``."""
    mods = {side: e.modality for side, e in experts.items()}
    video = [s for s, m in mods.items() if m == "video"]
    audio = [s for s, m in mods.items() if m == "audio"]
    if len(video) != 1 or len(audio) != 1:
        from soe.errors import RecipeError

        raise RecipeError(f"{what} needs one video and one audio expert, got {mods}")
    return video[0], audio[0]

def to_uint8_frames(video: torch.Tensor) -> np.ndarray:
    """``(3, F, H, W)`` in [-1, 1] -> ``(F, H, W, 3)`` uint8 (H and W padded to even sizes for H.264)."""
    x = ((video.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 3, 0).cpu().numpy()
    f, h, w, _ = x.shape
    return np.pad(x, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")


def fit_audio(audio: torch.Tensor, sample_rate: int, seconds: float) -> np.ndarray:
    """``(C, N)`` -> float32 stereo ``(2, round(seconds*sr))``: trimmed or zero-padded to the video's length."""
    a = audio.float().clamp(-1, 1).cpu()
    if a.shape[0] == 1:
        a = a.expand(2, -1)
    n = int(round(seconds * sample_rate))
    a = a[:2, :n] if a.shape[1] >= n else torch.nn.functional.pad(a[:2], (0, n - a.shape[1]))
    return a.contiguous().numpy()


def aac_rate(sample_rate: int) -> int:
    """The nearest AAC sample rate at or above ``sample_rate`` (e.g. UniVerse-1's 25.6 kHz -> 32 kHz)."""
    rates = sorted(av.codec.Codec("aac", "w").audio_rates or [48000])
    return next((r for r in rates if r >= sample_rate), rates[-1])


def resample_audio(audio: torch.Tensor, src_rate: int, dst_rate: int) -> torch.Tensor:
    """``(C, N)`` float audio from ``src_rate`` to ``dst_rate`` with FFmpeg's resampler (PyAV)."""
    if src_rate == dst_rate:
        return audio
    a = audio.float().clamp(-1, 1)
    a = a.expand(2, -1) if a.shape[0] == 1 else a[:2]
    frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(a.cpu().numpy()), format="fltp", layout="stereo")
    frame.sample_rate = src_rate
    resampler = av.AudioResampler(format="fltp", layout="stereo", rate=dst_rate)
    out = [f.to_ndarray() for f in resampler.resample(frame)] + [f.to_ndarray() for f in resampler.resample(None)]
    return torch.from_numpy(np.concatenate(out, axis=1))


def write_mp4(path, video: torch.Tensor, fps: float, audio: torch.Tensor | None = None, sample_rate: int | None = None) -> Path:
    """Mux ``video`` ``(3, F, H, W)`` and ``audio`` ``(C, N)`` into one mp4 of the video's duration.

    Audio at a rate AAC cannot store (e.g. 25.6 kHz) is resampled to the next AAC rate."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    frames = to_uint8_frames(video)
    rate = Fraction(fps).limit_denominator(1001)
    seconds = len(frames) / float(rate)
    tmp = path.with_name(f".{path.name}.tmp.mp4")
    with av.open(str(tmp), mode="w") as container:
        vs = container.add_stream("libx264", rate=rate)
        vs.width, vs.height, vs.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        vs.options = {"crf": "18", "preset": "veryfast"}
        astream = None
        if audio is not None:
            rate_out = aac_rate(int(sample_rate))
            audio, sample_rate = resample_audio(audio, int(sample_rate), rate_out), rate_out
            astream = container.add_stream("aac", rate=int(sample_rate))
            astream.layout = "stereo"
        for f in frames:
            for packet in vs.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                container.mux(packet)
        for packet in vs.encode():
            container.mux(packet)
        if astream is not None:
            samples = fit_audio(audio, int(sample_rate), seconds)
            chunk = 1024
            for start in range(0, samples.shape[1], chunk):
                piece = np.ascontiguousarray(samples[:, start: start + chunk])
                frame = av.AudioFrame.from_ndarray(piece, format="fltp", layout="stereo")
                frame.sample_rate = int(sample_rate)
                frame.pts = start
                for packet in astream.encode(frame):
                    container.mux(packet)
            for packet in astream.encode():
                container.mux(packet)
    tmp.replace(path)
    return path


def contact_sheet(path, video: torch.Tensor, fps: float, audio: torch.Tensor, sample_rate: int, columns: int = 8,
                  title: str | None = None, given: dict[str, float] | None = None) -> Path:
    """Frames over time above the waveform and spectrogram, all on one time axis (judge sync at a glance);
    ``title`` (e.g. prompt, step, checkpoint) heads the sheet. ``given``: modality -> seconds from the
    start that were given, not generated (conditioning); those frames get a red border and that
    stretch of the audio panels a red band."""
    from soe.extras import require

    require("matplotlib", "contact sheets (PNG)")
    given = given or {}
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    frames = to_uint8_frames(video)
    seconds = len(frames) / fps
    picks = np.linspace(0, len(frames) - 1, min(columns, len(frames))).round().astype(int)
    wave = fit_audio(audio, sample_rate, seconds).mean(0)
    fig = plt.figure(figsize=(12, 6), dpi=100)
    grid = fig.add_gridspec(3, len(picks), height_ratios=[1.2, 1, 1])
    for n, idx in enumerate(picks):
        ax = fig.add_subplot(grid[0, n])
        ax.imshow(frames[idx])
        ax.set_title(f"{idx / fps:.2f}s" + (" given" if idx / fps < given.get("video", 0) else ""), fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
        for spine in ax.spines.values():  # a red frame around given frames, no frame otherwise
            spine.set(visible=idx / fps < given.get("video", 0), color="red", linewidth=3)
    t = np.arange(len(wave)) / sample_rate
    ax_w = fig.add_subplot(grid[1, :])
    ax_w.plot(t, wave, lw=0.5)
    ax_w.set_xlim(0, seconds)
    ax_w.set_ylabel("waveform")
    for idx in picks:
        ax_w.axvline(idx / fps, color="grey", lw=0.5, alpha=0.5)
    ax_s = fig.add_subplot(grid[2, :], sharex=ax_w)
    nfft = max(64, min(1024, len(wave) // 8))
    with np.errstate(divide="ignore"):  # bins of exact silence are log10(0) = -inf, drawn black: no warning on screen
        power, _, _, image = ax_s.specgram(wave + 1e-9, NFFT=nfft, Fs=sample_rate, noverlap=nfft // 2, cmap="magma")
    top = 10 * np.log10(max(float(power.max()), 1e-20))
    image.set_clim(top - 60, top)  # 60 dB of range: silence is black, not the colour of rounding noise
    ax_s.set_xlabel("seconds")
    ax_s.set_ylabel("Hz")
    if given.get("audio"):
        for ax in (ax_w, ax_s):
            ax.axvspan(0, min(given["audio"], seconds), color="red", alpha=0.15, lw=0)
        ax_w.set_title("audio: red = given", fontsize=8, loc="left")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path
