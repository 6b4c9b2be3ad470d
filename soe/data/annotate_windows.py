"""The windows of ``soe annotate`` through the models in batches, decoding overlapping the model calls.

Each clip is planned first (soe.data.annotate_run): its windows, and what the cache lacks for them. What must
be decoded (the frames and sound of windows still to caption, the 16 kHz speech track of a clip still to
transcribe or whose windows' languages are unknown) is read by ``decode_clip`` in a prefetching pool: the
next clips decode while the models run (``--workers N`` processes, else one thread). A window the file ends
before is skipped alone, the clip's other windows kept (``read_windows(each=True)``, as ``soe encode``).

Decoded work goes into three queues: Whisper over whole clips, Whisper's language detection over each window
that holds words (a window's language is what Whisper hears in it, not the clip's), and the captioner over
(window, prompt) pairs. A queue runs one batch of ``batch_size`` inputs (``annotate.batch_size``) as soon as
it holds one, and what is left at the end; batches are padded on the left and decoded greedily, so a
window's text does not depend on the batch it was in. Every result is appended to the cache as it comes;
a clip's record is written once its last result is in. Hand-written: only this queueing; the batching of
each model is transformers' own (processors padding a list of inputs, the ASR pipeline's ``batch_size``).
"""
from __future__ import annotations

from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from soe.data.annotation_store import text_key, window_key, words_key
from soe.data.media_io import MediaError, ordered_map, read_speech, safe_read_windows
from soe.data.transcript import SPEECH_RATE, Word, join_words, words_in_window

FIELDS = ("caption", "sound")  # what the omni model writes, each from its own prompt
LANGUAGE = "language"  # the field of a window's language record in the cache (its prompt: "")


def decode_clip(task: tuple) -> tuple:
    """What a decode worker reads of one clip: ``task = (path, windows, fps, size, rate, speech)`` ->
    ``(media, track)``: ``media`` as ``safe_read_windows`` returns it (a MediaError in a window's place when
    the file ends before it), ``track`` the 16 kHz speech track ``(audio, first)`` when ``speech``, else None;
    a MediaError for a file that cannot be read at all."""
    path, windows, fps, size, rate, speech = task
    media = safe_read_windows((path, windows, fps, size, rate)) if windows else []
    if isinstance(media, MediaError) or not speech:
        return media, None
    try:
        return media, read_speech(path, SPEECH_RATE)
    except MediaError as e:
        return e, None


def prefetch(fn, items: list, workers: int, ahead: int = 2):
    """``(item, fn(item))`` in order, computed ahead of the consumer: in ``workers`` processes, else one thread."""
    if workers > 0:
        yield from ordered_map(fn, items, workers)
        return
    with ThreadPoolExecutor(1, thread_name_prefix="annotate-decode") as pool:
        queue: deque = deque()
        for x in items:
            queue.append((x, pool.submit(fn, x)))
            if len(queue) > ahead:
                y, fut = queue.popleft()
                yield y, fut.result()
        while queue:
            y, fut = queue.popleft()
            yield y, fut.result()


@dataclass
class Pending:
    """One clip on its way through the models."""

    clip: object  # soe.data.sources.Clip
    digest: str  # its content hash
    planned: list  # [(start, WindowSpec)]
    words: list[Word] | None  # its transcript, once known (None: none, or Whisper's still to come)
    source: str | None  # where the words come from: a file name, "asr", or None
    texts: dict = field(default_factory=dict)  # {(window key, field): text}
    languages: dict = field(default_factory=dict)  # {window key: language}
    captions: dict = field(default_factory=dict)  # {window key: [fields still to write]}
    bad: dict = field(default_factory=dict)  # {window key: why it could not be read}
    waiting: int = 0  # model results still to come
    track: tuple | None = None  # (16 kHz audio, time of its first sample) while languages are still to detect

    @property
    def windows(self) -> list[tuple[float, float]]:
        return [window_key(start, spec.seconds) for start, spec in self.planned]


