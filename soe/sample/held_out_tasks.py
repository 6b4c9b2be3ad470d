"""Held-out synthetic clips sampled per task, scored on latents and, optionally, on decoded mp4s.

``sample.sync_tasks`` names what each held-out clip is sampled as: ``joint`` (nothing given), ``v2a`` (the
clip's true video given clean, the audio sampled), ``a2v`` (its true audio given, the video sampled); the
same clips, seeds and noise for every task and for both the experts alone (step 0: zero-initialised
connectors) and the stitched model. Each is scored with the latent AV-Align of ``soe.evaluate.sync_eval``
and, with ``sample.sync_media``, decoded by the synthetic preview codec at the video's latent frame rate
(one picture per latent frame, so optical flow sees the motion, not repeated frames; click loudness below
``AUDIO_GATE`` as silence, so librosa counts clicks, not a near-silent latent's hum), written as mp4 with
the audio also beside it as a lossless ``.wav`` (which ``soe eval`` reads instead of the AAC track), and scored by ``soe eval``'s own pipeline (``soe.evaluate.run``: ``av_align`` on the decoded files, ``eval.json``
in each folder).
"""
from __future__ import annotations

from pathlib import Path

import torch

AUDIO_GATE = 0.2  # click loudness below this decodes as silence: a true clip is 0 between clicks and ~1 on one
GIVEN = {"joint": "nothing", "v2a": "the true video", "a2v": "the true audio"}
GENERATED = {"joint": ("video", "audio"), "v2a": ("audio",), "a2v": ("video",)}


def held_out_clips(stitcher, cfg, n: int) -> tuple[dict, dict, float]:
    """(conditioning, true latents, seconds) of the recipe's ``n`` held-out clips."""
    from soe.evaluate import sync_eval

    experts = {"a": stitcher.a, "b": stitcher.b}
    seconds = cfg.sample.seconds or cfg.data.seconds
    cond, truth = sync_eval.held_out(experts, seconds, n, cfg.seed)
    return cond, truth, seconds


@torch.no_grad()
def sample_task(stitcher, cfg, task: str, cond: dict, truth: dict, seconds: float) -> dict:
    """Latents per side of the held-out clips sampled as ``task`` (the given side is the truth itself)."""
    from soe.flow.conditioning import given_for_task
    from soe.recipe.builders import build_sampler
    from soe.sample.sampler import sample_stitched

    experts = {"a": stitcher.a, "b": stitcher.b}
    cond = {s: {k: v.to(experts[s].device) for k, v in c.items()} for s, c in cond.items()}
    given = None
    if task != "joint":
        given = given_for_task(task, experts, {s: truth[s].to(experts[s].device, torch.float32) for s in experts})
    was_training = stitcher.training
    stitcher.eval()
    try:
        latents = sample_stitched(stitcher, cond, seconds, build_sampler(cfg), given=given)
    finally:
        stitcher.train(was_training)
    return {s: v.float().cpu() for s, v in latents.items()}


def score_latents(latents: dict, truth: dict, experts: dict, seconds: float, task: str) -> dict:
    """Latent AV-Align and the Frechet distance of each generated modality (a given one is the truth)."""
    from soe.evaluate import sync_eval

    frechet = sync_eval.frechet(latents, truth, experts, seconds)
    return {"sync": sync_eval.sync_score(latents, experts, seconds),
            "frechet": {m: v for m, v in frechet.items() if m in GENERATED[task]}}


def write_wav(path: Path, audio: torch.Tensor, sample_rate: int) -> Path:
    """``(C, N)`` float audio in [-1, 1] -> a 16-bit mono PCM wav (the channels averaged)."""
    import wave

    pcm = (audio.float().mean(0).clamp(-1, 1) * 32767).round().to(torch.int16).numpy().astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(int(sample_rate))
        w.writeframes(pcm.tobytes())
    return path


def write_media(latents: dict, experts: dict, folder: Path) -> list[Path]:
    """``clip_NN.mp4`` (+ ``clip_NN.wav``) per held-out clip: the latents decoded by the synthetic preview codec,
    the video at its latent frame rate (one picture per latent frame)."""
    from soe.data.synthetic import SyntheticPreviewCodec
    from soe.media import media_sides, write_mp4

    v, a = media_sides(experts, "sample.sync_media")
    vc = SyntheticPreviewCodec(experts[v], fps=experts[v].latent_rate)
    ac = SyntheticPreviewCodec(experts[a], gate=AUDIO_GATE)
    video, audio = vc.decode(latents[v]), ac.decode(latents[a])
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(len(video)):
        write_wav(folder / f"clip_{i:02d}.wav", audio[i], int(ac.rate))  # lossless: AAC's padding adds an onset at the end
        out.append(write_mp4(folder / f"clip_{i:02d}.mp4", video[i], vc.rate, audio[i], int(ac.rate)))
    return out


def eval_av_align(folder: Path) -> float:
    """``soe eval FOLDER --metrics av_align --force``: the mean AV-Align of the decoded mp4s (``eval.json`` written there)."""
    from soe.evaluate.run import evaluate, plan, write_json

    p = plan(folder, metrics="av_align", force=True)
    result = evaluate(p, device="cpu")
    write_json(result, p["out"])
    if result["failed"]:
        from soe.errors import SoeError

        raise SoeError(f"sample.sync_media: soe eval could not score {sorted(result['failed'])[0]} in {folder}")
    return float(result["mean"]["av_align"])
