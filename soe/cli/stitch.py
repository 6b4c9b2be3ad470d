"""``soe stitch RECIPE``: recipe -> builders -> Stitcher -> Lightning -> checkpoints and exports."""
from __future__ import annotations

import warnings
from pathlib import Path

import lightning as L
from omegaconf import OmegaConf
from rich.console import Console

from soe.cli.tables import print_tables, stitch_tables
from soe.console import make_console
from soe.data.build import build_datamodule
from soe.errors import RecipeError
from soe.extras import has as has_extra
from soe.extras import missing_message
from soe.outputs import check_output
from soe.recipe.builders import build_stitcher
from soe.recipe.reading import load_recipe, to_container
from soe.recipe.validate import validate_recipe
from soe.sample.callbacks import SampleCallback, SyncReportCallback
from soe.threads import configure_threads
from soe.train.build import (apply_storage_dtypes, apply_training_setup, build_lora_training, build_objective, build_optim,
                             build_stitcher_to_shard, build_trainer, check_machine)
from soe.train.checkpoint import read_checkpoint
from soe.train.cluster import process_rank
from soe.train.interrupt import StopOnInterrupt
from soe.train.log_rows import KeepLogRow
from soe.train.module import StitchModule
from soe.train.plots import plot_losses
from soe.train.progress import quiet_libraries
from soe.train.run_folder import RunLock, check_recipe_changes
from soe.train.trained import ExportTrained


def prepare_run_dir(cfg) -> tuple[Path, str | None]:
    """The run folder, and the checkpoint to resume from. Never overwrites an earlier run by accident."""
    run_dir = Path(cfg.run_dir)
    last = run_dir / "checkpoints" / "last.ckpt"
    for p in (run_dir, *run_dir.parents):
        if p.exists() and not p.is_dir():
            raise RecipeError(f"run_dir: '{p}' is a file, expected a folder for '{run_dir}'")
    if cfg.resume:
        if not last.is_file():
            raise RecipeError(f"resume: no checkpoint to resume from at '{last}'")
        if not (run_dir / "recipe.yaml").is_file():  # the recipe a resume is compared with: without it nothing is guarded
            raise RecipeError(f"resume: '{run_dir / 'recipe.yaml'}' is missing, so the recipe cannot be compared with the "
                              "run's; put the run's recipe back (logs/version_*/recipe.yaml holds a copy)")
        check_output(run_dir, "run_dir")
        return run_dir, str(last)
    if (run_dir / "checkpoints").is_dir() and any((run_dir / "checkpoints").iterdir()):
        raise RecipeError(f"run_dir: '{run_dir}' already holds checkpoints; pass resume=true to continue it or choose another run_dir")
    if (run_dir / "trained").exists():  # a run whose checkpoints were removed still holds what it trained
        raise RecipeError(f"run_dir: '{run_dir}' already holds trained/ of an earlier run; choose another run_dir "
                          "(or move trained/ away)")
    check_output(run_dir, "run_dir")  # a folder that can be written (read-only, no permission: one line now)
    return run_dir, None


def check_parallel(cfg) -> None:
    """``parallel`` against this run's ranks (one line, exit 2): CFG parallel is sampling's; the context group
    divides ``trainer.devices x trainer.num_nodes``."""
    from soe.schema import ParallelConfig, build

    p = build(ParallelConfig, cfg.parallel, "parallel")
    if p.cfg:
        raise RecipeError("parallel.cfg: runs the two branches of classifier-free guidance of `soe generate` on two ranks; "
                          "training has no unconditional branch (set parallel.cfg=false for `soe stitch`)")
    if p.context > 1:
        devices = cfg.trainer.devices
        if not isinstance(devices, int):
            raise RecipeError(f"parallel.context: needs trainer.devices as a count of devices, got {devices!r}")
        try:
            p.data_parallel(devices * cfg.trainer.num_nodes, "trainer.devices x trainer.num_nodes")
        except RecipeError as err:
            raise RecipeError(f"parallel.{err}") from None
        if cfg.trainer.strategy not in ("ddp", "fsdp2"):
            raise RecipeError(f"parallel.context: runs under trainer.strategy ddp or fsdp2, not '{cfg.trainer.strategy}'")


