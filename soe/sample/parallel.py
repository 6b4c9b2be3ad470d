"""The ranks of ``soe generate`` under torchrun (``parallel`` section, soe/schema/parallel.py).

``torchrun --nproc-per-node N -m soe generate RECIPE ... parallel.context=C parallel.cfg=true|false``: N must be
``C x (2 if cfg else 1)``, the ranks of one sample. With ``context`` the long expert's tokens are split across C
ranks (soe/stitch/context_parallel.py); with ``cfg`` the conditional half of each guided call runs on one rank and
the unconditional half on the other, and the two predictions are exchanged (an all-gather of the outputs).
Every rank samples; rank 0 alone checks and writes the output folder and prints.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from soe.errors import RecipeError
from soe.schema import ParallelConfig, build


@dataclass
class SampleRanks:
    config: ParallelConfig
    mesh: object
    rank: int

    @property
    def writer(self) -> bool:
        return self.rank == 0


def check_ranks(cfg) -> ParallelConfig | None:
    """``parallel`` against the processes torchrun started (one line, before any model is built); None: one process."""
    p = build(ParallelConfig, cfg.parallel, "parallel")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if p.group == 1:
        if world > 1:
            raise RecipeError(f"parallel: {world} processes (WORLD_SIZE) but parallel.context=1 and parallel.cfg=false; "
                              "`soe generate` splits one sample: set parallel.context or parallel.cfg, or run one process")
        return None
    if world != p.group:
        raise RecipeError(f"parallel: one sample takes parallel.context x (2 if parallel.cfg) = {p.group} ranks; run "
                          f"`torchrun --nproc-per-node {p.group} -m soe generate ...` (WORLD_SIZE is {world})")
    if p.cfg and all(float(g) == 1.0 for g in cfg.sample.guidance.values()):
        raise RecipeError("parallel.cfg: sample.guidance is 1 for both experts, so there is no unconditional branch to "
                          "run on a second rank; set sample.guidance or parallel.cfg=false")
    return p


def start_ranks(p: ParallelConfig, device_type: str = "cpu") -> SampleRanks:
    """Join torchrun's process group (gloo on CPU, nccl on CUDA) and lay the ranks out as (dp, cfg, ring, ulysses)."""
    from soe.stitch.context_parallel import world_mesh

    if not dist.is_initialized():
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    if device_type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return SampleRanks(p, world_mesh(p.context, device_type, cfg=p.cfg), dist.get_rank())


def split_for_sampling(stitcher, ranks: SampleRanks) -> None:
    """Split the stitch as ``ranks`` say: the long expert's tokens (context), the guided batch's halves (cfg)."""
    if ranks.config.context > 1:
        from soe.stitch.context_parallel import split_stitcher

        split_stitcher(stitcher, ranks.mesh)
    if ranks.config.cfg:
        stitcher.cfg_group = ranks.mesh["cfg"].get_group()


def cfg_parallel(predict, group):
    """``predict`` over a guided batch ``[cond; uncond]`` (2B): this rank runs its half, the halves are all-gathered."""
    rank, size = dist.get_rank(group), dist.get_world_size(group)

    def run(inputs, source_mask):
        if source_mask is None:  # no guidance this call: every rank runs the whole batch
            return predict(inputs, source_mask)
        n = source_mask.shape[0] // size
        part = slice(rank * n, (rank + 1) * n)
        mine = predict({k: {key: v[part] if torch.is_tensor(v) else v for key, v in b.items()} for k, b in inputs.items()},
                       source_mask[part])
        out = {}
        for k, v in mine.items():
            parts = [torch.empty_like(v) for _ in range(size)]
            dist.all_gather(parts, v.contiguous(), group=group)
            out[k] = torch.cat(parts)
        return out

    return run
