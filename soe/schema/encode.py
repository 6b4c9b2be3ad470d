"""``encode.<key>=value`` on the ``soe encode`` command line: how a folder of clips is cut into windows,
captioned where a clip has no caption, and stored as the latent cache (soe/data/encode.py)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

from soe.schema.base import Dtype, RecipeError, device_problem

DEFAULT_PROMPT = "Describe this video clip in one sentence: what is seen and what is heard."  # encode.annotator_prompt


@dataclass
class EncodeConfig:
    """``encode.<key>=value`` on the ``soe encode`` command line."""

    durations: Optional[List[float]] = None  # window lengths in seconds, one duration bucket each; null = [data.seconds]
    resolutions: Optional[List[List[int]]] = None  # aspect-ratio buckets [[H, W], ...]; null = the video expert's size
    batch_size: int = 4  # windows per codec call
    shard_size: int = 64  # windows per shard (the unit of resumption)
    windows_per_task: int = 8  # windows one decode task holds in memory
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # annotations.jsonl of `soe annotate` (each window's own caption, sound description, lyrics); the command line's
    # --annotations FILE, else SRC/annotations.jsonl when there is one
    annotations: Optional[str] = None
    annotator: Optional[str] = None  # local vision-language model folder that captions windows without one
    annotator_prompt: str = DEFAULT_PROMPT
    missing_caption: str = "skip"  # skip (report the clip) | empty (encode an empty caption)
    max_windows: Optional[int] = None  # stop after this many new windows (a quick look at a big folder)
    latent_dtype: str = "auto"  # stored latents: auto = the dtype trainer.precision trains in | float32 | bfloat16 | float16
    text_dtype: str = "bfloat16"  # stored text states (trimmed to each prompt's length, once per distinct caption)

    def __post_init__(self):
        if self.durations is not None and (not self.durations or any(not d > 0 for d in self.durations)):
            raise RecipeError(f"encode.durations: expected positive window lengths in seconds, got {self.durations}")
        if self.resolutions is not None and (not self.resolutions or any(len(r) != 2 or min(r) < 1 for r in self.resolutions)):
            raise RecipeError(f"encode.resolutions: expected [[H, W], ...] of positive sizes, got {self.resolutions}")
        for k in ("batch_size", "shard_size", "windows_per_task"):
            if getattr(self, k) < 1:
                raise RecipeError(f"encode.{k}: expected a positive integer, got {getattr(self, k)}")
        if self.missing_caption not in ("skip", "empty"):
            raise RecipeError(f"encode.missing_caption: expected one of ['skip', 'empty'], got {self.missing_caption!r}")
        for k in ("latent_dtype", "text_dtype"):
            allowed = [d.value for d in Dtype] + (["auto"] if k == "latent_dtype" else [])
            if getattr(self, k) not in allowed:
                raise RecipeError(f"encode.{k}: expected one of {allowed}, got {getattr(self, k)!r}")
        if self.device != "auto":
            problem = device_problem(self.device)
            if problem is not None:
                raise RecipeError(f"encode.device: {problem}")
        if self.max_windows is not None and self.max_windows < 1:
            raise RecipeError(f"encode.max_windows: expected a positive integer, got {self.max_windows}")
