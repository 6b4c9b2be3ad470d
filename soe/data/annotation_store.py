"""The records of ``soe annotate``: its cache of model outputs, and each run's clip records.

Two folders, the same log format (one fsynced JSON record a line; a torn last line, from a kill, is cut off
when its log is opened again):

    CACHE/ (``--cache DIR``, ``annotate.cache``; default ``$SOE_CACHE_DIR/annotate`` or ``~/.cache/soe/annotate``)
        parts/log-<n>.jsonl           ``text`` and ``words`` records: what the models wrote, whichever run,
                                      recipe or ``--out`` asked; process n of those running at once writes
                                      log n (the first one not locked), so runs and shards share one cache
    FILE.parts/ (beside the annotations file, soe.data.annotations_file)
        annotate.json                 the selection of the last run: models, prompts, window plan, and its hash
        parts/part-<I>-of-<N>.jsonl   ``clip`` records of annotate process I of N
        annotate_report.json          what the last run did

Records (``clip`` is the sha256 of the clip file's bytes, so a renamed or copied clip keeps its annotations
and an edited one loses them)::

    {"kind": "text", "clip", "start", "seconds", "field": "caption" | "sound", "model", "prompt", "text"}
    {"kind": "words", "clip", "model", "words": [[text, start, end], ...]}     a clip's Whisper transcript
    (the language Whisper hears in a window is a ``text`` record, field "language", prompt "")
    {"kind": "clip", "clip", "path", "selection", "time", "windows": [{"start", "seconds", "caption", "sound",
     "transcript"}, ...]}                                                    a clip's windows under a selection

``text`` and ``words`` records are the cache: keyed by (clip, window, model, prompt) and (clip, model), where
``model`` names the weights (folder name + a hash of its config and weight files) and the settings that
change what they write. ``clip`` records are each clip's windows under a selection, merged into the annotations file
(soe.data.annotations_file) by the last part to finish. A record is never rewritten: annotating again with
other prompts appends records, and switching back finds the earlier ones. Hand-written: a JSON-lines log per
process is all this needs (the same commit-by-appended-line scheme as the latent cache's part logs).
"""
from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import os
from pathlib import Path

from soe.data.stream_format import PARTS, append_line, part_name, read_log, write_json_atomic
from soe.data.stream_read import default_cache_dir
from soe.data.stream_writer import lock_part
from soe.errors import RecipeError

