"""Ctrl-C, SIGTERM or SIGUSR1 during ``soe stitch``: finish the step under way, save it, stop, and say how to resume.

While training steps run, the first SIGINT (Ctrl-C), SIGTERM (``kill``, ``scancel``, a SLURM preemption or
time limit) or SIGUSR1 (SLURM's ``--signal=USR1@<seconds>`` warning before the time limit) only asks to
stop: the run ends after the current optimizer step exactly as if ``trainer.max_steps`` had been that
step (every rank agrees on the step, so a signal that reached one rank stops them all; ``last.ckpt``
and ``trained/`` are written by the usual end-of-run code; end-of-run sampling and the sync report are
skipped). A second signal, or one before the first step or during end-of-run sampling, stops at once;
checkpoint and export writes are never cut in half (:func:`uninterrupted`), so the last checkpoint on
disk stays loadable. Either way ``run_training`` raises :class:`TrainingInterrupted` (a
``KeyboardInterrupt``) whose one-line message names the checkpoint and the command that resumes it;
``soe`` prints it and exits with status 128 + the signal's number (130 for Ctrl-C).

SIGUSR1 inside a SLURM job also requeues the job once the checkpoint is on disk (``scontrol requeue``,
:mod:`soe.train.cluster`); the requeued job runs its script again, which resumes with ``resume=true``
(docs/cluster.md). Lightning's own handlers are kept out of the way: its SLURM auto-requeue handler is
not installed where a SIGUSR1 handler exists, and its SIGTERM handler (which exits at the next batch
without a checkpoint) is replaced while training steps run.

A process that ignores one of these signals (SIGINT in a job started in the background) keeps ignoring it.
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

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)
REQUEUE_SIGNAL = signal.SIGUSR1  # Lightning's SLURMEnvironment default requeue signal too


def _name(signum) -> str:
    return "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name


def _default(signum):
    return signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL


class StopOnInterrupt(Callback):
    """The signal handlers and the step-boundary stop described in the module docstring."""

    def __init__(self, run_dir):
        self.run_dir = Path(run_dir)
        self.requested = False  # a stop signal arrived while steps were running
        self.signum: int | None = None  # the first stop signal that arrived
        self.stopped_at: int | None = None  # the step the run ended at because of it
        self._deferring = False  # True while training steps run: a first signal waits for the step's end
        self._previous: dict = {}  # signal -> the handler it had before (only those soe handles)
        self._pid = None

    # ---- the handler -------------------------------------------------------------------------------
    @contextlib.contextmanager
    def installed(self, announce: bool = True):
        """Handle the stop signals inside the block (main thread only; each signal whose handler is not
        Python's default, an ignored one included, is left alone)."""
        self._announce = announce
        if threading.current_thread() is threading.main_thread():
            self._pid = os.getpid()
            for signum in STOP_SIGNALS:
                current = signal.getsignal(signum)
                if current is _default(signum):
                    self._previous[signum] = current
                    signal.signal(signum, self._handle)
        try:
            yield self
        finally:
            for signum, previous in self._previous.items():
                signal.signal(signum, previous)
            self._previous = {}

    def _handle(self, signum, frame):
        if os.getpid() != self._pid:
            return  # a forked data-loader worker: the training process decides, the worker keeps serving
        if self.signum is None:
            self.signum = signum
        if self._deferring and not self.requested:
            self.requested = True
            if self._announce:  # os.write: never re-enters a Python stream the signal interrupted
                again = "press Ctrl-C again" if signum == signal.SIGINT else f"send {_name(signum)} again"
                os.write(2, f"\n{_name(signum)}: finishing the step under way, then saving a checkpoint "
                            f"({again} to stop at once)\n".encode())
            return
        if _Critical.depth:
            _Critical.pending = True
            return
        raise KeyboardInterrupt

    # ---- Lightning hooks -----------------------------------------------------------------------------
    def on_train_start(self, trainer, pl_module):
        """Lightning's fit put its own SIGTERM handler in front of soe's (it exits at the next batch, without a
        checkpoint): soe's comes back for the training steps; Lightning restores the one it replaced at teardown."""
        for signum in self._previous:
            if signal.getsignal(signum) is not self._handle:
                signal.signal(signum, self._handle)

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
        """The one line the user sees: which checkpoint a resume uses, and the command that resumes. On the
        requeue signal inside a SLURM job, the first rank requeues the job here, after the checkpoint is written."""
        from soe.train.checkpoint import read_checkpoint

        signum = self.signum or signal.SIGINT
        code = 128 + int(signum)
        if not getattr(self, "_announce", True):
            return TrainingInterrupted("", exit_code=code)  # another DDP rank: the first rank tells the user, once
        last = self.run_dir / "checkpoints" / "last.ckpt"
        try:
            saved = int(read_checkpoint(last)["global_step"]) if last.is_file() else None
        except Exception:  # noqa: BLE001 - unreadable (not soe's): nothing to resume from
            saved = None
        when = f"after step {self.stopped_at}" if graceful else "during training"
        if saved is None:
            return TrainingInterrupted(f"stopped by {_name(signum)} {when}; no checkpoint was written, so there is nothing "
                                       f"to resume: start the run again", exit_code=code)
        requeued = ""
        if signum == REQUEUE_SIGNAL:
            from soe.train.cluster import requeue_slurm_job, slurm_job_id

            requeued = f"; {requeue_slurm_job()}" if slurm_job_id() else ""
        return TrainingInterrupted(f"stopped by {_name(signum)} {when}; '{last}' holds step {saved}; resume with: "
                                   f"soe stitch {self.run_dir / 'recipe.yaml'} resume=true{requeued}", exit_code=code)

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
    """True once a stop signal has ended this run early (end-of-run sampling and reports are skipped)."""
    return any(isinstance(c, StopOnInterrupt) and c.stopped_at is not None for c in trainer.callbacks)
