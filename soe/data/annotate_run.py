"""``soe annotate``: each training window of a folder of clips gets its own text, for ``soe encode`` to read.

Per window, never per clip (a caption of a whole minute describes no 5 s of it): windows are cut exactly
as ``soe encode`` cuts them (the recipe's experts, ``data.seconds`` or ``annotate.durations``); an omni model
that sees and hears the window writes a caption (for the video expert) and a sound description (for the
audio expert), each from its own prompt (``soe.data.omni``; an image-text model writes captions only); the
clip's word-timed transcript (a ``clip.words.json`` sidecar, else Whisper with word timestamps:
``soe.data.transcript``) is cut at word midpoints into the window's transcript (the audio expert's lyrics),
with the language Whisper hears in that window. The models' outputs are cached by (clip hash, window,
model, prompt) in a cache folder shared by every run (``--cache``, default ``$SOE_CACHE_DIR/annotate``:
``soe.data.annotation_store``), so a killed run resumes, and a rerun, another ``--out`` or a second recipe
cutting the same windows calls no model. Windows go through the models in batches, decoded ahead of them
(``soe.data.annotate_windows``). ``--shard I/N`` annotates clips I, I+N, ... of the sorted list, each
process into its own log in ``FILE.parts/``; the last to finish writes the annotations file.
"""
from __future__ import annotations

import json
import time
from collections import deque
from pathlib import Path

import torch
from rich.console import Console

from soe.data.annotate import AnnotatorError, VLMAnnotator
from soe.data.annotate_windows import (FIELDS, Batcher, Pending, cached_languages, cached_texts, cached_words, clip_windows,
                                      decode_clip, prefetch)
from soe.data.annotation_store import (SELECTION_FILE, AnnotationLog, AnnotationStore, CacheLog, cache_folder, clip_hash, model_id,
                                       read_selection, selection_hash, write_selection)
from soe.data.annotations_file import ANNOTATIONS_FILE, clear_done, mark_done, merge_if_complete, work_folder
from soe.data.command_args import check_expert_folders, options_among, parse_shard
from soe.data.media_io import MediaError, ordered_map, safe_probe
from soe.data.omni import OmniAnnotator, omni_size
from soe.data.report import AnnotateReport, progress_bars
from soe.data.sources import CAPTIONS_FILE, find_clips, read_captions_jsonl
from soe.data.stream_format import part_name
from soe.data.transcript import SPEECH_RATE, WhisperTranscriber, Word, parse_words, read_words, sidecar_of
from soe.data.windows import plan_record, plan_windows, window_specs
from soe.errors import UsageError, one_line
from soe.media import media_sides
from soe.recipe.reading import load_recipe
from soe.recipe.validate import validate_recipe
from soe.schema.annotate import PROMPT_KEYS, AnnotateConfig
from soe.schema.base import command_settings
from soe.threads import configure_threads

REPORT_FILE = "annotate_report.json"


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


def _captioner_kind(path, strict_omni: bool) -> str:
    """``"omni"`` (Qwen2.5-Omni: sees and hears) or ``"image"`` (an image-text model: video captions only), from
    the folder's ``config.json``; any other model is one line naming the file."""
    from soe.data.omni import OMNI_TYPES

    config = Path(path) / "config.json"
    try:
        model_type = json.loads(config.read_text()).get("model_type")
    except (OSError, ValueError) as e:
        raise AnnotatorError(f"--captioner: '{config}' is not a readable model config ({e})") from None
    if model_type in OMNI_TYPES:
        return "omni"
    if strict_omni:
        return "omni"  # annotate.omni: OmniAnnotator names the wrong kind
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    if model_type not in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
        raise AnnotatorError(f"--captioner: '{config}' holds a {model_type!r} model, expected Qwen2.5-Omni (model_type one of "
                             f"{list(OMNI_TYPES)}) or an image-text-to-text model (video captions only)")
    return "image"


def _check_asr(path) -> None:
    config = Path(path) / "config.json"
    try:
        model_type = json.loads(config.read_text()).get("model_type")
    except (OSError, ValueError) as e:
        raise AnnotatorError(f"--asr: '{config}' is not a readable model config ({e})") from None
    if model_type != "whisper":
        raise AnnotatorError(f"--asr: '{config}' holds a {model_type!r} model, expected Whisper (model_type 'whisper')")


