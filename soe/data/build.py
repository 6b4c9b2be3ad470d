"""Recipe -> the training data: the ``data`` section as a LightningDataModule (synthetic clips, a streamed
cache written by ``soe encode``, or an older cache folder read whole)."""
from __future__ import annotations

from omegaconf import DictConfig

from soe.stitch.stitcher import Stitcher


def build_datamodule(cfg: DictConfig, stitcher: Stitcher):
    """``data`` -> a LightningDataModule: synthetic clips, a streamed cache (``soe encode``) or an older cache folder."""
    experts, d = {"a": stitcher.a, "b": stitcher.b}, cfg.data
    if d.kind == "synthetic":
        from soe.data.datamodule import SyntheticAVDataModule

        return SyntheticAVDataModule(experts, seconds=d.seconds, num_clips=d.num_clips, batch_size=d.batch_size, seed=cfg.seed,
                                     num_workers=d.num_workers)
    from soe.data.stream_format import is_stream_cache

    if is_stream_cache(d.path):  # written by `soe encode`: streamed, bounded memory per rank
        from soe.data.streaming import StreamingLatentDataModule

        return StreamingLatentDataModule(experts, d.path, batch_size=d.batch_size, seed=cfg.seed, num_workers=d.num_workers,
                                         shuffle_chunks=d.shuffle_chunks, seconds=d.seconds, cache_dir=d.cache_dir)
    from soe.data.datamodule import PairedLatentDataModule

    return PairedLatentDataModule(experts, d.path, batch_size=d.batch_size, seed=cfg.seed, num_workers=d.num_workers,
                                  seconds=d.seconds)

