"""No logged row is lost between a checkpoint and the log write that follows it.

Lightning saves the periodic checkpoint of step k+1 in ``on_train_batch_end`` of batch k and writes
that batch's log row only afterwards (``update_train_step_metrics``, the last thing a training batch
does). A kill between the two would leave a checkpoint whose resume starts at batch k+1 while no log
holds batch k. :class:`KeepLogRow` closes that window from the other side: the row about to be
written travels inside every checkpoint (as this callback's state), and a resumed run writes it
into its own log when the run's logs do not already hold that step.
"""
from __future__ import annotations

from pathlib import Path

from lightning.pytorch.callbacks import Callback


def pending_row(trainer) -> dict | None:
    """The row Lightning writes at the end of the training batch under way, as Lightning computes it
    (``_LoggerConnector.update_train_step_metrics``/``log_metrics``); None when this batch writes none."""
    from lightning.fabric.utilities.apply_func import convert_tensors_to_scalars

    connector = trainer._logger_connector
    if trainer.fit_loop._should_accumulate() or not connector.should_update_logs:
        return None
    metrics = convert_tensors_to_scalars(connector.metrics["log"])
    if not metrics:
        return None
    metrics.setdefault("epoch", trainer.current_epoch)
    return {"step": int(trainer.fit_loop.epoch_loop._batches_that_stepped), "metrics": metrics}


class KeepLogRow(Callback):
    """Each checkpoint carries the log row of the batch it is saved in (see the module docstring).

    Runs before the checkpoint callbacks in ``on_train_batch_end`` (Lightning moves those last)."""

    def __init__(self, run_dir):
        self.run_dir = Path(run_dir)
        self._row: dict | None = None  # the current batch's row, not yet written by Lightning
        self._restored: dict | None = None  # from the checkpoint a resumed run starts from

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._row = None  # the previous batch's row is written by now

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._row = pending_row(trainer)

    def on_train_end(self, trainer, pl_module):
        self._row = None  # the last batch's row is written: the final checkpoint needs none

    def state_dict(self) -> dict:
        return {"row": self._row} if self._row else {}

    def load_state_dict(self, state_dict: dict) -> None:
        self._restored = state_dict.get("row")

    def on_train_start(self, trainer, pl_module):
        row, self._restored = self._restored, None
        if row is None or not trainer.is_global_zero:
            return
        from soe.train.plots import read_run_metrics

        logged = read_run_metrics(self.run_dir)
        if any(step == row["step"] for series in logged.values() for step, _ in series):
            return  # the interrupted start wrote it after all
        for logger in trainer.loggers:
            logger.log_metrics(row["metrics"], step=row["step"])
            logger.save()
