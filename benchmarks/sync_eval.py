"""Scoring of the sync experiment: sample every mode, read events back out of latents, AV-Align and Frechet.

Modes (soe/flow/conditioning.py): ``independent`` (each expert alone), ``joint`` (stitched, nothing given),
``v2a`` (the true video given, audio sampled), ``a2v`` (the true audio given, video sampled) and
``image`` (the true first video latent frame given, the rest of both sampled).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from soe.evaluate.metrics import av_align, frechet_distance
from soe.evaluate.sync_eval import events, features  # the demo's readouts: one definition of events and features
from soe.flow.conditioning import given_for_task
from soe.sample.sampler import sample, sample_stitched

MODES = ("independent", "joint", "v2a", "a2v", "image")
GIVEN = {"v2a": ("video",), "a2v": ("audio",)}  # modalities a mode copies from the truth (no Frechet for them)


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
    """What the latents mean, as video with sound (soe.data.synthetic.SyntheticPreviewCodec)."""
    from soe.data.synthetic import SyntheticPreviewCodec
    from soe.media import contact_sheet, write_mp4

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
