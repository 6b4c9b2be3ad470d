"""Depth expansion: make the shallower expert as deep as the other by inserting interpolated blocks.

UniVerse-1 expands ACE-Step (24 blocks) to Wan's 30 by inserting one block after every four original
blocks (every fifth block of the expanded stack is new); a new block starts as the mean of its two
neighbours, or as a copy of its left neighbour when it closes the stack. The expert is never edited:
inserted blocks are deep copies owned by the Stitcher (``fusion.inserted.<side>.<virtual index>``),
run through ``Expert.run_block_module`` with the same call signature as the expert's own blocks.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from soe.schema.stitch import DepthConfig


def insertion_points(n_orig: int, n_target: int, every: int | None = None) -> list[int]:
    """Original block indices that are each followed by one inserted block (``n_target - n_orig`` of them)."""
    extra = n_target - n_orig
    if extra < 0:
        raise ValueError(f"depth: cannot expand {n_orig} blocks to {n_target}")
    if extra == 0:
        return []
    if every is None:  # evenly spread, end-aligned like the linear depth map
        return [(k + 1) * n_orig // extra - 1 for k in range(extra)]
    points = [i for i in range(n_orig) if (i + 1) % every == 0]
    if len(points) != extra:
        raise ValueError(f"depth.every: {every} inserts {len(points)} blocks into {n_orig}, but {extra} are needed "
                         f"to reach {n_target}; choose every={max(1, n_orig // extra)} or null (spread evenly)")
    return points


@torch.no_grad()
def interpolated_block(left: nn.Module, right: nn.Module | None) -> nn.Module:
    """A deep copy of ``left`` whose parameters and buffers are the mean of ``left`` and ``right``."""
    new = copy.deepcopy(left)
    new._forward_hooks.clear()  # a copy never inherits stitching hooks
    new._forward_pre_hooks.clear()
    if right is not None:
        src = dict(right.named_parameters()) | dict(right.named_buffers())
        for name, t in list(new.named_parameters()) + list(new.named_buffers()):
            if t.is_floating_point() and t.device.type != "meta":
                t.copy_((t + src[name]) / 2)
    return new


class ExpandedStack(nn.Module):
    """The virtual block list of one expert: its own blocks (by index, not owned) plus inserted blocks."""

    def __init__(self, expert, n_target: int, every: int | None = None):
        super().__init__()
        n = expert.num_blocks
        after = insertion_points(n, n_target, every)
        self.order: list[tuple[bool, int]] = []  # (inserted?, original index or virtual index)
        self.inserted = nn.ModuleDict()
        self.neighbours: dict[str, tuple[int, int | None]] = {}  # inserted key -> the original blocks it averages
        blocks = expert.blocks
        for i in range(n):
            self.order.append((False, i))
            if i in after:
                k = len(self.order)
                self.inserted[f"{k:02d}"] = interpolated_block(blocks[i], blocks[i + 1] if i + 1 < n else None)
                self.neighbours[f"{k:02d}"] = (i, i + 1 if i + 1 < n else None)
                self.order.append((True, k))

    def __len__(self) -> int:
        return len(self.order)

    def is_inserted(self, k: int) -> bool:
        return self.order[k][0]

    def module(self, expert, k: int) -> nn.Module:
        inserted, i = self.order[k]
        return self.inserted[f"{i:02d}"] if inserted else expert.blocks[i]

    def run(self, expert, k: int, state):
        inserted, i = self.order[k]
        if inserted:
            return expert.run_block_module(self.inserted[f"{i:02d}"], state)
        return expert.run_block(i, state)


def expand_stacks(a, b, spec: DepthConfig) -> dict:
    """``{"a": ExpandedStack | None, "b": ...}``: the shallower expert expanded to the deeper's depth."""
    stacks = {"a": None, "b": None}
    if spec.mode == "insert_interpolated" and a.num_blocks != b.num_blocks:
        side, deep = ("a", b.num_blocks) if a.num_blocks < b.num_blocks else ("b", a.num_blocks)
        stacks[side] = ExpandedStack(a if side == "a" else b, deep, spec.every)
    return stacks
