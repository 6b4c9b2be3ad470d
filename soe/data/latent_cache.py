"""Latent cache format 1: sharded safetensors plus a JSONL index, read whole into memory.

``soe encode`` now writes format 2, which training streams (``soe.data.stream_format``); format 1
caches are still read, and ``write_shard`` still writes them (tests, small hand-made caches).

Layout of a cache folder::

    meta.json            {"format": 1, "experts": {"a": "wan2.1", "b": "ace-step"}}
    index.jsonl          one line per clip: {"id", "shard", "seconds", "bucket"} (+ optional fields, e.g.
                         "source", "start", "caption", "resolution" [H, W] written by `soe encode`)
    shard-00000.safetensors   tensors "<id>/<side>/<key>" (latents and conditioning, no batch axis)

Shards are written to a temporary name and renamed, then the index is appended, so a killed writer
never leaves a half-written shard referenced by the index.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from soe.errors import SoeError

FORMAT = 1


class LatentCacheError(SoeError, ValueError):
    pass


def write_meta(folder, experts: dict[str, str], settings: dict | None = None) -> None:
    """``settings`` (optional, stored as ``"encode"``): how the latents were made; a cache is only ever
    extended with the same settings."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    meta = folder / "meta.json"
    if meta.exists():
        old = json.loads(meta.read_text())
        if old.get("experts") != experts:
            raise LatentCacheError(f"latent cache '{folder}' was written for experts {old.get('experts')}, not {experts}")
        if settings is not None and old.get("encode") not in (None, settings):
            changed = sorted(k for k in set(settings) | set(old["encode"]) if settings.get(k) != old["encode"].get(k))
            raise LatentCacheError(f"latent cache '{folder}' was encoded with other settings ({', '.join(changed)} differ); "
                                   "write to a new folder")
        return
    tmp = folder / ".meta.json.tmp"
    tmp.write_text(json.dumps({"format": FORMAT, "experts": experts, **({"encode": settings} if settings else {})}, indent=1))
    os.replace(tmp, meta)


def write_shard(folder, shard_name: str, clips: list[dict]) -> None:
    """``clips``: ``[{"id", "seconds", "bucket"?, "index"?: {extra index fields}, "a": {key: tensor}, "b": {key: tensor}}]``."""
    folder = Path(folder)
    tensors, lines = {}, []
    for c in clips:
        for side in ("a", "b"):
            for k, v in c[side].items():
                tensors[f"{c['id']}/{side}/{k}"] = v.detach().contiguous().cpu()
        lines.append({"id": c["id"], "shard": shard_name, "seconds": float(c["seconds"]), "bucket": str(c.get("bucket", "default")),
                      **c.get("index", {})})
    tmp = folder / f".{shard_name}.tmp"
    save_file(tensors, tmp)
    os.replace(tmp, folder / shard_name)  # atomic: the shard is whole or absent
    with open(folder / "index.jsonl", "a") as f:
        f.write("".join(json.dumps(line) + "\n" for line in lines))
        f.flush()
        os.fsync(f.fileno())


def read_index(folder) -> tuple[dict, list[dict]]:
    folder = Path(folder)
    meta_file, index_file = folder / "meta.json", folder / "index.jsonl"
    for f in (meta_file, index_file):
        if not f.is_file():
            raise LatentCacheError(f"latent cache '{folder}': missing '{f.name}' (write one with `soe encode`)")
    try:
        meta = json.loads(meta_file.read_text())
        rows = [json.loads(line) for line in index_file.read_text().splitlines() if line.strip()]
    except json.JSONDecodeError as e:
        raise LatentCacheError(f"latent cache '{folder}': corrupt JSON in meta.json or index.jsonl ({e})") from None
    if meta.get("format") != FORMAT:
        raise LatentCacheError(f"latent cache '{folder}': format {meta.get('format')!r}, expected {FORMAT}")
    if not rows:
        raise LatentCacheError(f"latent cache '{folder}': the index lists no clips")
    for n, row in enumerate(rows):
        lacking = [k for k in ("id", "shard", "seconds") if not isinstance(row, dict) or k not in row]
        if lacking:
            raise LatentCacheError(f"latent cache '{folder}': index.jsonl line {n + 1} lacks {lacking}")
    return meta, rows


def load_clips(folder, rows: list[dict]) -> list[dict]:
    """Every clip of the index as ``{"a": {...}, "b": {...}}`` (tensors without batch axis)."""
    folder = Path(folder)
    shards: dict[str, dict] = {}
    clips = []
    for row in rows:
        name = row["shard"]
        if name not in shards:
            path = folder / name
            if not path.is_file():
                raise LatentCacheError(f"latent cache '{folder}': index names missing shard '{name}'")
            try:
                shards[name] = load_file(path)
            except (SafetensorError, OSError) as e:
                raise LatentCacheError(f"latent cache '{folder}': shard '{name}' is unreadable ({e})") from None
        clip: dict = {"a": {}, "b": {}}
        prefix = f"{row['id']}/"
        for k, v in shards[name].items():
            if k.startswith(prefix):
                _, side, key = k.split("/", 2)
                clip[side][key] = v
        for side in ("a", "b"):
            if "latents" not in clip[side]:
                raise LatentCacheError(f"latent cache '{folder}': clip '{row['id']}' has no '{side}/latents' in '{name}'")
        clips.append(clip)
    return clips


def validate_clip_shapes(clips: list[dict], rows: list[dict], experts: dict, folder) -> None:
    """Latents must have each expert's latent shape (time may vary); conditioning keys must exist.

    Rows with a ``resolution`` (aspect-ratio buckets of ``soe encode``) may also differ on the axes after time."""
    for clip, row in zip(clips, rows):
        for side, e in experts.items():
            got = tuple(clip[side]["latents"].shape)
            want = tuple(e.latent_shape(1, row["seconds"]))[1:]
            t = e.latent_time_axis - 1
            free = (lambda i: i == t) if not row.get("resolution") else (lambda i: i >= t)
            if len(got) != len(want) or any(g != w for i, (g, w) in enumerate(zip(got, want)) if not free(i)):
                raise LatentCacheError(
                    f"latent cache '{folder}': clip '{row['id']}' {side}/latents has shape {list(got)}, "
                    f"expert '{e.name}' expects {list(want)} (time axis {t} may differ)"
                )
            missing = [k for k in e.condition_keys if k not in clip[side]]
            if missing:
                raise LatentCacheError(f"latent cache '{folder}': clip '{row['id']}' lacks {side} conditioning {missing}")
