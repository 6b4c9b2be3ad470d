"""``soe encode``: a folder of audio-video clips -> the latent cache that training reads.

Per clip: probe (PyAV), cut into windows of the recipe's clip length (``data.seconds``, or several
lengths with ``encode.durations``), decode each window at the video expert's fps and size and the
audio codec's sample rate (decode workers), caption windows without one (optional annotator), then
in batches on the accelerator: each expert's own codec and text encoder, one shard at a time.
Unusable clips are skipped and listed in the report with the reason; a killed run resumes.
"""
from __future__ import annotations

import dataclasses
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from rich.console import Console

from soe.data.annotate import Annotator, load_annotator
from soe.data.annotation_store import window_clip, window_key
from soe.data.annotations_file import ANNOTATIONS_FILE, AnnotationRows
from soe.data.command_args import check_expert_folders, check_folders, options_among, parse_shard
from soe.data.media_io import MediaError, safe_probe, safe_read_windows
from soe.data.media_io import ordered_map as _ordered_map
from soe.data.report import EncodeReport, progress_bars
from soe.data.sources import Clip, find_clips
from soe.data.stream_format import latent_dtype_for, text_key
from soe.data.stream_writer import PartWriter, lock_part
from soe.data.text import TextConditioner
from soe.data.windows import bucket_name, nearest_resolution, plan_windows, window_specs
from soe.errors import DataError, RecipeError, UsageError
from soe.media import media_sides
from soe.outputs import new_root, remove_new
from soe.recipe.reading import load_recipe
from soe.recipe.validate import validate_recipe
from soe.schema.base import command_settings
from soe.schema.encode import EncodeConfig
from soe.threads import configure_threads


def parse_settings(overrides: list[str]) -> tuple[list[str], EncodeConfig]:
    """Split ``encode.*`` overrides (settings of this command) from recipe overrides."""
    return command_settings(EncodeConfig, "encode", overrides)


@dataclass
class _Item:
    wid: str
    clip: Clip
    start: float
    spec: object
    frames: np.ndarray  # (F, H, W, 3) uint8
    audio: np.ndarray  # (2, N) float32
    caption: str
    annotated: bool = False  # captioned by encode.annotator
    from_annotations: bool = False  # texts from the annotations file (annotations.jsonl)


@dataclass
class _Task:
    clip: Clip
    size: tuple
    windows: list = field(default_factory=list)  # [(wid, start, spec)]


def _build_expert(cfg, side):
    """Shapes and rates only: the preset on the meta device when a real text encoder is used; on CPU
    (tiny weights) when captions become pseudo-embeddings drawn through the expert's ``conditioning``."""
    from soe.recipe.builders import build_expert

    e = cfg.experts[side]
    meta = e.text_encoder_path is not None and e.preset is not None
    with torch.device("meta" if meta else "cpu"):
        return build_expert(cfg, side, device="meta" if meta else "cpu", load_weights=e.preset is None)


def _fit_time(z: torch.Tensor, axis: int, length: int) -> torch.Tensor:
    if z.shape[axis] < length:
        raise RuntimeError(f"codec gave {z.shape[axis]} latent frames, the expert expects {length}")
    return z.narrow(axis, 0, length)


