"""What a training run shows on screen: ``step N/M``, each modality's loss, no library chatter.

Lightning's rich bar counts batches of an "epoch" (``Epoch 0/-2``, ``12/12``), adds ``v_num`` and
shows every logged value; soe trains by steps, so the bar shows the optimizer step out of
``trainer.max_steps`` (also after a resume) and the per-modality flow losses. The balanced sum
(``loss``) still goes to the CSV/TensorBoard logs, but it is not what tells a user whether both
modalities learn, so it is not on the bar.
"""
from __future__ import annotations

import logging
import warnings

from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.callbacks.progress.rich_progress import CustomBarColumn, CustomTimeColumn
from rich.progress import TextColumn

# Messages of torch, diffusers and Lightning that say nothing actionable to an soe user.
_NOISE = (
    (FutureWarning, r".*torch\.nn\.utils\.weight_norm.* is deprecated"),  # diffusers' Oobleck codec
    (UserWarning, r".*Checkpoint directory .* exists and is not empty"),  # soe's own run-folder check decides
    (UserWarning, r".*does not have many workers"),  # synthetic data and cached latents are in memory
    (UserWarning, r".*Precision.*is not supported by the model summary"),
    # soe trains by steps: a run shorter than the log interval just logs no loss rows (its end says "no plot")
    (UserWarning, r".*number of training batches .* is smaller than the logging interval"),
)


def quiet_libraries() -> None:
    """Silence Lightning's banners and tips ("GPU available", litlogger tips, "`Trainer.fit` stopped")
    and known harmless warnings, for this process. soe's own messages are unaffected."""
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero",
                 "lightning.pytorch.accelerators.cuda", "lightning.fabric.utilities.distributed"):
        logging.getLogger(name).setLevel(logging.WARNING)
    for category, pattern in _NOISE:
        warnings.filterwarnings("ignore", message=pattern, category=category)


class StepProgressBar(RichProgressBar):
    """``step N/M``, a bar, elapsed/remaining time and ``video 0.412  audio 0.097`` (per-modality losses)."""

    def configure_columns(self, trainer) -> list:  # Lightning appends the metrics column
        return [TextColumn("[progress.description]{task.description}"),
                CustomBarColumn(complete_style=self.theme.progress_bar, finished_style=self.theme.progress_bar_finished,
                                pulse_style=self.theme.progress_bar_pulse),
                CustomTimeColumn(style=self.theme.time)]

    @property
    def total_train_batches(self):
        return self.trainer.max_steps

    def _get_train_description(self, current_epoch: int) -> str:
        return f"step {self.trainer.global_step}/{self.trainer.max_steps}"

    def on_train_epoch_start(self, trainer, pl_module):
        super().on_train_epoch_start(trainer, pl_module)
        self._update(self.train_progress_bar_id, trainer.global_step)  # a resumed run starts part-way

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.is_disabled:
            return
        if self.train_progress_bar_id is None:
            self._initialize_train_progress_bar_id()
        if self.progress is not None:
            self.progress.update(self.train_progress_bar_id, completed=trainer.global_step,
                                 description=self._get_train_description(trainer.current_epoch))
        self._update_metrics(trainer, pl_module)
        self.refresh()

    def get_metrics(self, trainer, pl_module) -> dict:
        """Only the per-modality losses (logged as ``loss_<side>_<modality>``), named by modality."""
        items = super().get_metrics(trainer, pl_module)
        return {f"{k.split('_', 2)[2]} loss": v for k, v in items.items() if k.startswith("loss_") and k.count("_") >= 2}