def _transcripts(src, clips) -> dict[str, tuple[list[Word], str]]:
    """``{clip: (words, where from)}`` of the clips that bring their own transcript: a ``<stem>.words.json``
    sidecar, else a ``words`` list in captions.jsonl. A bad file stops the run before anything is written."""
    listed = read_captions_jsonl(Path(src))
    out = {}
    for c in clips:
        if sidecar_of(c.path).is_file():
            out[c.rel] = (read_words(sidecar_of(c.path)), sidecar_of(c.path).name)
        elif listed.get(c.rel, {}).get("words") is not None:
            out[c.rel] = (parse_words(listed[c.rel]["words"], f"{Path(src) / CAPTIONS_FILE} ({c.rel})"), CAPTIONS_FILE)
    return out


def _prepare(path):
    """What a probing worker does for one clip: its probe and its content hash."""
    info = safe_probe(path)
    return info, (None if isinstance(info, MediaError) else clip_hash(path))


def annotate_folder(cfg, src, out, settings: AnnotateConfig | None = None, shard: tuple[int, int] = (0, 1),
                    console: Console | None = None, progress: bool = True, workers: int = 0) -> AnnotateReport:
    """Annotate every window of the clips of part ``shard = (I, N)`` of ``src`` into the annotations file ``out``
    (shard logs in ``out.parts/``, the models' outputs in ``settings.cache``); the last part to finish writes ``out``."""
    settings, console, t0 = settings or AnnotateConfig(), console or Console(), time.perf_counter()
    out = Path(out)
    work = work_folder(out)
    specs, fps, sample_rate = window_plan(cfg, settings.durations)
    clips = find_clips(src)[0][shard[0]::shard[1]]
    brought = _transcripts(src, clips)  # bad file: stop now
    device, dtype = _torch_settings(settings)
    captioner = settings.captioner or settings.omni
    kind = captioner and _captioner_kind(captioner, strict_omni=settings.captioner is None)
    if settings.whisper:
        _check_asr(settings.whisper)
    if captioner is None and settings.whisper is None and not brought:
        raise UsageError("soe annotate: nothing to annotate with: give --captioner FOLDER (captions, sound descriptions) "
                         "and/or --asr FOLDER (transcripts), or clip.words.json sidecars / words in captions.jsonl")
    captioner_model = captioner and model_id(captioner, fps=settings.fps, max_pixels=settings.max_pixels,
                                             max_new_tokens=settings.max_new_tokens, dtype=str(dtype))
    whisper_model = settings.whisper and model_id(settings.whisper, language=settings.language, dtype=str(dtype))
    prompts = {"caption": settings.caption_prompt, "sound": settings.sound_prompt}
    fields = FIELDS if kind == "omni" else ("caption",) if kind else ()
    selection = {"caption": captioner_model and {"model": captioner_model, "prompt": prompts["caption"]},
                 "sound": kind == "omni" and {"model": captioner_model, "prompt": prompts["sound"]} or None,
                 "transcript": {"whisper": whisper_model, "sidecar": "clip.words.json"},
                 "plan": plan_record(specs, fps, sample_rate)}
    digest = selection_hash(selection)
    if out.exists() and (not (work / SELECTION_FILE).is_file() or read_selection(work).get("selection") != digest):
        raise UsageError(f"soe annotate --out: '{out}' exists and was not written by this run (same models, prompts and "
                         f"windows); expected a new file (remove it to annotate again: the cache is kept)")
    models = {"captioner": captioner_model, "caption_prompt": prompts["caption"] if kind else None,
              "audio_caption_prompt": prompts["sound"] if kind == "omni" else None, "asr": whisper_model}
    if kind == "omni":
        model = OmniAnnotator(captioner, settings.max_new_tokens, device, dtype)
    elif kind == "image":
        model = VLMAnnotator(captioner, prompt=prompts["caption"], max_new_tokens=settings.max_new_tokens, device=device,
                             key="--captioner")
    else:
        model = None
    whisper = WhisperTranscriber(settings.whisper, settings.language, device, dtype) if settings.whisper else None
    cache = cache_folder(settings.cache)
    try:  # first write: every check above has passed; only the models' outputs are cached
        cache_log = CacheLog(cache) if model is not None or whisper is not None else None
    except OSError as e:
        raise UsageError(f"--cache: cannot write the annotate cache '{cache}' ({one_line(e, 200)})") from None
    work.mkdir(parents=True, exist_ok=True)
    log = AnnotationLog(work, *shard)
    try:
        clear_done(work, *shard)
        sel = write_selection(work, selection)
        report = AnnotateReport(clips=len(clips), sidecar_transcripts=len(brought))
        run = _Run(AnnotationStore(cache), AnnotationStore(work), cache_log, log, report, model, kind, fields, captioner_model, whisper,
                   whisper_model, prompts, settings, models)
        with progress_bars(console, progress, unit="windows") as bar:
            probing = bar.add_task("probing clips", total=len(clips))
            prepared = []
            for _, (info, clip_digest) in ordered_map(_prepare, [c.path for c in clips], workers):
                prepared.append((clips[len(prepared)], info, clip_digest))
                bar.advance(probing)
            planned = {c.rel: plan_windows(i.seconds, specs, fps, sample_rate) for c, i, _ in prepared if not isinstance(i, MediaError)}
            task = bar.add_task("annotating windows", total=sum(len(p) for p in planned.values()))
            done = run.annotate(prepared, planned, brought, specs, sel, workers, lambda n: bar.advance(task, n))
        report.batches = dict(run.batcher.calls)
        mark_done(work, *shard, sel, done)
        report.merged = merge_if_complete(work, out, shard[1], sel)
    finally:
        log.close()
        if cache_log is not None:
            cache_log.close()
    report.elapsed = time.perf_counter() - t0
    report.write(work / (REPORT_FILE if shard[1] == 1 else f"annotate_report.{part_name(*shard)}.json"))
    return report