class _Encoder:
    """Batched codec + text encoding of decoded windows, into the writer."""

    def __init__(self, experts, codecs, text, writer, sides, device, with_resolution: bool):
        self.experts, self.codecs, self.text, self.writer = experts, codecs, text, writer
        self.v, self.a = sides
        self.device, self.with_resolution = device, with_resolution

    @torch.no_grad()
    def __call__(self, items: list[_Item]) -> None:
        v, a = self.v, self.a
        video = torch.from_numpy(np.stack([it.frames for it in items])).to(self.device)  # (B, F, H, W, 3) uint8
        video = video.permute(0, 4, 1, 2, 3).float().div(127.5).sub(1.0)  # (B, 3, F, H, W) in [-1, 1]
        audio = torch.from_numpy(np.stack([it.audio for it in items])).to(self.device)  # (B, 2, N)
        spec = items[0].spec
        lat = {v: self.codecs[v].encode(video), a: self.codecs[a].encode(audio)}
        lat = {s: _fit_time(z, self.experts[s].latent_time_axis, spec.latent_frames[s]).float().cpu() for s, z in lat.items()}
        cond = {v: self.text[v]([it.caption for it in items], [None] * len(items)),
                a: self.text[a]([it.clip.audio_caption or it.caption for it in items], [it.clip.lyrics for it in items])}
        for i, it in enumerate(items):
            index = {"source": it.clip.rel, "start": it.start, "caption": it.caption}
            if it.clip.audio_caption:
                index["audio_caption"] = it.clip.audio_caption
            if it.annotated:
                index["annotated"] = True
            if it.from_annotations:
                index.update(annotations=True, **({"lyrics": it.clip.lyrics} if it.clip.lyrics else {}))
            if self.with_resolution:
                index["resolution"] = list(it.frames.shape[1:3])
            texts = {v: text_key(v, it.caption, None), a: text_key(a, it.clip.audio_caption or it.caption, it.clip.lyrics)}
            record = {"id": it.wid, "seconds": spec.seconds, "bucket": bucket_name(spec.seconds, it.frames.shape[1:3]), "index": index,
                      "text": texts}
            for s in (v, a):
                c = {k: (t[i].float() if t.is_floating_point() else t[i]) for k, t in cond[s].items()}
                record[s] = {"latents": lat[s][i], **c}
            self.writer.add(record)


def encode_folder(cfg, src, out, settings: EncodeConfig | None = None, workers: int = 0, console: Console | None = None,
                  progress: bool = True, codecs: dict | None = None, annotator: Annotator | None = None,
                  shard: tuple[int, int] = (0, 1)) -> EncodeReport:
    """Encode every usable clip of ``src`` into the latent cache ``out`` (resuming what is there).

    ``shard=(I, N)``: this process encodes clips I, I+N, I+2N, ... of the sorted clip list (part I of N);
    the last part to finish merges the cache."""
    settings = settings or EncodeConfig()
    console = console or Console()
    t0 = time.perf_counter()
    fresh = not Path(out).exists()
    lock = lock_part(out, *shard)  # before any model is loaded: a second process on this shard stops at once
    try:
        return _encode_locked(cfg, src, out, settings, workers, console, progress, codecs, annotator, shard, lock, t0)
    except BaseException:
        lock.close()
        if fresh and not any(p.suffix != ".lock" for p in Path(out).rglob("*") if p.is_file()):
            shutil.rmtree(out, ignore_errors=True)  # a failed first start leaves no cache folder behind
        raise


