"""``soe eval``: every requested metric over a folder of clips, each clip decoded once, into ``eval.json``.

Order of work: every input is checked first (folders, metric names, the models folder and each model
subfolder's kind, the prompts file, the output file), so bad input writes nothing; then clips are decoded,
in ``workers`` processes when asked, each worker also computing the metrics that need no model (AV-Align:
OpenCV and librosa, the CPU-heavy part); the model-based metrics then run in this process, one model loaded
once for all clips on ``device``, each clip's frames batched. A clip that cannot be decoded is reported by
name and listed under ``failed``; the others are still evaluated.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from soe.evaluate import av_align as av_align_mod
from soe.evaluate.catalog import METRICS, EvalError, model_folders, parse_metrics
from soe.evaluate.decode import Clip, DecodeError, find_clips, safe_decode
from soe.evaluate.prompt_file import PROMPTS_FILE, read_prompt_rows
from soe.outputs import check_output, removed_on_failure
from soe.schema.base import device_problem

CPU_METRICS = {"av_align": av_align_mod.clip_av_align}


def read_prompts(path) -> dict[str, dict]:
    """``--prompts``: the rows of a prompts file or Verse-Bench folder by ``id`` (soe.evaluate.prompt_file)."""
    try:
        return {row["id"]: row for row in read_prompt_rows(path, need_prompt=False)}
    except ValueError as e:
        raise EvalError(f"--prompts {e}") from None


def _text_of(row: dict | None, metric: str):
    if not row:
        return None
    if metric == "clap_score":
        return row.get("audio_prompt") or row.get("prompt") or None
    if metric == "clip_score":
        return row.get("prompt") or None
    if metric == "wer":
        return row.get("transcript")
    if metric == "id_consistency":
        return row.get("image") or None
    return None


def _measure(task: tuple) -> tuple:
    """Worker: decode one clip and compute the model-free metrics; the clip comes back only when ``keep``."""
    stem, path, cpu, keep = task
    clip = safe_decode((stem, path))
    if isinstance(clip, DecodeError):
        return stem, None, {}, str(clip)
    values, errors = {}, []
    for name in cpu:
        try:
            values[name] = float(CPU_METRICS[name](clip))
        except (DecodeError, ValueError) as e:
            errors.append(f"{name}: {' '.join(str(e).split())}")
    return stem, (clip if keep else None), values, "; ".join(errors) or None


def _decoded(items: list[tuple], workers: int):
    if workers <= 1:
        yield from map(_measure, items)
        return
    # spawned, not forked: a forked worker inherits this process's FFmpeg state, and PyAV 18.1.1's frame conversion
    # then waits forever on swscale slice threads that exist only here (seen after an in-process decode)
    with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
        yield from pool.map(_measure, items, chunksize=1)


def file_hashes(folder: Path) -> dict[str, str]:
    """sha256 of each weights/config file of a model folder (what the numbers were computed with)."""
    out = {}
    for p in sorted(folder.iterdir()):
        if p.is_file() and p.suffix in (".safetensors", ".bin", ".json", ".pth", ".pt"):
            h = hashlib.sha256()
            with p.open("rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
            out[p.name] = h.hexdigest()
    return out


class Models:
    """The models the chosen metrics need, each loaded once on first use."""

    def __init__(self, folders: dict[str, Path], device: str):
        self.folders, self.device, self._loaded = folders, device, {}

    def get(self, name: str):
        if name not in self._loaded:
            folder = self.folders[name]
            if name == "clap":
                from soe.evaluate.clap import ClapEmbedder as cls
            elif name == "clip":
                from soe.evaluate.clip_score import ClipScorer as cls
            elif name == "dino":
                from soe.evaluate.dino import DinoEmbedder as cls
            elif name == "synchformer":
                from soe.evaluate.desync import DesyncScorer as cls
            else:
                from soe.evaluate.wer import WhisperTranscriber as cls
            try:
                self._loaded[name] = cls(folder, device=self.device)
            except (OSError, ValueError) as e:  # weights that do not load: bad input, one line, exit status 2
                raise EvalError(f"--models {folder}: cannot load the {name} model ({' '.join(str(e).split())})") from None
        return self._loaded[name]


def _model_metric(models: Models, name: str, clip: Clip, arg) -> float:
    from PIL import Image

    if name == "clap_score":
        from soe.evaluate.clap import SAMPLE_RATE, cosine_rows

        m = models.get("clap")
        return float(cosine_rows(m.text([arg]), m.audio([clip.audio_at(SAMPLE_RATE)]))[0])
    if name == "clip_score":
        return models.get("clip").score(clip.frames, arg)
    if name in ("desync", "sync_offset"):
        return models.get("synchformer").scores(clip)[name]
    if name == "id_consistency":
        return models.get("dino").id_consistency(Image.open(arg).convert("RGB"), clip.frames)
    from soe.evaluate.wer import SAMPLE_RATE, word_error_rate

    return word_error_rate(arg, models.get("whisper").transcribe(clip.audio_at(SAMPLE_RATE)[: 30 * SAMPLE_RATE]))


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def results_file(out, samples: Path, force: bool = False) -> Path:
    """``--out`` (default SAMPLES/eval.json) as a new .json file in a folder that can be written (so never one of
    the clips, wavs or prompts it reads); an existing one only with ``force``."""
    out = Path(out) if out is not None else samples / "eval.json"
    if out.suffix != ".json" or out.is_dir():
        raise EvalError(f"--out {out}: expected a .json results file" + (", got a folder" if out.is_dir() else ""))
    check_output(out.parent, "--out")  # not under a file, writable
    if out.exists() and not force:
        raise EvalError(f"{out}: exists; pass --force to overwrite it, or --out FILE")
    return out


def plan(samples, reference=None, prompts=None, models=None, metrics=None, out=None, force=False,
         model_overrides=None, device=None) -> dict:
    """Check every input (EvalError, one line, before anything is computed or written) and decide what runs."""
    samples = Path(samples)
    if not samples.is_dir():
        raise EvalError(f"{samples}: no such folder (expected a folder of mp4 clips or a run folder)")
    clips = find_clips(samples)
    if not clips:
        raise EvalError(f"{samples}: no video files (expected *.mp4, or a run folder with generated/ clips)")
    if reference is not None and not Path(reference).is_dir():
        raise EvalError(f"--reference {reference}: no such folder (expected a folder of real clips)")
    names = parse_metrics(metrics)
    folders = model_folders(models, model_overrides)
    prompts_path = Path(prompts) if prompts is not None else samples / PROMPTS_FILE
    rows = read_prompts(prompts_path) if prompts is not None or prompts_path.is_file() else {}
    out = results_file(out, samples, force=force)
    problem = device_problem(device) if device is not None else None
    if problem is not None:
        raise EvalError(f"--device: {problem}")
    skipped, run = {}, []
    for n in names:
        m = METRICS[n]
        if m.model is not None and m.model not in folders:
            where = f"{Path(models) / m.model}" if models is not None else f"--models DIR with a {m.model}/ subfolder"
            kind = "synchformer_state_dict.pth" if m.model == "synchformer" else "transformers save_pretrained folder"
            skipped[n] = f"needs {m.model} weights: {where} ({kind})"
        elif m.kind == "set" and reference is None:
            skipped[n] = "needs --reference DIR (real clips)"
        elif m.needs is not None and not any(_text_of(rows.get(s), n) for s in clips):
            skipped[n] = f"no clip has a {'prompt' if m.needs == 'text' else m.needs} in the prompts file"
        else:
            run.append(n)
    return {"samples": samples, "clips": clips, "reference": reference, "rows": rows, "out": out, "run": run,
            "skipped": skipped, "folders": folders, "asked": names}


def evaluate(p: dict, workers: int = 0, device: str | None = None, progress=None, on_failure=None) -> dict:
    """Compute the plan ``p`` (from :func:`plan`): the ``eval.json`` document."""
    device = device or default_device()
    run, rows = p["run"], p["rows"]
    cpu = [n for n in run if n in CPU_METRICS]
    model_metrics = [n for n in run if METRICS[n].model is not None and METRICS[n].kind == "clip"]
    keep = bool(model_metrics) or "fd_audio" in run or "fd_video" in run
    models = Models(p["folders"], device)
    per_clip, failed = {}, {}
    emb = {"fd_audio": [], "fd_video": []}
    task = progress.add_task("clips", total=len(p["clips"])) if progress is not None else None
    items = [(stem, str(path), cpu, keep) for stem, path in p["clips"].items()]
    for stem, clip, values, error in _decoded(items, workers):
        if clip is None and not values:
            failed[stem] = error
        else:
            values, errors = dict(values), [error] if error else []
            for n in model_metrics:
                arg = _text_of(rows.get(stem), n)
                if arg or METRICS[n].needs is None:
                    try:
                        values[n] = _model_metric(models, n, clip, arg)
                    except EvalError:  # the model itself does not load: bad input for every clip
                        raise
                    except (DecodeError, OSError, ValueError) as e:
                        errors.append(f"{n}: {' '.join(str(e).split())}")
            _set_embeddings(models, run, clip, emb)
            per_clip[stem] = values
            if errors:
                failed[stem] = "; ".join(errors)
        if on_failure is not None and stem in failed:
            on_failure(stem, failed[stem])
        if progress is not None:
            progress.advance(task)
    set_values = _set_metrics(models, run, emb, p["reference"], workers, failed)
    return {"clips": per_clip, "mean": _means(per_clip, run), "set": set_values, "skipped": p["skipped"], "failed": failed,
            "models": {m: {"folder": str(f), "sha256": file_hashes(f)} for m, f in p["folders"].items()
                       if any(METRICS[n].model == m for n in run)},
            "definitions": {n: METRICS[n].definition for n in p["asked"]}}


def _set_embeddings(models: Models, run: list[str], clip: Clip, emb: dict) -> None:
    if clip is None:
        return
    if "fd_audio" in run and clip.audio is not None:
        from soe.evaluate.clap import SAMPLE_RATE

        emb["fd_audio"].append(models.get("clap").audio([clip.audio_at(SAMPLE_RATE)])[0])
    if "fd_video" in run:
        emb["fd_video"].extend(models.get("dino").frame_embeddings(clip.frames))


def _set_metrics(models: Models, run: list[str], emb: dict, reference, workers: int, failed: dict) -> dict:
    wanted = [n for n in ("fd_audio", "fd_video") if n in run]
    if not wanted:
        return {}
    from soe.evaluate.frechet import frechet_distance

    ref = {n: [] for n in wanted}
    items = [(f"reference/{s}", str(path), [], True) for s, path in find_clips(reference).items()]
    for stem, clip, _, error in _decoded(items, workers):
        if clip is None:
            failed[stem] = error
        else:
            _set_embeddings(models, wanted, clip, ref)
    out = {}
    for n in wanted:
        try:
            out[n] = frechet_distance(np.array(emb[n]), np.array(ref[n]))
        except ValueError as e:
            out[n] = None
            failed[f"set/{n}"] = str(e)
    return out


def _means(per_clip: dict, run: list[str]) -> dict:
    out = {}
    for n in run:
        vals = [v[n] for v in per_clip.values() if n in v and v[n] is not None and math.isfinite(v[n])]
        if vals:
            out[n] = float(np.mean(vals))
    return out


def summary(result: dict) -> list[tuple[str, float, float, int]]:
    """(metric, mean, std, n) per per-clip metric, then (set metric, value, nan, n clips)."""
    rows = []
    for n in result["mean"]:
        vals = [v[n] for v in result["clips"].values() if v.get(n) is not None]
        rows.append((n, float(np.mean(vals)), float(np.std(vals)), len(vals)))
    for n, v in result["set"].items():
        rows.append((n, float("nan") if v is None else v, float("nan"), len(result["clips"])))
    return rows


def write_json(result: dict, out: Path) -> Path:
    """Write atomically (a temporary file beside it, then a rename), creating its folder (removed again on failure)."""
    with removed_on_failure(out.parent, "--out"):
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(result, indent=2, sort_keys=False, allow_nan=False) + "\n")
        tmp.replace(out)
    return out
