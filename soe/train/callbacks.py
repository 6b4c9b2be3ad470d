"""Training callbacks: render samples (mp4 + contact sheet) into the run folder while training."""
from __future__ import annotations

from pathlib import Path

from lightning.pytorch.callbacks import Callback


class SampleCallback(Callback):
    """Every ``every_n_steps`` optimizer steps (0 = never) and/or once at the end, render the
    recipe's ``sample`` section into ``<run_dir>/samples/step-NNNNNN/``."""

    def __init__(self, cfg, run_dir, every_n_steps: int = 0, at_end: bool = False, codecs: dict | None = None):
        self.cfg, self.run_dir, self.every, self.at_end = cfg, Path(run_dir), every_n_steps, at_end
        self._codecs = codecs  # from generate.check_sampling, run before the first step

    def _render(self, trainer, pl_module):
        # every rank samples (sharded parameters are gathered in the forward); rank zero writes
        from soe.generate import load_codecs, render_samples

        if self._codecs is None:
            self._codecs = load_codecs(pl_module.stitcher, self.cfg)
        out = self.run_dir / "samples" / f"step-{trainer.global_step:06d}"
        render_samples(pl_module.stitcher, self.cfg, out, codecs=self._codecs, write=trainer.is_global_zero)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if self.every and step > 0 and step % self.every == 0 and getattr(self, "_last", None) != step:
            self._last = step
            self._render(trainer, pl_module)

    def on_train_end(self, trainer, pl_module):
        if self.at_end and getattr(self, "_last", None) != trainer.global_step:
            save_final = getattr(trainer.checkpoint_callback, "save_final", None)  # RunCheckpoint
            if save_final is not None:  # the trained state is on disk before sampling can fail or be interrupted
                save_final(trainer)
            self._render(trainer, pl_module)