def _encode_locked(cfg, src, out, settings, workers, console, progress, codecs, annotator, shard, lock, t0) -> EncodeReport:
    experts = {side: _build_expert(cfg, side) for side in ("a", "b")}
    v, a = media_sides(experts, "experts: soe encode")
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if settings.device == "auto" else settings.device)
    if codecs is None:
        from soe.recipe.builders import build_codec

        codecs = {}
        for side in (v, a):
            if cfg.experts[side].path is not None and cfg.experts[side].codec_path is None:
                raise RecipeError(f"experts.{side}.codec_path: expert '{experts[side].name}' has real weights; give its codec "
                                  "folder (a tiny random codec would write meaningless latents)")
            codecs[side] = build_codec(cfg, side, experts[side])
    codecs = {s: c.to(device).eval() for s, c in codecs.items()}
    ve = experts[v]
    fps, sample_rate = float(ve.fps), int(codecs[a].rate)
    default_size = (int(ve.height), int(ve.width))
    resolutions = [tuple(int(x) for x in r) for r in settings.resolutions] if settings.resolutions else None
    durations = sorted({float(d) for d in (settings.durations or [cfg.data.seconds])}, reverse=True)
    specs = window_specs(durations, (v, ve), (a, experts[a]), fps, sample_rate)
    recorded = {"durations": durations, "fps": fps, "sample_rate": sample_rate, "size": list(default_size),
                "resolutions": [list(r) for r in resolutions] if resolutions else None, "seed": cfg.seed,
                "latent_frames": {f"{s.seconds:g}": s.latent_frames for s in specs},
                **{f"{k}_{side}": cfg.experts[side][k] for side in ("a", "b") for k in ("codec_path", "text_encoder_path")}}
    annotations = AnnotationRows(settings.annotations, "encode.annotations") if settings.annotations else None
    if annotations is not None:
        recorded["annotations"] = annotations.digest  # a resume must read the same texts
        annotations.check_lengths([spec.seconds for spec in specs])
    storage = {"latents": latent_dtype_for(cfg.trainer.precision) if settings.latent_dtype == "auto" else settings.latent_dtype,
               "text": settings.text_dtype}
    if annotator is None:  # a missing annotator folder fails before the cache folder is written
        annotator = load_annotator(settings.annotator, settings.annotator_prompt, device=device)
    clips, orphans = find_clips(src)  # captions that cannot be read, too
    writer = PartWriter(out, {s: e.name for s, e in experts.items()}, recorded, settings.shard_size, part=shard[0], parts=shard[1],
                        storage=storage, lock=lock)
    text = {s: TextConditioner(experts[s], s, cfg, device) for s in (v, a)}
    report = EncodeReport(windows_cached=len(writer.rows), seconds_cached=sum(float(r["seconds"]) for r in writer.rows))
    clips = clips[shard[0]::shard[1]]
    report.clips = len(clips)
    for path, reason, detail in orphans:
        report.skip(path, reason, detail)
    encoder = _Encoder(experts, codecs, text, writer, (v, a), device, with_resolution=resolutions is not None)

    with progress_bars(console, progress) as bar:
        tasks, encoded_clips, window_clips = [], set(), {}  # window_clips: {window id: the clip as that window reads}
        probing = bar.add_task("probing clips", total=len(clips))
        for clip, (_, info) in zip(clips, _ordered_map(safe_probe, [c.path for c in clips], workers)):
            bar.advance(probing)
            if isinstance(info, MediaError):
                report.skip(clip.rel, info.reason, info.detail)
                continue
            texts = None if annotations is None else annotations.of(
                clip.rel, [(start, spec.seconds) for start, spec in plan_windows(info.seconds, specs, fps, sample_rate)])
            if clip.caption is None and texts is None and annotator is None and settings.missing_caption == "skip":
                report.skip(clip.rel, "no caption", "no sidecar .txt or captions.jsonl entry (or set encode.annotator)")
                continue
            planned = plan_windows(info.seconds, specs, fps, sample_rate)
            if not planned:
                report.skip(clip.rel, "too short", f"{info.seconds:.2f}s, one window needs {durations[-1]:g}s")
                continue
            size = nearest_resolution(info.width, info.height, resolutions) if resolutions else default_size
            todo = [(f"{clip.clip_id}-w{k:03d}", start, spec) for k, (start, spec) in enumerate(planned)]
            if texts is not None:  # a window soe annotate could not read has no row: not encoded either
                for _, start, spec in todo:
                    if window_key(start, spec.seconds) not in texts:
                        report.skip(clip.rel, "not annotated", f"the window at {start:.2f}s has no row in the annotations")
                todo = [w for w in todo if window_key(w[1], w[2].seconds) in texts]
                own = {wid: window_clip(clip, texts.get(window_key(start, spec.seconds))) for wid, start, spec in todo}
                if annotator is None and settings.missing_caption == "skip" and any(c.caption is None for c in own.values()):
                    report.skip(clip.rel, "no caption", "a window has no caption in the annotations and the clip no sidecar one")
                    continue
                window_clips.update(own)
            if len(todo) > sum(w[0] not in writer.done for w in todo):
                encoded_clips.add(clip.rel)
            todo = [w for w in todo if w[0] not in writer.done]
            for i in range(0, len(todo), settings.windows_per_task):
                tasks.append(_Task(clip, size, todo[i: i + settings.windows_per_task]))
        total = sum(len(t.windows) for t in tasks)
        if settings.max_windows is not None:
            total = min(total, settings.max_windows)
        windows_bar = bar.add_task("encoding windows", total=total)
        pending: dict[str, list[_Item]] = {}
        failed: set[str] = set()
        jobs = [(t.clip.path, [(s, sp.video_frames, sp.audio_samples) for _, s, sp in t.windows], fps, t.size, sample_rate) for t in tasks]
        stop = False
        for task, (_, result) in zip(tasks, _ordered_map(safe_read_windows, jobs, workers)):
            if isinstance(result, MediaError):
                if task.clip.rel not in failed:
                    failed.add(task.clip.rel)
                    report.skip(task.clip.rel, result.reason, result.detail)
                continue
            for (wid, start, spec), media in zip(task.windows, result):
                if isinstance(media, MediaError):  # this window only: the clip's other windows are kept
                    report.skip(task.clip.rel, media.reason, media.detail)
                    bar.advance(windows_bar)
                    continue
                frames, audio = media
                wclip = window_clips.get(wid, task.clip)
                caption, annotated = wclip.caption, False
                if caption is None:
                    caption, annotated = (annotator(frames, audio, sample_rate), True) if annotator is not None else ("", False)
                key = bucket_name(spec.seconds, frames.shape[1:3])
                pending.setdefault(key, []).append(_Item(wid, wclip, start, spec, frames, audio, caption, annotated, wid in window_clips))
                report.windows_new += 1
                report.seconds_new += spec.seconds
                encoded_clips.add(task.clip.rel)
                if len(pending[key]) >= settings.batch_size:
                    encoder(pending.pop(key))
                bar.advance(windows_bar)
                if settings.max_windows is not None and report.windows_new >= settings.max_windows:
                    stop = True
                    break
            if stop:
                break
        for items in pending.values():
            encoder(items)
        report.merged = writer.finish()
    report.clips_encoded = len(encoded_clips)
    report.shards = writer.shards_written
    report.elapsed = time.perf_counter() - t0
    report.write(Path(out) / "encode_report.json")
    return report


