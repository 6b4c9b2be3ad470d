"""A stitched model loaded once and sampled per request: what ``soe app`` serves.

``soe generate`` builds the model, renders and exits; an app answers many requests that change only
``sample.*`` keys (prompt, seconds, steps, seed, guidance, conditioning media, memory mode). Each request is
read exactly as the command line reads it (the recipe plus ``key=value`` overrides through
``load_recipe`` and ``validate_recipe``), so bad input gets the CLI's one-line messages; the model, its trained
run and its codecs are built once per memory mode (``sample.memory`` installs hooks, so a change rebuilds).
One request samples at a time (a lock), whatever the web server does.
"""
from __future__ import annotations

import threading
from pathlib import Path

from soe.errors import RecipeError

REQUEST_KEYS = ("prompt", "negative_prompt", "seconds", "steps", "seed", "guidance.a", "guidance.b", "image", "video",
                "audio", "memory")


class SampleSession:
    """``render(request)`` -> ``(mp4, contact sheet png)``; ``request``: sample keys (``REQUEST_KEYS``) -> values."""

    def __init__(self, recipe, overrides=()):
        self.recipe, self.overrides = recipe, list(overrides)
        self.lock = threading.Lock()
        self._model = None  # (memory mode, stitcher, step, trained folder, codecs)
        self.cfg = self.config({})  # the recipe and its overrides are checked at start, not at the first request

    def config(self, request: dict):
        """The recipe with the request's ``sample.<key>=value`` overrides, read and validated as the CLI does."""
        from soe.recipe.reading import load_recipe
        from soe.recipe.validate import validate_recipe
        from soe.train.trained import resolve_merged_ckpt

        unknown = sorted(set(request) - set(REQUEST_KEYS))
        if unknown:
            raise RecipeError(f"sample.{unknown[0]}: not a setting of soe app; expected one of {list(REQUEST_KEYS)}")
        extra = [f"sample.{k}={'null' if v is None else v}" for k, v in request.items() if k not in ("prompt", "negative_prompt")]
        texts = [f"sample.{k}={v}" for k, v in request.items() if k in ("prompt", "negative_prompt") and v is not None]
        cfg = load_recipe(self.recipe, [*self.overrides, *extra, *texts, "sample.num_samples=1"])  # prompts literal
        resolve_merged_ckpt(cfg)
        validate_recipe(cfg)
        return cfg

    @property
    def modalities(self) -> dict[str, str]:
        from soe.plugin.registry import get_expert

        return {side: get_expert(self.cfg.experts[side].name).modality for side in ("a", "b")}

    def _loaded(self, cfg):
        from soe.recipe.builders import build_sample
        from soe.sample.generate import check_sampling, load_run
        from soe.sample.speed import apply_speed

        memory = str(cfg.sample.memory)
        if self._model is None or self._model[0] != memory:
            self._model = None  # the previous model's memory is freed before the next is built
            stitcher, step, trained = load_run(cfg)
            speed = apply_speed(stitcher, build_sample(cfg), cfg.sample.device)
            self._model = (memory, stitcher, step, trained, speed.prepare_codecs(check_sampling(stitcher, cfg)))
        return self._model[1:]

    def render(self, request: dict, progress=None) -> tuple[Path, Path]:
        """Sample one clip for ``request`` into a new output folder (``soe generate``'s rules); ``progress(i, total)``
        is called after each sampling step."""
        from soe.sample.generate import given_inputs, new_output_folder, render_samples, sheet_title

        cfg = self.config(request)
        with self.lock:
            stitcher, step, trained, codecs = self._loaded(cfg)
            given = given_inputs(stitcher, cfg, codecs, 1, cfg.sample.seconds or cfg.data.seconds)
            out = new_output_folder(cfg)
            try:
                files = render_samples(stitcher, cfg, out, codecs=codecs, given=given, progress=progress,
                                       title=sheet_title(cfg.sample.prompt, step, trained))
            except BaseException:
                if out.is_dir() and not any(out.iterdir()):
                    out.rmdir()  # nothing half-written
                raise
        mp4 = next(f for f in files if f.suffix == ".mp4")
        return mp4, mp4.with_suffix(".png")
