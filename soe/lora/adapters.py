"""What trains: connectors always; per expert peft LoRA, everything, or nothing.

Targets are regexes (full match), exact module names or name suffixes over the expert model's
module names. A pattern that matches nothing fails loudly and lists close candidates.
"""
from __future__ import annotations

import difflib
import math
import re

from torch import nn

from soe.plugin.expert import Expert
from soe.schema import LoraConfig, RecipeError

ADAPTER = "soe"
# ``lora.init_from`` given as a Hub repo id (soe/hub.py): a LoRA repo's weight and config files, no more
LORA_HUB_FILES = ("*.safetensors", "*.json")
_LORA_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding)


def match_modules(model: nn.Module, patterns, where: str = "lora.targets") -> list[str]:
    """Names of LoRA-able modules matched by any pattern; each pattern must match at least once."""
    names = [n for n, m in model.named_modules() if isinstance(m, _LORA_LAYERS)]
    matched: set[str] = set()
    for pat in patterns:
        try:
            rx = re.compile(pat)
        except re.error as e:
            raise RecipeError(f"{where}: '{pat}' is not a valid regex ({e})") from None
        hits = {n for n in names if n == pat or n.endswith("." + pat) or rx.fullmatch(n)}
        if not hits:
            close = difflib.get_close_matches(pat.replace("\\", ""), names, n=5, cutoff=0.3)
            raise RecipeError(f"{where}: '{pat}' matches no Linear/Conv module; close candidates: {close or names[:5]}")
        matched |= hits
    return sorted(matched)


def add_lora(expert: Expert, spec: LoraConfig, where: str = "lora", adapters_on=None, defer: bool = False) -> list[str]:
    """Inject a peft LoRA adapter into ``expert.model``; only the adapter weights train.

    With ``spec.init_from`` the adapter is the one in that file (its modules, ranks and alphas) and
    starts from its weights, e.g. a community Wan LoRA in diffusers or ComfyUI format. An expert on
    the meta device gets shapes only (`soe inspect`), or with ``adapters_on`` real, initialised
    adapters on that device. ``defer`` (FSDP2): adapters on the meta device whatever the expert's
    weights, drawn later by :func:`materialise_adapters` (``StitchModule.configure_model``)."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import inject_adapter_in_model

    on_meta = defer or any(p.is_meta for p in expert.model.parameters())
    if spec.init_from is not None:
        return _add_lora_from_file(expert, spec, where, on_meta, None if defer else adapters_on)
    targets = match_modules(expert.model, spec.targets or expert.lora_targets, f"{where}.targets")
    config = PeftLoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout, target_modules=targets)
    inject_adapter_in_model(config, expert.model, adapter_name=ADAPTER, low_cpu_mem_usage=on_meta)
    if on_meta and adapters_on is not None and not defer:
        materialise_adapters(expert, spec, adapters_on, where)
    _train_only_lora(expert)
    return targets


def lora_parameter_count(expert: Expert, spec: LoraConfig, where: str = "lora") -> int | None:
    """How many parameters :func:`add_lora` would add, from the targeted modules' shapes alone
    (``soe inspect`` counts instead of injecting hundreds of peft layers). peft's LoRA of rank r adds
    lora_A and lora_B without bias: ``r * (in + out)`` to a Linear, ``r * (num_embeddings + dim)`` to an
    Embedding, ``r * in * prod(kernel) + out * r / groups`` to a convolution (B is a grouped 1x1 conv).
    None when the count needs peft itself: ``init_from`` (its ranks and modules come from the file)."""
    if spec.init_from is not None:
        return None
    layers = dict(expert.model.named_modules())
    total = 0
    for name in match_modules(expert.model, spec.targets or expert.lora_targets, f"{where}.targets"):
        m = layers[name]
        if isinstance(m, nn.Linear):
            total += spec.r * (m.in_features + m.out_features)
        elif isinstance(m, nn.Embedding):
            total += spec.r * (m.num_embeddings + m.embedding_dim)
        elif isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and spec.r % m.groups == 0:  # else peft refuses: let it say so
            total += spec.r * m.in_channels * math.prod(m.kernel_size) + m.out_channels * spec.r // m.groups
        else:
            return None
    return total


def materialise_adapters(expert: Expert, spec: LoraConfig, device, where: str = "lora") -> int:
    """Adapters that peft left on the meta device: allocated on ``device`` with the values an eager
    :func:`add_lora` draws from the global RNG in the same state. peft builds each adapted layer's
    ``lora_A`` / ``lora_B`` as new ``nn.Linear`` / ``nn.Conv`` (their default init draws) or, for an
    embedding, ``torch.randn`` parameters, then resets them (``reset_lora_parameters``) and casts them
    to the base layer's dtype: the same draws in the same module order here. With ``spec.init_from``
    the file's tensors are loaded afterwards, as eagerly. Returns the number of layers filled."""
    from peft.tuners.lora import LoraLayer

    done = 0
    for m in expert.model.modules():
        if not isinstance(m, LoraLayer):
            continue
        parts = [getattr(m, n) for n in m.adapter_layer_names if ADAPTER in getattr(m, n)]
        if not any(p.is_meta for part in parts for p in part.parameters()):
            continue
        for part in parts:
            part.to_empty(device=device)
            item = part[ADAPTER]
            if isinstance(item, nn.Module):
                item.reset_parameters()  # what its constructor drew
            else:
                item.data.normal_()  # torch.randn
        m.reset_lora_parameters(ADAPTER, True)
        base = m.get_base_layer().weight
        if base.dtype.is_floating_point:
            for part in parts:
                part.to(dtype=base.dtype)
        done += 1
    if spec.init_from is not None:
        _load_lora_file(expert, spec, f"{where}.init_from")
    return done


