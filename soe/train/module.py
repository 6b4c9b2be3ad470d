"""``StitchModule``: the Lightning side of a stitched model. The Stitcher is injected."""
from __future__ import annotations

import math
import warnings

import lightning as L
import torch

from soe.errors import CheckpointError, NonFiniteLossError
from soe.flow.objective import FlowObjective
from soe.lora.task_gate import LoraTraining, preservation_error
from soe.rng import stream_seed
from soe.schema import NonFinite, OptimConfig, choice
from soe.stitch.batch_check import cast_batch
from soe.stitch.stitcher import Stitcher


def lr_factor(step: int, s: OptimConfig, max_steps: int) -> float:
    """Linear warmup, then constant or cosine decay to zero at ``max_steps``."""
    if step < s.warmup_steps:
        return (step + 1) / s.warmup_steps
    if s.schedule == "cosine":
        progress = (step - s.warmup_steps) / max(1, max_steps - s.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return 1.0


class StitchModule(L.LightningModule):
    """``plan``: a ``soe.train.sharding.ShardPlan`` of what ``soe.train.build.build_stitcher_to_shard``
    left on the meta device (experts from files, connectors, LoRA adapters), filled in shard by shard
    in ``configure_model``. ``context``: ranks that share one sample (``parallel.context``): consecutive ranks, whose
    long expert's tokens ``configure_model`` splits across them (soe/stitch/context_parallel.py); they draw the same
    batch, noise and timesteps (the data-parallel rank is ``global_rank // context``)."""

    def __init__(self, stitcher: Stitcher, objective: FlowObjective, optim: OptimConfig, max_steps: int = 1000,
                 on_nonfinite: str = "stop", plan=None, context: int = 1, lora_training: LoraTraining | None = None):
        super().__init__()
        self.stitcher, self.objective, self.optim, self.max_steps = stitcher, objective, optim, max_steps
        self.context = context
        self.lora_training = lora_training or LoraTraining()  # experts.<side>.lora.{tasks, preserve, lr_scale}
        self.on_nonfinite = choice(NonFinite, on_nonfinite, "trainer.on_nonfinite")
        self._plan = plan  # None once filled in
        self.skipped_steps: list[int] = []  # steps skipped for a non-finite loss (on_nonfinite: skip)
        self.strict_loading = False  # checkpoints hold only the trainable tensors

    # ---- the step ------------------------------------------------------------------------------
    def training_step(self, batch, batch_idx):
        step = int(batch["step"][0])  # batch number from the sampler: noise is a function of data position
        # the global RNG (LoRA dropout) too, so a resumed run draws what an uninterrupted one would
        torch.manual_seed(stream_seed(self.objective.seed, "global", step, self.data_rank))
        clean = {s: cast_batch(getattr(self.stitcher, s), batch[s]) for s in ("a", "b")}
        inputs, targets = self.objective.noised(clean, step=step, rank=self.data_rank)
        saved = [b.clone() for b in self.objective.buffers()] if self.on_nonfinite == "skip" else None
        lt = self.lora_training
        lt.mark(targets["a"]["tasks"])  # lora.tasks: which samples' gradient reaches each LoRA
        source = self.objective.source_mask(inputs["a"]["latents"].shape[0], step, self.data_rank)  # flow.source_dropout
        source = None if source is None else source.to(inputs["a"]["latents"].device)
        pred_a, pred_b = self.stitcher(inputs["a"], inputs["b"], source)
        preds = {"a": pred_a, "b": pred_b}
        if self.stitcher.context is not None:  # a split sample: gradients scaled so the average over ranks is exact
            from soe.stitch.context_parallel import scale_split_gradients

            preds = scale_split_gradients(self.stitcher, preds)
        loss, per_modality = self.objective(preds, targets)
        if not self._check_finite(per_modality, saved):
            return None  # Lightning skips backward and this optimizer step
        if lt.preserve:  # lora.preserve: the same call with those LoRAs off is the target of a second term
            with torch.no_grad(), lt.off(lt.preserve):
                ref = dict(zip(("a", "b"), self.stitcher(inputs["a"], inputs["b"], source)))
            for side, weight in lt.preserve.items():
                err = preservation_error(preds[side], ref[side], targets[side], self.objective.loss_space[side])
                loss = loss + weight * self.objective.loss_scale(side) * err
                self.log(f"preserve_{side}", err, batch_size=pred_a.shape[0])
        for side, value in per_modality.items():
            self.log(f"loss_{side}_{self.objective.modality[side]}", value, prog_bar=True, batch_size=pred_a.shape[0])
        self.log("loss", loss, batch_size=pred_a.shape[0])  # the (balanced) sum: logs only; the bar shows each modality
        return loss

    @property
    def data_rank(self) -> int:
        """This rank's place among the data-parallel ranks (ranks sharing one sample draw the same data and noise)."""
        return self.global_rank // self.context

    def on_before_optimizer_step(self, optimizer):  # once per optimizer step, before gradient clipping
        split = self.stitcher.context
        if split is not None and getattr(self, "_soe_sharded", False):  # FSDP2 averaged over dp only: now over cp
            from soe.stitch.context_parallel import average_over_context

            average_over_context(self.trainable_parameters(), split)

    def _check_finite(self, losses, saved_buffers=None) -> bool:
        """True when every modality's loss is finite (on every rank). Otherwise ``stop`` raises a
        one-line error naming the modality and step; ``skip`` restores the loss-balance buffers the
        bad loss touched, warns and returns False."""
        bad = [f"{self.objective.modality[s]} loss (expert {s}) = {v.item()}" for s, v in losses.items() if not torch.isfinite(v)]
        trainer = self._trainer
        any_bad = trainer.strategy.reduce_boolean_decision(bool(bad), all=False) if trainer is not None else bool(bad)
        if not any_bad:  # one decision for all ranks, so DDP never waits on a rank that skipped
            return True
        what = "non-finite " + (", ".join(bad) if bad else "loss on another rank")
        if self.on_nonfinite == "stop":
            raise NonFiniteLossError(f"{what} at step {self.global_step}; training stopped "
                                     "(trainer.on_nonfinite=skip skips such steps instead)")
        for buf, old in zip(self.objective.buffers(), saved_buffers or []):
            buf.copy_(old)
        self.skipped_steps.append(self.global_step)
        warnings.warn(f"{what} at step {self.global_step}: skipped this optimizer step (trainer.on_nonfinite=skip)", RuntimeWarning)
        return False

    # ---- optimisation --------------------------------------------------------------------------
    def trainable_parameters(self):
        return [p for p in self.parameters() if p.requires_grad]

    def configure_optimizers(self):
        s = self.optim
        groups, rest = [], []  # lora.lr_scale: each scaled LoRA in its own group
        scaled = {side: [] for side in self.lora_training.lr_scale}
        for name, p in self.named_parameters():
            side = name.split(".")[1] if name.startswith("stitcher.") else None
            if not p.requires_grad:
                continue
            (scaled[side] if side in scaled and "lora_" in name else rest).append(p)
        groups = [{"params": rest}] + [{"params": ps, "lr": s.lr * self.lora_training.lr_scale[k]} for k, ps in scaled.items() if ps]
        opt = torch.optim.AdamW(groups, lr=s.lr, betas=tuple(s.betas), weight_decay=s.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(step, s, self.max_steps))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # ---- strategies ----------------------------------------------------------------------------
    def configure_model(self):
        """Under FSDP2 (ModelParallelStrategy): draw the connectors and LoRA adapters left on the meta
        device, shard every expert block, each expert, each connector, then load the experts built on
        the meta device one block at a time into each rank's shard (``soe.train.sharding``)."""
        mesh = getattr(self, "device_mesh", None)
        if mesh is None or getattr(self, "_soe_sharded", False):
            if self._plan and not getattr(self, "_soe_sharded", False):
                raise RuntimeError("a stitch built on the meta device needs the fsdp2 strategy to be filled in")
            self._split_context()
            return
        from soe.train.sharding import ShardPlan, materialise

        materialise(self.stitcher, self._plan or ShardPlan(), mesh["data_parallel"])
        self._plan = None
        self._soe_sharded = True
        self._split_context()

    def _split_context(self) -> None:
        """``parallel.context``: the long expert's tokens split across each group of ``context`` consecutive ranks
        (diffusers' context parallelism on a mesh ``(dp, cfg, ring, ulysses)`` laid out like Lightning's ``(dp, tp)``)."""
        if self.context == 1 or self.stitcher.context is not None:
            return
        from soe.stitch.context_parallel import split_stitcher, world_mesh

        split_stitcher(self.stitcher, world_mesh(self.context, self.device.type))

    # ---- checkpoints hold only what trains -----------------------------------------------------
    def trainable_state_dict(self) -> dict:
        names = {n for n, p in self.named_parameters() if p.requires_grad}
        return {k: v for k, v in self.state_dict().items() if k in names or k.startswith("objective.")}

    def on_save_checkpoint(self, checkpoint):
        # the strategy's state dict, filtered: under fsdp2 it is the full one gathered on rank 0 (one file, written
        # atomically like every other checkpoint), where this module's own state_dict() would be its local shards
        names = {n for n, p in self.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in names or k.startswith("objective.")}
        checkpoint["soe"] = {"trainable_keys": sorted(checkpoint["state_dict"])}

    def on_load_checkpoint(self, checkpoint):
        if "state_dict" not in checkpoint and "soe" in checkpoint:
            return  # fsdp2: the strategy took the tensors out to load them into the shards (soe stitch checked the file first)
        mine, theirs = self.trainable_state_dict(), checkpoint.get("state_dict", {})
        if set(theirs) != set(mine):
            missing, extra = sorted(set(mine) - set(theirs))[:3], sorted(set(theirs) - set(mine))[:3]
            raise CheckpointError(f"checkpoint does not match this recipe's trainable tensors: missing {missing}, unexpected {extra}")
        for k, v in mine.items():  # plain tensors only: sharded (DTensor) states are checked by their strategy
            w = theirs[k]
            if type(v) is torch.Tensor and type(w) is torch.Tensor and v.shape != w.shape:
                raise CheckpointError(f"checkpoint tensor '{k}' has shape {list(w.shape)}, this recipe's has {list(v.shape)}")
