"""The prompts file: JSON lines ``{"id", "prompt", "audio_prompt"?, "image"?, "lyrics"?, "transcript"?}``, or a
Verse-Bench folder (soe.evaluate.verse_bench). ``soe generate prompts=FILE`` samples one clip per row and writes the
rows beside its clips as ``prompts.jsonl``; ``soe eval --prompts FILE`` (default SAMPLES/prompts.jsonl) reads them
back. One reader for both: each command adds only its own checks and the key its messages name.

Hand-written: a line loop over ``json.loads`` with the checks both commands need (ids that are file names, once each;
images found relative to the file's folder and given as absolute paths). Problems are a ``ValueError`` naming the
file and line.
"""
from __future__ import annotations

import json
from pathlib import Path

from soe.evaluate.verse_bench import ID, read_items  # ID: a file name on every system (<id>.mp4), never a path

PROMPTS_FILE = "prompts.jsonl"  # the rows beside generated clips


def read_prompt_rows(path, need_prompt: bool = True) -> list[dict]:
    """The rows of a prompts file or Verse-Bench folder, ids as strings and images as absolute paths.
    ``need_prompt``: every row must carry a ``prompt`` (sampling), else only an ``id`` (evaluation)."""
    path = Path(path)
    if path.is_dir():
        return read_items(path)
    if not path.is_file():
        raise ValueError(f"'{path}' is not a file (expected JSON lines with 'id'{' and prompt' if need_prompt else ''}, "
                         f"or a Verse-Bench folder)")
    rows, seen = [], set()
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            raise ValueError(f"{path}:{n}: not a JSON object (expected one row per line)") from None
        if not isinstance(row, dict) or (need_prompt and not isinstance(row.get("prompt"), str)):
            raise ValueError(f"{path}:{n}: expected an object with 'id'" + (" and 'prompt' (a string)" if need_prompt else ""))
        rid = str(row.get("id", ""))
        if not ID.match(rid) or rid in seen:
            raise ValueError(f"{path}:{n}: id {rid!r} " + ("repeats an earlier row" if rid in seen else
                             "must be a file name (letters, digits, '.', '_', '-')"))
        seen.add(rid)
        row["id"] = rid
        if row.get("image"):
            image = Path(row["image"]) if Path(row["image"]).is_absolute() else path.parent / row["image"]
            if not image.is_file():
                raise ValueError(f"{path}:{n}: image '{row['image']}' not found")
            row["image"] = str(image.resolve())
        rows.append(row)
    return rows
