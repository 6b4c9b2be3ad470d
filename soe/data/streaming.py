"""Training on a streaming latent cache: which windows form batch k, and the Lightning data module.

Readers: every DataLoader worker of every rank (a rank without workers is one reader itself), so
devices x max(1, num_workers) of them. Order (``StreamBatchSampler``), per bucket and epoch: a seeded
permutation of the bucket's chunks, dealt to the readers (disjoint, balanced by windows: see
``_deal``), so each chunk is read by exactly one reader per epoch (litdata's own way of splitting
chunks). Each reader shuffles the windows of every ``shuffle_chunks`` consecutive chunks of its share
together (the bounded shuffle buffer) and forms its batches, each within one bucket, from those alone.
Batch ``k`` of a rank comes from its worker ``k % num_workers``'s share: the DataLoader hands batches
to its workers in turn, so each worker process reads one reader's chunks (after a resume the workers
are rotated, still one share each). Every rank's batch ``k`` comes from the same bucket (the buckets'
batches are interleaved by a seeded permutation per epoch and worker). Batch ``k`` is a function of
(seed, k, devices, num_workers): a resumed run sees exactly the batches of an uninterrupted one, and
the checkpoint refuses a resume with another ``num_workers``. A reader gives ``floor(min windows of a
reader's share / batch_size)`` batches per bucket and epoch (the shares' sizes depend on chunk sizes
alone); the few windows beyond that are left out of the epoch. The sampler holds O(chunks + batches
per epoch) small integers, never anything per window; windows are read lazily by ``StreamingCache``
through litdata.
"""
from __future__ import annotations

import bisect
import heapq
from functools import lru_cache

import torch
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

from soe.data.datamodule import StepDataLoader, _StitchDataModule
from soe.data.latent_cache import LatentCacheError
from soe.data.stream_chunks import chunk_starts
from soe.data.stream_read import StreamingCache
from soe.errors import DataError, SoeError
from soe.rng import generator_for


