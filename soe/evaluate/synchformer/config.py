"""Sizes of a Synchformer (Iashin et al., 2024) as av-benchmark's ``synchformer_state_dict.pth`` was trained.

The defaults are the published model: a Motionformer-style video ViT-B/16 over 16-frame segments (2-frame
tubelets, 224 px), an AST over 128-bin log-mel spectrograms of 0.64 s segments (66 frames, 16x16 patches,
stride 10), and a 3-layer, 8-head transformer over 14 segments of both that classifies the audio-video
offset into 21 classes on a grid from -2 s to +2 s. A ``config.json`` next to the weights may override any
field (tests use a tiny one); ``model_type`` must be ``synchformer``.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

MODEL_TYPE = "synchformer"


@dataclass(frozen=True)
class SynchformerConfig:
    dim: int = 768  # one width for both feature extractors and the offset transformer
    # video (Motionformer, divided space-time attention)
    video_depth: int = 12
    video_heads: int = 12
    mlp_ratio: int = 4
    image_size: int = 224
    patch_size: int = 16
    segment_frames: int = 16  # frames per segment at 25 fps (0.64 s)
    tubelet: int = 2  # frames per 3D patch: 8 time tokens per segment
    # audio (AST)
    audio_depth: int = 12
    audio_heads: int = 12
    audio_intermediate: int = 3072
    n_mels: int = 128
    spec_frames: int = 66  # mel frames per segment after padding (65 from 10,240 samples at hop 160, + 1)
    audio_patch: int = 16
    audio_stride: int = 10
    # offset transformer
    sync_layers: int = 3
    sync_heads: int = 8
    segments: int = 14  # segments per window (4.8 s): the transformer's position table is sized for exactly this
    offset_classes: int = 21
    max_offset: float = 2.0  # class grid: linspace(-max_offset, max_offset, offset_classes) seconds

    @property
    def video_tokens(self) -> int:
        """Time tokens per video segment."""
        return self.segment_frames // self.tubelet

    @property
    def audio_grid(self) -> tuple[int, int]:
        """(frequency, time) patches of one audio segment."""
        f = (self.n_mels - self.audio_patch) // self.audio_stride + 1
        t = (self.spec_frames - self.audio_patch) // self.audio_stride + 1
        return f, t

    @classmethod
    def from_folder(cls, folder) -> "SynchformerConfig":
        """The defaults, overridden by ``folder/config.json`` when present (``ValueError``, one line, on a bad key)."""
        path = Path(folder) / "config.json"
        if not path.is_file():
            return cls()
        data = json.loads(path.read_text())
        if data.pop("model_type", MODEL_TYPE) != MODEL_TYPE:
            raise ValueError(f"{path}: model_type must be {MODEL_TYPE!r}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{path}: unknown key {unknown[0]!r}; expected keys among {', '.join(sorted(known))}")
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps({"model_type": MODEL_TYPE, **dataclasses.asdict(self)}, indent=2) + "\n"
