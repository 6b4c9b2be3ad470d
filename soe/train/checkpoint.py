"""Nothing is lost: atomic checkpoint files, and exports of what trained in standard formats.

* ``AtomicCheckpointIO``: Lightning checkpoints are written to a temporary file, fsynced, then
  renamed over the target, so a kill mid-write leaves the previous checkpoint intact. They are read
  back with ``torch.load(weights_only=True)`` only: a checkpoint is data, never code.
* ``export_trained`` writes ``connectors.safetensors`` and, per expert, a peft LoRA adapter folder
  (``adapter_config.json`` + ``adapter_model.safetensors``) or, for fully trained experts, the
  expert in its official format; ``load_trained`` reads them back into a freshly built Stitcher.
"""
from __future__ import annotations

import contextlib
import json
import os
import pickle
import re
import shutil
import tempfile
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins.io import TorchCheckpointIO
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from soe.errors import CheckpointError, one_line
from soe.lora import ADAPTER


class AtomicCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(self, checkpoint, path, storage_options=None):
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        for stale in path.parent.glob(f".{path.name}.*"):  # left by a writer killed mid-write
            stale.unlink(missing_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def load_checkpoint(self, path, map_location=lambda storage, loc: storage, weights_only=None):
        """Always ``weights_only=True`` (whatever Lightning asks): a pickle that would run code is refused."""
        with _one_line_errors(path):
            return super().load_checkpoint(path, map_location=map_location, weights_only=True)


def read_checkpoint(path, mmap: bool = True) -> dict:
    """A Lightning checkpoint read as ``AtomicCheckpointIO`` does; ``mmap``: tensors stay on disk until used,
    so checking a resume checkpoint before training costs next to nothing."""
    with _one_line_errors(path):
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)


@contextlib.contextmanager
def _one_line_errors(path):
    try:
        yield
    except pickle.UnpicklingError as e:
        found = re.search(r"(Unsupported global: GLOBAL \S+|Unsupported operand \S+)", str(e))
        raise CheckpointError(f"checkpoint '{path}' refused: it pickles more than tensors and plain containers "
                              f"({found.group(1) if found else one_line(e, 120)})") from None
    except Exception as e:  # truncated or not a checkpoint: one line naming the file
        raise CheckpointError(f"checkpoint '{path}' cannot be read safely: {one_line(e, 300)}") from None


