"""The decoded part of a streaming latent cache a process holds: a shuffle buffer per bucket, text states.

``WindowBuffer``: one bucket's shuffle buffer, ``slots`` window chunks decoded into preallocated
tensors (latents as stored, each window's text state number, ids), so that a batch is one gather per
tensor whatever chunks its windows come from, and its size is fixed by ``slots`` x the largest chunk
of the bucket, whatever the number of windows. ``TextChunks``: text chunks of one side, kept as
stored (trimmed) up to a number of chunks, padded back into each batch.

Why preallocated tensors: a chunk kept as litdata hands it out (a dict of small tensors per window)
is thousands of Python objects; with 16 of them buffered, Python's garbage collector spent about as
long scanning them as litdata spent decoding, and a batch cost a tensor op per window it took.
Keeping only litdata's per-window latent tensors (no copy, a batch stacked from them) was measured
again: faster with the import-time objects frozen (as ``benchmarks/data_stream.py`` does), but in a
process that has not frozen them, as a training run, the survivors set off full collections that cost
702 ms per epoch of 50k tiny windows, against 226 ms with the copy. Large windows are the other way
round: few objects, and the copy in and out of the buffer is two more passes over every byte (576 KB
windows: loader / raw read 0.5-0.6 with the copy, 0.97 without). So windows of ``VIEW_BYTES`` or more are
kept as litdata hands them out (views of the mapped chunk file), and a batch is stacked from them.
"""
from __future__ import annotations

import bisect
import math
import mmap
from array import array
from collections import OrderedDict
from itertools import accumulate
from operator import itemgetter
from typing import Callable

import torch

from soe.data.stream_format import unpack

SIDES = ("a", "b")
HUGE_PAGE = 2 << 20
VIEW_BYTES = 64 << 10  # windows at least this large are kept as litdata hands them out, not copied into the buffer


def chunk_starts(sizes: list[int]) -> list[int]:
    """The number of the first item of each chunk, from the chunks' item counts."""
    return [0, *accumulate(sizes[:-1])]


