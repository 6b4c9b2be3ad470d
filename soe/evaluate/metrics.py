"""Audio-visual synchrony and sample-quality metrics.

* ``av_align``: AV-Align style score — intersection over union of audio onset times and video motion
  event times, where an audio and a video event match when they lie within ``tolerance`` seconds.
  Identical event times give 1.0, disjoint ones 0.0.
* ``audio_onsets`` / ``video_motion_events``: event detectors on envelopes sampled at known rates.
* ``frechet_distance``: Frechet distance between Gaussian fits of two feature sets.
"""
from __future__ import annotations

import numpy as np


def match_events(a: np.ndarray, b: np.ndarray, tolerance: float) -> int:
    """Greedy one-to-one matching of sorted event times within ``tolerance`` seconds."""
    a, b = np.sort(np.asarray(a, float)), np.sort(np.asarray(b, float))
    i = j = matched = 0
    while i < len(a) and j < len(b):
        if abs(a[i] - b[j]) <= tolerance:
            matched, i, j = matched + 1, i + 1, j + 1
        elif a[i] < b[j]:
            i += 1
        else:
            j += 1
    return matched


def av_align(audio_events, video_events, tolerance: float) -> float:
    """|matched| / (|audio| + |video| - |matched|); 1.0 when neither has events (nothing to disagree on)."""
    na, nv = len(audio_events), len(video_events)
    if na == 0 and nv == 0:
        return 1.0
    m = match_events(audio_events, video_events, tolerance)
    return m / (na + nv - m)


def peak_times(signal: np.ndarray, rate: float, threshold: float, min_gap: float) -> np.ndarray:
    """Times (s) of interior local maxima above ``threshold`` at least ``min_gap`` apart (strongest
    kept). Edge samples never count: a rising edge at the clip's end is an event outside the clip."""
    x = np.asarray(signal, float)
    if len(x) < 3:
        return np.zeros(0)
    cand = [i for i in range(1, len(x) - 1) if x[i] >= threshold and x[i] >= x[i - 1] and x[i] > x[i + 1]]
    cand.sort(key=lambda i: -x[i])
    kept: list[int] = []
    for i in cand:
        if all(abs(i - k) / rate >= min_gap for k in kept):
            kept.append(i)
    return (np.sort(np.array(kept, float)) + 0.5) / rate


def audio_onsets(envelope: np.ndarray, rate: float, min_gap: float = 0.2, rel_threshold: float = 0.35) -> np.ndarray:
    """Onsets = peaks of the positive first difference of an energy envelope sampled at ``rate``."""
    env = np.asarray(envelope, float)
    rise = np.clip(np.diff(env, prepend=env[:1]), 0, None)
    if rise.max() <= 0:
        return np.zeros(0)
    return peak_times(rise, rate, rel_threshold * rise.max(), min_gap)


def video_motion_events(height: np.ndarray, rate: float, min_gap: float = 0.2, rel_depth: float = 0.35) -> np.ndarray:
    """Motion events = impacts: local minima of an object's height above the floor (sampled at ``rate``)."""
    h = np.asarray(height, float)
    depth = h.max() - h
    if depth.max() <= 0:
        return np.zeros(0)
    return peak_times(depth, rate, (1 - rel_depth) * depth.max(), min_gap)


def frechet_distance(x: np.ndarray, y: np.ndarray, eps: float = 1e-6) -> float:
    """Frechet distance between Gaussians fitted to feature sets ``x`` (N, D) and ``y`` (M, D)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    mu1, mu2 = x.mean(0), y.mean(0)
    s1 = np.atleast_2d(np.cov(x, rowvar=False)) + eps * np.eye(x.shape[1])
    s2 = np.atleast_2d(np.cov(y, rowvar=False)) + eps * np.eye(y.shape[1])
    # tr(sqrt(s1 s2)) = sum of square roots of the eigenvalues of s1 s2 (real, >= 0 for PSD s1, s2)
    eig = np.linalg.eigvals(s1 @ s2).real.clip(min=0)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(eig).sum())