def run_training(recipe, overrides=(), console: Console | None = None, progress: bool = True,
                 allow_changes=()) -> dict:
    """Train the recipe into its run folder. ``allow_changes``: recipe keys a resume may change
    beyond the free ones (see ``soe.train.run_folder``)."""
    console = console or make_console()
    cfg = load_recipe(recipe, overrides) if not OmegaConf.is_config(recipe) else recipe
    validate_recipe(cfg)
    check_machine(cfg.trainer)  # a GPU recipe on a machine without one: one line naming the key
    check_parallel(cfg)
    configure_threads(cfg.trainer.threads)
    quiet_libraries()  # Lightning's banners and tips, known harmless warnings
    if allow_changes and not cfg.resume:
        raise RecipeError(f"--allow-changes {' '.join(allow_changes)}: only a resume (resume=true) compares the recipe "
                          f"with the run's recipe.yaml; a new run has no changes to allow")
    lock = RunLock(cfg.run_dir)
    # DDP's other processes (on this node or, with trainer.num_nodes, on others) run this script under the owner's lock
    owner = process_rank(to_container(cfg.trainer.devices), cfg.trainer.num_nodes) == 0
    if owner:
        lock.check()  # a run folder in use fails now, before anything is built or written
    run_dir, resume_from = prepare_run_dir(cfg)
    if owner:
        if resume_from:
            accepted = check_recipe_changes(run_dir, cfg, allow_changes)
            for key, (old, new) in accepted.items():
                console.print(f"resume: {key} {old!r} -> {new!r}")
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    auto = cfg.stitch.pairs == "auto"
    chosen: dict = {}  # stitch.pairs: auto chosen by this start (a resume reads the run's record): written with the recipe
    if cfg.trainer.strategy == "fsdp2":  # experts from files stay on the meta device until configure_model shards them
        if auto:
            raise RecipeError("stitch.pairs: 'auto' runs both experts whole, which fsdp2 does not build; give the pairs "
                              "`soe inspect` chose as a list")
        stitcher, plan = build_stitcher_to_shard(cfg)
    else:
        from soe.data.auto_pairs import RECORD, recorded_pair_chooser

        chooser = recorded_pair_chooser(cfg, run_dir / RECORD if resume_from else None, chosen) if auto else None
        stitcher, plan = build_stitcher(cfg, auto_pairs=chooser), None
    apply_training_setup(stitcher, cfg, plan=plan)
    apply_storage_dtypes(stitcher, cfg)  # experts.<side>.storage_dtype: frozen weights in fp8
    stitcher.train()  # loaded checkpoints come back in eval mode; LoRA dropout must be live while training
    module = StitchModule(stitcher, build_objective(cfg, stitcher), build_optim(cfg), max_steps=cfg.trainer.max_steps,
                          on_nonfinite=cfg.trainer.on_nonfinite, plan=plan, context=cfg.parallel.context,
                          lora_training=build_lora_training(cfg, stitcher))
    if resume_from:  # a bad checkpoint fails here, before Lightning's loggers touch the run folder
        module.on_load_checkpoint(read_checkpoint(resume_from))
    train_modes = {s: cfg.experts[s].train for s in ("a", "b")}
    stop = StopOnInterrupt(run_dir)  # Ctrl-C: finish the step, save, say how to resume (soe/train/interrupt.py)
    callbacks = [stop, KeepLogRow(run_dir), ExportTrained(run_dir / "trained", train_modes)]
    if cfg.sample.every_n_steps or cfg.sample.at_end or cfg.sample.at_start:  # checked before the first step
        from soe.sample.generate import check_sampling

        codecs = check_sampling(stitcher, cfg)
        callbacks.append(SampleCallback(cfg, run_dir, cfg.sample.every_n_steps, cfg.sample.at_end, cfg.sample.at_start,
                                        codecs=codecs))
    if cfg.sample.sync_clips and cfg.data.kind == "synthetic":  # held-out clips exist only for the synthetic task
        callbacks.append(SyncReportCallback(cfg, run_dir, cfg.sample.sync_clips, console=console))
    datamodule = build_datamodule(cfg, stitcher)
    datamodule.ranks_per_sample = cfg.parallel.context  # the ranks of one sample read the same batches
    datamodule.setup("fit")  # a bad latent cache fails here, before anything is written
    trainer = build_trainer(cfg, run_dir, callbacks, console_progress=progress)
    datamodule.check_buckets(trainer.num_nodes * trainer.num_devices // cfg.parallel.context)  # every data rank's batch, first
    if owner != trainer.is_global_zero:  # Lightning numbered the processes otherwise than soe.train.cluster read them
        raise RecipeError(f"trainer: this process is rank {trainer.global_rank} of {trainer.world_size}, but its environment "
                          f"read as rank {process_rank(to_container(cfg.trainer.devices), cfg.trainer.num_nodes)}; "
                          f"check trainer.devices and trainer.num_nodes against the launcher's processes per node and nodes")
    # only now, with everything built, does the run folder get (re)written, under its lock
    if owner:
        lock.acquire()
        if lock.stale_holder:
            console.print(f"run_dir: took over the lock of pid {lock.stale_holder.get('pid')} on host "
                          f"{lock.stale_holder.get('host')}, which is no longer running")
    try:
        if owner:  # the run's recipe (already resolved; free text keeps its escapes), and a copy beside this start's logs
            OmegaConf.save(cfg, run_dir / "recipe.yaml")
            csv_log = trainer.loggers[0]
            csv_log.experiment  # creates this start's logs/version_N (it warns about a folder that exists)
            OmegaConf.save(cfg, Path(csv_log.log_dir) / "recipe.yaml")
            if chosen:
                from soe.data.auto_pairs import write_record

                write_record(chosen, run_dir)  # auto_pairs.json: resume, generate and export use these pairs
            print_tables(stitch_tables(stitcher), console)
        with stop.installed(announce=owner), stop.converting(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", ".*does not have many workers.*")
            warnings.filterwarnings("ignore", ".*Precision.*is not supported by the model summary.*")
            trainer.fit(module, datamodule=datamodule, ckpt_path=resume_from)
        if trainer.is_global_zero:
            png = plot_losses(run_dir, run_dir / "loss_curves.png")
            console.print(f"[green]done[/]: {trainer.global_step} steps; run folder [bold]{run_dir}[/] "
                          f"(checkpoints/, trained/, logs/, {png.name if png else 'no plot'})")
            for extra, feature in (("tensorboard", "TensorBoard logs"), ("matplotlib", "loss_curves.png")):
                if not has_extra(extra):
                    console.print(f"[yellow]note[/]: {missing_message(extra, feature)}")
    finally:
        lock.release()
    return {"run_dir": run_dir, "module": module, "trainer": trainer}
