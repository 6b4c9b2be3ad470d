"""Which clips a source folder holds, and their captions.

A folder of video files (``.mp4 .mov .mkv .webm .avi``, searched recursively) with captions either
as sidecar text files next to each clip (``clip.txt``, optional ``clip.audio.txt`` and
``clip.lyrics.txt``) or in one ``captions.jsonl`` at the folder root, one object per line:
``{"path": "sub/clip.mp4", "caption": "...", "audio_caption": "...", "lyrics": "..."}`` (paths relative
to the folder; ``audio_caption`` and ``lyrics`` optional; ``words``, a timed transcript, is read by
``soe annotate``). ``captions.jsonl`` wins over sidecars.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

from soe.errors import UsageError

VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".webm", ".avi")
CAPTIONS_FILE = "captions.jsonl"


@dataclass(frozen=True)
class Clip:
    path: Path
    rel: str  # path relative to the source folder (posix), the clip's identity
    caption: str | None = None  # for the video expert (and the audio one unless audio_caption is given)
    audio_caption: str | None = None
    lyrics: str | None = None

    @property
    def clip_id(self) -> str:
        """Stable, readable, unique: ``<stem>-<8 hex of the relative path>`` (no '/', safe in tensor keys)."""
        stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(self.rel).stem)[:40] or "clip"
        return f"{stem}-{hashlib.sha1(self.rel.encode()).hexdigest()[:8]}"


def _utf8(path: Path) -> str:
    """The file's text, or a one-line UsageError naming it (captions are UTF-8, not guessed)."""
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise UsageError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason}); save the captions as UTF-8") from None


def _read_text(path: Path) -> str | None:
    if not path.is_file():
        return None
    text = _utf8(path).strip()
    return text or None


def read_captions_jsonl(folder: Path) -> dict[str, dict]:
    file = folder / CAPTIONS_FILE
    if not file.is_file():
        return {}
    out = {}
    for n, line in enumerate(_utf8(file).splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UsageError(f"{file}: line {n} is not valid JSON ({e.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("path"), str):
            raise UsageError(f"{file}: line {n} needs a \"path\" (the clip, relative to the folder)")
        for key in ("caption", "audio_caption", "lyrics"):
            if row.get(key) is not None and not isinstance(row[key], str):
                raise UsageError(f"{file}: line {n}: \"{key}\" must be a string")
        if row.get("words") is not None and not isinstance(row["words"], list):
            raise UsageError(f"{file}: line {n}: \"words\" must be a list of {{\"word\", \"start\", \"end\"}} (a timed transcript)")
        out[Path(row["path"]).as_posix()] = row
    return out


def find_clips(folder) -> tuple[list[Clip], list[tuple[str, str, str]]]:
    """The folder's clips (sorted by relative path) and ``(path, reason, detail)`` of captions without a clip."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UsageError(f"soe encode: source folder not found: '{folder}'")
    listed = read_captions_jsonl(folder)
    clips = []
    for path in sorted(p for p in folder.rglob("*") if p.suffix.lower() in VIDEO_SUFFIXES and p.is_file()):
        rel = path.relative_to(folder).as_posix()
        row = listed.get(rel, {})
        base = path.with_suffix("")
        caption = row.get("caption") or _read_text(path.with_suffix(".txt"))
        audio = row.get("audio_caption") or _read_text(base.with_name(base.name + ".audio.txt"))
        lyrics = row.get("lyrics") if "lyrics" in row else _read_text(base.with_name(base.name + ".lyrics.txt"))
        clips.append(Clip(path, rel, caption or None, audio or None, lyrics or None))
    found = {c.rel for c in clips}
    orphans = [(rel, "missing file", f"listed in {CAPTIONS_FILE} but not in the folder") for rel in listed if rel not in found]
    return clips, orphans
