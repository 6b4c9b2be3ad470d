"""LoRA files as other tools write and read them: diffusers, peft and ComfyUI key naming, alpha.

soe keeps adapters as peft tensors named after the expert model's modules
(``blocks.0.attn1.to_q.lora_A.weight``). Other tools differ in three ways:

* a prefix: diffusers pipelines file transformer adapters under ``transformer.``, peft's
  ``PeftModel`` under ``base_model.model.``, ComfyUI under ``diffusion_model.``;
* the module names: ComfyUI runs Wan under the original (non-diffusers) Wan names
  (``blocks.0.self_attn.q``), ACE-Step v1 under its official names (which soe's model keeps);
* the scale: peft and diffusers store ``lora_alpha`` in the adapter config (diffusers: in the
  safetensors header, key ``lora_adapter_metadata``); ComfyUI stores one ``<module>.alpha`` tensor per
  module and scales ``lora_up @ lora_down`` by ``alpha / rank``, exactly as peft does.

``read_lora`` reads any of them back into soe's naming (``experts.<side>.lora.init_from``).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from soe.errors import SoeError

METADATA_KEY = "lora_adapter_metadata"  # diffusers' safetensors header key for the adapter config
DIFFUSERS_FILE = "pytorch_lora_weights.safetensors"  # diffusers' and ACE-Step v1's file name
PEFT_FILE = "adapter_model.safetensors"  # peft's file name (with adapter_config.json)
_PREFIXES = ("transformer.", "base_model.model.", "diffusion_model.")


class LoraFileError(SoeError, ValueError):
    """A LoRA file that cannot be read or does not fit the expert."""


class ModuleNames:
    """A two-way renaming of module names by a table of ``(soe name, other name)`` templates;
    ``{i}`` stands for a block index. Names the table does not cover are refused."""

    def __init__(self, pairs: list[tuple[str, str]]):
        def rx(t):
            return re.compile(re.escape(t).replace(r"\{i\}", r"(?P<i>\d+)"))

        self._to_other = [(rx(a), b) for a, b in pairs]
        self._from_other = [(rx(b), a) for a, b in pairs]

    @staticmethod
    def _rename(name: str, rules) -> str | None:
        for src, dst in rules:
            m = src.fullmatch(name)
            if m:
                return dst.format(**m.groupdict())
        return None

    def to_other(self, name: str) -> str | None:
        return self._rename(name, self._to_other)

    def from_other(self, name: str) -> str | None:
        return self._rename(name, self._from_other)


class SameNames:
    """The expert model already uses the other tool's names (soe's ACE-Step v1 keeps the official ones)."""

    def to_other(self, name: str) -> str:
        return name

    def from_other(self, name: str) -> str:
        return name


# diffusers' WanTransformer3DModel -> the original Wan module names ComfyUI's Wan model uses.
WAN_ORIGINAL_NAMES = ModuleNames([
    *[(f"blocks.{{i}}.attn1.{d}", f"blocks.{{i}}.self_attn.{o}") for d, o in
      (("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "o"))],
    *[(f"blocks.{{i}}.attn2.{d}", f"blocks.{{i}}.cross_attn.{o}") for d, o in
      (("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "o"), ("add_k_proj", "k_img"), ("add_v_proj", "v_img"))],
    ("blocks.{i}.ffn.net.0.proj", "blocks.{i}.ffn.0"),
    ("blocks.{i}.ffn.net.2", "blocks.{i}.ffn.2"),
    ("patch_embedding", "patch_embedding"),
    ("condition_embedder.text_embedder.linear_1", "text_embedding.0"),
    ("condition_embedder.text_embedder.linear_2", "text_embedding.2"),
    ("condition_embedder.time_embedder.linear_1", "time_embedding.0"),
    ("condition_embedder.time_embedder.linear_2", "time_embedding.2"),
    ("condition_embedder.time_proj", "time_projection.1"),
    ("condition_embedder.image_embedder.ff.net.0.proj", "img_emb.proj.1"),
    ("condition_embedder.image_embedder.ff.net.2", "img_emb.proj.3"),
    ("proj_out", "head.head"),
])

# Experts whose models ComfyUI runs, and how their module names read there.
COMFYUI_NAMES = {"wan2.1": WAN_ORIGINAL_NAMES, "wan2.2-ti2v": WAN_ORIGINAL_NAMES, "ace-step": SameNames()}


@dataclass
class LoraWeights:
    """An adapter in soe's naming: ``tensors`` keyed ``<module>.lora_A.weight`` / ``<module>.lora_B.weight``,
    plus the rank and alpha of each module."""

    tensors: dict[str, torch.Tensor]
    ranks: dict[str, int]
    alphas: dict[str, float]

    @property
    def modules(self) -> list[str]:
        return sorted(self.ranks)

    def with_alpha_equal_rank(self) -> "LoraWeights":
        """The same adapter with each module's ``alpha / rank`` folded into ``lora_B`` (alpha = rank):
        for loaders that read no alpha (ACE-Step v1's pipeline reads the file without its metadata)."""
        tensors = dict(self.tensors)
        for m, r in self.ranks.items():
            if self.alphas[m] != r:
                b = tensors[f"{m}.lora_B.weight"]
                tensors[f"{m}.lora_B.weight"] = (b.double() * (self.alphas[m] / r)).to(b.dtype)
        return LoraWeights(tensors, dict(self.ranks), {m: float(r) for m, r in self.ranks.items()})

    def peft_config(self, dropout: float = 0.0):
        """A peft ``LoraConfig`` that reproduces these ranks and alphas (patterns where modules differ)."""
        from peft import LoraConfig

        r = max(set(self.ranks.values()), key=list(self.ranks.values()).count)
        alpha = max(set(self.alphas.values()), key=list(self.alphas.values()).count)
        return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=self.modules,
                          rank_pattern={f"^{m}$": v for m, v in self.ranks.items() if v != r},
                          alpha_pattern={f"^{m}$": v for m, v in self.alphas.items() if v != alpha})


