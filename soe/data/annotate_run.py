"""``soe annotate``: each training window of a folder of clips gets its own text, for ``soe encode`` to read.

Per window, never per clip (a caption of a whole minute describes no 5 s of it): windows are cut exactly
as ``soe encode`` cuts them (the recipe's experts, ``data.seconds`` or ``annotate.durations``); an omni model
that sees and hears the window writes a caption (for the video expert) and a sound description (for the
audio expert), each from its own prompt (``soe.data.omni``); the clip's word-timed transcript (a
``clip.words.json`` sidecar, else Whisper with word timestamps: ``soe.data.transcript``) is cut at word
midpoints into the window's transcript (the audio expert's lyrics). Results are cached by (clip hash,
window, model, prompt) in the annotations folder (``soe.data.annotation_store``), so a killed run resumes
and a run with another prompt recomputes only what that prompt changes. ``--shard I/N`` annotates clips
I, I+N, ... of the sorted list, each process into its own log; nothing needs merging.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch
from rich.console import Console

from soe.data.annotation_store import (AnnotationLog, AnnotationStore, clip_hash, model_id, text_key, window_key, words_key,
                                       write_selection)
from soe.data.command_args import check_expert_folders, check_folders, options_among, parse_shard
from soe.data.media_io import MediaError, read_speech, read_windows, safe_probe
from soe.data.omni import OmniAnnotator, omni_size
from soe.data.report import AnnotateReport, progress_bars
from soe.data.sources import find_clips
from soe.data.transcript import SPEECH_RATE, WhisperTranscriber, Word, join_words, read_words, sidecar_of, words_in_window
from soe.data.windows import plan_record, plan_windows, window_specs
from soe.errors import UsageError
from soe.media import media_sides
from soe.recipe.reading import load_recipe
from soe.recipe.validate import validate_recipe
from soe.schema.annotate import PROMPT_KEYS, AnnotateConfig
from soe.schema.base import command_settings
from soe.threads import configure_threads

WINDOWS_PER_READ = 8  # windows decoded at once for the omni model (bounds memory on long clips)
FIELDS = ("caption", "sound")  # what the omni model writes, each from its own prompt


def window_plan(cfg, durations=None) -> tuple[list, float, int]:
    """``(specs, fps, sample_rate)``: the windows ``soe encode`` cuts with this recipe, from the experts
    built on the meta device (shapes and rates only; nothing is loaded)."""
    from soe.recipe.builders import build_codec, build_expert_with_weights

    with torch.device("meta"):
        experts = {s: build_expert_with_weights(cfg, s, device="meta", empty=True)[0] for s in ("a", "b")}
    v, a = media_sides(experts, "experts: soe annotate")
    rate = getattr(experts[a], "sample_rate", None) or build_codec(cfg, a, experts[a]).rate  # the audio codec's rate
    fps = float(experts[v].fps)
    specs = window_specs(durations or [cfg.data.seconds], (v, experts[v]), (a, experts[a]), fps, int(rate))
    return specs, fps, int(rate)


def _torch_settings(settings: AnnotateConfig) -> tuple[str, object]:
    device = ("cuda" if torch.cuda.is_available() else "cpu") if settings.device == "auto" else settings.device
    if settings.dtype != "auto":
        return device, getattr(torch, settings.dtype)
    return device, ("auto" if device.startswith("cuda") else torch.float32)  # the checkpoint's dtype on GPU


def annotate_folder(cfg, src, out, settings: AnnotateConfig | None = None, shard: tuple[int, int] = (0, 1),
                    console: Console | None = None, progress: bool = True) -> AnnotateReport:
    """Annotate every window of the clips of part ``shard = (I, N)`` of ``src`` into the folder ``out``."""
    settings, console, t0 = settings or AnnotateConfig(), console or Console(), time.perf_counter()
    specs, fps, sample_rate = window_plan(cfg, settings.durations)
    clips = find_clips(src)[0][shard[0]::shard[1]]
    sidecars = {c.rel: read_words(sidecar_of(c.path)) for c in clips if sidecar_of(c.path).is_file()}  # bad file: stop now
    device, dtype = _torch_settings(settings)
    omni = OmniAnnotator(settings.omni, settings.max_new_tokens, device, dtype) if settings.omni else None
    whisper = WhisperTranscriber(settings.whisper, settings.language, device, dtype) if settings.whisper else None
    if omni is None and whisper is None and not sidecars:
        raise UsageError("soe annotate: nothing to annotate with: give annotate.omni=FOLDER (captions, sound descriptions) "
                         "and/or annotate.whisper=FOLDER (transcripts), or clip.words.json sidecars")
    omni_model = omni and model_id(settings.omni, fps=settings.fps, max_pixels=settings.max_pixels,
                                   max_new_tokens=settings.max_new_tokens, dtype=str(dtype))
    whisper_model = whisper and model_id(settings.whisper, language=settings.language, dtype=str(dtype))
    prompts = {"caption": settings.caption_prompt, "sound": settings.sound_prompt}
    selection = {"caption": omni_model and {"model": omni_model, "prompt": prompts["caption"]},
                 "sound": omni_model and {"model": omni_model, "prompt": prompts["sound"]},
                 "transcript": {"whisper": whisper_model, "sidecar": "clip.words.json"},
                 "plan": plan_record(specs, fps, sample_rate)}
    Path(out).mkdir(parents=True, exist_ok=True)  # first write: every check above has passed
    log = AnnotationLog(out, *shard)
    try:
        sel = write_selection(out, selection)
        store = AnnotationStore(out)
        report = AnnotateReport(clips=len(clips), sidecar_transcripts=len(sidecars))
        run = _Run(store, log, report, omni, omni_model, whisper, whisper_model, prompts, settings.fps, settings.max_pixels)
        with progress_bars(console, progress) as bar:
            task = bar.add_task("annotating clips", total=len(clips))
            for clip in clips:
                run.clip(clip, specs, fps, sample_rate, sidecars.get(clip.rel), sel)
                bar.advance(task)
    finally:
        log.close()
    report.elapsed = time.perf_counter() - t0
    report.write(Path(out) / "annotate_report.json")
    return report


class _Run:
    """One annotate run: each clip's transcript and window texts, from the cache or the models, into the log."""

    def __init__(self, store, log, report, omni, omni_model, whisper, whisper_model, prompts, fps, max_pixels):
        self.store, self.log, self.report = store, log, report
        self.omni, self.omni_model, self.whisper, self.whisper_model = omni, omni_model, whisper, whisper_model
        self.prompts, self.fps, self.max_pixels = prompts, fps, max_pixels

    def write(self, record: dict) -> None:
        self.log.append(record)
        self.store.add(record)

    def clip(self, clip, specs, fps, sample_rate, sidecar: list[Word] | None, selection: str) -> None:
        info = safe_probe(clip.path)
        if isinstance(info, MediaError):
            return self.report.skip(clip.rel, info.reason, info.detail)
        planned = plan_windows(info.seconds, specs, fps, sample_rate)
        if not planned:
            return self.report.skip(clip.rel, "too short", f"{info.seconds:.2f}s, one window needs {specs[-1].seconds:g}s")
        digest = clip_hash(clip.path)
        try:
            words = sidecar if sidecar is not None else self.words(clip, digest)
            texts = self.texts(clip, digest, [(start, spec.seconds) for start, spec in planned], info)
        except MediaError as e:
            return self.report.skip(clip.rel, e.reason, e.detail)
        windows = [{"start": start, "seconds": spec.seconds, **texts.get(window_key(start, spec.seconds), {"caption": None, "sound": None}),
                    "transcript": None if words is None else join_words(words_in_window(words, start, spec.seconds))}
                   for start, spec in planned]
        old = self.store.get(("clip", digest, selection))
        if old is None or old["windows"] != windows or old["path"] != clip.rel:
            self.write({"kind": "clip", "clip": digest, "path": clip.rel, "selection": selection, "time": time.time(), "windows": windows})
        self.report.clips_annotated += 1
        self.report.windows += len(windows)

    def words(self, clip, digest: str) -> list[Word] | None:
        """The clip's Whisper words (cached per clip and model); None without a Whisper model."""
        if self.whisper is None:
            return None
        cached = self.store.get(words_key(digest, self.whisper_model))
        if cached is not None:
            self.report.transcribed_cached += 1
            return [Word(*w) for w in cached["words"]]
        audio, first = read_speech(clip.path, SPEECH_RATE)
        words = self.whisper(audio, offset=first)
        self.write({"kind": "words", "clip": digest, "model": self.whisper_model, "words": [[w.text, w.start, w.end] for w in words]})
        self.report.transcribed_new += 1
        return words

    def texts(self, clip, digest: str, windows: list[tuple[float, float]], info) -> dict:
        """``{window key: {"caption", "sound"}}`` from the cache, the omni model writing what is missing."""
        if self.omni is None:
            return {}
        keys = {(w, f): text_key(digest, *w, f, self.omni_model, self.prompts[f]) for w in windows for f in FIELDS}
        missing = {k for k, key in keys.items() if self.store.get(key) is None}
        self.report.texts_cached += len(keys) - len(missing)
        todo = list(dict.fromkeys(w for w, _ in sorted(missing)))
        size = omni_size(info.width, info.height, self.max_pixels)
        rate = self.omni.sample_rate
        for i in range(0, len(todo), WINDOWS_PER_READ):
            group = todo[i: i + WINDOWS_PER_READ]
            frames = [max(2, int(seconds * self.fps + 1e-6) // 2 * 2) for _, seconds in group]  # whole temporal patches of 2
            media = read_windows(clip.path, [(s, n, int(round(d * rate))) for (s, d), n in zip(group, frames)], self.fps, size, rate)
            for (start, seconds), (video, audio) in zip(group, media):
                for f in FIELDS:
                    if ((start, seconds), f) in missing:
                        text = self.omni.describe(video, audio.mean(axis=0), self.fps, self.prompts[f])
                        self.write({"kind": "text", "clip": digest, "start": start, "seconds": seconds, "field": f,
                                    "model": self.omni_model, "prompt": self.prompts[f], "text": text})
                        self.report.texts_new += 1
        return {window_key(*w): {f: self.store.get(keys[w, f])["text"] for f in FIELDS} for w in windows}


def annotate_command(recipe, src, overrides, out=None, shard: str | None = None, console: Console | None = None) -> AnnotateReport:
    """``soe annotate RECIPE SRC_FOLDER --out DIR [--shard I/N] [key=value ...] [annotate.<key>=value ...]``."""
    console = console or Console()
    out, _, shard, overrides = options_among(list(overrides), out, 0, shard, command="soe annotate", allowed=("--out", "--shard"))
    part = parse_shard(shard, "soe annotate")
    overrides, settings = command_settings(AnnotateConfig, "annotate", overrides, literal=PROMPT_KEYS)
    cfg = load_recipe(recipe, overrides)
    validate_recipe(cfg, check_paths=False)  # data.path is not read
    check_expert_folders(cfg, ("path",))  # each expert's config: where windows fall
    if out is None:
        raise UsageError("soe annotate: give the annotations folder with --out DIR (then encode with encode.annotations=DIR)")
    check_folders(src, out, "soe annotate", "annotations")
    for key in ("omni", "whisper"):
        if getattr(settings, key) is not None and not Path(getattr(settings, key)).is_dir():
            raise UsageError(f"annotate.{key}: model folder not found: '{getattr(settings, key)}'")
    configure_threads(cfg.trainer.threads)
    report = annotate_folder(cfg, src, out, settings, shard=part, console=console)
    console.print(report.table())
    console.print(f"annotations: [bold]{out}[/] (encode with encode.annotations={out})")
    return report
