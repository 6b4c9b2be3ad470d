"""Weight folders in diffusers' layout: ``diffusion_pytorch_model.safetensors``, or the shards that
its ``.index.json`` lists. Read whole (``load_weights``) or lazily one tensor at a time
(``FolderWeights``: what FSDP2 materialisation reads, so a rank never holds a whole expert).
"""
from __future__ import annotations

import json
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

WEIGHTS = "diffusion_pytorch_model.safetensors"
WEIGHTS_INDEX = WEIGHTS + ".index.json"  # the sharded variant save_pretrained writes for large models


def has_weights(folder) -> bool:
    return (Path(folder) / WEIGHTS).is_file() or (Path(folder) / WEIGHTS_INDEX).is_file()


def weight_files(folder) -> list[Path]:
    """The safetensors files of ``folder``: the single file, else every shard its index names."""
    folder = Path(folder)
    if (folder / WEIGHTS).is_file():
        return [folder / WEIGHTS]
    index = folder / WEIGHTS_INDEX
    if not index.is_file():
        raise FileNotFoundError(f"'{folder}' holds neither '{WEIGHTS}' nor '{WEIGHTS_INDEX}'")
    files = [folder / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(f"'{f}' is listed in '{index}' but missing")
    return files


def load_weights(folder, device=None) -> dict[str, torch.Tensor]:
    """Every tensor of the folder (or of one ``.safetensors`` file) in one dict."""
    folder = Path(folder)
    state: dict[str, torch.Tensor] = {}
    for f in [folder] if folder.is_file() else weight_files(folder):
        state.update(load_file(f, device=str(device or "cpu")))
    return state


class FolderWeights:
    """Lazy access to the tensors of a weight folder: names and shapes from the headers only; the data
    of a tensor is read when asked for, while a ``reading()`` block keeps its files open (closing them
    unmaps what was read, so host memory holds one block of tensors at a time)."""

    def __init__(self, folder):
        self.folder = Path(folder)
        self.files = weight_files(self.folder)
        self.file_of: dict[str, Path] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        for f in self.files:
            with safe_open(f, framework="pt") as h:
                for key in h.keys():
                    self.file_of[key] = f
                    self.shapes[key] = tuple(h.get_slice(key).get_shape())
        self._open: dict[Path, object] | None = None

    def __contains__(self, key: str) -> bool:
        return key in self.file_of

    def reading(self) -> "_Reading":
        return _Reading(self)

    def get(self, key: str, index: tuple[slice, ...] | None = None) -> torch.Tensor:
        """The tensor ``key``, or only its part ``index`` (only those bytes are read)."""
        if self._open is None:
            raise RuntimeError("FolderWeights.get outside a reading() block")
        f = self.file_of[key]
        if f not in self._open:
            self._open[f] = self._stack.enter_context(safe_open(f, framework="pt"))
        if index is None:
            return self._open[f].get_tensor(key)
        return self._open[f].get_slice(key)[index]


class _Reading:
    def __init__(self, weights: FolderWeights):
        self.weights = weights

    def __enter__(self) -> FolderWeights:
        self.weights._stack, self.weights._open = ExitStack(), {}
        return self.weights

    def __exit__(self, *exc):
        self.weights._stack.close()
        self.weights._open = None