def _replace_dir(tmp: Path, final: Path) -> None:
    old = final.with_name(f".{final.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def _full_cpu(state: dict) -> dict:
    """Plain contiguous CPU tensors; sharded (FSDP2 DTensor) ones are gathered: call on every rank."""
    from torch.distributed.tensor import DTensor

    return {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().cpu().contiguous() for k, v in state.items()}


TRAINED_INFO = "soe_trained.json"  # {"step": N}: the optimizer step the exported tensors come from


def export_trained(stitcher, folder, train_modes: dict[str, str], write: bool = True, step: int | None = None) -> Path:
    """Write everything that trained into ``folder`` (atomically replaced as a whole).

    Under a sharded strategy every rank must call this (gathering is collective); only the rank
    with ``write=True`` writes files.
    """
    folder = Path(folder)
    conn = _full_cpu(stitcher.connectors.state_dict())
    adapters = {side: _full_cpu(get_peft_model_state_dict(getattr(stitcher, side).model, adapter_name=ADAPTER))
                for side, mode in train_modes.items() if mode == "lora"}
    fusion = _full_cpu(stitcher.fusion.state_dict()) if getattr(stitcher, "fusion", None) is not None else None
    if not write:
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    save_file(conn, tmp / "connectors.safetensors")
    if step is not None:
        (tmp / TRAINED_INFO).write_text(json.dumps({"step": int(step)}))
    if fusion is not None:  # inserted blocks and new k/v projections (soe/depth.py, soe/inject.py)
        save_file(fusion, tmp / "fusion.safetensors")
    for side, mode in train_modes.items():
        expert = getattr(stitcher, side)
        if mode == "lora":
            out = tmp / f"lora_{side}"
            out.mkdir()
            expert.model.peft_config[ADAPTER].save_pretrained(out)
            save_file(adapters[side], out / "adapter_model.safetensors")
        elif mode == "full":
            expert.save(tmp / f"expert_{side}")
    _replace_dir(tmp, folder)
    return folder


def load_trained(stitcher, folder) -> int | None:
    """Load connectors and adapters written by ``export_trained`` into a freshly built Stitcher;
    returns the training step they come from (None when the folder does not record it, e.g. ``soe convert``).

    Anything unusable (missing or truncated files, wrong shapes or keys, adapters of another expert)
    is a one-line :class:`CheckpointError` naming the folder.
    """
    try:
        _load_trained(stitcher, Path(folder))
        info = Path(folder) / TRAINED_INFO
        return int(json.loads(info.read_text())["step"]) if info.is_file() else None
    except CheckpointError:
        raise
    except (OSError, ValueError, RuntimeError, KeyError, SafetensorError) as e:
        raise CheckpointError(f"trained folder '{folder}': {one_line(e, 300)}") from None


def _load_trained(stitcher, folder: Path) -> None:
    conn_file = folder / "connectors.safetensors"
    if not conn_file.is_file():
        raise FileNotFoundError(f"'{folder}' holds no connectors.safetensors (expected a folder written by `soe stitch`)")
    stitcher.connectors.load_state_dict(load_file(conn_file), strict=True)
    if (folder / "fusion.safetensors").is_file():
        if getattr(stitcher, "fusion", None) is None:
            raise ValueError("fusion.safetensors holds inserted blocks / k/v projections, but the recipe has no stitch.depth or stitch.inject")
        result = stitcher.fusion.load_state_dict(load_file(folder / "fusion.safetensors"), strict=False)
        if result.unexpected_keys:  # missing ones (a release without them) keep their init
            raise ValueError(f"fusion.safetensors: tensors the stitch does not have: {result.unexpected_keys[:3]}")
    for side in ("a", "b"):
        expert = getattr(stitcher, side)
        weights = folder / f"expert_{side}.safetensors"  # expert tensors by model name (e.g. `soe convert`)
        if weights.is_file():
            result = expert.model.load_state_dict(load_file(weights), strict=False)
            if result.unexpected_keys:
                raise ValueError(f"{weights.name}: tensors the expert does not have: {result.unexpected_keys[:3]}")
        lora_dir = folder / f"lora_{side}"
        if lora_dir.is_dir():
            config = LoraConfig.from_pretrained(lora_dir)
            if ADAPTER not in getattr(expert.model, "peft_config", {}):
                inject_adapter_in_model(config, expert.model, adapter_name=ADAPTER)
            result = set_peft_model_state_dict(expert.model, load_file(lora_dir / "adapter_model.safetensors"), adapter_name=ADAPTER)
            unexpected = getattr(result, "unexpected_keys", [])
            if unexpected:
                raise ValueError(f"{lora_dir}: adapter tensors that match no LoRA layer: {unexpected[:3]}")
            missing = [k for k in getattr(result, "missing_keys", []) if "lora_" in k]
            if missing:  # peft loads non-strictly: a LoRA layer without tensors would keep its init silently
                raise ValueError(f"{lora_dir}: LoRA layers without tensors in the adapter: {missing[:3]}")
        full_dir = folder / f"expert_{side}"
        if full_dir.is_dir():
            loaded = type(expert).load(full_dir)
            expert.model.load_state_dict(loaded.model.state_dict())


class ExportTrained(Callback):
    """After every checkpoint, export what trained to ``<run_dir>/trained`` (peft + safetensors)."""

    def __init__(self, folder, train_modes: dict[str, str]):
        self.folder, self.train_modes = Path(folder), train_modes

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        export_trained(pl_module.stitcher, self.folder, self.train_modes, write=trainer.is_global_zero, step=trainer.global_step)

    def on_train_end(self, trainer, pl_module):
        export_trained(pl_module.stitcher, self.folder, self.train_modes, write=trainer.is_global_zero, step=trainer.global_step)
