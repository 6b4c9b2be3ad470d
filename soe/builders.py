"""Recipe -> experts -> Stitcher. The only place where recipe sections turn into objects."""
from __future__ import annotations

import torch
from omegaconf import DictConfig

from soe.config import RecipeError, to_container
from soe.errors import CheckpointError, SoeError, one_line, without_loader_advice
from soe.connector import ConnectorSpec
from soe.expert import Expert
from soe.registry import get_expert
from soe.stitcher import Stitcher

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_expert(cfg: DictConfig, side: str, device=None, load_weights: bool = True) -> Expert:
    """One expert of the recipe: real weights from ``path``, else random weights of ``preset``.

    ``load_weights=False`` (meta-device inspection) builds the preset architecture only.
    """
    e = cfg.experts[side]
    cls = get_expert(e.name)
    options = dict(to_container(e.options))
    dtype = DTYPES[e.dtype]
    try:
        if e.path is not None and load_weights:
            expert = cls.load(e.path, dtype=dtype, device=device, **options)
        else:
            expert = cls.from_preset(e.preset, device=device, dtype=dtype, **dict(to_container(e.architecture)), **options)
    except SoeError:
        raise
    except Exception as err:
        from_path = e.path is not None and load_weights
        if isinstance(err, TypeError) and (not from_path or "argument" in str(err)):  # an option the expert or model does not take
            raise RecipeError(f"experts.{side}.options: {err}") from None
        if not from_path:
            raise
        # missing/truncated files, wrong shapes, dtypes or keys, another family's config: one line naming the key
        raise CheckpointError(f"experts.{side}.path: cannot load '{e.path}' as expert '{e.name}': "
                              f"{one_line(without_loader_advice(err), 300)}") from None
    if e.gradient_checkpointing:
        expert.set_gradient_checkpointing(True)
    return expert


def build_stitcher(cfg: DictConfig, device=None, load_weights: bool = True) -> Stitcher:
    a = build_expert(cfg, "a", device, load_weights)
    b = build_expert(cfg, "b", device, load_weights)
    s = cfg.stitch
    try:
        return Stitcher(
            a,
            b,
            pairs=to_container(s.pairs),
            direction=s.direction,
            detach_source=s.detach_source,
            connector=ConnectorSpec(**to_container(s.connector)),
            engine=s.engine,
            device=device,
            depth=to_container(s.depth),
            inject=to_container(s.inject),
        )
    except ValueError as err:  # a tap point, attention module or copy_from the experts do not have
        raise RecipeError(f"stitch.{err}") from None
