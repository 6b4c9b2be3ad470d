"""Each expert's text conditioning for a window's caption, exactly as the stitched model will see it.

With ``experts.<side>.text_encoder_path`` set: the expert's own text encoder (``Expert.text_encoder``).
Without (tiny experts of the demo and tests): the same deterministic pseudo-embedding of the caption
that ``soe generate`` uses (``soe.sample.generate.prompt_conditions``), so a cached caption and a sampling
prompt with the same text condition the model identically.
"""
from __future__ import annotations

import torch

from soe.errors import RecipeError
from soe.rng import generator_for, stream_seed


class TextConditioner:
    """``(captions, lyrics) -> {key: (B, ...)}`` on CPU, memoised per (caption, lyrics): windows of one
    clip share a caption, so each distinct text is encoded once."""

    def __init__(self, expert, side: str, cfg, device, cache_size: int = 4096):
        self.expert, self.side, self.seed, self.seconds = expert, side, cfg.seed, cfg.data.seconds
        e = cfg.experts[side]
        self.encoder = None
        if e.text_encoder_path is not None:
            from soe.recipe.builders import build_text_encoder

            self.encoder = build_text_encoder(cfg, side, expert, device)
        elif e.path is not None:
            raise RecipeError(f"experts.{side}.text_encoder_path: expert '{expert.name}' has real weights; encoding captions "
                              "needs its own text encoder (a local folder), pseudo-embeddings are for random tiny experts only")
        self.cache: dict[tuple, dict] = {}
        self.cache_size = cache_size

    def _pseudo(self, caption: str) -> dict:
        g = generator_for(stream_seed(self.seed, "prompt", caption), self.side)  # as soe.sample.generate.prompt_conditions
        return self.expert.conditioning(1, self.seconds, generator=g)

    def __call__(self, captions: list[str], lyrics: list[str | None]) -> dict:
        keys = [(c, l or "") for c, l in zip(captions, lyrics)]
        todo = list(dict.fromkeys(k for k in keys if k not in self.cache))
        if todo:
            if self.encoder is None:
                fresh = [self._pseudo(c) for c, _ in todo]
            else:
                out = self.encoder([c for c, _ in todo], [l for _, l in todo])
                fresh = [{k: v[i: i + 1] for k, v in out.items()} for i in range(len(todo))]
            if len(self.cache) + len(fresh) > self.cache_size:
                self.cache.clear()
            for k, cond in zip(todo, fresh):
                self.cache[k] = {n: t.detach().cpu() for n, t in cond.items()}
        rows = [self.cache[k] for k in keys]
        return {n: torch.cat([r[n] for r in rows]) for n in rows[0]}