class Batcher:
    """The three model queues of one run, and the cache records their results become (``write``)."""

    def __init__(self, run, batch_size: int):
        self.run, self.batch_size = run, batch_size
        self.asr: deque[Pending] = deque()
        self.language: deque[tuple[Pending, tuple, np.ndarray]] = deque()
        self.caption: deque[tuple[Pending, tuple, str, tuple]] = deque()
        self.calls = {"asr": 0, "language": 0, "captioner": 0}  # generate / forward calls made (batches)

    def add(self, p: Pending, media: list, track) -> None:
        """Queue what the models still owe clip ``p``, from its decoded windows ``media`` and speech ``track``."""
        wanted = [w for w in p.windows if p.captions.get(w)]
        for w, m in zip(wanted, media):
            if isinstance(m, MediaError):
                p.bad[w] = m.detail
                continue
            video, audio = m
            for f in p.captions[w]:
                self.caption.append((p, w, f, (video, audio.mean(axis=0))))
                p.waiting += 1
        if track is not None:
            p.track = track
            if p.words is None:
                self.asr.append(p)
                p.waiting += 1
            else:
                self.queue_languages(p)

    def queue_languages(self, p: Pending) -> None:
        """Queue each window of ``p`` that holds words and has no language yet, with its 16 kHz sound."""
        audio, first = p.track
        for (start, spec), w in zip(p.planned, p.windows):
            if w in p.languages or w in p.bad or not words_in_window(p.words, start, spec.seconds):
                continue
            if self.run.language:  # annotate.language: what Whisper was told, not detected
                p.languages[w] = self.run.language
                continue
            i0 = round((start - first) * SPEECH_RATE)
            piece = audio[max(0, i0): max(0, i0 + round(spec.seconds * SPEECH_RATE))]
            self.language.append((p, w, np.pad(piece, (max(0, -i0), 0)).copy()))
            p.waiting += 1
        p.track = None

    def step(self, final: bool = False) -> None:
        """Run every full batch (every batch, when ``final``)."""
        n = 1 if final else self.batch_size
        while len(self.asr) >= n or len(self.language) >= n or len(self.caption) >= n:
            if len(self.asr) >= n:
                self.run_asr([self.asr.popleft() for _ in range(min(self.batch_size, len(self.asr)))])
            elif len(self.language) >= n:
                self.run_languages([self.language.popleft() for _ in range(min(self.batch_size, len(self.language)))])
            else:
                self.run_captions([self.caption.popleft() for _ in range(min(self.batch_size, len(self.caption)))])

    def run_asr(self, batch: list[Pending]) -> None:
        run = self.run
        self.calls["asr"] += 1
        results = run.whisper.transcribe([p.track for p in batch], batch_size=self.batch_size)
        run.cache([{"kind": "words", "clip": p.digest, "model": run.whisper_model, "words": [[w.text, w.start, w.end] for w in words]}
                   for p, words in zip(batch, results)])
        for p, words in zip(batch, results):
            p.words, p.waiting = words, p.waiting - 1
            run.report.transcribed_new += 1
            self.queue_languages(p)

    def run_languages(self, batch: list[tuple]) -> None:
        run = self.run
        self.calls["language"] += 1
        codes = run.whisper.languages([audio for _, _, audio in batch], batch_size=self.batch_size)
        run.cache([{"kind": "text", "clip": p.digest, "start": w[0], "seconds": w[1], "field": LANGUAGE, "model": run.whisper_model,
                    "prompt": "", "text": code} for (p, w, _), code in zip(batch, codes)])
        for (p, w, _), code in zip(batch, codes):
            p.languages[w], p.waiting = code, p.waiting - 1

    def run_captions(self, batch: list[tuple]) -> None:
        run = self.run
        self.calls["captioner"] += 1
        if run.kind == "omni":
            texts = run.model.describe_batch([m for *_, m in batch], run.fps, [run.prompts[f] for _, _, f, _ in batch])
        else:  # an image-text model: captions only, one prompt
            texts = run.model.caption_batch([video for *_, (video, _) in batch], run.prompts["caption"])
        run.cache([{"kind": "text", "clip": p.digest, "start": w[0], "seconds": w[1], "field": f, "model": run.model_name,
                    "prompt": run.prompts[f], "text": text} for (p, w, f, _), text in zip(batch, texts)])
        for (p, w, f, _), text in zip(batch, texts):
            p.texts[w, f], p.waiting = text, p.waiting - 1
            run.report.texts_new += 1


def clip_windows(p: Pending, fields: tuple[str, ...], with_language: bool) -> list[dict]:
    """The windows of a finished clip as its record holds them (the unreadable ones left out)."""
    windows = []
    for (start, spec), w in zip(p.planned, p.windows):
        if w in p.bad:
            continue
        own = None if p.words is None else words_in_window(p.words, start, spec.seconds)
        window = {"start": start, "seconds": spec.seconds, **{f: p.texts.get((w, f)) if f in fields else None for f in FIELDS},
                  "transcript": None if own is None else join_words(own),  # "" where nobody speaks: no lyrics
                  "words": None if own is None else [[x.text, x.start, x.end] for x in own]}
        if with_language:
            window["language"] = p.languages.get(w) if own else None
        windows.append(window)
    return windows


def cached_texts(store, p: Pending, fields: tuple[str, ...], model: str | None, prompts: dict) -> int:
    """Fill ``p.texts`` from the cache; ``p.captions`` gets, per window, the fields still to write. Returns the
    number found."""
    found = 0
    for w in p.windows:
        for f in fields:
            record = store.get(text_key(p.digest, *w, f, model, prompts[f]))
            if record is None:
                p.captions.setdefault(w, []).append(f)
            else:
                p.texts[w, f] = record["text"]
                found += 1
    return found


def cached_languages(store, p: Pending, model: str, language: str | None) -> bool:
    """Fill ``p.languages`` for the windows of ``p`` that hold words (all of them set to ``language`` when it is
    given); True when one is still to detect."""
    missing = False
    for (start, spec), w in zip(p.planned, p.windows):
        if not words_in_window(p.words, start, spec.seconds):
            continue
        record = None if language else store.get(text_key(p.digest, *w, LANGUAGE, model, ""))
        if language or record is not None:
            p.languages[w] = language or record["text"]
        else:
            missing = True
    return missing


def cached_words(store, digest: str, model: str) -> list[Word] | None:
    record = store.get(words_key(digest, model))
    return None if record is None else [Word(*w) for w in record["words"]]
