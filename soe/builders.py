"""Recipe -> objects. The only place where recipe sections become experts, the Stitcher, what trains,
the flow objective, the data, the optimiser settings and the sampler settings.

Each section is first built as its option dataclass (:mod:`soe.schema`, checked in ``__post_init__``);
the classes below take those dataclasses or plain arguments, never the recipe.
"""
from __future__ import annotations

import dataclasses

import torch
from omegaconf import DictConfig

from soe.errors import CheckpointError, SoeError, one_line, without_loader_advice
from soe.expert import Expert
from soe.registry import get_expert
from soe.schema import (ExpertConfig, OptimConfig, Recipe, RecipeError, SampleConfig, SamplerConfig, StitchConfig, build)
from soe.stitcher import Stitcher


def recipe_options(cfg: DictConfig) -> Recipe:
    """The whole recipe as its dataclasses (every option's own checks run)."""
    return build(Recipe, cfg)


# ---- experts and the Stitcher --------------------------------------------------------------------
def build_expert(cfg: DictConfig, side: str, device=None, load_weights: bool = True) -> Expert:
    """One expert of the recipe: real weights from ``path``, else random weights of ``preset``.

    ``load_weights=False`` (meta-device inspection) builds the preset architecture only.
    """
    return _build_expert(cfg, side, device, load_weights)[0]


def _build_expert(cfg: DictConfig, side: str, device=None, load_weights: bool = True, empty: bool = False):
    """``(expert, weights)``; with ``empty`` (FSDP2) an expert from ``path`` whose family offers
    ``load_empty`` has its parameters on the meta device and ``weights`` reads its files lazily."""
    e: ExpertConfig = build(ExpertConfig, cfg.experts[side], f"experts.{side}")
    cls = get_expert(e.name)
    from_path = e.path is not None and load_weights
    weights = None
    empty = empty and cls.load_empty.__func__ is not Expert.load_empty.__func__  # the family can load lazily
    try:
        if from_path and empty:
            expert, weights = cls.load_empty(e.path, dtype=e.dtype.torch, **e.options)
        elif from_path:
            expert = cls.load(e.path, dtype=e.dtype.torch, device=device, **e.options)
        else:
            expert = cls.from_preset(e.preset, device=device, dtype=e.dtype.torch, **e.architecture, **e.options)
    except SoeError:
        raise
    except Exception as err:
        if isinstance(err, TypeError) and (not from_path or "argument" in str(err)):  # an option the expert or model does not take
            model_key = not from_path and any(f"'{k}'" in str(err) for k in e.architecture)
            raise RecipeError(f"experts.{side}.{'architecture' if model_key else 'options'}: {err}") from None
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
    s: StitchConfig = build(StitchConfig, cfg.stitch, "stitch")
    if s.depth.mode != "none" or s.inject:
        return build_stitcher(cfg), {}
    built, weights = {}, {}
    for side in ("a", "b"):
        built[side], w = _build_expert(cfg, side, empty=True)
        if w is not None:
            weights[side] = w
            built[side]._execution_device = torch.device("cpu")  # until its shards load: batches are made on the host
    return build_stitcher(cfg, device="cpu", experts=built), weights


def build_stitcher(cfg: DictConfig, device=None, load_weights: bool = True, experts: dict | None = None) -> Stitcher:
    """Both experts (``experts``: already built ones to reuse, e.g. what ``validate_recipe`` built on
    the meta device) joined as ``stitch`` says."""
    a, b = ((experts or {}).get(side) or build_expert(cfg, side, device, load_weights) for side in ("a", "b"))
    s: StitchConfig = build(StitchConfig, cfg.stitch, "stitch")
    try:
        return Stitcher(a, b, pairs=s.pairs, direction=s.direction, detach_source=s.detach_source, connector=s.connector,
                        engine=s.engine, device=device, depth=s.depth, inject=s.inject)
    except RecipeError:
        raise
    except ValueError as err:  # a tap point, attention module or copy_from the experts do not have
        raise RecipeError(f"stitch.{err}") from None


def build_codec(cfg: DictConfig, side: str, expert: Expert, device=None):
    """``experts.<side>.codec_path`` -> the expert's latent codec (its family's tiny random codec without a path)."""
    try:
        codec = expert.codec(cfg.experts[side].codec_path)
    except NotImplementedError as err:
        raise RecipeError(f"experts.{side}.codec_path: {err}") from None
    return codec.to(device) if device is not None else codec


