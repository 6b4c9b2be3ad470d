"""Scoring of the sync experiment: sample every mode, read events back out of latents, AV-Align and Frechet.

Modes (soe/conditioning.py): ``independent`` (each expert alone), ``joint`` (stitched, nothing given),
``v2a`` (the true video given, audio sampled), ``a2v`` (the true audio given, video sampled) and
``image`` (the true first video latent frame given, the rest of both sampled).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from soe.conditioning import given_for_task
from soe.metrics import audio_onsets, av_align, frechet_distance, video_motion_events
from soe.sampling import sample, sample_stitched
from soe.train.synthetic import audio_envelope_from_latent, video_height_from_latent

MODES = ("independent", "joint", "v2a", "a2v", "image")
GIVEN = {"v2a": ("video",), "a2v": ("audio",)}  # modalities a mode copies from the truth (no Frechet for them)


def events(latents: dict, experts: dict, seconds: float) -> list[tuple[np.ndarray, np.ndarray]]:
    """(audio onset times, video impact times) per clip, from clean latents (a = video, b = audio)."""
    out = []
    for v, a in zip(latents["a"], latents["b"]):
        height = video_height_from_latent(v).numpy()
        env = audio_envelope_from_latent(a, experts["b"].latent_time_axis - 1).numpy()
        out.append((audio_onsets(env, len(env) / seconds), video_motion_events(height, len(height) / seconds)))
    return out


def features(latents: dict, experts: dict, seconds: float) -> dict[str, np.ndarray]:
    """Simple per-clip features per modality (for the Frechet distance)."""
    feats = {"video": [], "audio": []}
    for v, a in zip(latents["a"], latents["b"]):
        h = video_height_from_latent(v).numpy()
        env = audio_envelope_from_latent(a, experts["b"].latent_time_axis - 1).numpy()
        nv, na = len(video_motion_events(h, len(h) / seconds)), len(audio_onsets(env, len(env) / seconds))
        feats["video"].append([h.mean(), h.std(), np.abs(np.diff(h)).mean(), nv, v.float().mean().item(), v.float().std().item()])
        feats["audio"].append([env.mean(), env.std(), np.abs(np.diff(env)).mean(), na, a.float().mean().item(), a.float().std().item()])
    return {k: np.array(x) for k, x in feats.items()}


def sync_score(latents: dict, experts: dict, seconds: float, tolerance: float) -> float:
    return float(np.mean([av_align(a, v, tolerance) for a, v in events(latents, experts, seconds)]))


@torch.no_grad()
def generate(mode: str, stitcher, alone: dict, cond: dict, truth: dict, seconds: float, settings) -> dict:
    """Latents of one mode for the held-out clips (same seeds and conditioning in every mode).
    ``stitcher=None``: the experts alone, with the mode's given latents (a stitch at step 0)."""
    if mode == "independent":
        return sample(alone, cond, seconds, settings)
    given = {} if mode == "joint" else given_for_task(mode, alone, truth)
    if stitcher is None:
        return sample(alone, cond, seconds, settings, given=given)
    return sample_stitched(stitcher, cond, seconds, settings, given=given)


def score(rows: dict, truth: dict, alone: dict, seconds: float, tolerance: float) -> dict:
    """``{mode: {"sync": s, "frechet_video": f|None, "frechet_audio": f|None}}``; None where the mode gives that modality."""
    ref = features(truth, alone, seconds)
    out = {"ground truth": {"sync": sync_score(truth, alone, seconds, tolerance), "frechet_video": 0.0, "frechet_audio": 0.0}}
    for mode, lat in rows.items():
        f = features(lat, alone, seconds)
        out[mode] = {"sync": sync_score(lat, alone, seconds, tolerance),
                     **{f"frechet_{m}": None if m in GIVEN.get(mode, ()) else frechet_distance(f[m], ref[m]) for m in ("video", "audio")}}
    return out


def write_previews(folder: Path, rows: dict, experts: dict, n: int) -> list[Path]:
    """What the latents mean, as video with sound (soe.train.synthetic.SyntheticPreviewCodec)."""
    from soe.media import contact_sheet, write_mp4
    from soe.train.synthetic import SyntheticPreviewCodec

    v_codec, a_codec = SyntheticPreviewCodec(experts["a"]), SyntheticPreviewCodec(experts["b"])
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, lat in rows.items():
        video, audio = v_codec.decode(lat["a"][:n]), a_codec.decode(lat["b"][:n])
        seconds = video.shape[2] / v_codec.rate
        given = {"v2a": {"video": seconds}, "a2v": {"audio": seconds}, "image": {"video": 1 / experts["a"].latent_rate}}.get(name)
        for i in range(n):
            stem = f"{name.split()[0]}_{i:02d}"
            write_mp4(folder / f"{stem}.mp4", video[i], v_codec.rate, audio[i], int(a_codec.rate))
            written.append(contact_sheet(folder / f"{stem}.png", video[i], v_codec.rate, audio[i], int(a_codec.rate), given=given))
    return written
