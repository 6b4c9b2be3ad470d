"""Synthetic streaming caches without media or codecs, for tests and ``benchmarks/data_stream.py``.

Windows are written through the same ``PartWriter`` as ``soe encode``; every ``windows_per_caption``
consecutive windows share a caption (and so one stored text state), and windows cycle through the
given durations (one bucket each).
"""
from __future__ import annotations

import torch

from soe.data.stream_format import text_key
from soe.data.stream_writer import PartWriter
from soe.rng import generator_for


def synthetic_record(i: int, experts: dict, durations=(1.0,), windows_per_caption: int = 4, seed: int = 0) -> dict:
    """Window ``i``: bouncing-square latents at each expert's shape, pseudo text states of its caption."""
    from soe.data.synthetic import BounceClip, render_for_expert

    seconds = float(durations[i % len(durations)])
    caption = f"caption {i // windows_per_caption}"
    record = {"id": f"w{i:07d}", "seconds": seconds, "bucket": f"{seconds:g}s", "index": {"caption": caption},
              "text": {s: text_key(s, caption, None) for s in experts}}
    clip = BounceClip.sample(seed, i)
    for side, e in experts.items():
        # a caption's text states may not depend on the window (soe encode: TextConditioner at data.seconds)
        cond = e.conditioning(1, float(durations[0]), generator=generator_for(seed, "cond", side, caption))
        record[side] = {"latents": render_for_expert(e, clip, seconds), **{k: v[0] for k, v in cond.items()}}
    return record


def random_record(i: int, shapes: dict, text_shapes: dict, durations=(1.0,), windows_per_caption: int = 4) -> dict:
    """A cheap window of random tensors (``shapes``/``text_shapes`` per side); for large benchmark caches."""
    seconds = float(durations[i % len(durations)])
    caption = i // windows_per_caption
    g = torch.Generator().manual_seed(i)
    tg = torch.Generator().manual_seed(10**9 + caption)
    record = {"id": f"w{i:07d}", "seconds": seconds, "bucket": f"{seconds:g}s", "index": {},
              "text": {s: text_key(s, str(caption), None) for s in shapes}}
    for side in shapes:
        record[side] = {"latents": torch.randn(shapes[side], generator=g),
                        "text": torch.randn(text_shapes[side], generator=tg)}
    return record


def write_cache(folder, records, experts: dict[str, str], shard_size: int = 64, part: int = 0, parts: int = 1,
                storage: dict | None = None) -> PartWriter:
    writer = PartWriter(folder, experts, {"synthetic": True}, shard_size, part=part, parts=parts, storage=storage)
    for r in records:
        writer.add(r)
    writer.finish()
    return writer