class StreamBatchSampler(Sampler):
    """Iteration starts at ``next_batch`` as it stands when ``iter()`` is called and runs until the
    trainer stops (like ``StepBatchSampler``); ``length`` is the nominal epoch Lightning counts against.
    ``num_workers``: the DataLoader workers of each rank (0: the rank reads itself); with
    ``world_size`` it fixes the readers the chunks are dealt to."""

    def __init__(self, chunk_sizes: dict[str, list[int]], batch_size: int, seed: int, length: int,
                 next_batch: int = 0, rank: int = 0, world_size: int = 1, shuffle_chunks: int = 8, num_workers: int = 0):
        self.batch_size, self.seed, self.length, self.next_batch = batch_size, seed, length, next_batch
        self.rank, self.world, self.shuffle_chunks = rank, world_size, max(1, int(shuffle_chunks))
        self.workers = readers_per_device(num_workers)  # batch k goes to loader worker (k - first batch) % workers
        self.readers = world_size * self.workers
        self.per_reader: dict[str, int] = {}  # bucket -> batches each reader gives per epoch (the same every epoch)
        for b, sizes in sorted(chunk_sizes.items()):
            loads, _ = _deal(sizes, list(range(len(sizes))), self.readers)
            n = min(loads) // batch_size
            if n:
                self.per_reader[b] = n
        if not self.per_reader:
            chunks = {b: len(s) for b, s in chunk_sizes.items()}
            raise DataError(f"data.batch_size: no bucket gives batch_size = {batch_size} windows to each of its {self.readers} readers "
                            f"(devices x max(1, data.num_workers); a reader reads whole chunks; chunks per bucket {chunks})")
        self.chunk_sizes = {b: chunk_sizes[b] for b in self.per_reader}
        self.names = list(self.chunk_sizes)
        self.per_stream = sum(self.per_reader.values())  # batches of one worker's stream per epoch
        self.starts = {b: chunk_starts(s) for b, s in self.chunk_sizes.items()}
        self._shares = lru_cache(maxsize=len(self.names) * 2)(self._bucket_epoch)
        self._reader = lru_cache(maxsize=len(self.names) * 2 * self.workers)(self._reader_chunks)
        self._group = lru_cache(maxsize=4 * self.shuffle_chunks * self.workers)(self._group_perm)
        self._slots = lru_cache(maxsize=2 * self.workers)(self._stream_slots)

    def batches_per_epoch(self) -> int:
        """Batches of this rank per epoch: each of its workers' streams in turn, one batch each."""
        return self.per_stream * self.workers

    def reader(self, k: int) -> int:
        """The reader (``rank x workers + worker``) whose chunks batch ``k`` of this rank comes from."""
        return self.rank * self.workers + k % self.workers

    def _stream_slots(self, e: int, v: int) -> tuple[list[int], list[int]]:
        """Which bucket each batch of worker stream ``v`` in epoch ``e`` comes from, and its number within
        that bucket (the same on every rank: a step draws every rank's batch from one bucket). Lists: each
        batch reads one entry of each (indexing a tensor made two 0-d tensors per batch)."""
        per = torch.tensor([self.per_reader[b] for b in self.names])
        slots = torch.repeat_interleave(torch.arange(len(self.names)), per)
        slots = slots[torch.randperm(len(slots), generator=generator_for(self.seed, "buckets", e, v))]
        within = torch.zeros_like(slots)
        for b in range(len(self.names)):
            mask = slots == b
            within[mask] = torch.arange(int(mask.sum()))
        return slots.tolist(), within.tolist()

    def _bucket_epoch(self, b: int, e: int) -> list[list[int]]:
        """The chunks of bucket ``b`` each of this rank's readers gets in epoch ``e``, in the epoch's seeded order."""
        sizes = self.chunk_sizes[self.names[b]]
        order = torch.randperm(len(sizes), generator=generator_for(self.seed, "chunks", b, e)).tolist()
        _, dealt = _deal(sizes, order, self.readers)
        return dealt[self.rank * self.workers: (self.rank + 1) * self.workers]

    def _reader_chunks(self, b: int, e: int, v: int) -> tuple[list[int], list[int]]:
        """Chunk order of this rank's reader ``v`` in bucket ``b``, epoch ``e``, and where each shuffle group starts."""
        sizes = self.chunk_sizes[self.names[b]]
        order = self._shares(b, e)[v]
        group_starts, pos = [], 0
        for g in range(0, len(order), self.shuffle_chunks):
            group_starts.append(pos)
            pos += sum(sizes[c] for c in order[g: g + self.shuffle_chunks])
        return order, group_starts

    def _group_perm(self, b: int, e: int, v: int, g: int) -> list[int]:
        """The windows (indices into the bucket's dataset) of reader ``v``'s shuffle group ``g``, shuffled."""
        order, _ = self._reader(b, e, v)
        name = self.names[b]
        chunks = order[g * self.shuffle_chunks: (g + 1) * self.shuffle_chunks]
        ids = [self.starts[name][c] + i for c in chunks for i in range(self.chunk_sizes[name][c])]
        n = self.rank * self.workers + v
        perm = torch.randperm(len(ids), generator=generator_for(self.seed, "windows", b, e, n, g)).tolist()
        return [ids[i] for i in perm]

    def window_at(self, b: int, e: int, v: int, p: int) -> int:
        """Position ``p`` of reader ``v``'s window sequence in bucket ``b``, epoch ``e``."""
        return self.windows_at(b, e, v, p, p + 1)[0]

    def batch(self, k: int) -> tuple[str, list[int]]:
        """Bucket and this rank's windows of batch ``k``."""
        e, j = divmod(k, self.batches_per_epoch())
        v, t = j % self.workers, j // self.workers  # j % workers == k % workers: an epoch is a multiple of workers
        slots, within = self._slots(e, v)
        b, i = slots[t], within[t]
        first = i * self.batch_size
        return self.names[b], self.windows_at(b, e, v, first, first + self.batch_size)

    def windows_at(self, b: int, e: int, v: int, start: int, stop: int) -> list[int]:
        """Positions ``start`` to ``stop`` of reader ``v``'s sequence: slices of the shuffle groups they fall in."""
        _, group_starts = self._reader(b, e, v)
        out, p = [], start
        while p < stop:
            g = bisect.bisect_right(group_starts, p) - 1
            end = min(stop, group_starts[g + 1] if g + 1 < len(group_starts) else stop)
            out += self._group(b, e, v, g)[p - group_starts[g]: end - group_starts[g]]
            p = end
        return out

    def __iter__(self):
        k = self.next_batch  # read now: a restarted iteration (or a restored loader state) continues the sequence
        while True:
            bucket, windows = self.batch(k)
            yield [(k, bucket, w) for w in windows]
            k += 1

    def __len__(self):
        return self.length


