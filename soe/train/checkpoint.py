"""Nothing is lost: atomic checkpoint files (what trained goes to ``trained/``: :mod:`soe.train.trained`).

* ``AtomicCheckpointIO``: Lightning checkpoints are written to a temporary file, fsynced, then
  renamed over the target, so a kill mid-write leaves the previous checkpoint intact. They are read
  back with ``torch.load(weights_only=True)`` only: a checkpoint is data, never code.
"""
from __future__ import annotations

import contextlib
import os
import pickle
import re
import tempfile
from pathlib import Path

import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

from soe.errors import DISK_FULL_ERRNOS, CheckpointError, DiskFullError, one_line
from soe.train.critical import uninterrupted


class AtomicCheckpointIO(TorchCheckpointIO):
    """``after_save``: callables run with the path once a checkpoint file is complete on disk."""

    def __init__(self):
        super().__init__()
        self.after_save: list = []

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        path = Path(path)
        with uninterrupted(), _disk_full_errors(f"checkpoint '{path}'", "the previous checkpoint is intact"):
            self._write(checkpoint, path)
        for hook in self.after_save:
            hook(path)

    def _write(self, checkpoint, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        for stale in path.parent.glob(f".{path.name}.*"):  # left by a writer killed mid-write
            stale.unlink(missing_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def load_checkpoint(self, path, map_location=lambda storage, loc: storage, weights_only=None):
        """Always ``weights_only=True`` (whatever Lightning asks): a pickle that would run code is refused."""
        with _one_line_errors(path):
            return super().load_checkpoint(path, map_location=map_location, weights_only=True)


def read_checkpoint(path, mmap: bool = True) -> dict:
    """A Lightning checkpoint read as ``AtomicCheckpointIO`` does; ``mmap``: tensors stay on disk until used,
    so checking a resume checkpoint before training costs next to nothing."""
    with _one_line_errors(path):
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)


@contextlib.contextmanager
def _one_line_errors(path):
    try:
        yield
    except pickle.UnpicklingError as e:
        found = re.search(r"(Unsupported global: GLOBAL \S+|Unsupported operand \S+)", str(e))
        raise CheckpointError(f"checkpoint '{path}' refused: it pickles more than tensors and plain containers "
                              f"({found.group(1) if found else one_line(e, 120)})") from None
    except Exception as e:  # truncated or not a checkpoint: one line naming the file
        raise CheckpointError(f"checkpoint '{path}' cannot be read safely: it is truncated or not a checkpoint written by "
                              f"soe ({one_line(e, 200)})") from None


@contextlib.contextmanager
def _disk_full_errors(what: str, intact: str):
    try:
        yield
    except OSError as e:
        if e.errno in DISK_FULL_ERRNOS:
            raise DiskFullError(f"{what}: no space left on the device ({e.strerror}); nothing was half-written, "
                                f"{intact}") from None
        raise


class RunCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` whose ``last.ckpt`` always holds the run's final step.

    Lightning's skips the final save when an earlier periodic one happened (a 45-step run saving
    every 20 would end with ``last.ckpt`` at step 40); ``save_final`` is also called by the sampling
    callback so the checkpoint is on disk before end-of-run sampling starts.
    """

    def load_state_dict(self, state_dict) -> None:
        """Resume follows the run folder wherever it now is: a folder moved (``mv``) since the checkpoint
        has its saved paths moved with it, so ``last.ckpt`` is overwritten as in place (Lightning keeps
        the old absolute ``last_model_path`` and writes ``last-v1.ckpt`` beside a stale ``last.ckpt``)."""
        old = state_dict.get("dirpath")
        if old is not None and self.dirpath is not None and old != self.dirpath:
            state_dict = {k: _moved_path(v, old, self.dirpath) for k, v in state_dict.items()}
            state_dict["best_k_models"] = {_moved_path(k, old, self.dirpath): v
                                           for k, v in (state_dict.get("best_k_models") or {}).items()}
        super().load_state_dict(state_dict)

    def save_final(self, trainer) -> None:
        if trainer.global_step == 0 or self._should_skip_saving_checkpoint(trainer):
            return  # nothing trained, or this step is already saved
        self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_train_end(self, trainer, pl_module):
        self.save_final(trainer)


def _moved_path(value, old: str, new: str):
    """``value`` with the folder ``old`` replaced by ``new`` when it is that folder or a path inside it."""
    if isinstance(value, str) and (value == old or value.startswith(old.rstrip("/") + "/")):
        return new + value[len(old):]
    return value
