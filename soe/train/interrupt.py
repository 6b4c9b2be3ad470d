"""Ctrl-C during ``soe stitch``: finish the step under way, save it, stop, and say how to resume.

While training steps run, the first SIGINT only asks to stop: the run ends after the current
optimizer step exactly as if ``trainer.max_steps`` had been that step (every rank agrees on the
step; ``last.ckpt`` and ``trained/`` are written by the usual end-of-run code; end-of-run sampling
and the sync report are skipped). A second Ctrl-C, or one before the first step or during
end-of-run sampling, stops at once; checkpoint and export writes are never cut in half
(:func:`uninterrupted`), so the last checkpoint on disk stays loadable. Either way ``run_training``
raises :class:`TrainingInterrupted` (a ``KeyboardInterrupt``) whose one-line message names the
checkpoint and the command that resumes it; ``soe`` prints it and exits with status 130.

A process that ignores SIGINT (started in the background) keeps ignoring it.
"""
from __future__ import annotations

import contextlib
import os
import signal
import threading
from pathlib import Path

from lightning.pytorch.callbacks import Callback

from soe.errors import TrainingInterrupted
from soe.train.critical import _Critical


class StopOnInterrupt(Callback):
    """The SIGINT handler and the step-boundary stop described in the module docstring."""

    def __init__(self, run_dir):
        self.run_dir = Path(run_dir)
        self.requested = False  # a Ctrl-C arrived while steps were running
        self.stopped_at: int | None = None  # the step the run ended at because of it
        self._deferring = False  # True while training steps run: a first Ctrl-C waits for the step's end
        self._previous = None
        self._pid = None

    # ---- the handler -------------------------------------------------------------------------------
    @contextlib.contextmanager
    def installed(self, announce: bool = True):
        """Handle SIGINT inside the block (main thread only; a process ignoring SIGINT keeps ignoring it)."""
        self._announce = announce
        current = signal.getsignal(signal.SIGINT)
        install = threading.current_thread() is threading.main_thread() and current is signal.default_int_handler
        if install:
            self._previous, self._pid = current, os.getpid()
            signal.signal(signal.SIGINT, self._handle)
        try:
            yield self
        finally:
            if install:
                signal.signal(signal.SIGINT, self._previous)

    def _handle(self, signum, frame):
        if os.getpid() != self._pid:
            return  # a forked data-loader worker: the training process decides, the worker keeps serving
        if self._deferring and not self.requested:
            self.requested = True
            if self._announce:  # os.write: never re-enters a Python stream the signal interrupted
                os.write(2, b"\nCtrl-C: finishing the step under way, then saving a checkpoint "
                            b"(press Ctrl-C again to stop at once)\n")
            return
        if _Critical.depth:
            _Critical.pending = True
            return
        raise KeyboardInterrupt

    # ---- Lightning hooks -----------------------------------------------------------------------------
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._deferring = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.stopped_at is not None or trainer.fit_loop._should_accumulate():
            return  # stop only where an optimizer step is complete
        if trainer.strategy.reduce_boolean_decision(self.requested, all=False):  # one decision for every rank
            self.stopped_at = trainer.global_step
            trainer.fit_loop.epoch_loop.max_steps = trainer.global_step  # the run ends here, as at max_steps

    def on_train_end(self, trainer, pl_module):
        self._deferring = False  # end-of-run sampling: Ctrl-C stops at once (last.ckpt is written first)

    # ---- what the user is told ------------------------------------------------------------------------
    def error(self, graceful: bool) -> TrainingInterrupted:
        """The one line the user sees: which checkpoint a resume uses, and the command that resumes."""
        from soe.train.checkpoint import read_checkpoint

        if not getattr(self, "_announce", True):
            return TrainingInterrupted("")  # another DDP rank: the first rank tells the user, once
        last = self.run_dir / "checkpoints" / "last.ckpt"
        try:
            saved = int(read_checkpoint(last)["global_step"]) if last.is_file() else None
        except Exception:  # noqa: BLE001 - unreadable (not soe's): nothing to resume from
            saved = None
        when = f"after step {self.stopped_at}" if graceful else "during training"
        if saved is None:
            return TrainingInterrupted(f"stopped by Ctrl-C {when}; no checkpoint was written, so there is nothing to "
                                       f"resume: start the run again")
        return TrainingInterrupted(f"stopped by Ctrl-C {when}; '{last}' holds step {saved}; resume with: "
                                   f"soe stitch {self.run_dir / 'recipe.yaml'} resume=true")

    @contextlib.contextmanager
    def converting(self):
        """Run ``trainer.fit`` inside: a Ctrl-C that stopped it, gracefully or at once, leaves as TrainingInterrupted."""
        try:
            yield
        except TrainingInterrupted:
            raise
        except KeyboardInterrupt:
            raise self.error(graceful=False) from None
        except SystemExit as e:  # Lightning answers a KeyboardInterrupt with sys.exit(1)
            if isinstance(e.__context__, KeyboardInterrupt):
                raise self.error(graceful=False) from None
            raise
        if self.stopped_at is not None:
            raise self.error(graceful=True)


def interrupted(trainer) -> bool:
    """True once a Ctrl-C has ended this run early (end-of-run sampling and reports are skipped)."""
    return any(isinstance(c, StopOnInterrupt) and c.stopped_at is not None for c in trainer.callbacks)
