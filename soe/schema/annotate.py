"""``annotate.<key>=value`` on the ``soe annotate`` command line: which models annotate each training window,
with which prompts, and how much of the window they see (soe/data/annotate_run.py)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional

from soe.schema.base import Dtype, OptionError, check_device, require

CAPTION_PROMPT = ("Describe what is seen in this video clip in one or two sentences: the subjects, what they do, "
                  "the setting and the camera. Do not describe the sound.")
SOUND_PROMPT = ("Describe what is heard in this video clip in one sentence: the sound events, music or voices (not "
                "the words spoken), and how they sound. Do not describe the picture.")
PROMPT_KEYS = ("caption_prompt", "sound_prompt")  # free text: taken as typed on the command line


@dataclass
class AnnotateConfig:
    """The settings of ``soe annotate`` (``annotate.<key>=value``): the omni model and its two prompts, Whisper,
    the windows, and what the omni model sees of each (docs/annotate.md)."""

    # the windows: the same as `soe encode` cuts (its encode.durations); null = [data.seconds]
    durations: Optional[List[float]] = None
    # --captioner: Qwen2.5-Omni folder (the released model, or its thinker alone: a caption and a sound description per
    # window, from its frames and sound), or an image-text-to-text model folder (captions only, from frames)
    captioner: Optional[str] = None
    omni: Optional[str] = None  # the same as captioner, a Qwen2.5-Omni folder only (the earlier name)
    caption_prompt: str = CAPTION_PROMPT  # what the video expert's caption asks for
    sound_prompt: str = SOUND_PROMPT  # what the audio expert's caption asks for
    fps: float = 2.0  # frames per second the omni model sees (Qwen2.5-Omni's own default)
    max_pixels: int = 200704  # frame size it sees (256 x 28 x 28: its processor may shrink it further)
    max_new_tokens: int = 128  # the longest caption, in tokens
    # --asr: Whisper folder: word-timed transcripts of clips without their own (clip.words.json, captions.jsonl words)
    whisper: Optional[str] = None
    language: Optional[str] = None  # Whisper's language (e.g. en); null = detected per window
    batch_size: int = 8  # windows (captioner), clips (Whisper) or windows (its language detection) per model call
    # --cache: the folder of the models' outputs, shared by every run, recipe and --out; null = $SOE_CACHE_DIR/annotate
    # (default ~/.cache/soe/annotate)
    cache: Optional[str] = None
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto (the checkpoint's own) | float32 | bfloat16 | float16

    def __post_init__(self):
        if self.durations is not None and (not self.durations or any(not d > 0 for d in self.durations)):
            raise OptionError("durations", f"expected positive window lengths in seconds, got {self.durations}")
        require(self.fps > 0 and math.isfinite(self.fps), "fps", f"expected frames per second > 0, got {self.fps}")
        require(self.max_pixels >= 28 * 28, "max_pixels", f"expected at least {28 * 28} (one 28 x 28 patch), got {self.max_pixels}")
        require(self.batch_size >= 1, "batch_size", f"expected a positive integer, got {self.batch_size}")
        require(self.max_new_tokens >= 1, "max_new_tokens", f"expected a positive integer, got {self.max_new_tokens}")
        require(self.captioner is None or self.omni is None, "captioner", "give --captioner or annotate.omni, not both")
        for key in PROMPT_KEYS:
            require(bool(getattr(self, key).strip()), key, "expected a prompt, got an empty one")
        allowed = ["auto", *Dtype.names()]
        require(self.dtype in allowed, "dtype", f"expected one of {allowed}, got {self.dtype!r}")
        if self.device != "auto":
            check_device(self.device, "device")  # cuda on a machine without a GPU: one line, not torch's traceback
