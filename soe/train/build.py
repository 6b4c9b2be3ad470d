"""Recipe -> what a training run is made of: the Stitcher to shard (FSDP2), what trains (LoRA, full or
frozen per expert; connectors always), fp8 storage of frozen layers, the flow objective, the optimiser
settings, and the Lightning Trainer with its strategy. Experts and the Stitcher come from
:mod:`soe.recipe.builders`; each section is first built as its option dataclass (:mod:`soe.schema`).
"""
from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig

from soe.errors import RecipeError, one_line
from soe.recipe.builders import build_expert_with_weights, build_stitcher, recipe_options
from soe.schema import ExpertConfig, OptimConfig, StitchConfig, build
from soe.stitch.stitcher import Stitcher


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
        built[side], w = build_expert_with_weights(cfg, side, empty=True)
        if w is not None:
            plan.weights[side] = w
            built[side]._execution_device = torch.device("cpu")  # until its shards load: batches are made on the host
    hosts = {"a_to_b": "b", "b_to_a": "a"}
    if any(v.mode == "attention_kv" and hosts[d] not in plan.weights for d, v in s.inject.items()):
        torch.set_rng_state(before)  # k/v copied from a preset host: everything whole, drawn as build_stitcher draws
        return build_stitcher(cfg), ShardPlan()
    plan.rng_state = torch.get_rng_state()  # where build_stitcher draws the connectors
    return build_stitcher(cfg, device="meta", experts=built), plan