class _Run:
    """One annotate run: each clip planned against the cache, decoded ahead, its missing texts from the models
    in batches (soe.data.annotate_windows), its windows into the log."""

    def __init__(self, store, clips, cache_log, log, report, model, kind, fields, model_name, whisper, whisper_model, prompts,
                 settings: AnnotateConfig, models):
        self.store, self.clips, self.cache_log, self.log, self.report = store, clips, cache_log, log, report
        self.model, self.kind, self.fields, self.model_name = model, kind, fields, model_name
        self.whisper, self.whisper_model, self.language = whisper, whisper_model, settings.language
        self.prompts, self.fps, self.max_pixels, self.models = prompts, settings.fps, settings.max_pixels, models
        self.batcher = Batcher(self, settings.batch_size)

    def cache(self, records: list[dict]) -> None:
        """Append model outputs to the cache (one fsync for the batch)."""
        self.cache_log.extend(records)
        for r in records:
            self.store.add(r)

    def plan(self, clip, info, digest, planned, brought) -> tuple[Pending, tuple]:
        """Clip ``clip`` against the cache: its Pending and what ``decode_clip`` must read of it."""
        words, source = brought if brought is not None else (None, "asr" if self.whisper else None)
        if source == "asr":
            words = cached_words(self.store, digest, self.whisper_model)
            if words is not None:
                self.report.transcribed_cached += 1
        p = Pending(clip, digest, planned, words, source)
        self.report.texts_cached += cached_texts(self.store, p, self.fields, self.model_name, self.prompts)
        speech = source == "asr" and (words is None or cached_languages(self.store, p, self.whisper_model, self.language))
        size = omni_size(info.width, info.height, self.max_pixels)
        rate = getattr(self.model, "sample_rate", SPEECH_RATE)
        wanted = [(start, max(2, int(spec.seconds * self.fps + 1e-6) // 2 * 2), round(spec.seconds * rate))  # whole temporal patches of 2
                  for (start, spec), w in zip(planned, p.windows) if p.captions.get(w)]
        return p, (clip.path, wanted, self.fps, size, rate, speech)

    def annotate(self, prepared, planned, brought, specs, selection: str, workers: int, advance) -> list[tuple[str, str]]:
        """Every window of the ``prepared`` clips; returns ``(relative path, hash)`` of the clips annotated."""
        jobs = []
        for clip, info, digest in prepared:
            if isinstance(info, MediaError):
                self.report.skip(clip.rel, info.reason, info.detail)
            elif not planned[clip.rel]:
                self.report.skip(clip.rel, "too short", f"{info.seconds:.2f}s, one window needs {specs[-1].seconds:g}s")
            else:
                jobs.append(self.plan(clip, info, digest, planned[clip.rel], brought.get(clip.rel)))
        done, open_ = [], deque()
        for (p, _), (_, (media, track)) in zip(jobs, prefetch(decode_clip, [task for _, task in jobs], workers)):
            if isinstance(media, MediaError):
                self.report.skip(p.clip.rel, media.reason, media.detail)
                advance(len(p.planned))
                continue
            self.batcher.add(p, media, track)
            for detail in p.bad.values():
                self.report.skip(p.clip.rel, "truncated window", detail)
            open_.append(p)
            self.batcher.step()
            self.finish(open_, selection, done, advance)
        self.batcher.step(final=True)
        self.finish(open_, selection, done, advance)
        return done

    def finish(self, open_: deque, selection: str, done: list, advance) -> None:
        """Write the record of each clip whose last result is in, in the order clips came."""
        while open_ and open_[0].waiting == 0:
            p = open_.popleft()
            advance(len(p.planned))
            windows = clip_windows(p, self.fields, with_language=p.source == "asr")
            if not windows:
                continue  # every window unreadable (each reported)
            models = {**self.models, "asr": self.whisper_model if p.source == "asr" else p.source}
            old = self.clips.get(("clip", p.digest, selection))
            if old is None or old["windows"] != windows or old["path"] != p.clip.rel or old.get("models") != models:
                record = {"kind": "clip", "clip": p.digest, "path": p.clip.rel, "selection": selection, "time": time.time(),
                          "models": models, "windows": windows}
                self.log.append(record)
                self.clips.add(record)
            self.report.clips_annotated += 1
            self.report.windows += len(windows)
            done.append((p.clip.rel, p.digest))


FLAGS = {"--asr": "whisper", "--captioner": "captioner", "--device": "device", "--cache": "cache"}  # flag -> annotate.<key>


def annotate_command(recipe, src, overrides, out=None, shard: str | None = None, console: Console | None = None,
                     workers: int = 0, flags: dict | None = None) -> AnnotateReport:
    """``soe annotate RECIPE SRC [--out FILE] [--asr PATH] [--captioner PATH] [--shard I/N] [--workers N] [--device D]
    [--cache DIR] [key=value ...] [annotate.<key>=value ...]``."""
    console = console or Console()
    flags = {k: v for k, v in (flags or {}).items() if v is not None}
    out, workers, shard, overrides = options_among(list(overrides), out, workers, shard, command="soe annotate",
                                                   allowed=("--out", "--shard", "--workers", *FLAGS), extra=flags)
    part = parse_shard(shard, "soe annotate")
    if workers < 0:
        raise UsageError(f"soe annotate: --workers must be >= 0, got {workers}")
    overrides = [*overrides, *(f"annotate.{FLAGS[k]}={v}" for k, v in flags.items())]
    overrides, settings = command_settings(AnnotateConfig, "annotate", overrides, literal=PROMPT_KEYS)
    cfg = load_recipe(recipe, overrides)
    validate_recipe(cfg, check_paths=False)  # data.path is not read
    check_expert_folders(cfg, ("path",))  # each expert's config: where windows fall
    if not Path(src).is_dir():
        raise UsageError(f"soe annotate: source folder not found: '{src}'")
    out = Path(out) if out is not None else Path(src) / ANNOTATIONS_FILE
    if out.is_dir() or not out.parent.is_dir():
        raise UsageError(f"soe annotate --out: expected a file in an existing folder (the annotations.jsonl), got '{out}'")
    for key, flag in (("omni", "annotate.omni"), ("captioner", "--captioner"), ("whisper", "--asr")):
        if getattr(settings, key) is not None and not Path(getattr(settings, key)).is_dir():
            raise UsageError(f"{flag}: model folder not found: '{getattr(settings, key)}'")
    if settings.cache is not None and Path(settings.cache).exists() and not Path(settings.cache).is_dir():
        raise UsageError(f"--cache: expected a folder (the annotate cache), got the file '{settings.cache}'")
    configure_threads(cfg.trainer.threads)
    report = annotate_folder(cfg, src, out, settings, shard=part, console=console, workers=workers)
    console.print(report.table())
    if report.merged:
        console.print(f"annotations: [bold]{out}[/] (soe encode reads SRC/{ANNOTATIONS_FILE}, or --annotations {out})")
    else:
        console.print(f"shard {part[0]}/{part[1]} done; the last shard to finish writes [bold]{out}[/]")
    return report
