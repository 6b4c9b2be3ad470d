"""``soe generate ... prompts=FILE.jsonl``: one sample per row, files named by the row's id.

A row is ``{"id", "prompt", "audio_prompt"?, "image"?, "lyrics"?, "transcript"?}``; a folder instead of a file is
read as Verse-Bench (``soe.evaluate.verse_bench``: its ``set*/<name>.json`` items and ``<name>.jpg`` images). ``prompt`` conditions both
experts (the one prompt ``soe generate`` takes today: ``audio_prompt`` and ``lyrics`` are carried to the
output's ``prompts.jsonl`` for ``soe eval`` but do not condition the audio expert separately yet); ``image``
(relative to the file's folder) is the row's reference image (``sample.image``). The rows are copied to the
output folder as ``prompts.jsonl``, images as absolute paths, so ``soe eval OUT`` finds them by itself.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from soe.errors import RecipeError

ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")  # a file name on every system, never a path


def read_rows(path) -> list[dict]:
    """The rows of ``sample.prompts``, checked (one line naming the file and line on any problem)."""
    path = Path(path)
    if path.is_dir():
        from soe.evaluate.verse_bench import read_items

        try:
            return read_items(path)
        except ValueError as e:
            raise RecipeError(f"sample.prompts: {e}") from None
    if not path.is_file():
        raise RecipeError(f"sample.prompts: '{path}' is not a file (expected JSON lines with 'id' and 'prompt', or a Verse-Bench folder)")
    rows, seen = [], set()
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            raise RecipeError(f"sample.prompts: {path}:{n}: not a JSON object") from None
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
            raise RecipeError(f"sample.prompts: {path}:{n}: expected an object with 'id' and 'prompt' (a string)")
        rid = str(row.get("id", ""))
        if not ID.match(rid) or rid in seen:
            raise RecipeError(f"sample.prompts: {path}:{n}: id {rid!r} " + ("repeats an earlier row" if rid in seen else
                              "must be a file name (letters, digits, '.', '_', '-')"))
        seen.add(rid)
        row["id"] = rid
        if row.get("image"):
            image = Path(row["image"]) if Path(row["image"]).is_absolute() else path.parent / row["image"]
            if not image.is_file():
                raise RecipeError(f"sample.prompts: {path}:{n}: image '{row['image']}' not found")
            row["image"] = str(image.resolve())
        rows.append(row)
    if not rows:
        raise RecipeError(f"sample.prompts: {path}: no rows")
    return rows


def write_rows(rows: list[dict], out: Path) -> Path:
    target = Path(out) / "prompts.jsonl"
    target.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return target
