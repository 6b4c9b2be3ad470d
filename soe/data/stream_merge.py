"""Merging the parts of a streaming latent cache into what training reads (no data is copied).

Each part's log lists its committed chunks. The merge checks every listed chunk is on disk whole
(its size is the one litdata recorded), then writes one litdata ``index.json`` per dataset with the
chunks in (part, chunk) order, ``index.jsonl`` with every window (streamed from the logs: the merge
keeps a few numbers per chunk and one id per window, never the windows' rows), and ``meta.json`` with the buckets,
the text offset of each part and each conditioning tensor's padded length. Encoding the same clips
with one process or with N gives the same windows, text states and index rows.

Text states are deduplicated within a part, not across parts, on purpose. ``soe encode --shard I/N``
splits clips (not windows) over parts, so every window of a clip, and so every repeat of its caption,
lands in one part; a caption is stored again only when clips in different parts carry the very same
text, at most once per part. One more copy costs 748,018 B for a UniVerse-1 prompt (80 Wan + 60
ACE-Step tokens, bf16, trimmed) against 6,198,016 B of latents per window: at most 10.8 % of a
window, and only for those shared captions. Removing the copies at merge would need either
rewriting every text chunk (the merge moves no data today) or a table from each part's caption
numbers to global ones held by every reading process (memory that grows with the number of
captions, which streaming avoids); neither pays for a saving that is zero for per-clip captions.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

from soe.data.latent_cache import LatentCacheError
from soe.data.stream_format import INDEX, PARTS, TEXTS, WINDOWS, part_name, read_log, write_json_atomic


def _check_chunk(folder: Path, rel: str, info: dict) -> None:
    path = folder / rel
    if not path.is_file():
        raise LatentCacheError(f"latent cache '{folder}': shard '{rel}' is listed but missing")
    if path.stat().st_size != int(info["chunk_bytes"]):
        raise LatentCacheError(f"latent cache '{folder}': shard '{rel}' is truncated ({path.stat().st_size} of "
                               f"{info['chunk_bytes']} bytes)")


def merge_parts(folder, require_all: bool = True) -> bool:
    """Merge when every part is done (``require_all``: otherwise a one-line error naming the missing ones)."""
    folder = Path(folder)
    meta = json.loads((folder / "meta.json").read_text())
    parts = int(meta["parts"])
    missing = [i for i in range(parts) if not (folder / PARTS / f"{part_name(i, parts)}.done").is_file()]
    if missing:
        if require_all:
            raise LatentCacheError(f"latent cache '{folder}': shards {missing} of {parts} are not encoded yet")
        return False
    strays = [p.name for p in (folder / PARTS).glob("part-*.jsonl") if not re.fullmatch(rf"part-\d+-of-{parts}\.jsonl", p.name)]
    if strays:
        raise LatentCacheError(f"latent cache '{folder}': '{PARTS}/{strays[0]}' belongs to another split than {parts} shards")
    datasets: dict[str, list] = {}  # relative dataset folder -> [(chunk info, config)]: a few numbers per chunk
    buckets, seen, lengths = {}, set(), {}  # seen: window ids (the only thing kept per window)
    offsets = {"a": [], "b": []}
    count = {"a": 0, "b": 0}
    tmp_index = folder / ".index.jsonl.tmp"
    try:
        with open(tmp_index, "w") as index:  # written as the logs are read: no window's row is held in memory
            for i in range(parts):
                for side in offsets:
                    offsets[side].append(count[side])
                for line in read_log(folder / PARTS / f"{part_name(i, parts)}.jsonl"):
                    entries = [(f"{WINDOWS}/{line['bucket']}", line["chunk"], line["config"])]
                    entries += [(f"{TEXTS}/{side}", t["chunk"], t["config"]) for side, t in line["texts"].items()]
                    for side, t in line["texts"].items():
                        count[side] += len(t["keys"])
                        for key, shape in t["lengths"].items():
                            if lengths.setdefault(side, {}).setdefault(key, shape) != shape:
                                raise LatentCacheError(f"latent cache '{folder}': {side} '{key}' padded to {shape} in part {i}, "
                                                       f"{lengths[side][key]} elsewhere")
                    for sub, info, config in entries:
                        _check_chunk(folder, f"{sub}/{info['filename']}", info)
                        datasets.setdefault(sub, []).append((info, config))
                    for row in line["rows"]:
                        if row["id"] in seen:
                            raise LatentCacheError(f"latent cache '{folder}': window '{row['id']}' is in two shards")
                        seen.add(row["id"])
                        b = buckets.setdefault(row["bucket"], {"windows": 0, "seconds": row["seconds"]})
                        b["windows"] += 1
                    if "shapes" in line and line["rows"]:  # the latent shapes of the bucket's first window (logs from before: none)
                        buckets[line["bucket"]].setdefault("shapes", line["shapes"])
                    index.write("".join(json.dumps(r) + "\n" for r in line["rows"]))
        if not seen:  # nothing to read: no index is written (soe encode reports why no window was encoded)
            if require_all:
                raise LatentCacheError(f"latent cache '{folder}': the encoded shards hold no windows")
            tmp_index.unlink()
            return False
        for sub, chunks in datasets.items():
            configs = {json.dumps(c, sort_keys=True) for _, c in chunks}
            if len(configs) != 1:
                raise LatentCacheError(f"latent cache '{folder}': the chunks of '{sub}' were written with different layouts")
        for sub, chunks in datasets.items():
            write_json_atomic(folder / sub / INDEX, {"chunks": [c for c, _ in chunks], "config": chunks[0][1]})
        os.replace(tmp_index, folder / "index.jsonl")
    finally:
        tmp_index.unlink(missing_ok=True)
    write_json_atomic(folder / "meta.json", {**meta, "buckets": buckets, "text_offsets": offsets, "text_lengths": lengths})
    return True
