"""Reading windows of a streaming latent cache lazily, through litdata's ``StreamingDataset``.

``StreamingCache`` knows the layout (buckets, chunk sizes, text offsets: a few numbers per chunk) and
nothing of the windows themselves; a window is read when a batch asks for it, from the chunk that
holds it, by litdata (which maps the chunk and drops what it no longer needs). Each process (rank or
DataLoader worker) opens its own litdata datasets on first use.
"""
from __future__ import annotations

import bisect
import json
import os
from collections import OrderedDict
from pathlib import Path

from soe.data.stream_format import INDEX, TEXTS, WINDOWS, pad, read_meta, unpack
from soe.errors import one_line
from soe.train.latent_cache import LatentCacheError

TEXT_CACHE_BYTES = 16 << 20  # decoded (trimmed) text chunks kept per process: bounded, whatever the cache size


def _read_index(folder: Path, sub: str) -> dict:
    path = folder / sub / INDEX
    if not path.is_file():
        raise LatentCacheError(f"latent cache '{folder}': missing '{sub}/{INDEX}' (merge the shards: run the last "
                               "`soe encode ... --shard I/N` again)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise LatentCacheError(f"latent cache '{folder}': corrupt JSON in '{sub}/{INDEX}' ({e})") from None


class StreamingCache:
    """``buffer_chunks``: decoded window chunks kept per bucket and process (the shuffle buffer:
    ``data.shuffle_chunks``); a chunk is decoded whole, in order, the first time a batch needs one of
    its windows. Memory: buckets x buffer_chunks chunks + 16 MB of text states, whatever the cache size."""

    def __init__(self, folder, buffer_chunks: int = 8):
        self.buffer_chunks = max(1, int(buffer_chunks))
        self.folder = Path(folder)
        self.meta = read_meta(self.folder)
        self.storage = self.meta["storage"]
        self.lengths = self.meta.get("text_lengths", {})
        self.offsets = self.meta["text_offsets"]
        self.buckets = sorted(self.meta["buckets"])
        self.files: dict[str, list[str]] = {}  # dataset -> chunk file names, in index order
        self.starts: dict[str, list[int]] = {}  # dataset -> first item of each chunk
        self.sizes: dict[str, list[int]] = {}
        self.paths: dict[str, list[str]] = {}
        for sub in [f"{WINDOWS}/{b}" for b in self.buckets] + [f"{TEXTS}/a", f"{TEXTS}/b"]:
            chunks = _read_index(self.folder, sub)["chunks"]
            self.files[sub] = [c["filename"] for c in chunks]
            self.sizes[sub] = [int(c["chunk_size"]) for c in chunks]
            self.paths[sub] = [str(self.folder / sub / c["filename"]) for c in chunks]
            self.starts[sub] = [0]
            for n in self.sizes[sub][:-1]:
                self.starts[sub].append(self.starts[sub][-1] + n)
            for c in chunks:  # a stat per chunk: missing or truncated shards fail before the first step
                path = self.folder / sub / c["filename"]
                if not path.is_file():
                    raise LatentCacheError(f"latent cache '{self.folder}': index lists missing shard '{sub}/{c['filename']}'")
                if path.stat().st_size != int(c["chunk_bytes"]):
                    raise LatentCacheError(f"latent cache '{self.folder}': shard '{sub}/{c['filename']}' is truncated "
                                           f"({path.stat().st_size} of {c['chunk_bytes']} bytes)")
        self._datasets: dict = {}
        self._texts: OrderedDict = OrderedDict()  # (dataset, chunk) -> decoded text states, at most TEXT_CACHE_BYTES
        self._text_bytes = 0
        self._chunks: dict[str, OrderedDict] = {}  # bucket dataset -> {(dataset, chunk): decoded windows}, buffer_chunks each

    def __getstate__(self):  # DataLoader workers open their own litdata datasets
        return {**self.__dict__, "_datasets": {}, "_texts": OrderedDict(), "_text_bytes": 0, "_chunks": {}}

    def chunk_sizes(self, bucket: str) -> list[int]:
        return self.sizes[f"{WINDOWS}/{bucket}"]

    def _dataset(self, sub: str):
        ds = self._datasets.get(sub)
        if ds is None:
            from litdata import StreamingDataset

            # whole chunks are read in order (see _row): let litdata decode them in one go
            ds = self._datasets[sub] = StreamingDataset(str(self.folder / sub), batch_decode=-1)
        return ds

    def _row(self, sub: str, index: int) -> dict:
        """Item ``index`` of dataset ``sub``, from its chunk decoded whole (kept in a bounded LRU)."""
        chunk = bisect.bisect_right(self.starts[sub], index) - 1
        text = sub.startswith(TEXTS)
        lru = self._texts if text else self._chunks.setdefault(sub, OrderedDict())  # per bucket: batches alternate buckets
        rows = lru.get((sub, chunk))
        if rows is None:
            first, n = self.starts[sub][chunk], self.sizes[sub][chunk]
            head = self._item(sub, first, chunk)  # litdata decodes the whole chunk (batch_decode=-1) ...
            rows = self._decoded_rows(sub, chunk, n) or [head] + [self._item(sub, first + i, chunk) for i in range(1, n)]
            if text:  # kept decoded (trimmed); padded per use
                rows = [{k: unpack(v, self.storage["text"]) for k, v in r.items()} for r in rows]
                self._text_bytes += sum(v.nbytes for r in rows for v in r.values())
            lru[(sub, chunk)] = rows
            while len(lru) > 1 and (self._text_bytes > TEXT_CACHE_BYTES if text else len(lru) > self.buffer_chunks):
                _, old = lru.popitem(last=False)
                if text:
                    self._text_bytes -= sum(v.nbytes for r in old for v in r.values())
        else:
            lru.move_to_end((sub, chunk))
        return rows[index - self.starts[sub][chunk]]

    def _decoded_rows(self, sub: str, chunk: int, n: int) -> list | None:
        """... and keeps the rows: take them all at once rather than item by item through ``__getitem__``
        (4x less overhead for small windows). Relies on litdata's PyTreeLoader internals; when they
        are not as expected, None and the caller reads item by item."""
        loader = getattr(getattr(self._dataset(sub).cache, "_reader", None), "_item_loader", None)
        rows = getattr(loader, "_chunk_rows", None)
        if isinstance(rows, list) and len(rows) == n and getattr(loader, "_chunk_rows_index", None) == chunk \
                and getattr(loader, "_win_start", None) == 0:
            return list(rows)
        return None

    def _item(self, sub: str, index: int, chunk: int | None = None) -> dict:
        if chunk is None:
            chunk = bisect.bisect_right(self.starts[sub], index) - 1
        if not os.path.exists(self.paths[sub][chunk]):  # litdata would wait for a download that never comes
            name = f"{sub}/{self.files[sub][chunk]}"
            raise LatentCacheError(f"latent cache '{self.folder}': shard '{name}' disappeared during training")
        try:
            return self._dataset(sub)[index]
        except LatentCacheError:
            raise
        except Exception as e:  # truncated or rewritten under us
            name = f"{sub}/{self.files[sub][chunk]}"
            raise LatentCacheError(f"latent cache '{self.folder}': shard '{name}' is unreadable ({one_line(e, 200)})") from None

    def window(self, bucket: str, index: int) -> dict:
        """``{"a": {"latents", cond...}, "b": {...}, "id"}``: tensors without batch axis, floats as float32,
        conditioning padded back to the encoder's length with zeros. Tensors may share memory with the
        read buffer (collating copies them): do not modify them in place."""
        item = self._row(f"{WINDOWS}/{bucket}", index)
        out = {"id": item["id"]}
        for side in ("a", "b"):
            cond = self._text(side, self.offsets[side][item["part"]] + item[f"text_{side}"])
            out[side] = {"latents": unpack(item[side], self.storage["latents"]), **cond}
        return out

    def _text(self, side: str, index: int) -> dict:
        lengths = self.lengths.get(side, {})
        return {k: pad(v, lengths[k][0]) if lengths.get(k) else v for k, v in self._row(f"{TEXTS}/{side}", index).items()}


def load_cache(folder) -> tuple[dict, list[dict], list[dict]]:
    """Everything at once, for tests and small inspections (training streams): meta, the index rows,
    and each row's window (``{"a": {...}, "b": {...}}``) in row order."""
    cache = StreamingCache(folder)
    rows = [json.loads(line) for line in (cache.folder / "index.jsonl").read_text().splitlines() if line.strip()]
    windows = {}
    for bucket in cache.buckets:
        for i in range(sum(cache.chunk_sizes(bucket))):
            w = cache.window(bucket, i)
            windows[w.pop("id")] = w
    return cache.meta, rows, [windows[r["id"]] for r in rows]