def _read_lora_file(expert: Expert, spec: LoraConfig, key: str):
    from soe.hub import resolve
    from soe.lora.formats import COMFYUI_NAMES, LoraFileError, read_lora

    try:
        return read_lora(resolve(spec.init_from, key, LORA_HUB_FILES), COMFYUI_NAMES.get(expert.name))
    except LoraFileError as e:
        raise RecipeError(f"{key}: {e}") from None


def _add_lora_from_file(expert: Expert, spec: LoraConfig, where: str, on_meta: bool, adapters_on=None) -> list[str]:
    from peft import inject_adapter_in_model

    key = f"{where}.init_from"
    weights = _read_lora_file(expert, spec, key)
    layers = dict(expert.model.named_modules())
    unknown = [m for m in weights.modules if not isinstance(layers.get(m), _LORA_LAYERS)]
    if unknown:
        close = difflib.get_close_matches(unknown[0], list(layers), n=3, cutoff=0.3)
        raise RecipeError(f"{key}: '{spec.init_from}' adapts module '{unknown[0]}' that expert '{expert.name}' does not have "
                          f"({len(unknown)} such); close candidates: {close}")
    inject_adapter_in_model(weights.peft_config(spec.dropout), expert.model, adapter_name=ADAPTER, low_cpu_mem_usage=on_meta)
    if on_meta and adapters_on is not None:
        materialise_adapters(expert, spec, adapters_on, where)  # loads the file too
    elif not on_meta:
        _load_lora_file(expert, spec, key, weights)
    _train_only_lora(expert)
    return weights.modules


def _load_lora_file(expert: Expert, spec: LoraConfig, key: str, weights=None) -> None:
    from peft import set_peft_model_state_dict

    weights = weights or _read_lora_file(expert, spec, key)
    try:
        result = set_peft_model_state_dict(expert.model, weights.tensors, adapter_name=ADAPTER)
    except RuntimeError as e:  # shape mismatch: a LoRA of another model size
        raise RecipeError(f"{key}: '{spec.init_from}' does not fit expert '{expert.name}': {' '.join(str(e).split())[:300]}") from None
    missing = [k for k in getattr(result, "missing_keys", []) if "lora_" in k]
    if missing or getattr(result, "unexpected_keys", []):
        raise RecipeError(f"{key}: '{spec.init_from}' leaves LoRA tensors unloaded: {(missing or result.unexpected_keys)[:3]}")


def _train_only_lora(expert: Expert) -> None:
    for name, p in expert.model.named_parameters():
        p.requires_grad_("lora_" in name and f".{ADAPTER}." in name + ".")


def set_trainable(expert: Expert, mode: str, lora: LoraConfig | None = None, where: str = "expert", adapters_on=None,
                  defer: bool = False) -> list[str]:
    """``frozen``: nothing trains; ``full``: every weight trains; ``lora``: only adapter weights."""
    expert.requires_grad_(mode == "full")
    if mode == "lora":
        return add_lora(expert, lora or LoraConfig(), where=f"{where}.lora", adapters_on=adapters_on, defer=defer)
    return []