def readers_per_device(num_workers: int) -> int:
    """The readers one device's chunks are dealt to: its DataLoader workers, or the device itself without any
    (so 0 and 1 workers give the same batches)."""
    return max(1, int(num_workers))


def _deal(sizes: list[int], order: list[int], readers: int) -> tuple[list[int], list[list[int]]]:
    """Deal chunks to ``readers``: largest first (ties in ``order``), each to the reader holding the fewest
    windows so far (ties: the lowest reader). Each reader's chunks come back in ``order``; the windows each
    reader holds depend on the chunk sizes alone, so the batches per epoch are the same every epoch."""
    position = {c: p for p, c in enumerate(order)}
    heap = [(0, n) for n in range(readers)]
    dealt: list[list[int]] = [[] for _ in range(readers)]
    for c in sorted(order, key=lambda c: (-sizes[c], position[c])):
        load, n = heapq.heappop(heap)
        dealt[n].append(c)
        heapq.heappush(heap, (load + sizes[c], n))
    loads = [0] * readers
    for load, n in heap:
        loads[n] = load
    return loads, [sorted(d, key=position.__getitem__) for d in dealt]


class StreamWindows(Dataset):
    """Map-style view for the DataLoader: key ``(batch number, bucket, window)`` -> a window. The
    DataLoader asks for a whole batch at once (``__getitems__``), which ``StreamingCache.batch``
    builds in one go: a batch's latents are stacked and converted once, its text states padded
    straight into the batch tensors (``collate_batch`` then passes it on)."""

    def __init__(self, cache: StreamingCache):
        self.cache = cache

    def __getitem__(self, key):
        step, bucket, index = key
        window = self.cache.window(bucket, index)
        return {"a": window["a"], "b": window["b"], "step": step}

    def __getitems__(self, keys: list) -> dict:
        step, bucket, _ = keys[0]
        if any(k[0] != step or k[1] != bucket for k in keys):  # StreamBatchSampler never mixes them
            raise ValueError(f"a streamed batch comes from one batch number and one bucket, got {sorted({k[:2] for k in keys})}")
        batch = self.cache.batch(bucket, [k[2] for k in keys])
        return {"a": batch["a"], "b": batch["b"], "step": torch.full((len(keys),), step, dtype=torch.long)}


def collate_batch(batch):
    """A batch built by ``StreamWindows.__getitems__`` as it is; a list of windows collated as usual."""
    return batch if isinstance(batch, dict) else default_collate(batch)


class StreamDataLoader(StepDataLoader):
    """``StepDataLoader`` (its position is in the checkpoint) whose cache errors stay one line when they
    happen in a worker process. The checkpoint also records the number of workers: batch ``k``'s windows
    depend on it (the chunks are dealt to devices x workers readers), so a resume with another
    ``data.num_workers`` is refused rather than silently changing the batches."""

    def state_dict(self) -> dict:
        return {**super().state_dict(), "num_workers": self.batch_sampler.workers}

    def load_state_dict(self, state: dict) -> None:
        saved = state.get("num_workers")
        if saved is not None and int(saved) != self.batch_sampler.workers:
            raise DataError(f"data.num_workers: the checkpoint was written with {saved} loader worker(s) per device (0 counts as 1), "
                            f"this run has {self.batch_sampler.workers}; batches depend on it: resume with data.num_workers={saved}")
        super().load_state_dict(state)

    def __iter__(self):
        it = super().__iter__()
        while True:
            try:
                batch = next(it)
            except StopIteration:
                return
            except SoeError as e:  # re-raised by torch with the worker's traceback: keep its last line
                text = str(e)
                if "Original Traceback" not in text:
                    raise
                last = [ln for ln in text.splitlines() if ln.strip()][-1]
                raise type(e)(last.split(": ", 1)[-1]) from None
            yield batch


