"""The streaming latent cache (format 2): litdata chunks, text states stored once, a part per encode process.

Layout of a cache folder::

    meta.json                    {"format": 2, "experts", "encode", "storage", "text_lengths", "parts", "buckets", "text_offsets"}
                                 buckets: {name: {"windows", "seconds", "shapes": {side: latent shape of its first window}}}
                                 (shapes: since 2026-11; training checks them at setup without reading a chunk)
    index.jsonl                  one line per window (id, bucket, seconds, source, start, caption, ...): for people
                                 and tools; training never reads it
    windows/<bucket>/            a litdata dataset per bucket: chunk-<part>-<n>.bin + index.json
                                 item = {"id", "part", "text_a", "text_b", "a", "b"} (latents, no batch axis)
    texts/<side>/                a litdata dataset per expert side: one item per distinct (caption, lyrics) of a
                                 part, each conditioning tensor trimmed of its trailing zero padding
    parts/part-<I>-of-<N>.jsonl  what encode process I of N committed, one line per chunk (the resume record)
    parts/part-<I>-of-<N>.done   written when process I finished; the last one to finish merges

Every chunk is written first and committed by one appended line of its part's log; ``index.json``
files and ``meta.json`` are written by the merge (temporary name, then rename). A reader only sees
chunks a merged ``index.json`` lists, so a killed encoder never leaves a half-written cache behind.

Text states: encoders pad prompts with zeros to a fixed length (Wan: 512 x 4096, ACE-Step: 256 text
+ 512 lyric tokens), which is what the expert's pipeline feeds the model. The cache keeps only the
rows before the padding and pads back with zeros at load, so the model sees exactly the encoder's
tensors. Floating tensors are stored in ``storage`` dtypes (bf16 text, latents in the training
dtype); litdata's tensor serializer has no bfloat16, so bf16 tensors travel as their int16 bits.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from soe.data.latent_cache import LatentCacheError
from soe.schema import Dtype

FORMAT = 2
WINDOWS, TEXTS, PARTS = "windows", "texts", "parts"
INDEX = "index.json"  # litdata's index file name
from soe.schema.train import is_url  # noqa: F401  (soe.data.stream_format.is_url)


def latent_dtype_for(precision: str) -> str:
    """The dtype a recipe trains in (``trainer.precision``): what its latents are stored as."""
    p = str(precision)
    return "bfloat16" if p.startswith("bf16") else "float16" if p.startswith("16") else "float32"


def is_stream_cache(folder) -> bool:
    """A format 2 cache folder; a URL always names one (format 1 caches are local only)."""
    if is_url(folder):
        return not folder.startswith("file://") or is_stream_cache(folder[len("file://"):])
    meta = Path(folder) / "meta.json"
    if not meta.is_file():
        return False
    try:
        return json.loads(meta.read_text()).get("format") == FORMAT
    except (json.JSONDecodeError, OSError):
        return False


def text_key(side: str, caption: str, lyrics: str | None) -> str:
    return hashlib.sha1(json.dumps([side, caption, lyrics or ""]).encode()).hexdigest()


def pack(t: torch.Tensor, dtype: str) -> torch.Tensor:
    """A tensor as stored: floats cast to ``dtype`` (bf16 as its int16 bits), integers as they are."""
    t = t.detach().cpu().contiguous()
    if not t.is_floating_point():
        return t.int() if t.dtype == torch.int16 else t  # int16 means bf16 bits in a stored tensor
    t = t.to(Dtype(dtype).torch)
    return t.view(torch.int16) if dtype == "bfloat16" else t


def unpack(t: torch.Tensor, dtype: str | None) -> torch.Tensor:
    """Back from storage; floats come out as float32 (what the training step computes the loss in)."""
    if t.dtype == torch.int16 and dtype == "bfloat16":
        return t.view(torch.bfloat16).float()
    return t.float() if t.is_floating_point() else t  # float32 and integers: litdata's (read-only) buffer as is


def trim(t: torch.Tensor) -> torch.Tensor:
    """Drop trailing all-zero slices along the first (sequence) axis; keep at least one."""
    if t.ndim == 0 or t.shape[0] == 0:
        return t
    nonzero = t.reshape(t.shape[0], -1).ne(0).any(dim=1).nonzero()
    keep = int(nonzero[-1]) + 1 if len(nonzero) else 1
    return t[:keep]


def pad(t: torch.Tensor, length: int) -> torch.Tensor:
    """Zero-pad the first axis back to ``length`` (the encoder's padded prompt length)."""
    if t.ndim == 0 or t.shape[0] == length:
        return t
    out = t.new_zeros((length, *t.shape[1:]))
    out[: t.shape[0]] = t
    return out


def write_json_atomic(path: Path, data) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1) if not isinstance(data, str) else data)
    os.replace(tmp, path)


def part_name(part: int, parts: int) -> str:
    return f"part-{part}-of-{parts}"


def read_meta(folder, name: str | None = None) -> dict:
    """``name``: what messages call the cache (its URL when ``folder`` is a local copy)."""
    folder = Path(folder)
    meta_file = folder / "meta.json"
    folder = name or folder
    if not meta_file.is_file():
        raise LatentCacheError(f"latent cache '{folder}': missing 'meta.json' (write one with `soe encode`)")
    try:
        meta = json.loads(meta_file.read_text())
    except json.JSONDecodeError as e:
        raise LatentCacheError(f"latent cache '{folder}': corrupt JSON in meta.json ({e})") from None
    if meta.get("format") != FORMAT:
        raise LatentCacheError(f"latent cache '{folder}': format {meta.get('format')!r}, expected {FORMAT}")
    if not meta.get("buckets"):
        parts = meta.get("parts")
        raise LatentCacheError(f"latent cache '{folder}': not merged yet" + (f" (encode every shard of {parts} with "
                               "`soe encode ... --shard I/N`; the last one to finish merges)" if parts else " (no windows)"))
    return meta


def append_line(path: Path, row: dict) -> None:
    """Commit ``row`` as one line of a log (fsynced before this returns); ``read_log`` reads them back."""
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_log(path: Path, repair: bool = False) -> list[dict]:
    """The committed lines of a part log; a torn last line (a kill mid-append) is dropped (and cut off with ``repair``)."""
    lines, good = [], b""
    if not path.is_file():
        return lines
    data = path.read_bytes()
    for line in data.splitlines(keepends=True):
        try:
            row = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            break
        if not line.endswith(b"\n"):
            break
        lines.append(row)
        good += line
    if repair and len(good) != len(data):
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_bytes(good)
        os.replace(tmp, path)
    return lines

