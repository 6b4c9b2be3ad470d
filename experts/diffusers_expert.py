"""Shared plumbing for experts whose model is a diffusers ``ModelMixin`` saved as a diffusers folder."""
from __future__ import annotations

import inspect

import json
from pathlib import Path
from typing import ClassVar

import torch
from safetensors import safe_open

from soe.errors import CheckpointNotFoundError
from soe.plugin.expert import Expert, hub_patterns


def cast_keeping_fp32(model, dtype):
    """``model.to(dtype)`` but the modules diffusers keeps in float32 (norms, rope, time embedders) stay float32."""
    if dtype is None or dtype == torch.float32:
        return model
    keep = tuple(getattr(model, "_keep_in_fp32_modules", None) or ())
    torch.nn.Module.to(model, dtype)  # plain cast; diffusers' own .to() warns on every cast
    for name, module in model.named_modules():
        if any(k in name.split(".") for k in keep):
            module.to(torch.float32)
    return model


def _check_float_weights(folder: Path) -> None:
    """Every stored weight is floating point (read from the safetensors headers only, no data)."""
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(file, framework="pt") as f:
            for key in f.keys():
                dtype = f.get_slice(key).get_dtype()
                if not (dtype.startswith("F") or dtype == "BF16"):
                    raise ValueError(f"'{file}': weight '{key}' is stored as {dtype}, expected a floating-point dtype")


OPTIONS_FILE = "soe_expert.json"


class DiffusersExpert(Expert):
    """An expert over one diffusers model class, stored in the ``transformer/`` subfolder of a pipeline."""

    model_class: ClassVar[type] = None  # the diffusers ModelMixin; or override model_cls() to import it lazily
    expert_keys: ClassVar[tuple[str, ...]] = ()  # constructor options of the expert, not of the model
    model_defaults: ClassVar[dict | None] = None  # the model constructor's keyword defaults (stand-ins; recipe key checks)
    subfolder: ClassVar[str] = "transformer"
    # a Hub repo id fetches the pipeline's transformer/ (or a transformer repo's own files) and its vae/ for the codec
    hub_files: ClassVar[dict[str, tuple[str, ...]]] = {"path": hub_patterns("transformer"), "codec_path": hub_patterns("vae")}

    @classmethod
    def model_cls(cls) -> type:
        """The model class. Built-in plugins import it here, so listing experts imports no diffusers model."""
        return cls.model_class

    @classmethod
    def architecture_names(cls) -> list[str]:
        """The model's constructor arguments: the family's copy of its defaults (``model_defaults``, which
        ``soe inspect`` reads without importing diffusers), else the model class's signature."""
        if cls.model_defaults is not None:
            return list(cls.model_defaults)
        params = list(inspect.signature(cls.model_cls().__init__).parameters.values())[1:]
        return [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]

    @classmethod
    def split_config(cls, config: dict) -> tuple[dict, dict]:
        """``config`` as (the model's constructor arguments, the expert's own ``expert_keys`` options)."""
        model = dict(config)
        return model, {k: model.pop(k) for k in cls.expert_keys if k in model}

    @classmethod
    def from_config(cls, config: dict, device=None, dtype=None):
        config, opts = cls.split_config(config)
        with torch.device(device or "cpu"):
            model = cls.model_cls()(**config)
        return cls(cast_keeping_fp32(model, dtype), **opts)

    @classmethod
    def _model_folder(cls, path: Path) -> Path:
        folder = path / cls.subfolder if (path / cls.subfolder / "config.json").is_file() else path
        if not (folder / "config.json").is_file():
            raise CheckpointNotFoundError(
                f"{cls.name}: no diffusers {cls.model_cls().__name__} at '{path}': "
                f"expected '{path}/{cls.subfolder}/config.json' or '{path}/config.json'"
            )
        _check_float_weights(folder)
        return folder

    @classmethod
    def _saved_options(cls, path: Path, opts: dict) -> dict:
        saved = path / OPTIONS_FILE  # expert options (fps, resolution, ...) written by `save`
        return {**json.loads(saved.read_text()).get("options", {}), **opts} if saved.is_file() else opts

    @classmethod
    def load(cls, path, dtype=None, device=None, **opts):
        """A diffusers pipeline folder (with ``transformer/``) or the transformer folder itself."""
        path = Path(path)
        folder = cls._model_folder(path)
        model, info = cls.model_cls().from_pretrained(folder, torch_dtype=dtype, output_loading_info=True)
        if info.get("missing_keys"):  # diffusers would initialise them randomly with only a log line
            missing = sorted(info["missing_keys"])
            raise ValueError(f"{cls.name}: '{folder}' lacks {len(missing)} weight(s) of the model, e.g. {missing[:3]}")
        if device is not None:
            model = model.to(device)
        return cls(model, **cls._saved_options(path, opts))

    @classmethod
    def load_empty(cls, path, dtype=None, **opts):
        from accelerate import init_empty_weights

        from soe.plugin.weights import FolderWeights

        path = Path(path)
        folder = cls._model_folder(path)
        with init_empty_weights(include_buffers=False):
            model = cls.model_cls().from_config(cls.model_cls().load_config(folder))
        return cls(cast_keeping_fp32(model, dtype), **cls._saved_options(path, opts)), FolderWeights(folder)

    def expert_options(self) -> dict:
        return {k: getattr(self, k) for k in self.expert_keys if hasattr(self, k)}

    def save(self, path) -> None:
        """The official diffusers layout, plus ``soe_expert.json`` with the expert's own options."""
        self.model.save_pretrained(Path(path) / self.subfolder)
        (Path(path) / OPTIONS_FILE).write_text(json.dumps({"name": self.name, "options": self.expert_options()}, indent=1))

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        super().set_gradient_checkpointing(enabled)  # split forward: run_block checkpoints itself
        if enabled:
            self.model.enable_gradient_checkpointing()  # native forward
        else:
            self.model.disable_gradient_checkpointing()
