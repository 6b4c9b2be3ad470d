"""Data modules: synthetic audio-visual clips (demo, tests) and a latent cache (real training).

Both hand out batches ``{"a": {...}, "b": {...}}`` of clean latents plus conditioning. The batch
sampler decides which clips form batch number k from (seed, k, rank) alone, so a resumed run sees
exactly the batches an uninterrupted run would have seen.
"""
from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from soe.errors import DataError
from soe.flow import generator_for
from soe.train.latent_cache import load_clips, read_index, validate_clip_shapes
from soe.train.synthetic import BounceClip, render_for_expert


class ClipDataset(Dataset):
    def __init__(self, clips: list[dict]):
        self.clips = clips

    def __len__(self):
        return len(self.clips)

    def __getitem__(self, key):
        step, i = key  # the sampler hands out (batch number, clip index)
        return {**self.clips[i], "step": step}


class StepBatchSampler(Sampler):
    """Batches drawn within buckets, a fresh permutation per epoch, a disjoint slice per rank.

    Batch ``k`` depends only on (seed, k, rank); iteration starts at ``start_batch`` so a resumed
    run continues the exact sequence. Length = the batches still to come.
    """

    def __init__(self, buckets: list[list[int]], batch_size: int, seed: int, total_batches: int,
                 start_batch: int = 0, rank: int = 0, world_size: int = 1):
        self.buckets = [b for b in buckets if len(b) >= batch_size * world_size]
        if not self.buckets:
            sizes = [len(b) for b in buckets]
            raise DataError(f"data.batch_size: no bucket holds batch_size x devices = {batch_size * world_size} clips (bucket sizes {sizes})")
        self.batch_size, self.seed, self.total, self.start = batch_size, seed, total_batches, start_batch
        self.rank, self.world = rank, world_size
        self._epoch_cache: tuple[int, list[list[int]]] | None = None

    def _epoch(self, e: int) -> list[list[int]]:
        if self._epoch_cache and self._epoch_cache[0] == e:
            return self._epoch_cache[1]
        g = generator_for(self.seed, "batches", e)
        per = self.batch_size * self.world
        batches = []
        for bucket in self.buckets:
            perm = [bucket[i] for i in torch.randperm(len(bucket), generator=g).tolist()]
            batches += [perm[s: s + per] for s in range(0, len(perm) - per + 1, per)]
        order = torch.randperm(len(batches), generator=g).tolist()
        self._epoch_cache = (e, [batches[i] for i in order])
        return self._epoch_cache[1]

    def batches_per_epoch(self) -> int:
        per = self.batch_size * self.world
        return sum(len(b) // per for b in self.buckets)

    def batch(self, k: int) -> list[int]:
        n = self.batches_per_epoch()
        full = self._epoch(k // n)[k % n]
        return full[self.rank * self.batch_size: (self.rank + 1) * self.batch_size]

    def __iter__(self):
        for k in range(self.start, self.total):
            yield [(k, i) for i in self.batch(k)]

    def __len__(self):
        return max(0, self.total - self.start)


class _StitchDataModule(L.LightningDataModule):
    """Shared plumbing: the experts are injected, the sampler resumes at the trainer's step."""

    def __init__(self, experts: dict, batch_size: int, seed: int = 0, num_workers: int = 0):
        super().__init__()
        self.experts, self.batch_size, self.seed, self.num_workers = experts, batch_size, seed, num_workers
        self.dataset: ClipDataset | None = None
        self.buckets: list[list[int]] = []

    def check_buckets(self, world_size: int = 1) -> None:
        """At least one bucket must fill a batch on every device (fails before training starts)."""
        need = self.batch_size * world_size
        if not any(len(b) >= need for b in self.buckets):
            sizes = [len(b) for b in self.buckets]
            raise DataError(f"data.batch_size: no bucket holds batch_size x devices = {need} clips (bucket sizes {sizes})")

    def train_dataloader(self):
        trainer = self.trainer
        accumulate = trainer.accumulate_grad_batches if trainer else 1
        max_steps = trainer.max_steps if trainer else 1
        start = trainer.global_step * accumulate if trainer else 0
        sampler = self.make_batch_sampler(max_steps * accumulate, start, trainer.global_rank if trainer else 0,
                                          trainer.world_size if trainer else 1)
        return self.make_loader(sampler)

    def make_batch_sampler(self, total_batches: int, start_batch: int, rank: int, world_size: int) -> Sampler:
        return StepBatchSampler(self.buckets, self.batch_size, self.seed, total_batches=total_batches,
                                start_batch=start_batch, rank=rank, world_size=world_size)

    def make_loader(self, sampler) -> DataLoader:
        return DataLoader(self.dataset, batch_sampler=sampler, num_workers=self.num_workers)


class SyntheticAVDataModule(_StitchDataModule):
    """Bouncing square + click per bounce, rendered at the experts' latent shapes (see synthetic.py)."""

    def __init__(self, experts: dict, seconds: float = 1.0, num_clips: int = 256, batch_size: int = 4, seed: int = 0, num_workers: int = 0):
        super().__init__(experts, batch_size, seed, num_workers)
        self.seconds, self.num_clips = seconds, num_clips

    def make_clip(self, index: int) -> dict:
        clip = BounceClip.sample(self.seed, index)
        item = {}
        for side, e in self.experts.items():
            cond = e.conditioning(1, self.seconds, generator=generator_for(self.seed, "cond", side, index))
            cond = {k: v[0].cpu().float() if v.is_floating_point() else v[0].cpu() for k, v in cond.items()}  # ids stay integer
            item[side] = {"latents": render_for_expert(e, clip, self.seconds), **cond}
        return item

    def setup(self, stage=None):
        if self.dataset is None:
            self.dataset = ClipDataset([self.make_clip(i) for i in range(self.num_clips)])
            self.buckets = [list(range(self.num_clips))]
            self.check_buckets()


class PairedLatentDataModule(_StitchDataModule):
    """Reads a latent cache folder; shapes are checked against the experts at setup."""

    def __init__(self, experts: dict, path, batch_size: int = 4, seed: int = 0, num_workers: int = 0):
        super().__init__(experts, batch_size, seed, num_workers)
        self.path = path

    def setup(self, stage=None):
        if self.dataset is not None:
            return
        meta, rows = read_index(self.path)
        names = {side: e.name for side, e in self.experts.items()}
        if meta.get("experts") != names:
            from soe.train.latent_cache import LatentCacheError

            raise LatentCacheError(f"latent cache '{self.path}' holds latents of experts {meta.get('experts')}, the recipe stitches {names}")
        clips = load_clips(self.path, rows)
        validate_clip_shapes(clips, rows, self.experts, self.path)
        self.dataset = ClipDataset(clips)
        by_bucket: dict[str, list[int]] = {}
        for i, row in enumerate(rows):
            by_bucket.setdefault(row.get("bucket", "default"), []).append(i)
        self.buckets = list(by_bucket.values())
        self.check_buckets()
