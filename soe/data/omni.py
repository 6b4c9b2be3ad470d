"""An omni model that sees and hears one window and writes what was asked of it (Qwen2.5-Omni's thinker).

Everything model-specific is transformers' own: ``AutoProcessor`` (Qwen2.5-Omni's processor: the chat
template, Qwen2-VL's video processor, Whisper's feature extractor) and
``Qwen2_5OmniThinkerForConditionalGeneration``, the text-writing part of Qwen2.5-Omni, loaded from the
released folder (its ``thinker.*`` weights; the talker that speaks is never built) or from a folder holding
the thinker alone. The window's audio goes in as the audio track of its video (``load_audio_from_video``
with the decoded samples, ``use_audio_in_video`` at generation), so the model reads picture and sound
interleaved by time, as Qwen2.5-Omni was trained to. Hand-written here: only the frame size the window is
decoded at (its aspect ratio, whole 28-pixel patches, at most ``max_pixels``) and greedy decoding of the answers
of a batch of windows (the processor pads their prompts on the left, so each answer is the one its window
gets alone).
"""
from __future__ import annotations

import json
import math

import numpy as np

from soe.data.annotate import AnnotatorError, model_folder, require_transformers, until_eos
from soe.errors import one_line

OMNI_TYPES = ("qwen2_5_omni", "qwen2_5_omni_thinker")  # the released model, or its thinker alone
PATCH = 28  # Qwen2-VL's vision patch (14) times its 2 x 2 merge


def omni_size(width: int, height: int, max_pixels: int) -> tuple[int, int]:
    """``(H, W)`` with the clip's aspect ratio, in whole patches, at most ``max_pixels`` (and never upscaled)."""
    scale = min(1.0, math.sqrt(max_pixels / (width * height)))
    h = max(PATCH, int(height * scale) // PATCH * PATCH)
    w = max(PATCH, int(width * scale) // PATCH * PATCH)
    return h, w


class OmniAnnotator:
    """``describe(frames, audio, prompt)`` with a local Qwen2.5-Omni folder."""

    def __init__(self, path, max_new_tokens: int = 128, device=None, dtype="auto"):
        path = model_folder(path, "annotate.omni")
        config = path / "config.json"
        try:
            model_type = json.loads(config.read_text()).get("model_type")
        except (OSError, ValueError) as e:
            raise AnnotatorError(f"annotate.omni: '{config}' is not readable JSON ({one_line(e, 200)})") from None
        if model_type not in OMNI_TYPES:
            raise AnnotatorError(f"annotate.omni: '{path}' holds a {model_type!r} model, expected Qwen2.5-Omni "
                                 f"(model_type one of {list(OMNI_TYPES)})")
        require_transformers("annotate.omni")
        try:
            from transformers import AutoProcessor, Qwen2_5OmniThinkerForConditionalGeneration

            self.processor = AutoProcessor.from_pretrained(path)
            self.model = Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(path, dtype=dtype).to(device or "cpu").eval()
        except Exception as e:  # transformers raises many types for a folder it cannot load
            raise AnnotatorError(f"annotate.omni: cannot load Qwen2.5-Omni from '{path}': {one_line(e, 300)}") from None
        self.max_new_tokens = max_new_tokens

    @property
    def sample_rate(self) -> int:
        """The audio rate the model hears (its feature extractor's: 16 kHz)."""
        return int(self.processor.feature_extractor.sampling_rate)

    def inputs(self, windows: list[tuple[np.ndarray, np.ndarray]], fps: float, prompts: list[str]):
        """The model's inputs for a batch: each window's ``frames (F, H, W, 3)`` uint8 seen at ``fps`` with
        ``audio (N,)`` mono at ``sample_rate`` as their sound track, and its question from ``prompts``; the
        processor pads on the left (its default), so every answer starts at the same column."""
        texts = [self.processor.apply_chat_template([{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": p}]}],
                                                    add_generation_prompt=True, tokenize=False) for p in prompts]
        return self.processor(text=texts, videos=[v for v, _ in windows], audio=[a for _, a in windows],
                              audio_from_video_indices=list(range(len(windows))), load_audio_from_video=True,
                              videos_kwargs={"fps": fps}, padding=True, return_tensors="pt").to(self.model.device)

    def describe_batch(self, windows: list[tuple[np.ndarray, np.ndarray]], fps: float, prompts: list[str]) -> list[str]:
        """The model's answers to ``prompts[i]`` about ``windows[i]``, in one greedy ``generate`` call, each at most
        ``max_new_tokens`` tokens: the texts ``describe`` writes one at a time (left padding, masked)."""
        import torch

        inputs = self.inputs(windows, fps, prompts)
        with torch.no_grad():
            out = self.model.generate(**inputs, use_audio_in_video=True, max_new_tokens=self.max_new_tokens, do_sample=False)
        answers = self.processor.batch_decode(until_eos(out[:, inputs["input_ids"].shape[1]:], self.model.generation_config),
                                              skip_special_tokens=True)
        return [" ".join(a.split()) for a in answers]

    def describe(self, frames: np.ndarray, audio: np.ndarray, fps: float, prompt: str) -> str:
        """The model's answer to ``prompt`` about one window, greedy, at most ``max_new_tokens`` tokens."""
        return self.describe_batch([(frames, audio)], fps, [prompt])[0]
