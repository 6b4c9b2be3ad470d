"""Verse-Bench (UniVerse-1's benchmark, ``hf download dorni/Verse-Bench``) read as soe prompt rows.

The published layout: ``set1/``, ``set2/``, ``set3/``, each holding per item ``<name>.json``, the reference image
``<name>.jpg`` and, in ``set2/``, the reference audio ``<name>.wav``. An item is
``{"video_prompt": str, "audio_prompt": [str, ...], "speech_prompt": {"speaker": str, "text": str}}`` (the keys
UniVerse-1's ``sample_universe.py`` and Verse-Bench's ``calculate_metrics.py`` read). Its row:

* ``id``: ``<name>`` (what Verse-Bench's scripts look for as ``<name>.mp4`` / ``<name>.wav``), ``set``: the folder;
* ``prompt``: ``video_prompt``; ``image``: ``<name>.jpg`` (UniVerse-1's reference frame, Verse-Bench's ID anchor);
* ``audio_prompt``: ``audio_prompt[0]`` (the text Verse-Bench's CLAP score reads), left out when empty;
* ``lyrics`` and ``transcript``: ``speech_prompt.text`` (UniVerse-1 feeds it to the audio expert as lyrics;
  Verse-Bench's WER compares against it), left out when empty;
* ``reference_audio``: ``<name>.wav`` when present (set2; Verse-Bench's per-clip FD/KL reference).

Hand-written: the folder walk and the key mapping. A bad item is a ``ValueError`` naming the file and the key.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

SETS = ("set1", "set2", "set3")
ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")  # a file name on every system (``<id>.mp4``), never a path


def is_verse_bench(path) -> bool:
    """A folder (Verse-Bench's root with ``set*/``, or one set folder of ``<name>.json`` items)."""
    return Path(path).is_dir()


def _item(path: Path) -> dict:
    try:
        item = json.loads(path.read_text())
    except (ValueError, OSError) as e:
        raise ValueError(f"{path}: not a JSON object ({' '.join(str(e).split())})") from None
    if not isinstance(item, dict) or not isinstance(item.get("video_prompt"), str) or not item["video_prompt"].strip():
        raise ValueError(f"{path}: expected a Verse-Bench item with 'video_prompt' (a non-empty string)")
    audio = item.get("audio_prompt", [])
    audio = [audio] if isinstance(audio, str) else audio
    if not isinstance(audio, list) or not all(isinstance(a, str) for a in audio):
        raise ValueError(f"{path}: 'audio_prompt' must be a list of strings")
    speech = item.get("speech_prompt", {}) or {}
    if not isinstance(speech, dict) or not isinstance(speech.get("text", ""), str):
        raise ValueError(f"{path}: 'speech_prompt' must be an object with 'text' (a string)")
    return {"prompt": item["video_prompt"].strip(), "audio": audio[0].strip() if audio else "",
            "speech": speech.get("text", "").strip()}


def read_items(folder) -> list[dict]:
    """Every item of a Verse-Bench folder as a prompt row (sets in order, items by name)."""
    folder = Path(folder)
    sets = [folder / s for s in SETS if (folder / s).is_dir()] or [folder]
    rows, seen = [], {}
    for set_dir in sets:
        for path in sorted(set_dir.glob("*.json"), key=lambda p: p.name):
            name = path.name.split(".")[0]  # Verse-Bench's own base name
            if not ID.match(name):
                raise ValueError(f"{path}: item name {name!r} must be a file name (letters, digits, '.', '_', '-')")
            if name in seen:
                raise ValueError(f"{path}: item {name!r} repeats {seen[name]}")
            seen[name] = path
            item = _item(path)
            row = {"id": name, "set": set_dir.name, "prompt": item["prompt"]}
            image, wav = path.with_name(f"{name}.jpg"), path.with_name(f"{name}.wav")
            if image.is_file():
                row["image"] = str(image.resolve())
            if item["audio"]:
                row["audio_prompt"] = item["audio"]
            if item["speech"]:
                row["lyrics"] = row["transcript"] = item["speech"]
            if wav.is_file():
                row["reference_audio"] = str(wav.resolve())
            rows.append(row)
    if not rows:
        raise ValueError(f"{folder}: no Verse-Bench items (expected set1/ set2/ set3/ holding <name>.json, <name>.jpg)")
    return rows
