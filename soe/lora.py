"""What trains: connectors always; per expert peft LoRA, everything, or nothing.

Targets are regexes (full match), exact module names or name suffixes over the expert model's
module names. A pattern that matches nothing fails loudly and lists close candidates.
"""
from __future__ import annotations

import difflib
import re
from dataclasses import dataclass

from peft import LoraConfig, inject_adapter_in_model
from torch import nn

from soe.config import RecipeError, to_container
from soe.expert import Expert

ADAPTER = "soe"
_LORA_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding)


@dataclass(frozen=True)
class LoraSpec:
    r: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    targets: tuple[str, ...] | None = None


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


def add_lora(expert: Expert, spec: LoraSpec, where: str = "lora") -> list[str]:
    """Inject a peft LoRA adapter into ``expert.model``; only the adapter weights train."""
    targets = match_modules(expert.model, spec.targets or expert.lora_targets, f"{where}.targets")
    config = LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout, target_modules=targets)
    on_meta = any(p.is_meta for p in expert.model.parameters())  # `soe inspect`: shapes only, no init
    inject_adapter_in_model(config, expert.model, adapter_name=ADAPTER, low_cpu_mem_usage=on_meta)
    for name, p in expert.model.named_parameters():
        p.requires_grad_(f"lora_" in name and f".{ADAPTER}." in name + ".")
    return targets


def set_trainable(expert: Expert, mode: str, lora: LoraSpec | None = None, where: str = "expert") -> list[str]:
    """``frozen``: nothing trains; ``full``: every weight trains; ``lora``: only adapter weights."""
    expert.requires_grad_(mode == "full")
    if mode == "lora":
        return add_lora(expert, lora or LoraSpec(), where=f"{where}.lora")
    return []


def apply_training_setup(stitcher, cfg) -> dict[str, list[str]]:
    """Apply the recipe's ``experts.{a,b}.train`` / ``lora`` settings; connectors always train."""
    targets = {}
    for side in ("a", "b"):
        e = cfg.experts[side]
        lora = to_container(e.lora)
        spec = LoraSpec(r=lora["r"], alpha=lora["alpha"], dropout=lora["dropout"],
                        targets=tuple(lora["targets"]) if lora["targets"] else None)
        targets[side] = set_trainable(getattr(stitcher, side), e.train, spec, where=f"experts.{side}")
    stitcher.connectors.requires_grad_(True)
    if getattr(stitcher, "fusion", None) is not None:  # inserted blocks and new k/v projections train too
        stitcher.fusion.requires_grad_(True)
    return targets


def trainable_state_dict(module: nn.Module) -> dict:
    """Only the tensors that train (connectors, LoRA, fully-trained experts): what a checkpoint holds."""
    names = {n for n, p in module.named_parameters() if p.requires_grad}
    return {k: v for k, v in module.state_dict().items() if k in names}