class WindowBuffer:
    """``read(chunk)`` -> the chunk's items (litdata's dicts); ``text_offsets[side][part]``: where part
    ``part``'s text states start in the side's text dataset."""

    def __init__(self, chunk_sizes: list[int], slots: int, read: Callable[[int], list[dict]], text_offsets: dict):
        self.read, self.text_offsets = read, text_offsets
        self.starts = chunk_starts(chunk_sizes)  # first window of each chunk: O(chunks) small integers
        self.slots, self.rows = max(1, min(slots, len(chunk_sizes))), max(chunk_sizes)
        self.held: OrderedDict[int, int] = OrderedDict()  # chunk -> first buffer row, least recently used first
        self.views: bool | None = None  # decided by the first chunk: windows of >= VIEW_BYTES are kept as read
        self.latents: dict = {}  # side -> (slots x rows, ...) tensor, or a list of each row's tensor (views)
        self.texts = {s: [0] * (self.slots * self.rows) for s in SIDES}  # each row's text state number
        self.ids: list = [None] * (self.slots * self.rows)

    def _load(self, chunk: int, keep: list[int]) -> None:
        """Decode ``chunk`` into a free slot, or the least recently used one not in ``keep``."""
        items = self.read(chunk)  # first: a chunk that fails to read leaves the buffer as it was
        if len(self.held) < self.slots:
            first = len(self.held) * self.rows
        else:
            first = self.held.pop(next(c for c in self.held if c not in keep))
        n = len(items)
        if self.views is None:
            self.views = sum(items[0][side].nbytes for side in SIDES) >= VIEW_BYTES
        for side in SIDES:
            tensors = [it[side] for it in items]
            if side not in self.latents:
                self.latents[side] = [None] * (self.slots * self.rows) if self.views else \
                    huge_page_empty((self.slots * self.rows, *tensors[0].shape), tensors[0].dtype)
            if self.views:  # rows past a shorter chunk let go of the views they held
                self.latents[side][first: first + self.rows] = tensors + [None] * (self.rows - n)
            else:
                torch.stack(tensors, out=self.latents[side][first: first + n])  # one copy out of litdata's buffer
            offsets, key = self.text_offsets[side], f"text_{side}"
            self.texts[side][first: first + n] = [offsets[it["part"]] + it[key] for it in items]
        self.ids[first: first + n] = [it["id"] for it in items]
        self.held[chunk] = first

    def gather(self, indices: list[int], dtype: str) -> tuple[list, dict, dict]:
        """Windows ``indices`` of the bucket: ids, ``{side: latents (B, ...) float32}``, ``{side: [text state
        number]}``. A batch that needs more chunks than the buffer holds (one that straddles two shuffle
        groups) is gathered a buffer's worth of chunks at a time."""
        starts, n = self.starts, len(indices)
        chunks = [bisect.bisect_right(starts, i) - 1 for i in indices]
        needed = list(dict.fromkeys(chunks))
        if len(needed) <= self.slots:  # the usual case: one gather per tensor
            self._hold(needed)
            shift = {c: self.held[c] - starts[c] for c in needed}  # window index -> buffer row
            rows = [shift[c] + i for c, i in zip(chunks, indices)]
            latents = {s: self._take(s, rows) for s in SIDES}
        else:  # a batch straddling two shuffle groups: a buffer's worth of chunks at a time, the held ones first (the
            # last of the old group), so that the new group's chunks, loaded last, stay for the batches after this one
            needed = [c for c in needed if c in self.held] + [c for c in needed if c not in self.held]
            ids, texts, latents = [None] * n, {s: [0] * n for s in SIDES}, {}
            for k in range(0, len(needed), self.slots):
                group = needed[k: k + self.slots]
                self._hold(group)
                mine = [p for p, c in enumerate(chunks) if c in group]
                rows = [self.held[chunks[p]] + indices[p] - starts[chunks[p]] for p in mine]
                for p, r in zip(mine, rows):
                    ids[p] = self.ids[r]
                    for s in SIDES:
                        texts[s][p] = self.texts[s][r]
                at = index_tensor(mine)
                for s in SIDES:
                    got = self._take(s, rows)
                    latents.setdefault(s, got.new_empty((n, *got.shape[1:])))[at] = got
            return ids, {s: unpack(v, dtype) for s, v in latents.items()}, texts
        pick = itemgetter(*rows) if n > 1 else lambda seq: (seq[rows[0]],)
        return list(pick(self.ids)), {s: unpack(v, dtype) for s, v in latents.items()}, {s: pick(self.texts[s]) for s in SIDES}

    def _take(self, side: str, rows: list[int]) -> torch.Tensor:
        """Buffer rows ``rows`` of ``side`` as one new tensor: one ``index_select`` (2-3x faster than ``[rows]``),
        or a stack of the kept views."""
        if self.views:
            return torch.stack([self.latents[side][r] for r in rows])
        return self.latents[side].index_select(0, index_tensor(rows))

    def _hold(self, chunks: list[int]) -> None:
        """Make sure ``chunks`` (at most ``slots`` of them) are in the buffer."""
        for c in chunks:
            if c in self.held:
                self.held.move_to_end(c)
            else:
                self._load(c, chunks)


