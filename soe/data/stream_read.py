"""Reading windows of a streaming latent cache lazily, through litdata's ``StreamingDataset``.

``StreamingCache`` knows the layout (buckets, chunk sizes, text offsets: a few numbers per chunk) and
nothing of the windows themselves; a window is read when a batch asks for it, from the chunk that
holds it, by litdata. Each process (rank or DataLoader worker) opens its own litdata datasets on
first use.

Where the cache lives: a local folder (or ``file://`` URL), or any URL litdata streams from
(``s3://``, ``gs://``, ``azure://``, ``hf://``, ``r2://``, ``local:`` and prefixes registered with
``litdata.streaming.downloader.register_downloader``). A remote cache is read through litdata's own
downloader into a local cache folder (``cache_dir``, default ``$SOE_CACHE_DIR`` or ``~/.cache/soe``,
one sub-folder per URL): ``meta.json`` and the ``index.json`` files are fetched when the cache is
opened, chunks when a batch first needs them.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from soe.data.latent_cache import LatentCacheError
from soe.data.stream_chunks import TextChunks, WindowBuffer, chunk_starts
from soe.data.stream_format import INDEX, TEXTS, WINDOWS, is_url, read_meta
from soe.errors import one_line

TEXT_SHARE = 0.5  # each side's text chunks are kept up to this share of the bytes of the window buffers: a text chunk
# serves windows of every bucket, whose chunk orders are independent, so a text cache of a few chunks reads each text
# chunk again for most window chunks that refer to it (data_stream.py, 50k windows: 1.75x an epoch when it held 2 text
# chunks per buffered window chunk); text states are small next to latents, so a share of their bytes holds many more


def default_cache_dir() -> Path:
    return Path(os.environ.get("SOE_CACHE_DIR") or Path.home() / ".cache" / "soe")


def resolve_location(folder, cache_dir=None) -> tuple[Path, str | None]:
    """``(local folder, remote URL or None)``. A URL must name a store litdata has a downloader for."""
    if not is_url(folder):
        return Path(folder), None
    url = str(folder).rstrip("/")
    if url.startswith("file://"):
        return Path(url[len("file://"):]), None
    from litdata.streaming.downloader import LocalDownloader, get_downloader

    local = Path(cache_dir or default_cache_dir()) / "streams" / hashlib.sha1(url.encode()).hexdigest()[:16]
    try:
        downloader = get_downloader(url, str(local), [])
    except ModuleNotFoundError as e:  # e.g. gs:// without google-cloud-storage
        raise LatentCacheError(f"latent cache '{url}': litdata needs an extra package for this store ({one_line(e, 120)})") from None
    if type(downloader) is LocalDownloader and not url.startswith("local:"):  # litdata's fallback: no downloader matched
        scheme = url.split("://", 1)[0]
        raise LatentCacheError(f"latent cache '{url}': litdata has no downloader for '{scheme}://' (use a local folder or "
                               "s3://, gs://, azure://, hf://, r2://, local:)")
    return local, url


class StreamingCache:
    """``buffer_chunks``: decoded window chunks kept per bucket and process (the shuffle buffer:
    ``data.shuffle_chunks``, see ``stream_chunks.WindowBuffer``); a chunk is decoded whole the first
    time a batch needs one of its windows. Memory: buckets x buffer_chunks window chunks, and per side
    text chunks of up to ``TEXT_SHARE`` of their bytes (see ``text_chunks_kept``), whatever the cache size.
    ``folder``: a local folder or a URL (see the module docstring); ``cache_dir``: where a remote
    cache's files are kept locally."""

    def __init__(self, folder, buffer_chunks: int = 8, cache_dir=None):
        self.buffer_chunks = max(1, int(buffer_chunks))
        self.folder, self.url = resolve_location(folder, cache_dir)
        self.name = self.url or str(self.folder)  # what error messages call the cache
        if self.url:
            self._fetch("meta.json")
        self.meta = read_meta(self.folder, self.name)
        self.storage = self.meta["storage"]
        self.lengths = self.meta.get("text_lengths", {})
        self.offsets = self.meta["text_offsets"]
        self.buckets = sorted(self.meta["buckets"])
        self.files: dict[str, list[str]] = {}  # dataset -> chunk file names, in index order
        self.starts: dict[str, list[int]] = {}  # dataset -> first item of each chunk
        self.sizes: dict[str, list[int]] = {}
        self.chunk_bytes: dict[str, int] = {}  # dataset -> bytes of its largest chunk (as stored)
        for sub in [f"{WINDOWS}/{b}" for b in self.buckets] + [f"{TEXTS}/a", f"{TEXTS}/b"]:
            chunks = self._read_index(sub)["chunks"]
            self.files[sub] = [c["filename"] for c in chunks]
            self.sizes[sub] = [int(c["chunk_size"]) for c in chunks]
            self.chunk_bytes[sub] = max((int(c["chunk_bytes"]) for c in chunks), default=0)
            self.starts[sub] = chunk_starts(self.sizes[sub])
            if self.url:  # a remote chunk is checked by litdata when it is downloaded
                continue
            for c in chunks:  # a stat per chunk: missing or truncated shards fail before the first step
                path = self.folder / sub / c["filename"]
                if not path.is_file():
                    raise LatentCacheError(f"latent cache '{self.name}': index lists missing shard '{sub}/{c['filename']}'")
                if path.stat().st_size != int(c["chunk_bytes"]):
                    raise LatentCacheError(f"latent cache '{self.name}': shard '{sub}/{c['filename']}' is truncated "
                                           f"({path.stat().st_size} of {c['chunk_bytes']} bytes)")
        self._datasets: dict = {}
        self._windows: dict[str, WindowBuffer] = {}  # bucket -> its shuffle buffer (buffer_chunks chunks)
        self._texts: dict[str, TextChunks] = {}  # side -> text chunks in use

    def __getstate__(self):  # DataLoader workers open their own litdata datasets
        return {**self.__dict__, "_datasets": {}, "_windows": {}, "_texts": {}}

    def release(self) -> None:
        """Drop the decoded chunks (e.g. those setup's checks read): forked DataLoader workers then start
        with empty buffers and read only the chunks dealt to them."""
        self._windows, self._texts = {}, {}

    # ---- where the files are ---------------------------------------------------------------------
    def _fetch(self, rel: str) -> None:
        """Download ``rel`` of the remote cache into the local folder with litdata's downloader (always
        anew: the remote cache may have been merged again); atomic, so ranks sharing the folder are safe."""
        from litdata.streaming.downloader import get_downloader

        local = self.folder / rel
        local.parent.mkdir(parents=True, exist_ok=True)
        tmp = local.with_name(f".{local.name}.{os.getpid()}.tmp")
        try:
            get_downloader(self.url, str(self.folder), []).download_file(f"{self.url}/{rel}", str(tmp))
            os.replace(tmp, local)
        except Exception as e:
            tmp.unlink(missing_ok=True)
            missing = "missing" if isinstance(e, FileNotFoundError) else f"unreadable ({one_line(e, 160)})"
            raise LatentCacheError(f"latent cache '{self.name}': '{rel}' is {missing}") from None

    def _read_index(self, sub: str) -> dict:
        path = self.folder / sub / INDEX
        if self.url:
            before = _chunk_identities(path)
            try:
                self._fetch(f"{sub}/{INDEX}")
            except LatentCacheError:
                pass  # reported below as the index a merge writes
            else:
                self._drop_stale_chunks(sub, before, _chunk_identities(path))
        if not path.is_file():
            raise LatentCacheError(f"latent cache '{self.name}': missing '{sub}/{INDEX}' (merge the shards: run the last "
                                   "`soe encode ... --shard I/N` again)")
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise LatentCacheError(f"latent cache '{self.name}': corrupt JSON in '{sub}/{INDEX}' ({e})") from None

    def _drop_stale_chunks(self, sub: str, before: dict | None, now: dict | None) -> None:
        """Delete local copies of chunks the remote index no longer lists as they were (re-encoded under
        the same name, or gone); litdata downloads them again when a batch needs them. Copies that no
        earlier index vouches for are dropped too."""
        for p in (self.folder / sub).glob("chunk-*.bin"):
            name = p.name
            if before is None or now is None or name not in now or before.get(name) != now[name]:
                p.unlink(missing_ok=True)

    def chunk_sizes(self, bucket: str) -> list[int]:
        return self.sizes[f"{WINDOWS}/{bucket}"]

    def _dataset(self, sub: str):
        ds = self._datasets.get(sub)
        if ds is None:
            from litdata import StreamingDataset
            from litdata.streaming.resolver import Dir

            source = Dir(path=str(self.folder / sub), url=f"{self.url}/{sub}") if self.url else str(self.folder / sub)
            ds = self._datasets[sub] = StreamingDataset(source)  # read a chunk at a time, in order (see _read_chunk)
        return ds

    # ---- decoded chunks ----------------------------------------------------------------------------
    def _buffer(self, bucket: str) -> WindowBuffer:
        buf = self._windows.get(bucket)
        if buf is None:
            sub = f"{WINDOWS}/{bucket}"
            buf = self._windows[bucket] = WindowBuffer(self.sizes[sub], self.buffer_chunks, lambda c: self._read_chunk(sub, c), self.offsets)
        return buf

    def _text_chunks(self, side: str) -> TextChunks:
        got = self._texts.get(side)
        if got is None:  # the text chunks the buffered windows refer to: about one per window chunk
            sub = f"{TEXTS}/{side}"
            got = self._texts[side] = TextChunks(self.sizes[sub], lambda c: self._read_chunk(sub, c), self.text_chunks_kept(side))
        return got

    def text_chunks_kept(self, side: str) -> int:
        """Text chunks of ``side`` a process keeps: ``TEXT_SHARE`` of the bytes its window buffers can hold (at least one)."""
        buffers = sum(min(self.buffer_chunks, len(self.sizes[f"{WINDOWS}/{b}"])) * self.chunk_bytes[f"{WINDOWS}/{b}"] for b in self.buckets)
        return max(1, int(TEXT_SHARE * buffers) // max(1, self.chunk_bytes[f"{TEXTS}/{side}"]))

    def _read_chunk(self, sub: str, chunk: int) -> list[dict]:
        name = f"{sub}/{self.files[sub][chunk]}"
        if not self.url and not os.path.exists(self.folder / name):  # litdata would wait for a download that never comes
            raise LatentCacheError(f"latent cache '{self.name}': shard '{name}' disappeared during training")
        first = self.starts[sub][chunk]
        try:
            from litdata.streaming.sampler import ChunkedIndex  # litdata's own (index, chunk): no search over the chunks

            ds = self._dataset(sub)
            return [ds[ChunkedIndex(i, chunk)] for i in range(first, first + self.sizes[sub][chunk])]
        except LatentCacheError:
            raise
        except Exception as e:  # truncated, rewritten under us, a failed download, or deleted while litdata opened it
            if not self.url and not os.path.exists(self.folder / name):
                raise LatentCacheError(f"latent cache '{self.name}': shard '{name}' disappeared during training") from None
            raise LatentCacheError(f"latent cache '{self.name}': shard '{name}' is unreadable ({one_line(e, 200)})") from None

    # ---- windows ----------------------------------------------------------------------------------
    def batch(self, bucket: str, indices: list[int]) -> dict:
        """Windows ``indices`` of ``bucket`` as one batch: ``{"id": [...], "a": {"latents", cond...}, "b": {...}}``,
        tensors with a leading batch axis, floats as float32, conditioning zero-padded back to the encoder's
        length straight into the batch tensor."""
        ids, latents, texts = self._buffer(bucket).gather(indices, self.storage["latents"])
        out: dict = {"id": ids}
        for side in ("a", "b"):
            text = self._text_chunks(side).batch(texts[side], self.lengths.get(side, {}), self.storage["text"])
            out[side] = {"latents": latents[side], **text}
        return out

    def window(self, bucket: str, index: int) -> dict:
        """One window: ``{"a": {"latents", cond...}, "b": {...}, "id"}``, tensors without batch axis."""
        b = self.batch(bucket, [index])
        return {"id": b["id"][0], **{side: {k: v[0] for k, v in b[side].items()} for side in ("a", "b")}}


def _chunk_identities(index_file: Path) -> dict | None:
    """``{chunk file name: (bytes, items, sha1)}`` of a local ``index.json``, None when there is none to trust.
    ``sha1`` is None for caches written before chunks carried one (then size and item count decide)."""
    try:
        chunks = json.loads(index_file.read_text())["chunks"]
        return {c["filename"]: (c["chunk_bytes"], c["chunk_size"], c.get("sha1")) for c in chunks}
    except (OSError, ValueError, KeyError, TypeError):
        return None


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
