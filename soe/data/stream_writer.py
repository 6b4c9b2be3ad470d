"""Writing the streaming latent cache (``soe.data.stream_format``): one ``PartWriter`` per encode process.

``soe encode --shard I/N`` runs process I of N; each holds an exclusive lock on its part, writes litdata
chunks named after its part number (so parts never collide, on one disk or a shared one) and commits
every chunk with one line appended to its own log. A killed process resumes from its log; a chunk no
line names is deleted and its windows are encoded again. When a part finishes it writes a ``.done``
marker and, if every part is done, merges: the ``index.json`` of each dataset lists the chunks in
(part, chunk) order, ``meta.json`` gets the buckets and text offsets. The merge moves no data.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
from pathlib import Path

from litdata.streaming.writer import BinaryWriter

from soe.data.latent_cache import LatentCacheError
from soe.data.stream_format import FORMAT, INDEX, PARTS, TEXTS, WINDOWS, append_line, pack, part_name, read_log, trim, write_json_atomic

CHUNK_ITEMS = 1 << 30  # chunk boundaries are ours (one flush = one chunk); recorded in every chunk's config


class ShardBusyError(LatentCacheError):
    """Another process is encoding the same part of the cache."""


def lock_part(folder, part: int, parts: int, what: str = "latent cache", doing: str = "encoded"):
    """Exclusive lock on part ``part`` of ``parts`` of the cache (held until the returned file is closed);
    ``what`` names the folder and ``doing`` what its processes do in the message when the part is taken."""
    folder = Path(folder)
    if not 0 <= part < parts:
        raise LatentCacheError(f"--shard {part}/{parts}: expected 0 <= I < N")
    (folder / PARTS).mkdir(parents=True, exist_ok=True)
    lock = open(folder / PARTS / f"{part_name(part, parts)}.lock", "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise ShardBusyError(f"{what} '{folder}': shard {part}/{parts} is being {doing} by another "
                             "process (give each process its own --shard I/N)") from None
    return lock


def _write_chunk(folder: Path, part: int, number: int, items: list[dict]) -> tuple[dict, dict]:
    """One litdata chunk ``chunk-<part>-<number>.bin`` holding ``items``, fsynced; returns (chunk info, config)."""
    folder.mkdir(parents=True, exist_ok=True)
    writer = BinaryWriter(str(folder), chunk_size=CHUNK_ITEMS, chunk_index=number)
    writer._rank = part  # litdata names chunks and its index after the writer's rank: ours is the part
    for i, item in enumerate(items):
        writer.add_item(i, item)
    writer.done()
    index = folder / f"{part}.{INDEX}"
    written = json.loads(index.read_text())
    index.unlink()
    (info,) = written["chunks"]
    with open(folder / info["filename"], "rb") as f:
        os.fsync(f.fileno())
        info["sha1"] = hashlib.file_digest(f, "sha1").hexdigest()  # the chunk's identity for local copies of a remote cache
    return info, written["config"]


def write_stream_meta(folder: Path, experts: dict, settings: dict, storage: dict, parts: int) -> None:
    """Create ``meta.json`` or check that this process encodes with the same experts, settings and split."""
    meta_file = folder / "meta.json"
    if meta_file.is_file():
        try:
            old = json.loads(meta_file.read_text())
        except json.JSONDecodeError as e:
            raise LatentCacheError(f"latent cache '{folder}': corrupt JSON in meta.json ({e})") from None
        if old.get("format") != FORMAT:
            raise LatentCacheError(f"latent cache '{folder}' is format {old.get('format')!r}; soe encode now writes format "
                                   f"{FORMAT}: write to a new folder")
        if old.get("experts") != experts:
            raise LatentCacheError(f"latent cache '{folder}' was written for experts {old.get('experts')}, not {experts}")
        for key, new in (("encode", settings), ("storage", storage)):
            if old.get(key) != new:
                changed = sorted(k for k in set(new) | set(old.get(key) or {}) if new.get(k) != (old.get(key) or {}).get(k))
                raise LatentCacheError(f"latent cache '{folder}' was encoded with other settings ({', '.join(changed)} differ); "
                                       "write to a new folder")
        if old.get("parts") != parts:
            raise LatentCacheError(f"latent cache '{folder}' is split into {old.get('parts')} shards (--shard I/{old.get('parts')}), "
                                   f"not {parts}")
        return
    folder.mkdir(parents=True, exist_ok=True)
    write_json_atomic(meta_file, {"format": FORMAT, "experts": experts, "encode": settings, "storage": storage, "parts": parts})


class PartWriter:
    """Resumable writer of part ``part`` of ``parts``; ``add`` records as ``soe.data.encode`` builds them:
    ``{"id", "seconds", "bucket", "index": {...}, "text": {side: key}, "a": {"latents", cond...}, "b": {...}}``."""

    def __init__(self, folder, experts: dict[str, str], settings: dict, shard_size: int = 64, part: int = 0, parts: int = 1,
                 storage: dict | None = None, lock=None):
        self.folder, self.shard_size, self.part, self.parts = Path(folder), int(shard_size), int(part), int(parts)
        self.storage = storage or {"latents": "float32", "text": "bfloat16"}
        self.name = part_name(self.part, self.parts)
        self._lock = lock or lock_part(self.folder, self.part, self.parts)  # ``lock``: taken earlier by the caller
        write_stream_meta(self.folder, experts, settings, self.storage, self.parts)
        self.log = self.folder / PARTS / f"{self.name}.jsonl"
        self.rows: list[dict] = []
        self.text_ids: dict[str, dict[str, int]] = {}
        self.next_chunk: dict[str, int] = {}
        self._repair()
        self.done = {r["id"] for r in self.rows}
        self.pending: dict[str, list[dict]] = {}
        self.shards_written = 0

    # ---- resume ------------------------------------------------------------------------------------
    def _repair(self) -> None:
        listed = set()
        for line in read_log(self.log, repair=True):
            self.rows += line["rows"]
            listed.add(f"{WINDOWS}/{line['bucket']}/{line['chunk']['filename']}")
            for side, t in line["texts"].items():
                listed.add(f"{TEXTS}/{side}/{t['chunk']['filename']}")
                ids = self.text_ids.setdefault(side, {})
                for key in t["keys"]:
                    ids[key] = len(ids)
        own = re.compile(rf"^chunk-{self.part}-(\d+)\.bin$")
        for sub in (WINDOWS, TEXTS):
            for folder in (self.folder / sub).glob("*") if (self.folder / sub).is_dir() else []:
                (folder / f"{self.part}.{INDEX}").unlink(missing_ok=True)
                for p in folder.iterdir():
                    m = own.match(p.name)
                    if not m:
                        continue
                    if f"{sub}/{folder.name}/{p.name}" not in listed:
                        p.unlink()  # written, never committed: its windows are encoded again
                    else:
                        self.next_chunk[f"{sub}/{folder.name}"] = max(self.next_chunk.get(f"{sub}/{folder.name}", 0), int(m.group(1)) + 1)
        (self.folder / PARTS / f"{self.name}.done").unlink(missing_ok=True)  # this part is being extended

    # ---- writing -----------------------------------------------------------------------------------
    def add(self, record: dict) -> None:
        if record["id"] in self.done:
            raise ValueError(f"window '{record['id']}' is already in the cache")
        bucket = str(record.get("bucket", "default"))
        self.pending.setdefault(bucket, []).append(record)
        self.done.add(record["id"])
        if len(self.pending[bucket]) >= self.shard_size:
            self._commit(bucket, self.pending.pop(bucket))

    def flush(self) -> None:
        for bucket in sorted(self.pending):
            self._commit(bucket, self.pending.pop(bucket))

    def _chunk(self, sub: str, items: list[dict]) -> tuple[dict, dict]:
        n = self.next_chunk.get(sub, 0)
        self.next_chunk[sub] = n + 1
        return _write_chunk(self.folder / sub, self.part, n, items)

    def _commit(self, bucket: str, records: list[dict]) -> None:
        if not records:
            return
        sides = [s for s in ("a", "b")]
        texts, new_ids = {}, {}
        for side in sides:
            ids = dict(self.text_ids.get(side, {}))
            items, keys, lengths = [], [], {}
            for r in records:
                key = r["text"][side]
                cond = {k: v for k, v in r[side].items() if k != "latents"}
                lengths = {k: (list(v.shape[:1]) if v.ndim else []) for k, v in cond.items()}
                if key in ids:
                    continue
                ids[key] = len(ids)
                keys.append(key)
                items.append({k: pack(trim(v), self.storage["text"]) for k, v in sorted(cond.items())})
            new_ids[side] = ids
            if items:
                info, config = self._chunk(f"{TEXTS}/{side}", items)
                texts[side] = {"chunk": info, "config": config, "keys": keys, "lengths": lengths}
        windows = [{"id": r["id"], "part": self.part, "text_a": new_ids["a"][r["text"]["a"]], "text_b": new_ids["b"][r["text"]["b"]],
                    "a": pack(r["a"]["latents"], self.storage["latents"]), "b": pack(r["b"]["latents"], self.storage["latents"])}
                   for r in records]
        info, config = self._chunk(f"{WINDOWS}/{bucket}", windows)
        rows = [{"id": r["id"], "bucket": bucket, "seconds": float(r["seconds"]), "chunk": info["filename"], **r.get("index", {})}
                for r in records]
        shapes = {side: list(records[0][side]["latents"].shape) for side in sides}  # the bucket's latent shapes, for setup checks
        append_line(self.log, {"bucket": bucket, "chunk": info, "config": config, "texts": texts, "rows": rows, "shapes": shapes})
        self.rows += rows
        self.text_ids = new_ids
        self.shards_written += 1

    def finish(self) -> bool:
        """Flush, mark this part done and merge if every part is; True when the cache was merged."""
        from soe.data.stream_merge import merge_parts

        self.flush()
        write_json_atomic(self.folder / PARTS / f"{self.name}.done", {"windows": len(self.rows)})
        merged = merge_parts(self.folder, require_all=False)
        self.close()
        return merged

    def close(self) -> None:
        if not self._lock.closed:
            fcntl.flock(self._lock, fcntl.LOCK_UN)
            self._lock.close()
