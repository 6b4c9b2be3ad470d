"""Training callbacks: render samples (mp4 + contact sheet) and report sync while training."""
from __future__ import annotations

import json
from pathlib import Path

from lightning.pytorch.callbacks import Callback

from soe.train.interrupt import interrupted


class SampleCallback(Callback):
    """Every ``every_n_steps`` optimizer steps (0 = never), before the first step (``at_start``) and/or
    once at the end, render the recipe's ``sample`` section into ``<run_dir>/samples/step-NNNNNN/``.
    With both ``at_start`` and ``at_end``, ``samples/before_after.png`` stacks the first and last sheets."""

    def __init__(self, cfg, run_dir, every_n_steps: int = 0, at_end: bool = False, at_start: bool = False,
                 codecs: dict | None = None):
        self.cfg, self.run_dir, self.every, self.at_end, self.at_start = cfg, Path(run_dir), every_n_steps, at_end, at_start
        self._codecs = codecs  # from generate.check_sampling, run before the first step
        self._last = None
        self._first_sheet = None

    def _render(self, trainer, pl_module) -> Path:
        # every rank samples (sharded parameters are gathered in the forward); rank zero writes
        from soe.sample.generate import load_codecs, render_samples, sheet_title

        if self._codecs is None:
            self._codecs = load_codecs(pl_module.stitcher, self.cfg)
        step = trainer.global_step
        out = self.run_dir / "samples" / f"step-{step:06d}"
        render_samples(pl_module.stitcher, self.cfg, out, codecs=self._codecs, write=trainer.is_global_zero,
                       title=sheet_title(self.cfg.sample.prompt, step, self.run_dir))
        self._last = step
        if self.cfg.sample.eval and trainer.is_global_zero:
            self._evaluate(trainer, out, step)
        return out / "sample_00.png"

    def _evaluate(self, trainer, out: Path, step: int) -> None:
        """``sample.eval``: the `soe eval` metrics of this render's mp4s, their mean logged as ``eval/<name>``."""
        import numpy as np

        from soe.evaluate.run import CPU_METRICS
        from soe.evaluate.decode import decode_clip

        clips = [decode_clip(p.stem, p) for p in sorted(out.glob("sample_*.mp4"))]
        values = {f"eval/{n}": float(np.mean([CPU_METRICS[n](c) for c in clips])) for n in self.cfg.sample.eval}
        for logger in trainer.loggers:
            logger.log_metrics(values, step=step)

    def on_train_start(self, trainer, pl_module):
        if self.at_start and trainer.global_step == 0:
            self._first_sheet = self._render(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if self.every and step > 0 and step % self.every == 0 and self._last != step and not interrupted(trainer):
            self._render(trainer, pl_module)

    def on_train_end(self, trainer, pl_module):
        if not self.at_end or interrupted(trainer):  # Ctrl-C: the user wants the run to end, not to sample
            return
        last = self.run_dir / "samples" / f"step-{trainer.global_step:06d}" / "sample_00.png"
        if self._last != trainer.global_step:
            save_final = getattr(trainer.checkpoint_callback, "save_final", None)  # RunCheckpoint
            if save_final is not None:  # the trained state is on disk before sampling can fail or be interrupted
                save_final(trainer)
            last = self._render(trainer, pl_module)
        if self._first_sheet is not None and trainer.is_global_zero and self._first_sheet != last:
            stack_images([self._first_sheet, last], self.run_dir / "samples" / "before_after.png")


def stack_images(pngs: list[Path], out: Path) -> Path:
    """One PNG of ``pngs`` stacked top to bottom (contact sheets of the same size)."""
    import numpy as np
    from PIL import Image

    images = [np.asarray(Image.open(p).convert("RGB")) for p in pngs]
    width = max(i.shape[1] for i in images)
    images = [np.pad(i, ((0, 0), (0, width - i.shape[1]), (0, 0)), constant_values=255) for i in images]
    Image.fromarray(np.concatenate(images, axis=0)).save(out)
    return out


class SyncReportCallback(Callback):
    """AV-Align of the stitched model on ``n`` held-out synthetic clips, before the first step (the
    experts alone: connectors start at zero) and after the last; printed as a table, saved as ``sync.json``."""

    def __init__(self, cfg, run_dir, n: int, console=None):
        self.cfg, self.run_dir, self.n, self.console = cfg, Path(run_dir), n, console
        self.scores: dict[str, dict] = {}

    def _score(self, trainer, pl_module, label: str) -> None:
        import torch

        from soe.evaluate import sync_eval
        from soe.recipe.builders import build_sampler
        from soe.sample.sampler import sample_stitched

        st = pl_module.stitcher
        experts = {"a": st.a, "b": st.b}
        seconds = self.cfg.sample.seconds or self.cfg.data.seconds
        cond, truth = sync_eval.held_out(experts, seconds, self.n, self.cfg.seed)
        if "truth" not in self.scores:
            self.scores["truth"] = {"step": None, "sync": sync_eval.sync_score(truth, experts, seconds)}
        was_training = st.training
        st.eval()
        try:
            with torch.no_grad():
                cond = {s: {k: v.to(experts[s].device) for k, v in c.items()} for s, c in cond.items()}
                latents = sample_stitched(st, cond, seconds, build_sampler(self.cfg))
        finally:
            st.train(was_training)
        latents = {s: v.float().cpu() for s, v in latents.items()}
        self.scores[label] = {"step": trainer.global_step, "sync": sync_eval.sync_score(latents, experts, seconds),
                              "frechet": sync_eval.frechet(latents, truth, experts, seconds)}

    def on_train_start(self, trainer, pl_module):
        if trainer.global_step == 0:
            self._score(trainer, pl_module, "experts alone")

    def on_train_end(self, trainer, pl_module):
        if interrupted(trainer):
            return
        self._score(trainer, pl_module, "stitched")
        if trainer.is_global_zero:
            (self.run_dir / "sync.json").write_text(json.dumps({"clips": self.n, **self.scores}, indent=1))
            if self.console is not None:
                self.console.print(self.table())

    def table(self):
        from rich.table import Table

        from soe.evaluate.sync_eval import HELD_OUT_SEED_OFFSET

        t = Table(title=f"audio-visual sync on {self.n} held-out clips (AV-Align: 1 = a click at every bounce and nowhere else; "
                        f"Frechet: distance to the true clips' features; clip seed {self.cfg.seed + HELD_OUT_SEED_OFFSET})")
        if self.n < 96:  # docs/evidence.md: on 12 draws of 8 clips the experts' audio Frechet alone ran 0.05 to 4.05
            t.caption = (f"Frechet distances of {self.n} clips swing several-fold from one draw of clips to the next; "
                         "compare them over 96 or more (benchmarks/sync_noise.py RUN --clips 96; docs/evidence.md)")
        t.add_column("model")  # the one column that may wrap (between words) on a narrow terminal
        for col in ("step", "AV-Align", "Frechet video", "Frechet audio"):
            t.add_column(col, no_wrap=True, justify="right")
        names = {"experts alone": "experts alone (untrained connectors)", "stitched": "stitched",
                 "truth": "ground truth clips"}
        for key in ("experts alone", "stitched", "truth"):
            if key in self.scores:
                r = self.scores[key]
                f = r.get("frechet", {})
                t.add_row(names[key], "" if r["step"] is None else str(r["step"]), f"{r['sync']:.3f}",
                          f"{f['video']:.3f}" if f else "0", f"{f['audio']:.3f}" if f else "0")
        return t
