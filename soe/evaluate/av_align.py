"""AV-Align on decoded media: do the sound's onsets fall on the picture's motion peaks?

The definition is TempoTokens' (Yariv et al., 2024) as MOVA's ``av_align_score.py`` computes it:

* motion: for each frame pair, the mean magnitude of OpenCV's Farneback optical flow between the grey
  frames (pyramid scale 0.5, 3 levels, window 15, 3 iterations, poly_n 5, poly_sigma 1.2, no flags); the
  trajectory starts with the first pair's value twice, so entry ``i`` is the flow into frame ``i``;
* video peaks: interior strict local maxima of that trajectory that are >= 0.1, at time ``i / fps``;
* audio peaks: librosa's onsets (``onset_strength`` then ``onset_detect``, default hop 512) of the mono
  track at 22,050 Hz (``librosa.load``'s default rate, which TempoTokens uses; MOVA's script resamples to
  44.1 kHz with ffmpeg by default, which gives other onset times, so numbers at 44.1 kHz are not this one);
* IoU: each audio peak takes the first still-unused video peak strictly closer than one frame (``1 / fps``);
  AV-Align = matched / (audio peaks + video peaks - matched), 0.0 when neither has a peak or the clip has
  fewer than two frames (MOVA's convention).

Hand-written: the peak picking and the matching (a dozen lines each in every implementation, no library
has them); optical flow is OpenCV's, onsets librosa's. Frames arrive RGB from PyAV, so the grey
conversion is ``COLOR_RGB2GRAY`` (the same weights as the official BGR path on OpenCV's own decode).
"""
from __future__ import annotations

import numpy as np

AUDIO_RATE = 22_050
PEAK_MIN = 0.1
FARNEBACK = dict(pyr_scale=0.5, levels=3, winsize=15, iterations=3, poly_n=5, poly_sigma=1.2, flags=0)
DEFINITION = ("AV-Align (TempoTokens; MOVA av_align_score.py): IoU of librosa onsets (mono, 22,050 Hz) and interior "
              "local maxima >= 0.1 of the mean Farneback flow magnitude (0.5, 3, 15, 3, 5, 1.2), a video peak matching at "
              "most one audio peak closer than 1/fps")


def flow_trajectory(frames: np.ndarray) -> np.ndarray:
    """Mean Farneback flow magnitude per frame, ``(T,)`` for ``frames`` ``(T, H, W, 3)`` RGB uint8 (T >= 2)."""
    import cv2

    grey = [cv2.cvtColor(np.ascontiguousarray(f), cv2.COLOR_RGB2GRAY) for f in frames]
    out = []
    for prev, cur in zip(grey[:-1], grey[1:]):
        flow = cv2.calcOpticalFlowFarneback(prev, cur, None, **FARNEBACK)  # (H, W, 2)
        out.append(cv2.mean(cv2.magnitude(flow[..., 0], flow[..., 1]))[0])
    return np.array(out[:1] + out, dtype=np.float64)  # entry i: the flow into frame i (entry 0 repeats pair 0)


def video_peaks(trajectory: np.ndarray, fps: float, minimum: float = PEAK_MIN) -> np.ndarray:
    """Times ``i / fps`` of interior strict local maxima of ``trajectory`` that are >= ``minimum``."""
    x = np.asarray(trajectory, dtype=np.float64)
    i = np.arange(1, len(x) - 1)
    keep = (x[i - 1] < x[i]) & (x[i] > x[i + 1]) & (x[i] >= minimum)
    return i[keep] / fps


def audio_peaks(mono: np.ndarray, sample_rate: int = AUDIO_RATE) -> np.ndarray:
    """Onset times (s) of a mono track: librosa ``onset_strength`` -> ``onset_detect`` -> ``frames_to_time``."""
    import librosa

    env = librosa.onset.onset_strength(y=np.asarray(mono, dtype=np.float32), sr=sample_rate)
    frames = librosa.onset.onset_detect(onset_envelope=env, sr=sample_rate)
    return librosa.frames_to_time(frames, sr=sample_rate)


def peak_iou(audio: np.ndarray, video: np.ndarray, fps: float) -> float:
    """matched / (|audio| + |video| - matched); each audio peak takes the first unused video peak within (-1/fps, 1/fps)."""
    used = np.zeros(len(video), dtype=bool)
    matched = 0
    for a in audio:
        for j, v in enumerate(video):
            if not used[j] and v - 1 / fps < a < v + 1 / fps:
                used[j], matched = True, matched + 1
                break
    union = len(audio) + len(video) - matched
    return matched / union if union else 0.0


def av_align(frames: np.ndarray, fps: float, mono_22k: np.ndarray) -> float:
    """AV-Align of one clip: ``frames`` (T, H, W, 3) RGB uint8 at ``fps``, audio mono float at 22,050 Hz."""
    if len(frames) < 2:
        return 0.0
    return peak_iou(audio_peaks(mono_22k), video_peaks(flow_trajectory(frames), fps), fps)


def clip_av_align(clip) -> float:
    """AV-Align of a decoded :class:`soe.evaluate.decode.Clip`."""
    return av_align(clip.frames, clip.fps, clip.audio_at(AUDIO_RATE))
