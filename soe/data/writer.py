"""Resumable, shard-atomic writing of a latent cache (over ``soe.train.latent_cache``).

A shard is written to a temporary name and renamed, then its index lines are appended; the index is
the only record of what is done. On (re)start the writer repairs what a kill can leave behind: a
torn last index line is dropped, temporary files and shards no index line names are deleted, so
their windows are encoded again into a fresh shard number. Nothing is ever listed twice.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

from soe.train.latent_cache import write_meta, write_shard

SHARD = re.compile(r"^shard-(\d{5,})\.safetensors$")


class CacheWriter:
    def __init__(self, folder, experts: dict[str, str], settings: dict, shard_size: int = 64):
        self.folder, self.shard_size = Path(folder), int(shard_size)
        write_meta(self.folder, experts, settings)
        self.rows = self._repair()
        self.done = {r["id"] for r in self.rows}
        self.pending: list[dict] = []
        numbers = [int(m.group(1)) for p in self.folder.iterdir() if (m := SHARD.match(p.name))]
        self.next_shard = max(numbers, default=-1) + 1
        self.shards_written = 0

    def _repair(self) -> list[dict]:
        index = self.folder / "index.jsonl"
        rows, good = [], b""
        if index.is_file():
            for line in index.read_bytes().splitlines(keepends=True):
                try:
                    row = json.loads(line)
                except (json.JSONDecodeError, UnicodeDecodeError):
                    break  # a torn write can only be the last line: keep what precedes it
                if not line.endswith(b"\n"):
                    break
                rows.append(row)
                good += line
            if len(good) != index.stat().st_size:
                tmp = self.folder / ".index.jsonl.tmp"
                tmp.write_bytes(good)
                os.replace(tmp, index)
        named = {r["shard"] for r in rows}
        for p in self.folder.iterdir():
            if p.name.endswith(".tmp") or (SHARD.match(p.name) and p.name not in named):
                p.unlink()  # half-written, or whole but never indexed: its windows are encoded again
        return rows

    def add(self, record: dict) -> None:
        """``record`` as ``write_shard`` takes it; written out once ``shard_size`` records are pending."""
        if record["id"] in self.done:
            raise ValueError(f"window '{record['id']}' is already in the cache")
        self.pending.append(record)
        self.done.add(record["id"])
        if len(self.pending) >= self.shard_size:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        name = f"shard-{self.next_shard:05d}.safetensors"
        write_shard(self.folder, name, self.pending)
        self.rows += [{"id": r["id"], "shard": name, "seconds": r["seconds"], "bucket": r.get("bucket", "default"), **r.get("index", {})}
                      for r in self.pending]
        self.pending, self.next_shard, self.shards_written = [], self.next_shard + 1, self.shards_written + 1
