"""``annotations.jsonl``: what ``soe annotate`` hands ``soe encode``, one JSON line per training window.

Row (``end`` = ``start`` + the window's length; ``language`` only where Whisper transcribed the clip)::

    {"path": "sub/clip.mp4", "start": 5.0, "end": 10.0, "caption": "...", "audio_caption": "...",
     "lyrics": "...", "words": [{"start", "end", "text"}, ...], "models": {...}, "language": "en"}

``soe annotate --out FILE`` keeps its shard logs in the folder ``FILE.parts/`` beside it (the models'
outputs go to the shared cache: soe.data.annotation_store); each process of ``--shard I/N`` marks its part done there
(``done/part-I-of-N.json``: the clips it annotated), and the last one to finish (the one that lists all N
marks under the same selection) merges them into ``FILE``, written to a temporary file and renamed into
place, so ``FILE`` is never half written. ``soe encode`` reads ``FILE`` (``SRC/annotations.jsonl`` when
present, or ``--annotations FILE``) and gives each window its own row's text (a window without a row, one
``soe annotate`` could not read, is left out).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from soe.data.annotation_store import AnnotationStore
from soe.data.stream_format import part_name, write_json_atomic
from soe.errors import RecipeError

ANNOTATIONS_FILE = "annotations.jsonl"
ROW_FIELDS = ("path", "start", "end", "caption", "audio_caption", "lyrics", "words", "models")


def work_folder(file) -> Path:
    """The shard logs of the annotations file ``file``: ``FILE.parts/`` beside it."""
    file = Path(file)
    return file.with_name(file.name + ".parts")


def _done(work: Path, part: int, parts: int) -> Path:
    return work / "done" / f"{part_name(part, parts)}.json"


def clear_done(work, part: int, parts: int) -> None:
    """This part is being annotated again: its earlier mark no longer counts."""
    _done(Path(work), part, parts).unlink(missing_ok=True)


def mark_done(work, part: int, parts: int, selection: str, clips: list[tuple[str, str]]) -> None:
    """Part ``part`` of ``parts`` annotated ``clips`` (``(relative path, content hash)``) under ``selection``."""
    path = _done(Path(work), part, parts)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, {"selection": selection, "clips": [list(c) for c in clips]})


def rows_of(record: dict) -> list[dict]:
    """The rows of one clip record of the store (its windows under a selection)."""
    rows = []
    for w in record["windows"]:
        words = w.get("words")
        row = {"path": record["path"], "start": w["start"], "end": round(w["start"] + w["seconds"], 6),
               "caption": w["caption"], "audio_caption": w["sound"], "lyrics": w["transcript"],
               "words": [{"start": s, "end": e, "text": t.strip()} for t, s, e, *_ in words or []],
               "models": record.get("models", {})}
        if "language" in w:
            row["language"] = w["language"]
        rows.append(row)
    return rows


def merge_if_complete(work, file, parts: int, selection: str) -> bool:
    """Merge the parts into ``file`` when all ``parts`` are marked done under ``selection`` (listing ``done/``);
    False while a part is missing."""
    work, marks = Path(work), []
    for i in range(parts):
        path = _done(work, i, parts)
        if not path.is_file():
            return False
        mark = json.loads(path.read_text())
        if mark.get("selection") != selection:
            return False
        marks.append(mark)
    store = AnnotationStore(work)
    clips = sorted({(rel, digest) for mark in marks for rel, digest in mark["clips"]})
    rows = [row for rel, digest in clips for row in rows_of(store.get(("clip", digest, selection)) | {"path": rel})]
    file = Path(file)
    tmp = file.with_name(f".{file.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, file)
    return True


def _window(start: float, end: float) -> tuple[float, float]:
    return round(float(start), 6), round(float(end), 6)


class AnnotationRows:
    """The rows of an annotations file, by clip and window, as ``soe encode`` reads them; a file that is not
    one is one line naming it and the line."""

    def __init__(self, file, key: str = "--annotations"):
        self.file, self.windows = Path(file), {}
        if not self.file.is_file():
            raise RecipeError(f"{key}: annotations file not found: '{file}' (expected the annotations.jsonl of `soe annotate`)")
        data = self.file.read_bytes()
        self.digest = hashlib.sha1(data).hexdigest()[:16]  # a resumed encode must read the same texts
        for n, line in enumerate(data.decode("utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise RecipeError(f"{self.file}: line {n} is not valid JSON ({e.msg})") from None
            if not isinstance(row, dict) or any(k not in row for k in ROW_FIELDS):
                raise RecipeError(f"{self.file}: line {n}: expected a row of `soe annotate` with {list(ROW_FIELDS)}")
            self.windows.setdefault(row["path"], {})[_window(row["start"], row["end"])] = row

    def check_lengths(self, seconds: list[float]) -> None:
        """Every row is a window of one of the lengths ``seconds`` this encode cuts (before anything is written)."""
        for rel, rows in self.windows.items():
            for start, end in rows:
                if not any(abs(end - start - s) < 1e-4 for s in seconds):
                    raise RecipeError(f"{self.file}: the window {start:g}-{end:g} s of '{rel}' is not one this encode cuts "
                                      f"({', '.join(f'{s:g}' for s in seconds)} s long): annotate with the recipe and "
                                      "data.seconds / encode.durations this encode uses")

    def of(self, rel: str, windows: list[tuple[float, float]]) -> dict | None:
        """``{(start, seconds): {"caption", "sound", "transcript"}}`` for the windows ``(start, seconds)`` this encode
        cuts from clip ``rel`` that have a row (a window ``soe annotate`` could not read has none: it is left out);
        None when the clip has no rows; rows for none of the windows (other windows) is one line."""
        rows = self.windows.get(rel)
        if rows is None:
            return None
        out = {}
        for start, seconds in windows:
            row = rows.get(_window(start, start + seconds))
            if row is not None:
                out[(round(float(start), 6), float(seconds))] = {"caption": row["caption"], "sound": row["audio_caption"],
                                                                  "transcript": row["lyrics"]}
        cut = {_window(start, start + seconds) for start, seconds in windows}
        other = [w for w in rows if w not in cut]
        if other or (windows and not out):
            start, end = other[0] if other else min(cut)
            raise RecipeError(f"{self.file}: the windows of '{rel}' are not the ones this encode cuts (first: {start:g}-{end:g} s): "
                              "annotate with the recipe and data.seconds / encode.durations this encode uses")
        return out