def comfyui_state_dict(weights: LoraWeights, names) -> dict[str, torch.Tensor]:
    """ComfyUI's LoRA keys: ``diffusion_model.<name>.lora_down.weight`` (A), ``.lora_up.weight`` (B)
    and ``.alpha`` (a scalar tensor; ComfyUI scales by alpha / rank)."""
    out = {}
    for module in weights.modules:
        other = names.to_other(module)
        if other is None:
            raise LoraFileError(f"module '{module}' has no ComfyUI name (soe.lora.formats knows the Wan and ACE-Step v1 layouts)")
        key = f"diffusion_model.{other}"
        out[f"{key}.lora_down.weight"] = weights.tensors[f"{module}.lora_A.weight"].contiguous()
        out[f"{key}.lora_up.weight"] = weights.tensors[f"{module}.lora_B.weight"].contiguous()
        out[f"{key}.alpha"] = torch.tensor(float(weights.alphas[module]))
    return out


def find_lora_file(path) -> Path:
    """``path`` itself, or the one LoRA file inside a folder (diffusers' or peft's file name first)."""
    path = Path(path)
    if path.is_file():
        return path
    if not path.is_dir():
        raise LoraFileError(f"LoRA file or folder not found: '{path}'")
    for name in (DIFFUSERS_FILE, PEFT_FILE):
        if (path / name).is_file():
            return path / name
    found = sorted(path.glob("*.safetensors"))
    if len(found) != 1:
        raise LoraFileError(f"'{path}' holds {len(found)} .safetensors files; expected {DIFFUSERS_FILE}, {PEFT_FILE} or exactly one")
    return found[0]


def read_lora(path, names=None) -> LoraWeights:
    """A LoRA written by diffusers (``save_lora_weights`` / ``save_lora_adapter``), peft or ComfyUI,
    in soe's module naming. ``names`` renames ComfyUI module names (e.g. ``WAN_ORIGINAL_NAMES``)."""
    from safetensors import SafetensorError, safe_open

    file = find_lora_file(path)
    try:
        with safe_open(file, framework="pt") as f:
            header = f.metadata() or {}
            raw = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise LoraFileError(f"'{file}' is not a readable safetensors file ({e})") from None
    comfy = any(k.startswith("diffusion_model.") or ".lora_down." in k or k.endswith(".alpha") for k in raw)
    tensors, alphas = {}, {}
    for key, value in raw.items():
        bare = next((key[len(p):] for p in _PREFIXES if key.startswith(p)), key)
        if bare.endswith(".alpha"):
            alphas[bare[: -len(".alpha")]] = float(value)
            continue
        m = re.fullmatch(r"(.+)\.(lora_A|lora_B|lora_down|lora_up)(?:\.[\w-]+)?\.weight", bare)
        if m is None:
            raise LoraFileError(f"'{file}': tensor '{key}' is not a LoRA down/up weight (lora_A/lora_B or lora_down/lora_up)")
        module, part = m.group(1), {"lora_down": "lora_A", "lora_up": "lora_B"}.get(m.group(2), m.group(2))
        tensors.setdefault(module, {})[part] = value
    if comfy and names is not None:
        renamed = {}
        for module, parts in tensors.items():
            ours = names.from_other(module)
            if ours is None:
                raise LoraFileError(f"'{file}': module '{module}' has no counterpart in this expert's model")
            renamed[ours] = parts
        alphas = {names.from_other(m) or m: a for m, a in alphas.items()}
        tensors = renamed
    out, ranks = {}, {}
    for module, parts in sorted(tensors.items()):
        if set(parts) != {"lora_A", "lora_B"}:
            raise LoraFileError(f"'{file}': module '{module}' lacks its {'lora_B (up)' if 'lora_A' in parts else 'lora_A (down)'} weight")
        out[f"{module}.lora_A.weight"], out[f"{module}.lora_B.weight"] = parts["lora_A"], parts["lora_B"]
        ranks[module] = int(parts["lora_A"].shape[0])
    if not out:
        raise LoraFileError(f"'{file}' holds no LoRA weights")
    config = _adapter_config(file, header)
    scale = {}
    for module, r in ranks.items():
        if module in alphas:  # ComfyUI: one alpha tensor per module
            scale[module] = alphas[module]
        elif config is not None:
            pattern = {k.lstrip("^").rstrip("$"): v for k, v in (config.get("alpha_pattern") or {}).items()}
            scale[module] = float(pattern.get(module, config.get("lora_alpha", r)))
        else:  # no alpha stored anywhere: the scale is 1, as diffusers and ComfyUI read such files
            scale[module] = float(r)
    return LoraWeights(out, ranks, scale)


def _adapter_config(file: Path, header: dict) -> dict | None:
    """The adapter config: diffusers' header metadata (prefix stripped), else peft's adapter_config.json."""
    if METADATA_KEY in header:
        meta = json.loads(header[METADATA_KEY])
        for p in _PREFIXES:  # save_lora_weights files the keys under the component prefix
            if any(k.startswith(p) for k in meta):
                meta = {k[len(p):]: v for k, v in meta.items() if k.startswith(p)}
        return meta
    side = file.parent / "adapter_config.json"
    return json.loads(side.read_text()) if side.is_file() else None
