"""The captioning hook: an ``Annotator`` writes a caption for a window that has none (off by default).

UniVerse-1 annotates its clips online with a vision-language model; here any callable with the
``Annotator`` signature will do. ``VLMAnnotator`` runs a local transformers image-text-to-text model
(``AutoProcessor`` + ``AutoModelForImageTextToText``, e.g. a Qwen2-VL / SmolVLM folder) on a few
frames of the window.
"""
from __future__ import annotations

from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from soe.errors import SoeError, one_line
from soe.schema.encode import DEFAULT_PROMPT


class AnnotatorError(SoeError, ValueError):
    """The annotator model folder cannot be used."""


@runtime_checkable
class Annotator(Protocol):
    def __call__(self, frames: np.ndarray, audio: np.ndarray, sample_rate: int) -> str:
        """``frames (F, H, W, 3)`` uint8 and ``audio (2, N)`` float of one window -> a caption."""
        ...


def model_folder(path, key: str) -> Path:
    """``path`` as a transformers model folder (it has a ``config.json``), else one line naming ``key``."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise AnnotatorError(f"{key}: no transformers model at '{path}' (expected '{path}/config.json')")
    return path


class VLMAnnotator:
    """Captions from a local vision-language model folder, looking at ``num_frames`` evenly spaced frames."""

    def __init__(self, path, prompt: str = DEFAULT_PROMPT, num_frames: int = 4, max_new_tokens: int = 64, device=None,
                 key: str = "encode.annotator"):
        path = model_folder(path, key)
        try:
            from transformers import AutoModelForImageTextToText, AutoProcessor

            self.processor = AutoProcessor.from_pretrained(path)
            self.model = AutoModelForImageTextToText.from_pretrained(path).to(device or "cpu").eval()
        except (OSError, ValueError, KeyError) as e:
            raise AnnotatorError(f"{key}: '{path}' is not a vision-language model transformers can load: {one_line(e, 300)}") from None
        self.prompt, self.num_frames, self.max_new_tokens = prompt, num_frames, max_new_tokens

    def __call__(self, frames: np.ndarray, audio: np.ndarray, sample_rate: int) -> str:
        return self.caption_batch([frames])[0]

    def caption_batch(self, windows: list[np.ndarray], prompt: str | None = None) -> list[str]:
        """A caption of each window's ``frames (F, H, W, 3)`` uint8, in one greedy ``generate`` call: the prompts
        padded on the left (masked), so each caption is the one this window gets alone."""
        import torch
        from PIL import Image

        images, texts = [], []
        for frames in windows:
            picks = np.linspace(0, len(frames) - 1, min(self.num_frames, len(frames))).round().astype(int)
            images.append([Image.fromarray(frames[i]) for i in picks])
            messages = [{"role": "user", "content": [*({"type": "image"} for _ in images[-1]),
                                                     {"type": "text", "text": prompt or self.prompt}]}]
            texts.append(self.processor.apply_chat_template(messages, add_generation_prompt=True))
        self.processor.tokenizer.padding_side = "left"
        inputs = self.processor(images=images, text=texts, padding=True, return_tensors="pt").to(self.model.device)
        with torch.no_grad():
            out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
        new = until_eos(out[:, inputs["input_ids"].shape[1]:], self.model.generation_config)
        return [t.strip() for t in self.processor.batch_decode(new, skip_special_tokens=True)]


def until_eos(tokens, generation_config) -> list[list[int]]:
    """Each row of generated ``tokens`` up to its first end-of-sequence token: in a batch, a finished answer
    is padded until the longest ends, and a tokenizer that does not mark the padding special would keep it."""
    eos = generation_config.eos_token_id
    eos = set(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])
    rows = []
    for row in tokens.tolist():
        end = next((i for i, t in enumerate(row) if t in eos), len(row))
        rows.append(row[:end])
    return rows


def require_transformers(key: str, minimum: str = "5.25") -> None:
    """``soe annotate`` calls transformers APIs of ``minimum`` and later (Qwen2.5-Omni's processor taking a
    video's decoded audio track); an older install is one line naming ``key`` and the extra to install."""
    from importlib.metadata import version

    from packaging.version import Version

    found = version("transformers")
    if Version(found) < Version(minimum):
        raise AnnotatorError(f"{key}: needs transformers >= {minimum}, found {found} (pip install 'soe[annotate]')")


def load_annotator(path, prompt: str = DEFAULT_PROMPT, device=None) -> Annotator | None:
    return None if path is None else VLMAnnotator(path, prompt=prompt, device=device)
