"""``clip_score``: how well a clip's frames agree with its prompt, by CLIP.

transformers' ``CLIPModel`` + ``CLIPProcessor`` from a local folder, with torchmetrics' ``CLIPScore``
convention: per frame ``100 * cos(image embedding, text embedding)``, averaged, then clipped at 0
(torchmetrics clips the mean, not each frame). The frames are 8 evenly spaced ones (all of them when the
clip has fewer). The prompt is cut to the text model's maximum length, as torchmetrics does.

Hand-written: the frame choice and the five lines of the score. torchmetrics is not called: its
``CLIPScore`` loads only hub names (or a callable), and 1.9 breaks on transformers 5, whose
``get_image_features`` / ``get_text_features`` return output objects instead of tensors; the lines here
are its ``_clip_score_update`` / ``compute`` arithmetic (tests/test_eval_models.py checks the value
against a direct transformers computation on a tiny saved model).
"""
from __future__ import annotations

import numpy as np
import torch

FRAMES = 8


def frame_indices(n: int, k: int = FRAMES) -> np.ndarray:
    """``k`` evenly spaced frame indices of ``n`` (all of them when ``n <= k``)."""
    return np.arange(n) if n <= k else np.linspace(0, n - 1, k).round().astype(int)


class ClipScorer:
    def __init__(self, folder, device: str = "cpu"):
        from transformers import CLIPModel, CLIPProcessor

        self.model = CLIPModel.from_pretrained(folder).to(device).eval()
        self.processor = CLIPProcessor.from_pretrained(folder)
        self.device = device

    @torch.no_grad()
    def score(self, frames: np.ndarray, prompt: str) -> float:
        """max(mean over 8 frames of 100 cos(frame, prompt), 0) for ``frames`` (T, H, W, 3) uint8 RGB."""
        images = [frames[i] for i in frame_indices(len(frames))]
        max_len = self.model.config.text_config.max_position_embeddings
        inputs = self.processor(text=[prompt], images=images, return_tensors="pt", padding=True)
        img = _tensor(self.model.get_image_features(pixel_values=inputs["pixel_values"].to(self.device)))
        txt = _tensor(self.model.get_text_features(input_ids=inputs["input_ids"][:, :max_len].to(self.device),
                                                   attention_mask=inputs["attention_mask"][:, :max_len].to(self.device)))
        img = img / img.norm(p=2, dim=-1, keepdim=True)  # (F, D)
        txt = txt / txt.norm(p=2, dim=-1, keepdim=True)  # (1, D)
        return float(max((100 * (img * txt).sum(-1)).mean().item(), 0.0))


def _tensor(out) -> torch.Tensor:
    return (out if isinstance(out, torch.Tensor) else out.pooler_output).float()