def build_text_encoder(cfg: DictConfig, side: str, expert: Expert, device=None):
    """``experts.<side>.text_encoder_path`` -> the expert's own text encoder (prompts -> its conditioning)."""
    path = cfg.experts[side].text_encoder_path
    try:
        return expert.text_encoder(path, device=device)
    except NotImplementedError as err:
        raise RecipeError(f"experts.{side}.text_encoder_path: {err}") from None
    except (OSError, ValueError) as err:  # missing files, another model's encoder, a width the expert cannot take
        raise RecipeError(f"experts.{side}.text_encoder_path: cannot use '{path}' for expert '{expert.name}': "
                          f"{one_line(err, 300)}") from None


# ---- training ------------------------------------------------------------------------------------
def apply_training_setup(stitcher: Stitcher, cfg: DictConfig, adapters_on=None) -> dict[str, list[str]]:
    """``experts.{a,b}.train`` / ``lora``: LoRA, full or frozen per expert; connectors (and inserted
    blocks, new k/v projections) always train. Returns the LoRA target modules per side.
    ``adapters_on``: a device for real LoRA adapters on experts waiting on meta (see ``soe.lora.add_lora``)."""
    from soe.lora import set_trainable

    targets = {}
    for side in ("a", "b"):
        e: ExpertConfig = build(ExpertConfig, cfg.experts[side], f"experts.{side}")
        targets[side] = set_trainable(getattr(stitcher, side), e.train, e.lora, where=f"experts.{side}", adapters_on=adapters_on)
    _train_stitch(stitcher)
    return targets


def count_training_setup(stitcher: Stitcher, cfg: DictConfig) -> dict[str, int]:
    """:func:`apply_training_setup` for ``soe inspect``: the same modules train, but a LoRA that
    ``soe.lora.lora_parameter_count`` can count is counted instead of injected (its expert stays frozen).
    Returns the counted LoRA parameters per side (0 where none was counted)."""
    from soe.lora import lora_parameter_count, set_trainable

    counts = {}
    for side in ("a", "b"):
        e: ExpertConfig = build(ExpertConfig, cfg.experts[side], f"experts.{side}")
        expert = getattr(stitcher, side)
        n = lora_parameter_count(expert, e.lora, f"experts.{side}.lora") if e.train == "lora" else None
        if n is None:
            set_trainable(expert, e.train, e.lora, where=f"experts.{side}")
        else:
            expert.requires_grad_(False)
        counts[side] = n or 0
    _train_stitch(stitcher)
    return counts


def _train_stitch(stitcher: Stitcher) -> None:
    """Connectors (and inserted blocks, new k/v projections) always train."""
    stitcher.connectors.requires_grad_(True)
    if getattr(stitcher, "fusion", None) is not None:
        stitcher.fusion.requires_grad_(True)


def build_objective(cfg: DictConfig, stitcher: Stitcher):
    """``flow`` (+ each expert's ``flow_shift`` and ``loss_weight``) -> the FlowObjective."""
    from soe.conditioning import TaskMixture
    from soe.flow import FlowObjective

    r = recipe_options(cfg)
    experts = {"a": stitcher.a, "b": stitcher.b}
    f = r.flow
    tasks = TaskMixture(dict(f.tasks) or {"joint": 1.0}, experts, seed=r.seed, extend_seconds=f.extend_seconds)
    sides = {"a": r.experts.a, "b": r.experts.b}
    return FlowObjective(experts, timesteps=f.timesteps, density=f.density, shifts={s: e.flow_shift for s, e in sides.items()},
                         weights={s: e.loss_weight for s, e in sides.items()}, balance=f.balance, momentum=f.balance_momentum,
                         seed=r.seed, tasks=tasks)


def build_optim(cfg: DictConfig) -> OptimConfig:
    return build(OptimConfig, cfg.optim, "optim")


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


# ---- sampling ------------------------------------------------------------------------------------
def build_sample(cfg: DictConfig) -> SampleConfig:
    """The ``sample`` section: a SamplerConfig (for ``soe.sampling``) and a SpeedConfig (for ``soe.speed``) in one."""
    return build(SampleConfig, cfg.sample, "sample")


def build_sampler(cfg: DictConfig, seed_offset: int = 0) -> SamplerConfig:
    """What the joint sampler takes from ``sample``; ``seed_offset`` shifts the seed (samples during training)."""
    s = build_sample(cfg)
    return SamplerConfig(**{f.name: getattr(s, f.name) for f in dataclasses.fields(SamplerConfig)} | {"seed": s.seed + seed_offset})