SELECTION_FILE = "annotate.json"
CACHE_ENV = "SOE_CACHE_DIR"  # soe's cache folder (the annotate cache is its annotate/), as for remote latent caches
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def clip_hash(path) -> str:
    """The identity of a clip's content: sha256 of the file (32 hex digits)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()[:32]


def model_id(folder, **settings) -> str:
    """A model folder's identity: its name and a hash of its config files and of its weight files' names and
    sizes (hashing gigabytes of weights per run would cost more than it protects), plus ``settings``."""
    folder, h = Path(folder), hashlib.sha1()
    for p in sorted(folder.iterdir()):
        if p.is_file() and p.suffix == ".json" and p.stat().st_size < 1 << 20:
            h.update(p.name.encode() + p.read_bytes())
        elif p.is_file() and p.suffix in WEIGHT_SUFFIXES:
            h.update(f"{p.name}:{p.stat().st_size}".encode())
    name = f"{folder.resolve().name}@{h.hexdigest()[:12]}"
    return name + "".join(f";{k}={v}" for k, v in sorted(settings.items()))


def window_key(start: float, seconds: float) -> tuple[float, float]:
    return round(float(start), 6), float(seconds)


def text_key(clip: str, start: float, seconds: float, field: str, model: str, prompt: str) -> tuple:
    return ("text", clip, *window_key(start, seconds), field, model, prompt)


def words_key(clip: str, model: str) -> tuple:
    return ("words", clip, model)


def _key(record: dict) -> tuple:
    if record["kind"] == "text":
        return text_key(record["clip"], record["start"], record["seconds"], record["field"], record["model"], record["prompt"])
    if record["kind"] == "words":
        return words_key(record["clip"], record["model"])
    return ("clip", record["clip"], record["selection"])


def selection_hash(selection: dict) -> str:
    return hashlib.sha1(json.dumps(selection, sort_keys=True).encode()).hexdigest()[:16]


class AnnotationStore:
    """Every record of every part of an annotations folder, newest last per key."""

    def __init__(self, folder):
        self.folder = Path(folder)
        self.records: dict[tuple, dict] = {}
        for log in sorted((self.folder / PARTS).glob("*.jsonl")):
            for r in read_log(log):
                self.add(r)

    def add(self, record: dict) -> None:
        key = _key(record)
        old = self.records.get(key)
        if old is None or record.get("time", 0) >= old.get("time", 0):
            self.records[key] = record

    def get(self, key: tuple) -> dict | None:
        return self.records.get(key)

    def clip_windows(self, clip: str, selection: str) -> dict | None:
        """``{(start, seconds): {"caption", "sound", "transcript"}}`` of a clip under ``selection``, or None."""
        record = self.records.get(("clip", clip, selection))
        if record is None:
            return None
        return {window_key(w["start"], w["seconds"]): w for w in record["windows"]}


class AnnotationLog:
    """The log of part ``part`` of ``parts``: locked for this process, a torn last line cut off."""

    def __init__(self, folder, part: int = 0, parts: int = 1):
        self.lock = lock_part(folder, part, parts, what="annotations", doing="annotated")
        self.path = Path(folder) / PARTS / f"{part_name(part, parts)}.jsonl"
        read_log(self.path, repair=True)

    def append(self, record: dict) -> None:
        append_line(self.path, record)

    def close(self) -> None:
        self.lock.close()


def cache_folder(setting: str | None) -> Path:
    """Where the models' outputs are cached: ``setting`` (``--cache DIR``), else ``annotate/`` in soe's cache folder."""
    return Path(setting) if setting else default_cache_dir() / "annotate"


class CacheLog:
    """This process's log in the cache folder ``folder``: the first ``log-<n>.jsonl`` no other process holds
    (locked until ``close``), its torn last line cut off. Hand-written: a lock per log lets any number of runs
    append to one cache at once without a server, and a killed run's log is taken over by the next."""

    def __init__(self, folder):
        (Path(folder) / PARTS).mkdir(parents=True, exist_ok=True)
        for n in range(1 << 16):
            lock = open(Path(folder) / PARTS / f"log-{n}.lock", "w")  # noqa: SIM115 (held until close)
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                lock.close()
                continue
            self.lock, self.path = lock, Path(folder) / PARTS / f"log-{n}.jsonl"
            read_log(self.path, repair=True)
            return
        raise RuntimeError(f"annotate cache '{folder}': no free log")  # 65536 processes at once

    def extend(self, records: list[dict]) -> None:
        """Commit ``records``, one line each, with one fsync (a kill leaves at most the last line torn)."""
        with open(self.path, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
            f.flush()
            os.fsync(f.fileno())

    def close(self) -> None:
        self.lock.close()


def write_selection(folder, selection: dict) -> str:
    """Record what this run annotates with (read by ``soe encode``); returns its hash."""
    digest = selection_hash(selection)
    write_json_atomic(Path(folder) / SELECTION_FILE, {"selection": digest, **selection})
    return digest


def read_selection(folder, key: str = "soe annotate") -> dict:
    """``annotate.json`` of an annotations folder; a folder without one is one line naming ``key``."""
    file = Path(folder) / SELECTION_FILE
    if not file.is_file():
        raise RecipeError(f"{key}: no annotations at '{folder}' (expected '{file}', written by `soe annotate`)")
    try:
        return json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise RecipeError(f"{key}: '{file}' is not readable JSON ({e})") from None


def window_clip(clip, texts: dict | None):
    """``clip`` as one of its windows reads: the window's caption, sound description (the audio expert's caption)
    and transcript (its lyrics) where the annotations have them, the clip's own captions elsewhere. A window
    transcribed without words has no lyrics (not the clip's)."""
    if texts is None:
        return clip
    transcript = texts.get("transcript")
    return dataclasses.replace(clip, caption=texts.get("caption") or clip.caption, audio_caption=texts.get("sound") or clip.audio_caption,
                               lyrics=clip.lyrics if transcript is None else (transcript or None))
