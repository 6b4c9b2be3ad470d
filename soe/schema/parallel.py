"""``parallel``: how the ranks of a run share the work of one sample (soe/stitch/context_parallel.py).

``context: N``: N ranks share one sample, each holding 1/N of the long expert's tokens (context parallel,
diffusers' Ulysses); ``cfg: true``: sampling runs the conditional and the unconditional branch of classifier-free
guidance on two ranks. The data-parallel size is world / (context x (2 if cfg else 1)).
"""
from __future__ import annotations

from dataclasses import dataclass

from soe.schema.base import OptionError, require


@dataclass
class ParallelConfig:
    context: int = 1  # ranks sharing one sample's tokens (1 = off)
    cfg: bool = False  # sampling: conditional and unconditional branches on two ranks

    def __post_init__(self):
        require(isinstance(self.context, int) and not isinstance(self.context, bool) and self.context >= 1, "context",
                f"expected a positive integer (ranks sharing one sample), got {self.context!r}")
        require(isinstance(self.cfg, bool), "cfg", f"expected true or false, got {self.cfg!r}")

    @property
    def group(self) -> int:
        """Ranks that work on one sample: ``context`` x 2 with CFG parallel."""
        return self.context * (2 if self.cfg else 1)

    def data_parallel(self, world: int, where: str = "the run") -> int:
        """The data-parallel size for ``world`` ranks; a world the group does not divide is one line."""
        if world % self.group:
            what = f"context {self.context}" + (" x cfg 2" if self.cfg else "")
            raise OptionError("context" if not self.cfg else "cfg", f"{what} = {self.group} ranks per sample does not divide "
                              f"the {world} ranks of {where}")
        return world // self.group
