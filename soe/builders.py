"""Recipe -> objects. The only place where recipe sections become experts, the Stitcher, what trains,
the flow objective, the data, the optimiser settings, the Lightning Trainer and the sampler settings.

Each section is first built as its option dataclass (:mod:`soe.schema`, checked in ``__post_init__``);
the classes below take those dataclasses or plain arguments, never the recipe.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from omegaconf import DictConfig

from soe.errors import CheckpointError, CheckpointNotFoundError, SoeError, one_line, without_loader_advice
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


def build_stand_in(cfg: DictConfig, side: str) -> Expert | None:
    """The preset expert of ``side`` over its family's shape-only stand-in (``Expert.stand_in``), for
    ``soe inspect``; None when the family has none or the section does not build one (an unknown name,
    preset or option: building the real expert then reports it as usual). A stand-in has the model's
    modules inside the blocks only, so a LoRA with its own ``targets`` (which may name modules outside
    them) or from a file (``init_from``: the file names its modules) is counted on the real model."""
    try:
        e: ExpertConfig = build(ExpertConfig, cfg.experts[side], f"experts.{side}")
        cls = get_expert(e.name)
        if e.preset not in cls.presets or (e.train == "lora" and (e.lora.targets is not None or e.lora.init_from is not None)):
            return None
        return cls.stand_in({**cls.presets[e.preset], **e.architecture, **e.options})
    except Exception:
        return None


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
    except Exception as err:
        if isinstance(err, SoeError) and not (from_path and isinstance(err, CheckpointNotFoundError)):
            raise  # a missing checkpoint is reported below, under its recipe key
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


def build_stitcher_to_shard(cfg: DictConfig):
    """The Stitcher for FSDP2 and a ``soe.train.sharding.ShardPlan`` of what waits on the meta device
    for ``StitchModule.configure_model``: each expert with a ``path`` (and a family that offers
    ``load_empty``), read shard by shard from its files, and every connector, drawn again there from
    the RNG state recorded here (so its values equal :func:`build_stitcher`'s). Pass the plan to
    :func:`apply_training_setup` to leave the LoRA adapters on the meta device too. Inserted blocks
    (``depth``) and k/v injection's new projections (``inject``) wait on the meta device too: read
    from the files (an inserted block as the mean of its neighbours) and drawn after the connectors.
    Preset experts are built whole (their random weights are drawn as one model); a k/v injection
    into a preset expert copies its weights: such a stitch is built whole (an empty plan)."""
    from soe.train.sharding import ShardPlan

    s: StitchConfig = build(StitchConfig, cfg.stitch, "stitch")
    before = torch.get_rng_state()
    built, plan = {}, ShardPlan()
    for side in ("a", "b"):
        built[side], w = _build_expert(cfg, side, empty=True)
        if w is not None:
            plan.weights[side] = w
            built[side]._execution_device = torch.device("cpu")  # until its shards load: batches are made on the host
    hosts = {"a_to_b": "b", "b_to_a": "a"}
    if any(v.mode == "attention_kv" and hosts[d] not in plan.weights for d, v in s.inject.items()):
        torch.set_rng_state(before)  # k/v copied from a preset host: everything whole, drawn as build_stitcher draws
        return build_stitcher(cfg), ShardPlan()
    plan.rng_state = torch.get_rng_state()  # where build_stitcher draws the connectors
    return build_stitcher(cfg, device="meta", experts=built), plan


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
def apply_training_setup(stitcher: Stitcher, cfg: DictConfig, plan=None) -> dict[str, list[str]]:
    """``experts.{a,b}.train`` / ``lora``: LoRA, full or frozen per expert; connectors (and inserted
    blocks, new k/v projections) always train. Returns the LoRA target modules per side.
    ``plan`` (FSDP2, from :func:`build_stitcher_to_shard`): LoRA adapters are left on the meta device
    and noted in the plan, to be drawn after the connectors when the Stitcher is sharded."""
    from soe.lora import set_trainable

    defer = plan is not None and plan.rng_state is not None
    targets = {}
    for side in ("a", "b"):
        e: ExpertConfig = build(ExpertConfig, cfg.experts[side], f"experts.{side}")
        targets[side] = set_trainable(getattr(stitcher, side), e.train, e.lora, where=f"experts.{side}", defer=defer)
        if defer and e.train == "lora":
            plan.lora[side] = e.lora
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


def apply_storage_dtypes(stitcher: Stitcher, cfg: DictConfig) -> dict[str, list[str]]:
    """``experts.<side>.storage_dtype``: frozen layers stored in fp8 (``soe.train.storage``), after LoRA
    is set up (so trainable layers are known). Returns the stored layers' names per side."""
    out = {}
    for side in ("a", "b"):
        e: ExpertConfig = build(ExpertConfig, cfg.experts[side], f"experts.{side}")
        if e.storage_dtype is not None:
            from soe.train.storage import store_frozen_in

            expert = getattr(stitcher, side)
            out[side] = store_frozen_in(expert.model, e.storage_dtype, expert.dtype)
    return out


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


# ---- Lightning -----------------------------------------------------------------------------------
def build_strategy(name: str, devices, num_nodes: int):
    """``trainer.strategy`` -> what ``L.Trainer(strategy=)`` takes (fsdp2: Lightning's ModelParallelStrategy)."""
    if name == "fsdp2":  # per-parameter sharding (torch fully_shard) through Lightning's ModelParallelStrategy
        from lightning.pytorch.strategies import ModelParallelStrategy

        if not isinstance(devices, int):
            raise RecipeError("trainer.devices: strategy 'fsdp2' needs a device count (an integer), not a list or 'auto'")
        return ModelParallelStrategy(data_parallel_size=devices * num_nodes, tensor_parallel_size=1)
    return name


def build_trainer(cfg: DictConfig, run_dir: Path, callbacks: list, console_progress: bool = True):
    """``trainer`` (+ ``optim.grad_clip``) -> the ``L.Trainer`` of a run in ``run_dir``: checkpoints
    written atomically (``trained/`` follows each), CSV (and TensorBoard) logs, the step bar."""
    import lightning as L
    from lightning.fabric.utilities.exceptions import MisconfigurationException
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    from soe.config import to_container
    from soe.console import console_kwargs
    from soe.extras import has as has_extra
    from soe.train.checkpoint import AtomicCheckpointIO, ExportTrained, RunCheckpoint
    from soe.train.progress import StepProgressBar

    t = cfg.trainer
    io = AtomicCheckpointIO()
    for callback in callbacks:
        if isinstance(callback, ExportTrained):  # trained/ follows each checkpoint once it is on disk
            callback.attach(io)
    ckpt = RunCheckpoint(dirpath=run_dir / "checkpoints", filename="step-{step:06d}", auto_insert_metric_name=False,
                           every_n_train_steps=t.checkpoint_every_n_steps, save_last=True, save_top_k=-1)
    # every logged row reaches the disk at once: a killed run keeps the losses of the steps it made
    loggers = [CSVLogger(run_dir, name="logs", flush_logs_every_n_steps=1)]
    if has_extra("tensorboard"):
        loggers.append(TensorBoardLogger(run_dir, name="tensorboard", version=""))
    progress = [StepProgressBar(refresh_rate=max(1, t.log_every_n_steps // 2), leave=True, console_kwargs=console_kwargs())] if console_progress else []
    try:
        return L.Trainer(
            max_steps=t.max_steps,
            accelerator=t.accelerator,
            devices=to_container(t.devices),
            num_nodes=t.num_nodes,
            strategy=build_strategy(t.strategy, to_container(t.devices), t.num_nodes),
            precision=t.precision,
            accumulate_grad_batches=t.accumulate_grad_batches,
            log_every_n_steps=t.log_every_n_steps,
            gradient_clip_val=cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else None,
            callbacks=[ckpt, *progress, *callbacks],
            logger=loggers,
            plugins=[io],
            default_root_dir=run_dir,
            enable_progress_bar=console_progress,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            use_distributed_sampler=False,  # StepBatchSampler slices batches per rank itself
            **to_container(t.extra),
        )
    except RecipeError:
        raise
    except (MisconfigurationException, ValueError, TypeError) as e:  # a strategy, precision, device, accelerator
        raise RecipeError(f"trainer: {one_line(e, 300)}") from None  # or extra argument Lightning cannot use here


# ---- sampling ------------------------------------------------------------------------------------
def build_sample(cfg: DictConfig) -> SampleConfig:
    """The ``sample`` section: a SamplerConfig (for ``soe.sampling``) and a SpeedConfig (for ``soe.speed``) in one."""
    return build(SampleConfig, cfg.sample, "sample")


def build_sampler(cfg: DictConfig, seed_offset: int = 0) -> SamplerConfig:
    """What the joint sampler takes from ``sample``; ``seed_offset`` shifts the seed (samples during training)."""
    s = build_sample(cfg)
    return SamplerConfig(**{f.name: getattr(s, f.name) for f in dataclasses.fields(SamplerConfig)} | {"seed": s.seed + seed_offset})

