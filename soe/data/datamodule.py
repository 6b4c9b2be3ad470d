"""Data modules: synthetic audio-visual clips (demo, tests) and a latent cache (real training).

Both hand out batches ``{"a": {...}, "b": {...}}`` of clean latents plus conditioning. The batch
sampler decides which clips form batch number k from (seed, k, rank) alone, so a resumed run sees
exactly the batches an uninterrupted run would have seen.
"""
from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from soe.data.latent_cache import load_clips, read_index, validate_clip_shapes
from soe.data.synthetic import BounceClip, render_for_expert
from soe.errors import DataError
from soe.rng import generator_for


class ClipDataset(Dataset):
    def __init__(self, clips: list[dict]):
        self.clips = clips

    def __len__(self):
        return len(self.clips)

    def __getitem__(self, key):
        step, i = key  # the sampler hands out (batch number, clip index)
        return {**self.clips[i], "step": step}


class StepBatchSampler(Sampler):
    """Batches drawn within buckets, a fresh permutation per data epoch, a disjoint slice per rank.

    Batch ``k`` depends only on (seed, k, rank). Iteration starts at ``next_batch`` as it stands when
    ``iter()`` is called and runs on until the trainer stops, so however Lightning cuts the run into
    "epochs" (a resume restores its own batch counter; a skipped optimizer step needs one batch more)
    each new iteration continues the one sequence. ``length`` is only the nominal epoch Lightning
    counts against (the whole run: max_steps x accumulate_grad_batches).
    """

    def __init__(self, buckets: list[list[int]], batch_size: int, seed: int, length: int,
                 next_batch: int = 0, rank: int = 0, world_size: int = 1):
        self.buckets = [b for b in buckets if len(b) >= batch_size * world_size]
        if not self.buckets:
            sizes = [len(b) for b in buckets]
            raise DataError(f"data.batch_size: no bucket holds batch_size x devices = {batch_size * world_size} clips (bucket sizes {sizes})")
        self.batch_size, self.seed, self.length, self.next_batch = batch_size, seed, length, next_batch
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
        k = self.next_batch  # read now, not at construction: a restarted iteration resumes the sequence
        while True:
            yield [(k, i) for i in self.batch(k)]
            k += 1

    def __len__(self):
        return self.length


class StepDataLoader(DataLoader):
    """A DataLoader over a :class:`StepBatchSampler` whose position is part of the checkpoint.

    Lightning saves ``state_dict()`` of loaders that have one into the checkpoint (``loops.fit_loop.
    state_dict.combined_loader``) and hands it back through ``load_state_dict`` on resume. The
    position is the next batch *training* will use (the data module records each batch as it
    reaches the model), never how far worker processes have prefetched.
    """

    def state_dict(self) -> dict:
        return {"next_batch": self.batch_sampler.next_batch}

    def load_state_dict(self, state: dict) -> None:
        self.batch_sampler.next_batch = int(state["next_batch"])


class _StitchDataModule(L.LightningDataModule):
    """Shared plumbing: the experts are injected, the sampler resumes where training stood."""

    def __init__(self, experts: dict, batch_size: int, seed: int = 0, num_workers: int = 0):
        super().__init__()
        self.experts, self.batch_size, self.seed, self.num_workers = experts, batch_size, seed, num_workers
        self.dataset: ClipDataset | None = None
        self.buckets: list[list[int]] = []
        self.sampler: StepBatchSampler | None = None
        self.ranks_per_sample = 1  # parallel.context: that many consecutive ranks read the same batches (one data rank)

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
        # a checkpoint's loader state (StepDataLoader.load_state_dict) overrides this; checkpoints
        # written before loaders had one resume at the batch the optimizer steps imply
        start = trainer.global_step * accumulate if trainer else 0
        n = self.ranks_per_sample
        self.sampler = self.make_batch_sampler(max(1, max_steps * accumulate), start, trainer.global_rank // n if trainer else 0,
                                               trainer.world_size // n if trainer else 1)
        return self.make_loader(self.sampler)

    def make_batch_sampler(self, length: int, next_batch: int, rank: int, world_size: int) -> Sampler:
        return StepBatchSampler(self.buckets, self.batch_size, self.seed, length=length, next_batch=next_batch,
                                rank=rank, world_size=world_size)

    def make_loader(self, sampler) -> DataLoader:
        return StepDataLoader(self.dataset, batch_sampler=sampler, num_workers=self.num_workers)

    def on_before_batch_transfer(self, batch, dataloader_idx):
        if self.sampler is not None and "step" in batch:  # this batch reaches the model now
            self.sampler.next_batch = int(batch["step"][0]) + 1
        return batch


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

    def __init__(self, experts: dict, path, batch_size: int = 4, seed: int = 0, num_workers: int = 0,
                 seconds: float | None = None):
        super().__init__(experts, batch_size, seed, num_workers)
        self.path, self.seconds = path, seconds  # seconds: the recipe's data.seconds, which the clips must match

    def setup(self, stage=None):
        if self.dataset is not None:
            return
        meta, rows = read_index(self.path)
        names = {side: e.name for side, e in self.experts.items()}
        if meta.get("experts") != names:
            from soe.data.latent_cache import LatentCacheError

            raise LatentCacheError(f"latent cache '{self.path}' holds latents of experts {meta.get('experts')}, the recipe stitches {names}")
        lengths = sorted({float(r["seconds"]) for r in rows})
        if self.seconds is not None and all(abs(s - self.seconds) > 1e-6 for s in lengths):  # bucketed caches hold several
            from soe.data.latent_cache import LatentCacheError

            raise LatentCacheError(f"data.seconds: {self.seconds} s, but the latent cache '{self.path}' holds clips of "
                                   f"{', '.join(f'{s:g}' for s in lengths)} s (set data.seconds to match, or encode the clips again)")
        clips = load_clips(self.path, rows)
        validate_clip_shapes(clips, rows, self.experts, self.path)
        self.dataset = ClipDataset(clips)
        by_bucket: dict[str, list[int]] = {}
        for i, row in enumerate(rows):
            by_bucket.setdefault(row.get("bucket", "default"), []).append(i)
        self.buckets = list(by_bucket.values())
        self.check_buckets()
