"""Is the stitched model in sync? AV-Align and per-modality quality on held-out synthetic clips.

The synthetic task (soe/data/synthetic.py) has a ground truth: a click at every bounce. Clips
generated from held-out conditioning are read back as events (video impacts, audio onsets) and
scored with AV-Align (soe/evaluate/metrics.py); a Frechet distance on simple per-clip features says whether
each modality still looks like the task. Used by the demo (``sample.sync_clips``) and by
benchmarks/sync_experiment.py.
"""
from __future__ import annotations

import numpy as np
import torch

from soe.data.synthetic import audio_envelope_from_latent, video_height_from_latent
from soe.evaluate.metrics import audio_onsets, av_align, frechet_distance, video_motion_events

HELD_OUT_SEED_OFFSET = 10_000  # held-out clips: a clip stream training never draws from


def held_out(experts: dict, seconds: float, n: int, seed: int) -> tuple[dict, dict]:
    """(conditioning, ground-truth latents) of ``n`` held-out clips, batched per side."""
    from soe.data.datamodule import SyntheticAVDataModule

    data = SyntheticAVDataModule(experts, seconds=seconds, num_clips=n, batch_size=1, seed=seed + HELD_OUT_SEED_OFFSET)
    clips = [data.make_clip(i) for i in range(n)]
    cond = {s: {k: torch.stack([c[s][k] for c in clips]) for k in clips[0][s] if k != "latents"} for s in experts}
    truth = {s: torch.stack([c[s]["latents"] for c in clips]) for s in experts}
    return cond, truth


def _sides(experts: dict) -> tuple[str, str]:
    video = next(s for s, e in experts.items() if e.modality == "video")
    audio = next(s for s, e in experts.items() if e.modality == "audio")
    return video, audio


def _signals(latents: dict, experts: dict):
    v, a = _sides(experts)
    for lv, la in zip(latents[v], latents[a]):
        yield lv, la, video_height_from_latent(lv.cpu()).numpy(), audio_envelope_from_latent(la.cpu(), experts[a].latent_time_axis - 1).numpy()


def events(latents: dict, experts: dict, seconds: float) -> list[tuple[np.ndarray, np.ndarray]]:
    """(audio onset times, video impact times) per clip, read off (generated) latents."""
    return [(audio_onsets(env, len(env) / seconds), video_motion_events(h, len(h) / seconds))
            for _, _, h, env in _signals(latents, experts)]


def tolerance(experts: dict) -> float:
    """1.5 latent frames of the slower side, in seconds."""
    return 1.5 / min(e.latent_rate for e in experts.values())


def sync_score(latents: dict, experts: dict, seconds: float) -> float:
    """Mean AV-Align over the clips (1.0: every click at a bounce and every bounce clicks)."""
    tol = tolerance(experts)
    return float(np.mean([av_align(a, v, tol) for a, v in events(latents, experts, seconds)]))


def features(latents: dict, experts: dict, seconds: float) -> dict[str, np.ndarray]:
    """Simple per-clip features per modality (motion/envelope statistics, event counts, latent moments)."""
    feats = {"video": [], "audio": []}
    for v, a, h, env in _signals(latents, experts):
        nv, na = len(video_motion_events(h, len(h) / seconds)), len(audio_onsets(env, len(env) / seconds))
        feats["video"].append([h.mean(), h.std(), np.abs(np.diff(h)).mean(), nv, v.float().mean().item(), v.float().std().item()])
        feats["audio"].append([env.mean(), env.std(), np.abs(np.diff(env)).mean(), na, a.float().mean().item(), a.float().std().item()])
    return {k: np.array(x) for k, x in feats.items()}


def frechet(latents: dict, truth: dict, experts: dict, seconds: float) -> dict[str, float]:
    """Per-modality Frechet distance of ``latents``' features to the ground truth's (0 = indistinguishable)."""
    ours, ref = features(latents, experts, seconds), features(truth, experts, seconds)
    return {m: frechet_distance(ours[m], ref[m]) for m in ("video", "audio")}
