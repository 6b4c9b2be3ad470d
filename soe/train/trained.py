"""What trained, in a folder of its own: a run's ``trained/`` (written after each checkpoint) and merged exports.

* ``export_trained`` writes ``connectors.safetensors`` (+ ``fusion.safetensors``: inserted blocks, new k/v
  projections) and, per expert, a peft LoRA adapter folder (``adapter_config.json`` +
  ``adapter_model.safetensors``) or, for a fully trained expert, the expert in its official format, into a
  temporary folder that is then swapped in; ``load_trained`` reads them back into a freshly built Stitcher.
  ``ExportTrained`` writes ``trained/`` once each checkpoint is on disk, so it is never ahead of it.
* A merged export (``soe export --format merged``: ``expert_a/``, ``expert_b/``, ``stitch.safetensors``) is
  recognised here too, so ``soe generate ckpt=FOLDER`` and ``soe.load_stitched`` can build from one.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from lightning.pytorch.callbacks import Callback
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from soe.errors import CheckpointError, RecipeError, one_line
from soe.lora.adapters import ADAPTER
from soe.schema import TrainMode
from soe.train.checkpoint import AtomicCheckpointIO, disk_full_errors
from soe.train.critical import uninterrupted

STITCH_FILE = "stitch.safetensors"


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


def gather_trained(stitcher, train_modes: dict[str, str]) -> tuple:
    """(connectors, LoRA adapters per side, fusion) as plain CPU tensors. Under a sharded strategy every
    rank must call this (gathering is collective)."""
    conn = _full_cpu(stitcher.connectors.state_dict())
    adapters = {side: _full_cpu(get_peft_model_state_dict(getattr(stitcher, side).model, adapter_name=ADAPTER))
                for side, mode in train_modes.items() if mode == "lora"}
    fusion = _full_cpu(stitcher.fusion.state_dict()) if getattr(stitcher, "fusion", None) is not None else None
    return conn, adapters, fusion


def export_trained(stitcher, folder, train_modes: dict[str, str], write: bool = True, step: int | None = None) -> Path:
    """Write everything that trained into ``folder`` (atomically replaced as a whole).

    Under a sharded strategy every rank must call this (gathering is collective); only the rank
    with ``write=True`` writes files.
    """
    tensors = gather_trained(stitcher, train_modes)
    if write:
        write_trained(stitcher, folder, train_modes, tensors, step)
    return Path(folder)


def write_trained(stitcher, folder, train_modes: dict[str, str], tensors: tuple, step: int | None = None) -> None:
    """Write ``gather_trained``'s tensors into a temporary folder, then swap it in; a failure (a full
    disk) removes the temporary folder and leaves the previous export as it was."""
    folder = Path(folder)
    with uninterrupted(), disk_full_errors(f"trained folder '{folder}'", "the previous export is intact"):
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
        try:
            _write_trained_files(stitcher, tmp, train_modes, *tensors, step=step)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        _replace_dir(tmp, folder)


def _write_trained_files(stitcher, tmp: Path, train_modes, conn, adapters, fusion, step: int | None = None) -> None:
    save_file(conn, tmp / "connectors.safetensors")
    if step is not None:
        (tmp / TRAINED_INFO).write_text(json.dumps({"step": int(step)}))
    if fusion is not None:  # inserted blocks and new k/v projections (soe/stitch/depth.py, soe/stitch/attention_kv.py)
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
    from soe.train.trained import STITCH_FILE, is_merged, load_stitch_file

    if is_merged(folder):  # `soe export --format merged`: the experts were built from its folders
        load_stitch_file(stitcher, folder / STITCH_FILE)
        return
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
            try:
                config = LoraConfig.from_pretrained(lora_dir)
            except Exception as e:  # missing, not JSON, not a LoRA config: name the file
                raise ValueError(f"'{lora_dir / 'adapter_config.json'}' is not a peft LoRA adapter config ({one_line(e, 150)})") from None
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
    """After every checkpoint, export what trained to ``<run_dir>/trained`` (peft + safetensors).

    The tensors are taken when the checkpoint is (every rank: sharded ones are gathered); the
    files are written once the checkpoint file is complete (``AtomicCheckpointIO.after_save``), so
    ``trained/`` is never ahead of the last checkpoint, e.g. when the disk fills up.
    """

    def __init__(self, folder, train_modes: dict[str, str]):
        self.folder, self.train_modes = Path(folder), train_modes
        self._pending: tuple | None = None  # (stitcher, tensors, step) of the checkpoint being written

    def attach(self, io: AtomicCheckpointIO) -> None:
        io.after_save.append(self._write_pending)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        self._pending = (pl_module.stitcher, gather_trained(pl_module.stitcher, self.train_modes), trainer.global_step)

    def _write_pending(self, path) -> None:
        if self._pending is not None:
            stitcher, tensors, step = self._pending
            write_trained(stitcher, self.folder, self.train_modes, tensors, step)
            self._pending = None

    def on_train_end(self, trainer, pl_module):
        if trainer.checkpoint_callback is None:  # otherwise the final checkpoint exported it
            export_trained(pl_module.stitcher, self.folder, self.train_modes, write=trainer.is_global_zero,
                           step=trainer.global_step)
        elif trainer.is_global_zero and self._pending is not None:
            # strategies that save without the CheckpointIO plugin (FSDP2's distributed checkpoints) never call
            # after_save: the gathered tensors of the last checkpoint are written now (no collective needed)
            self._write_pending(None)




def is_merged(folder) -> bool:
    folder = Path(folder)
    return (folder / STITCH_FILE).is_file() and all((folder / f"expert_{s}").is_dir() for s in ("a", "b"))



def use_merged_experts(cfg, folder) -> None:
    """Point ``experts.{a,b}.path`` at a merged export's expert folders (``soe generate RECIPE ckpt=FOLDER``)."""
    folder = Path(folder)
    for side in ("a", "b"):
        cfg.experts[side].path = str(folder / f"expert_{side}")
        cfg.experts[side].train = TrainMode.frozen



def load_stitch_file(stitcher, file) -> None:
    """Connectors and fusion modules from ``stitch.safetensors`` (strict: every tensor must fit)."""
    from safetensors.torch import load_file


    tensors = load_file(file)
    parts = {"connectors": stitcher.connectors, "fusion": stitcher.fusion}
    for prefix, module in parts.items():
        sub = {k[len(prefix) + 1:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}
        if module is None:
            if sub:
                raise ValueError(f"{Path(file).name} holds {prefix} tensors, but the recipe has no stitch.depth or stitch.inject")
            continue
        module.load_state_dict(sub, strict=True)
    stray = [k for k in tensors if k.split(".", 1)[0] not in parts]
    if stray:
        raise ValueError(f"{Path(file).name}: tensors of no connector or fusion module: {stray[:3]}")



def resolve_merged_ckpt(cfg) -> None:
    """``sample.ckpt`` naming a merged export: build the experts from its folders (called before validation)."""
    ckpt = cfg.sample.ckpt
    if ckpt is not None and is_merged(ckpt):
        use_merged_experts(cfg, ckpt)
    elif ckpt is not None and Path(ckpt).is_dir() and (Path(ckpt) / STITCH_FILE).is_file():
        raise RecipeError(f"sample.ckpt: '{ckpt}' has {STITCH_FILE} but not both expert_a/ and expert_b/")

