"""DINO features: ``id_consistency`` (reference image vs every frame) and the frame side of ``fd_video``.

transformers' ``AutoModel`` + ``AutoImageProcessor`` from a local folder (DINOv2 or DINOv3; Verse-Bench loads
``dinov3-vitl16-pretrain-lvd1689m`` through the ``image-feature-extraction`` pipeline). Verse-Bench's feature
is token ``-2`` of the last hidden state (the pipeline's output ``[0][-2]``), and ID consistency is the mean
over all frames of its cosine with the reference image's; both are followed here. ``fd_video`` embeds a clip
by the CLS token (index 0 of the last hidden state, before any pooler) of 8 evenly spaced frames.

Hand-written: the token choice and the cosine; preprocessing is the folder's own image processor.
"""
from __future__ import annotations

import numpy as np
import torch

from soe.evaluate.clip_score import frame_indices

ID_TOKEN = -2  # Verse-Bench: pipeline("image-feature-extraction")(image)[0][-2]


class DinoEmbedder:
    def __init__(self, folder, device: str = "cpu", batch_size: int = 16):
        from transformers import AutoImageProcessor, AutoModel

        self.model = AutoModel.from_pretrained(folder).to(device).eval()
        self.processor = AutoImageProcessor.from_pretrained(folder)
        self.device, self.batch_size = device, batch_size

    @torch.no_grad()
    def tokens(self, images: list, token: int) -> np.ndarray:
        """Last-hidden-state token ``token`` of each image (RGB uint8 arrays or PIL images): ``(N, D)``."""
        out = []
        for i in range(0, len(images), self.batch_size):
            inputs = self.processor(images=list(images[i: i + self.batch_size]), return_tensors="pt").to(self.device)
            out.append(self.model(**inputs).last_hidden_state[:, token].float().cpu().numpy())  # (B, D)
        return np.concatenate(out)

    def id_consistency(self, reference, frames: np.ndarray) -> float:
        """Mean over all frames of cos(token -2 of the reference image, token -2 of the frame)."""
        ref = self.tokens([reference], ID_TOKEN)[0]
        feats = self.tokens(list(frames), ID_TOKEN)
        cos = feats @ ref / np.maximum(np.linalg.norm(feats, axis=-1) * np.linalg.norm(ref), 1e-12)
        return float(cos.mean())

    def frame_embeddings(self, frames: np.ndarray) -> np.ndarray:
        """CLS embeddings of 8 evenly spaced frames: ``(8, D)`` (fewer for shorter clips)."""
        return self.tokens([frames[i] for i in frame_indices(len(frames))], 0)