class TextChunks:
    """Text states of one side: decoded chunks as stored (trimmed), at most ``max_chunks`` of them, least
    recently used out first. A chunk's states are copied out of litdata's items into one tensor per key
    (each item a view of it, with its length): about half the memory of keeping litdata's items, which
    also hold on to the mapped chunk file."""

    def __init__(self, chunk_sizes: list[int], read: Callable[[int], list[dict]], max_chunks: int):
        self.sizes, self.starts = chunk_sizes, chunk_starts(chunk_sizes)
        self.read, self.max_chunks = read, max(1, max_chunks)
        self.held: OrderedDict[int, None] = OrderedDict()  # chunks, least recently used first
        self.items: dict[int, tuple] = {}  # text state number -> (chunk, its tensors and their lengths, one per key), held chunks only
        self.keys: list[str] = []

    def _load(self, c: int) -> None:
        items = self.read(c)
        self.keys = list(items[0])
        columns = [_compact([it[k] for it in items]) for k in self.keys]  # per key: (views, lengths)
        views, lengths = zip(*[v for v, _ in columns]), zip(*[n for _, n in columns])  # per item: one per key
        for j, (row, row_lengths) in enumerate(zip(views, lengths)):
            self.items[self.starts[c] + j] = (c, row, row_lengths)
        self.held[c] = None
        while len(self.held) > self.max_chunks:
            old, _ = self.held.popitem(last=False)
            for i in range(self.starts[old], self.starts[old] + self.sizes[old]):
                del self.items[i]

    def batch(self, numbers, lengths: dict, dtype: str) -> dict:
        """Text states ``numbers`` (a sequence of text state numbers) as batch tensors, each key zero-padded back to ``lengths[key][0]``."""
        get = self.items.get
        rows = [get(i) for i in numbers]
        if None in rows:  # read the missing chunks (one may push out a chunk read earlier for this batch: rows keep its tensors)
            for p, i in enumerate(numbers):
                if rows[p] is None:
                    rows[p] = get(i)
                    if rows[p] is None:
                        self._load(bisect.bisect_right(self.starts, i) - 1)
                        rows[p] = self.items[i]
        for c in {r[0] for r in rows}:
            if c in self.held:  # a chunk read for this batch may have pushed out one used earlier in it
                self.held.move_to_end(c)
        return {k: unpack(stack_padded([r[1][j] for r in rows], [r[2][j] for r in rows], (lengths.get(k) or [None])[0]), dtype)
                for j, k in enumerate(self.keys)}


def _compact(tensors: list[torch.Tensor]) -> tuple[tuple, list]:
    """The tensors copied into one owned tensor, handed back as views of it, and their lengths (None: 0-d)."""
    if tensors[0].ndim == 0:
        return torch.stack(tensors).unbind(), [None] * len(tensors)
    lengths = [t.shape[0] for t in tensors]
    return torch.cat(tensors).split(lengths), lengths


def stack_padded(tensors: list[torch.Tensor], lengths: list, length: int | None) -> torch.Tensor:
    """Stack along a new batch axis, zero-padding the first axis of each (``lengths``: theirs, None for 0-d)
    to ``length`` (None: as they are). A fixed number of tensor operations per batch, whatever its size
    (a Python loop over rows or ``pad_sequence`` cost 4-10x more for small text states)."""
    if length is None or lengths[0] is None or lengths.count(length) == len(lengths):
        return torch.stack(tensors)
    first = tensors[0]
    out = first.new_zeros((len(tensors), length, *first.shape[1:]))
    rows = torch.arange(length) < index_tensor(lengths)[:, None]  # (B, length): kept rows
    out[rows] = torch.cat(tensors)  # row-major order of the mask = the tensors one after the other
    return out


def huge_page_empty(shape: tuple, dtype: torch.dtype) -> torch.Tensor:
    """``torch.empty(shape, dtype=dtype)`` in an anonymous mapping advised for transparent huge pages where
    the system has them (Linux, THP "madvise" or "always"): a shuffle buffer's first fill then faults 2 MB
    pages instead of 4 KB ones (a 1.5 MB slot: 0.3 ms instead of 0.8; warm 0.17). Elsewhere, or below one
    huge page, a plain ``torch.empty``. The mapping lives as long as the tensor."""
    numel = math.prod(shape)
    nbytes = numel * dtype.itemsize
    advice = getattr(mmap, "MADV_HUGEPAGE", None)
    if advice is None or nbytes < HUGE_PAGE:
        return torch.empty(shape, dtype=dtype)
    mapping = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        mapping.madvise(advice)
    except OSError:  # THP compiled out: the mapping still works, with small pages
        pass
    return torch.frombuffer(mapping, dtype=dtype, count=numel).view(shape)


def index_tensor(values: list[int]) -> torch.Tensor:
    """``torch.tensor(values)`` (int64) in a fifth of the time for short lists, through the buffer protocol."""
    return torch.frombuffer(array("q", values), dtype=torch.int64) if values else torch.zeros(0, dtype=torch.int64)