def apply_training_setup(stitcher: Stitcher, cfg: DictConfig, plan=None) -> dict[str, list[str]]:
    """``experts.{a,b}.train`` / ``lora``: LoRA, full or frozen per expert; connectors (and inserted
    blocks, new k/v projections) always train. Returns the LoRA target modules per side.
    ``plan`` (FSDP2, from :func:`build_stitcher_to_shard`): LoRA adapters are left on the meta device
    and noted in the plan, to be drawn after the connectors when the Stitcher is sharded."""
    from soe.lora.adapters import set_trainable

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
    ``soe.lora.adapters.lora_parameter_count`` can count is counted instead of injected (its expert stays frozen).
    Returns the counted LoRA parameters per side (0 where none was counted)."""
    from soe.lora.adapters import lora_parameter_count, set_trainable

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


def build_lora_training(cfg: DictConfig, stitcher: Stitcher):
    """``experts.<side>.lora.{tasks, preserve, lr_scale}`` of the sides that train a LoRA -> a
    ``soe.lora.task_gate.LoraTraining`` (hooks on those LoRAs where ``tasks`` or ``preserve`` is set)."""
    from soe.flow.conditioning import TASKS
    from soe.lora.task_gate import LoraGate, LoraTraining

    r = recipe_options(cfg)
    drawn = {t for t, w in (dict(r.flow.tasks) or {"joint": 1.0}).items() if w > 0}
    out = LoraTraining()
    for side in ("a", "b"):
        e: ExpertConfig = getattr(r.experts, side)
        if e.train != "lora":
            continue
        key = f"experts.{side}.lora"
        for name in ("tasks", "off_tasks"):
            unknown = [t for t in getattr(e.lora, name) or [] if t not in TASKS]
            if unknown:
                raise RecipeError(f"{key}.{name}: unknown task '{unknown[0]}'; expected some of {list(TASKS)}")
        if e.lora.tasks is not None and not drawn & set(e.lora.tasks):
            raise RecipeError(f"{key}.tasks: none of {list(e.lora.tasks)} is drawn by flow.tasks {sorted(drawn)}: "
                              "the LoRA would never learn")
        if e.lora.tasks is not None or e.lora.preserve > 0 or e.lora.off_tasks:
            out.gates[side] = LoraGate(getattr(stitcher, side), None if e.lora.tasks is None else list(e.lora.tasks),
                                       e.lora.off_tasks)
        if e.lora.preserve > 0:
            out.preserve[side] = float(e.lora.preserve)
        if e.lora.lr_scale != 1.0:
            out.lr_scale[side] = float(e.lora.lr_scale)
    return out


def build_objective(cfg: DictConfig, stitcher: Stitcher):
    """``flow`` (+ each expert's ``flow_shift`` and ``loss_weight``) -> the FlowObjective."""
    from soe.flow.conditioning import TaskMixture
    from soe.flow.objective import FlowObjective

    r = recipe_options(cfg)
    experts = {"a": stitcher.a, "b": stitcher.b}
    f = r.flow
    tasks = TaskMixture(dict(f.tasks) or {"joint": 1.0}, experts, seed=r.seed, extend_seconds=f.extend_seconds)
    sides = {"a": r.experts.a, "b": r.experts.b}
    return FlowObjective(experts, timesteps=f.timesteps, density=f.density, shifts={s: e.flow_shift for s, e in sides.items()},
                         weights={s: e.loss_weight for s, e in sides.items()}, balance=f.balance, momentum=f.balance_momentum,
                         seed=r.seed, tasks=tasks, source_dropout=f.source_dropout)


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


def check_machine(trainer_cfg) -> None:
    """``trainer.accelerator`` / ``trainer.devices`` against this machine, one line naming the key (before anything
    is built or written; Lightning's own errors name no key)."""
    import torch

    from soe.schema.base import device_problem

    device = {"gpu": "cuda", "cuda": "cuda", "mps": "mps"}.get(trainer_cfg.accelerator)
    if device is None:
        return
    problem = device_problem(device)
    if problem is not None:
        raise RecipeError(f"trainer.accelerator: {problem.replace(repr(device), repr(trainer_cfg.accelerator), 1)}")
    count = torch.cuda.device_count() if device == "cuda" else 1
    if isinstance(trainer_cfg.devices, int) and trainer_cfg.devices > count:
        raise RecipeError(f"trainer.devices: expected at most {count} (the {device} devices of this machine), got "
                          f"{trainer_cfg.devices}")


def build_strategy(name: str, devices, num_nodes: int, context: int = 1):
    """``trainer.strategy`` -> what ``L.Trainer(strategy=)`` takes (fsdp2: Lightning's ModelParallelStrategy, its
    ``data_parallel`` dimension the data-parallel ranks, its second dimension the ``parallel.context`` ranks of a sample)."""
    if name == "fsdp2":  # per-parameter sharding (torch fully_shard) through Lightning's ModelParallelStrategy
        from lightning.pytorch.strategies import ModelParallelStrategy

        if not isinstance(devices, int):
            raise RecipeError("trainer.devices: strategy 'fsdp2' needs a device count (an integer), not a list or 'auto'")
        # one checkpoint file gathered on rank 0 (trainable tensors only): written atomically and resumed exactly like ddp's
        return ModelParallelStrategy(data_parallel_size=devices * num_nodes // context, tensor_parallel_size=context,
                                     save_distributed_checkpoint=False)
    return name


def build_trainer(cfg: DictConfig, run_dir: Path, callbacks: list, console_progress: bool = True):
    """``trainer`` (+ ``optim.grad_clip``) -> the ``L.Trainer`` of a run in ``run_dir``: checkpoints
    written atomically (``trained/`` follows each), CSV (and TensorBoard) logs, the step bar."""
    import lightning as L
    from lightning.fabric.utilities.exceptions import MisconfigurationException
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    from soe.console import console_kwargs
    from soe.extras import has as has_extra
    from soe.recipe.reading import to_container
    from soe.train.checkpoint import AtomicCheckpointIO, RunCheckpoint
    from soe.train.progress import StepProgressBar
    from soe.train.trained import ExportTrained

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
            strategy=build_strategy(t.strategy, to_container(t.devices), t.num_nodes, cfg.parallel.context),
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

