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
            # with held-out tasks, before_after.png is the task sheet (SyncReportCallback); the joint sheets stack here
            per_task = self.cfg.sample.sync_clips and self.cfg.data.kind == "synthetic" and (list(self.cfg.sample.sync_tasks) != ["joint"] or self.cfg.sample.sync_media)
            stack_images([self._first_sheet, last], self.run_dir / "samples" / ("joint_before_after.png" if per_task else "before_after.png"))


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
    """AV-Align of the stitched model on ``n`` held-out clips, before the first step (the experts alone:
    connectors start at zero) and after the last; printed as a table, saved as ``sync.json``.

    ``sample.sync_tasks`` beyond ``[joint]`` also samples the clips as v2a (true video given) and a2v (true
    audio given); ``sample.sync_media`` decodes every sample to mp4 under ``samples/held_out/`` and adds
    ``soe eval``'s AV-Align of those files (soe/sample/held_out_tasks.py); with either, the table has a row per
    task and model and ``samples/before_after.png`` shows the first clip per task, alone vs stitched."""

    def __init__(self, cfg, run_dir, n: int, console=None):
        self.cfg, self.run_dir, self.n, self.console = cfg, Path(run_dir), n, console
        self.scores: dict[str, dict] = {}
        self.latents: dict[str, dict] = {}  # label -> task -> latents per side (for the task sheet)
        self.tasks = list(cfg.sample.sync_tasks)
        self.per_task = self.tasks != ["joint"] or bool(cfg.sample.sync_media)

    def _score(self, trainer, pl_module, label: str) -> None:
        from soe.evaluate import sync_eval
        from soe.sample import held_out_tasks as hot

        st = pl_module.stitcher
        experts = {"a": st.a, "b": st.b}
        cond, truth, seconds = hot.held_out_clips(st, self.cfg, self.n)
        media = self.run_dir / "samples" / "held_out"
        if "truth" not in self.scores:
            self.scores["truth"] = {"step": None, "sync": sync_eval.sync_score(truth, experts, seconds)}
            self.truth, self.seconds = truth, seconds
            if self.cfg.sample.sync_media and trainer.is_global_zero:
                hot.write_media(truth, experts, media / "truth")
                self.scores["truth"]["av_align"] = hot.eval_av_align(media / "truth")
        row, tasks = {"step": trainer.global_step}, {}
        for task in self.tasks:
            latents = hot.sample_task(st, self.cfg, task, cond, truth, seconds)
            tasks[task] = hot.score_latents(latents, truth, experts, seconds, task)
            self.latents.setdefault(label, {})[task] = latents
            if self.cfg.sample.sync_media and trainer.is_global_zero:
                folder = media / f"{label.replace(' ', '_')}-step-{trainer.global_step:06d}" / task
                hot.write_media(latents, experts, folder)
                tasks[task]["av_align"] = hot.eval_av_align(folder)
        if "joint" in tasks:
            row.update(sync=tasks["joint"]["sync"], frechet=tasks["joint"]["frechet"])
        if self.per_task:
            row["tasks"] = tasks
        self.scores[label] = row

    def on_train_start(self, trainer, pl_module):
        if trainer.global_step == 0:
            self._score(trainer, pl_module, "experts alone")

    def on_train_end(self, trainer, pl_module):
        if interrupted(trainer):
            return
        self._score(trainer, pl_module, "stitched")
        if trainer.is_global_zero:
            (self.run_dir / "sync.json").write_text(json.dumps({"clips": self.n, **self.scores}, indent=1))
            if self.per_task and "experts alone" in self.latents:
                from soe.sample.task_sheet import task_sheet

                st = pl_module.stitcher
                task_sheet(self.latents["experts alone"], self.latents["stitched"], self.truth, {"a": st.a, "b": st.b},
                           self.seconds, {"clips": self.n, **self.scores}, self.run_dir / "samples" / "before_after.png")
            if self.console is not None:
                self.console.print(self.task_table() if self.per_task else self.table())

    def task_table(self):
        """One row per task and model: latent AV-Align, `soe eval`'s AV-Align of the mp4s, Frechet distances."""
        from rich.table import Table

        from soe.sample.held_out_tasks import GIVEN

        media = bool(self.cfg.sample.sync_media)
        t = Table(title=f"audio-visual sync on {self.n} held-out clips per task (1 = a click at every bounce and nowhere "
                        "else; sync: read off the latents; AV-Align: `soe eval` on the decoded mp4s in samples/held_out/)")
        t.caption = ("v2a: the clip's true video given, audio sampled; a2v: its true audio given, video sampled. Frechet "
                     "distances of few clips swing several-fold from one draw of clips to the next (docs/evidence.md)")
        t.add_column("task (given)")
        t.add_column("model")
        for col in ("sync", *(("AV-Align",) if media else ()), "Frechet video", "Frechet audio"):
            t.add_column(col, no_wrap=True, justify="right")
        for task in self.tasks:
            for key, name in (("experts alone", "experts alone"), ("stitched", "stitched")):
                r = self.scores.get(key, {}).get("tasks", {}).get(task)
                if r is None:
                    continue
                f = r["frechet"]
                t.add_row(f"{task} ({GIVEN[task]})" if key == "experts alone" else "", name, f"{r['sync']:.3f}",
                          *((f"{r['av_align']:.3f}",) if media else ()),
                          f"{f['video']:.3f}" if "video" in f else "given", f"{f['audio']:.3f}" if "audio" in f else "given")
        tr = self.scores.get("truth")
        if tr is not None:
            t.add_row("ground truth", "", f"{tr['sync']:.3f}", *((f"{tr.get('av_align', 0):.3f}",) if media else ()), "0", "0")
        return t

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
