"""Word-timed transcripts of a clip, and the part of one that belongs to a training window.

Words come from a sidecar ``clip.words.json`` next to ``clip.mp4`` (what Whisper-style tools write: a list
of words, openai-whisper's or WhisperX's ``{"segments": [{"words": [...]}]}``, or the transformers
pipeline's ``{"chunks": [...]}``), else from a local Whisper model through the transformers
automatic-speech-recognition pipeline with ``return_timestamps="word"`` (its cross-attention alignment
gives each word's start and end; clips longer than 30 s go through the pipeline's chunked long-form
mode; clips are batched by the pipeline; the language is detected per window with Whisper's
``detect_language``). Hand-written here: reading those three layouts and the cut, which the ecosystem
does not offer: a window keeps the words whose midpoint lies inside it, so a word spoken across a window edge
belongs to exactly one window.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from soe.data.annotate import AnnotatorError, model_folder, require_transformers
from soe.errors import UsageError, one_line

WORDS_SUFFIX = ".words.json"
SPEECH_RATE = 16000  # Whisper's sample rate
LONG_FORM_SECONDS = 30  # Whisper hears 30 s at once: longer clips go through the chunked pipeline


@dataclass(frozen=True)
class Word:
    text: str  # as the recogniser wrote it (Whisper's words carry their leading space)
    start: float  # seconds on the clip's timeline
    end: float
    language: str | None = None  # what Whisper heard (None: a transcript brought along, or not detected)

    @property
    def middle(self) -> float:
        return (self.start + self.end) / 2


def sidecar_of(clip_path) -> Path:
    """``clip.mp4`` -> ``clip.words.json``."""
    path = Path(clip_path)
    return path.with_name(path.stem + WORDS_SUFFIX)


def read_words(path) -> list[Word]:
    """A sidecar's words, in time order; a file that is not one of the layouts, or whose words are out of
    order, is one line naming it."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UsageError(f"{path}: not a readable JSON file ({one_line(e, 200)})") from None
    if isinstance(data, dict) and isinstance(data.get("segments"), list):
        items = [w for seg in data["segments"] if isinstance(seg, dict) for w in seg.get("words") or []]
    elif isinstance(data, dict):
        items = data.get("chunks", data.get("words"))
    else:
        items = data
    if not isinstance(items, list):
        raise UsageError(f"{path}: expected a list of words, {{\"segments\": [{{\"words\": [...]}}]}} or {{\"chunks\": [...]}}")
    return parse_words(items, str(path))


def parse_words(items: list, where: str) -> list[Word]:
    """``[{"word" | "text", "start", "end"} | {"text", "timestamp"}, ...]`` in time order -> words (blank ones
    dropped); a malformed word or a word starting before the one above it is one line naming ``where``."""
    words = [_word(item, where, n) for n, item in enumerate(items)]
    for n in range(1, len(words)):
        if words[n].start < words[n - 1].start:
            raise UsageError(f"{where}: words out of order: word {n} starts at {words[n].start:g} s, before word {n - 1} "
                             f"at {words[n - 1].start:g} s (expected words in time order)")
    return [w for w in words if w.text.strip()]


def _word(item, path: str, n: int) -> Word:
    if not isinstance(item, dict):
        raise UsageError(f"{path}: word {n} is not an object")
    text = item.get("word", item.get("text"))
    times = item.get("timestamp") or (item.get("start"), item.get("end"))
    ok = isinstance(text, str) and isinstance(times, (list, tuple)) and len(times) == 2
    start, end = (times if ok else (None, None))
    if end is None and isinstance(start, (int, float)):
        end = start  # the transformers pipeline leaves the end of a clip's last word open
    if not (ok and all(isinstance(t, (int, float)) and math.isfinite(t) for t in (start, end)) and 0 <= start <= end):
        raise UsageError(f"{path}: word {n} needs \"word\" (or \"text\") and \"start\" <= \"end\" in seconds "
                         f"(or \"timestamp\": [start, end]), got {json.dumps(item)[:120]}")
    return Word(text, float(start), float(end))


def words_in_window(words: list[Word], start: float, seconds: float) -> list[Word]:
    """The words whose midpoint lies in ``[start, start + seconds)``."""
    return [w for w in words if start <= w.middle < start + seconds]


_UNSPACED = re.compile("[\u0e00-\u0e7f\u3000-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uff00-\uffef]")  # Thai, CJK, kana


