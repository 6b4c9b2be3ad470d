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
from pathlib import Path

from soe.errors import RecipeError
from soe.evaluate.prompt_file import PROMPTS_FILE, read_prompt_rows


def read_rows(path) -> list[dict]:
    """The rows of ``sample.prompts``, checked (one line naming the file and line on any problem)."""
    try:
        rows = read_prompt_rows(path, need_prompt=True)
    except ValueError as e:
        raise RecipeError(f"sample.prompts: {e}") from None
    if not rows:
        raise RecipeError(f"sample.prompts: {path}: no rows")
    return rows


def write_rows(rows: list[dict], out: Path) -> Path:
    target = Path(out) / PROMPTS_FILE
    target.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return target
