"""Training with frozen expert weights stored in fp8 (``experts.<side>.storage_dtype: float8_e4m3fn``).

Each frozen ``Linear`` / ``Conv`` layer keeps its weight in fp8 and computes with a copy cast to the
expert's dtype, through a diffusers ``ModelHook``. Unlike diffusers' ``apply_layerwise_casting`` (used
for sampling, see ``soe.sample.speed``), which casts the parameter itself up before a layer runs and back
down after it, the parameter is never changed here: autograd and gradient-checkpoint recomputation
keep seeing the tensors they saved. Trainable layers (LoRA, fully trained experts) are left alone.
Halves the frozen weights of a LoRA run (UniVerse-1: about 9.4 GB -> 4.7 GB of bf16 weights).
The recipe's ``experts.<side>.storage_dtype`` reaches here through ``soe.train.build.apply_storage_dtypes``.
"""
from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from diffusers.hooks import HookRegistry, ModelHook
from torch import nn

from soe.schema import StorageDtype

HOOK_NAME = "soe_fp8_storage"
_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)

SKIP_CAST = ("pos_embed", "patch_embed", "norm", "^proj_in$", "^proj_out$", "lora_", "time_proj", "timestep_embedder")



class _CastCopyHook(ModelHook):
    def __init__(self, compute_dtype: torch.dtype):
        super().__init__()
        self.compute_dtype = compute_dtype

    def new_forward(self, module, x, *args, **kwargs):
        w = module.weight.to(self.compute_dtype)  # a copy: the stored fp8 parameter is never touched
        b = module.bias.to(self.compute_dtype) if module.bias is not None else None
        if isinstance(module, nn.Linear):
            return F.linear(x, w, b)
        return module._conv_forward(x, w, b)


def store_frozen_in(model: nn.Module, storage_dtype: str, compute_dtype: torch.dtype) -> list[str]:
    """Frozen layers of ``model`` stored in ``storage_dtype``; returns their names."""
    skip = SKIP_CAST + tuple(getattr(model, "_skip_layerwise_casting_patterns", None) or ())
    done = []
    for name, m in model.named_modules():
        if not isinstance(m, _LAYERS) or any(re.search(p, name) for p in skip):
            continue
        params = [m.weight] + ([m.bias] if m.bias is not None else [])
        if any(p.requires_grad for p in params):
            continue
        m.weight.data = m.weight.data.to(StorageDtype(storage_dtype).torch)
        HookRegistry.check_if_exists_or_initialize(m).register_hook(_CastCopyHook(compute_dtype), HOOK_NAME)
        done.append(name)
    return done
