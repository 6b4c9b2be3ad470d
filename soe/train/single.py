"""Train one expert alone under its own flow objective (pretraining, baselines).

The same FlowObjective, data modules and Lightning loop as a stitch, with one side of each batch.
"""
from __future__ import annotations

import lightning as L

from soe.flow.objective import FlowObjective
from soe.lora.task_gate import LoraTraining
from soe.plugin.expert import Expert
from soe.schema import OptimConfig
from soe.train.module import StitchModule


class ExpertModule(StitchModule):
    """A ``StitchModule`` whose model is one expert, fed the ``side`` of each paired batch."""

    def __init__(self, expert: Expert, side: str, optim: OptimConfig, max_steps: int, seed: int = 0, density: str = "logit_normal"):
        L.LightningModule.__init__(self)  # not StitchModule's: there is no Stitcher
        self.expert, self.side, self.optim, self.max_steps = expert, side, optim, max_steps
        self.objective = FlowObjective({side: expert}, density=density, seed=seed)
        self.on_nonfinite, self.skipped_steps = "stop", []  # what _check_finite reads: a bad loss stops in one line
        self.lora_training, self.context = LoraTraining(), 1  # what configure_optimizers reads: no LoRA options, no split
        self.strict_loading = False

    def training_step(self, batch, batch_idx):
        step = int(batch["step"][0])
        inputs, targets = self.objective.noised({self.side: batch[self.side]}, step=step, rank=self.global_rank)
        loss, per = self.objective({self.side: self.expert(inputs[self.side])}, targets)
        self._check_finite(per)
        self.log(f"loss_{self.side}_{self.expert.modality}", loss, prog_bar=True, batch_size=inputs[self.side]["latents"].shape[0])
        return loss

    def configure_model(self):
        return None

    def on_before_optimizer_step(self, optimizer):  # one expert on each rank: no context-parallel average
        return None


def pretrain_expert(expert: Expert, datamodule, side: str, max_steps: int, lr: float = 1e-3, warmup_steps: int = 20,
                    schedule: str = "constant", seed: int = 0, progress: bool = False, **trainer_kwargs) -> ExpertModule:
    """Fully train ``expert`` on ``datamodule``'s ``side`` latents for ``max_steps`` steps (CPU or GPU)."""
    from soe.train.progress import quiet_libraries

    quiet_libraries()
    expert.requires_grad_(True).train()
    module = ExpertModule(expert, side, OptimConfig(lr=lr, warmup_steps=warmup_steps, schedule=schedule), max_steps, seed=seed)
    trainer = L.Trainer(max_steps=max_steps, logger=False, enable_checkpointing=False, enable_progress_bar=progress,
                        enable_model_summary=False, use_distributed_sampler=False, gradient_clip_val=1.0, **trainer_kwargs)
    trainer.fit(module, datamodule=datamodule)
    expert.eval()
    return module