def encode_command(recipe, src, overrides, out=None, workers: int = 0, console: Console | None = None,
                   shard: str | None = None, annotations: str | None = None) -> EncodeReport:
    """``soe encode RECIPE SRC_FOLDER [--out DIR] [--workers N] [--shard I/N] [--annotations FILE] [key=value ...]``."""
    console = console or Console()
    flags = {"--annotations": annotations} if annotations is not None else {}
    out, workers, shard, overrides = options_among(list(overrides), out, workers, shard,
                                                   allowed=("--out", "--workers", "--shard", "--annotations"), extra=flags)
    part = parse_shard(shard)
    overrides, settings = parse_settings(overrides)
    if "--annotations" in flags:
        settings = dataclasses.replace(settings, annotations=flags["--annotations"])
    elif settings.annotations is None and (Path(src) / ANNOTATIONS_FILE).is_file():
        settings = dataclasses.replace(settings, annotations=str(Path(src) / ANNOTATIONS_FILE))  # soe annotate's default place
    cfg = load_recipe(recipe, overrides)
    validate_recipe(cfg, check_paths=False, data_path_is_output=True)  # data.path is what we are about to write
    check_expert_folders(cfg, ("path", "codec_path", "text_encoder_path"))
    if settings.annotations is not None:
        AnnotationRows(settings.annotations, "--annotations" if "--annotations" in flags else "encode.annotations")  # before writing
    out = out or cfg.data.path
    if out is None:
        raise UsageError("soe encode: give the cache folder with --out DIR (or data.path in the recipe)")
    check_folders(src, out, "soe encode", "latent cache")
    if workers < 0:
        raise UsageError(f"soe encode: --workers must be >= 0, got {workers}")
    configure_threads(cfg.trainer.threads)
    root = new_root(out)  # made by this run
    before = set(Path(out).rglob("*")) if root is None else set()
    report = encode_folder(cfg, src, out, settings, workers=workers, console=console, shard=part)
    if part[1] == 1 and report.windows_new + report.windows_cached == 0:  # nothing to train on: say why, exit non-zero
        remove_new(Path(out), root, before)  # and leave nothing behind (no empty cache, no report)
        reasons = ", ".join(f"{n} {r}" for r, n in sorted(report.by_reason.items())) or "no video files found"
        raise DataError(f"soe encode: no window was encoded from '{src}' ({report.clips} clip(s) found; skipped: {reasons})")
    console.print(report.table())
    if report.merged:
        console.print(f"latent cache: [bold]{out}[/] (train with data.kind=latents data.path={out})")
    else:
        console.print(f"shard {part[0]}/{part[1]} of [bold]{out}[/] done; the last shard to finish merges the cache")
    return report
