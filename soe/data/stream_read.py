"""Reading windows of a streaming latent cache lazily, through litdata's ``StreamingDataset``.

``StreamingCache`` knows the layout (buckets, chunk sizes, text offsets: a few numbers per chunk) and
nothing of the windows themselves; a window is read when a batch asks for it, from the chunk that
holds it, by litdata (which maps the chunk and drops what it no longer needs). Each process (rank or
DataLoader worker) opens its own litdata datasets on first use.
"""
from __future__ import annotations

import bisect
import json
from pathlib import Path

from soe.data.stream_format import INDEX, TEXTS, WINDOWS, pad, read_meta, unpack
from soe.errors import one_line
from soe.train.latent_cache import LatentCacheError


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
    def __init__(self, folder):
        self.folder = Path(folder)
        self.meta = read_meta(self.folder)
        self.storage = self.meta["storage"]
        self.lengths = self.meta.get("text_lengths", {})
        self.offsets = self.meta["text_offsets"]
        self.buckets = sorted(self.meta["buckets"])
        self.files: dict[str, list[str]] = {}  # dataset -> chunk file names, in index order
        self.starts: dict[str, list[int]] = {}  # dataset -> first item of each chunk
        self.sizes: dict[str, list[int]] = {}
        for sub in [f"{WINDOWS}/{b}" for b in self.buckets] + [f"{TEXTS}/a", f"{TEXTS}/b"]:
            chunks = _read_index(self.folder, sub)["chunks"]
            self.files[sub] = [c["filename"] for c in chunks]
            self.sizes[sub] = [int(c["chunk_size"]) for c in chunks]
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

    def __getstate__(self):  # DataLoader workers open their own litdata datasets
        return {**self.__dict__, "_datasets": {}}

    def chunk_sizes(self, bucket: str) -> list[int]:
        return self.sizes[f"{WINDOWS}/{bucket}"]

    def _dataset(self, sub: str):
        ds = self._datasets.get(sub)
        if ds is None:
            from litdata import StreamingDataset

            ds = self._datasets[sub] = StreamingDataset(str(self.folder / sub))
        return ds

    def _item(self, sub: str, index: int) -> dict:
        chunk = bisect.bisect_right(self.starts[sub], index) - 1
        name = f"{sub}/{self.files[sub][chunk]}"
        path = self.folder / name
        if not path.is_file():  # litdata would wait for a download that never comes
            raise LatentCacheError(f"latent cache '{self.folder}': shard '{name}' disappeared during training")
        try:
            return self._dataset(sub)[index]
        except LatentCacheError:
            raise
        except Exception as e:  # truncated or rewritten under us
            raise LatentCacheError(f"latent cache '{self.folder}': shard '{name}' is unreadable ({one_line(e, 200)})") from None

    def window(self, bucket: str, index: int) -> dict:
        """``{"a": {"latents", cond...}, "b": {...}, "id"}``: tensors without batch axis, floats as float32,
        conditioning padded back to the encoder's length with zeros."""
        item = self._item(f"{WINDOWS}/{bucket}", index)
        out = {"id": item["id"]}
        for side in ("a", "b"):
            text = self._item(f"{TEXTS}/{side}", self.offsets[side][item["part"]] + item[f"text_{side}"])
            cond = {}
            for k, v in text.items():
                v = unpack(v, self.storage["text"])
                length = self.lengths.get(side, {}).get(k)
                cond[k] = pad(v, length[0]) if length else v
            out[side] = {"latents": unpack(item[side], self.storage["latents"]), **cond}
        return out



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
