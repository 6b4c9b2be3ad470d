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
    return _build_expert(cfg, side, device, load_weights)[0]


def _build_expert(cfg: DictConfig, side: str, device=None, load_weights: bool = True, empty: bool = False):
    e = cfg.experts[side]
    cls = get_expert(e.name)
    options = dict(to_container(e.options))
    dtype = DTYPES[e.dtype]
    weights = None
    empty = empty and cls.load_empty.__func__ is not Expert.load_empty.__func__  # the family can load lazily
    try:
        if e.path is not None and load_weights and empty:
            expert, weights = cls.load_empty(e.path, dtype=dtype, **options)
        elif e.path is not None and load_weights:
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
    return expert, weights


def build_stitcher_to_shard(cfg: DictConfig) -> tuple[Stitcher, dict]:
    """The Stitcher for FSDP2, and ``{side: FolderWeights}``: each expert with a ``path`` (and a family
    that offers ``load_empty``) has its parameters on the meta device, to be loaded shard by shard by
    ``StitchModule.configure_model``; preset experts and connectors are built as ``build_stitcher``
    builds them. Inserted blocks and k/v injection start from the experts' weights: such stitches,
    like families without ``load_empty``, are built whole."""
    if cfg.stitch.depth.mode != "none" or to_container(cfg.stitch.inject):
        return build_stitcher(cfg), {}
    built, weights = {}, {}
    for side in ("a", "b"):
        built[side], w = _build_expert(cfg, side, empty=True)
        if w is not None:
            weights[side] = w
            built[side]._execution_device = torch.device("cpu")  # until its shards load: batches are made on the host
    return build_stitcher(cfg, device="cpu", experts=(built["a"], built["b"])), weights


def build_stitcher(cfg: DictConfig, device=None, load_weights: bool = True, experts: tuple | None = None) -> Stitcher:
    a, b = experts or (build_expert(cfg, "a", device, load_weights), build_expert(cfg, "b", device, load_weights))
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