def join_words(words: list[Word]) -> str:
    """The words as one line: as written when they carry their own spaces (Whisper's English words do),
    else separated by a space except between two characters of scripts written without spaces (Chinese,
    Japanese, Thai: Whisper's and WhisperX's words there carry none)."""
    if any(w.text[:1].isspace() for w in words):
        return " ".join("".join(w.text for w in words).split())
    line = ""
    for w in (w.text.strip() for w in words):
        unspaced = line and _UNSPACED.match(line[-1]) and _UNSPACED.match(w[:1])
        line += w if not line or unspaced else " " + w
    return line


class WhisperTranscriber:
    """Word-timed speech recognition with a local Whisper folder (transformers' ASR pipeline)."""

    def __init__(self, path, language: str | None = None, device=None, dtype="auto"):
        path = model_folder(path, "annotate.whisper")
        require_transformers("annotate.whisper")
        try:
            from transformers import pipeline

            self.pipe = pipeline("automatic-speech-recognition", model=str(path), device=device or "cpu", dtype=dtype)
        except Exception as e:  # transformers raises many types for a folder it cannot load
            raise AnnotatorError(f"annotate.whisper: '{path}' is not a speech recognition model transformers can load: "
                                 f"{one_line(e, 300)}") from None
        if getattr(self.pipe.model.generation_config, "alignment_heads", None) is None:
            raise AnnotatorError(f"annotate.whisper: '{path}' has no alignment_heads in generation_config.json: "
                                 "Whisper cannot time its words without them")
        self.language = language
        if self.pipe.tokenizer.pad_token is None:  # batches need one; Whisper pads its labels with its end of text
            self.pipe.tokenizer.pad_token = self.pipe.tokenizer.eos_token

    def __call__(self, audio: np.ndarray, offset: float = 0.0) -> list[Word]:
        """``audio (N,)`` mono float at 16 kHz -> its words, ``offset`` added to every time."""
        return self.transcribe([(audio, offset)])[0]

    def transcribe(self, clips: list[tuple[np.ndarray, float]], batch_size: int = 1) -> list[list[Word]]:
        """Each clip's ``(audio (N,) mono float at 16 kHz, offset)`` -> its words, ``offset`` added to every time,
        ``batch_size`` inputs a forward pass (the pipeline's batching; Whisper pads every input to 30 s, so a
        clip's words do not depend on its batch). Longer than 30 s: the pipeline's chunked long-form mode (30 s
        chunks, their words merged). Words carry ``language`` only when it is set (``annotate.language``): the
        language heard is detected per window (``languages``)."""
        out: list[list[Word]] = [[] for _ in clips]
        kwargs = {"task": "transcribe", **({"language": self.language} if self.language else {})}
        for long in (False, True):
            picked = [i for i, (a, _) in enumerate(clips) if a.size and (a.size > LONG_FORM_SECONDS * SPEECH_RATE) == long]
            if not picked:
                continue
            chunked = {"chunk_length_s": LONG_FORM_SECONDS} if long else {}
            results = self.pipe([{"raw": clips[i][0], "sampling_rate": SPEECH_RATE} for i in picked], batch_size=batch_size,
                                return_timestamps="word", generate_kwargs=kwargs, **chunked)
            for i, result in zip(picked, results):
                offset = clips[i][1]
                for chunk in result.get("chunks", []):
                    start, end = chunk["timestamp"]
                    end = start if end is None else end
                    if chunk["text"].strip():
                        out[i].append(Word(chunk["text"], offset + float(start), offset + float(max(start, end)), self.language))
        return out

    def languages(self, audios: list[np.ndarray], batch_size: int = 1) -> list[str | None]:
        """The language Whisper hears in each piece of 16 kHz audio (a window's; its first 30 s), as its language
        token (e.g. ``en``); the set ``annotate.language`` without detecting. The pipeline's own ``return_language``
        is not used: with word timestamps it leaks timestamp tokens into the words."""
        import torch

        if self.language:
            return [self.language] * len(audios)
        model, codes = self.pipe.model, []
        for i in range(0, len(audios), batch_size):
            batch = [a[: LONG_FORM_SECONDS * SPEECH_RATE] for a in audios[i: i + batch_size]]
            features = self.pipe.feature_extractor(batch, sampling_rate=SPEECH_RATE, return_tensors="pt").input_features
            with torch.no_grad():
                tokens = model.detect_language(features.to(model.device, model.dtype))
            for token in tokens.reshape(-1).tolist():
                code = self.pipe.tokenizer.decode([int(token)]).strip()
                codes.append(code[2:-2] if code.startswith("<|") and code.endswith("|>") else None)
        return codes