class StreamingLatentDataModule(_StitchDataModule):
    """Streams a latent cache written by ``soe encode`` (format 2): bounded memory per rank."""

    def __init__(self, experts: dict, path, batch_size: int = 4, seed: int = 0, num_workers: int = 0, shuffle_chunks: int = 8,
                 seconds: float | None = None, cache_dir=None):
        super().__init__(experts, batch_size, seed, num_workers)
        self.path, self.shuffle_chunks, self.seconds = path, shuffle_chunks, seconds  # seconds: data.seconds
        self.cache_dir = cache_dir  # local copy of a remote (URL) cache; None: $SOE_CACHE_DIR or ~/.cache/soe
        self.cache: StreamingCache | None = None

    def setup(self, stage=None):
        if self.cache is not None:
            return
        cache = StreamingCache(self.path, buffer_chunks=self.shuffle_chunks, cache_dir=self.cache_dir)
        names = {side: e.name for side, e in self.experts.items()}
        if cache.meta.get("experts") != names:
            raise LatentCacheError(f"latent cache '{self.path}' holds latents of experts {cache.meta.get('experts')}, the recipe stitches {names}")
        lengths = sorted({float(b["seconds"]) for b in cache.meta["buckets"].values()})
        if self.seconds is not None and all(abs(s - self.seconds) > 1e-6 for s in lengths):  # bucketed caches hold several
            raise LatentCacheError(f"data.seconds: {self.seconds} s, but the latent cache '{self.path}' holds windows of "
                                   f"{', '.join(f'{s:g}' for s in lengths)} s (set data.seconds to match, or encode the clips again)")
        for bucket in cache.buckets:  # shapes and conditioning keys against the experts
            self._check_window(cache, bucket)
        cache.release()
        self.cache, self.dataset = cache, StreamWindows(cache)
        self.buckets = [range(sum(cache.chunk_sizes(b))) for b in cache.buckets]
        self.check_buckets()

    def _check_window(self, cache: StreamingCache, bucket: str) -> None:
        """The bucket's latent shapes and conditioning keys against the experts: from ``meta.json`` (a cache
        merged since it records them), else from the bucket's first window (which reads its chunk)."""
        seconds = float(cache.meta["buckets"][bucket]["seconds"])
        shapes = cache.meta["buckets"][bucket].get("shapes")
        window = None if shapes else cache.window(bucket, 0)
        for side, e in self.experts.items():
            got = tuple(shapes[side]) if shapes else tuple(window[side]["latents"].shape)
            keys = set(cache.lengths.get(side, {})) if shapes else set(window[side]) - {"latents"}
            want = tuple(e.latent_shape(1, seconds))[1:]
            t = e.latent_time_axis - 1
            if len(got) != len(want) or any(g != x for i, (g, x) in enumerate(zip(got, want)) if i < t):
                raise LatentCacheError(f"latent cache '{self.path}': bucket '{bucket}' {side}/latents has shape {list(got)}, "
                                       f"expert '{e.name}' expects {list(want)} (axes from time on may differ)")
            missing = [k for k in e.condition_keys if k not in keys]
            if missing:
                raise LatentCacheError(f"latent cache '{self.path}': bucket '{bucket}' lacks {side} conditioning {missing}")

    def make_batch_sampler(self, length: int, next_batch: int, rank: int, world_size: int) -> Sampler:
        sizes = {b: self.cache.chunk_sizes(b) for b in self.cache.buckets}
        return StreamBatchSampler(sizes, self.batch_size, self.seed, length, next_batch, rank, world_size, self.shuffle_chunks,
                                  self.num_workers)

    def make_loader(self, sampler) -> DataLoader:
        return StreamDataLoader(self.dataset, batch_sampler=sampler, num_workers=self.num_workers, collate_fn=collate_batch,
                                persistent_workers=False, prefetch_factor=2 if self.num_workers else None)
