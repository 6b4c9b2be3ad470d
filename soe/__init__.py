"""soe — Stitching of Experts: join two pretrained diffusion transformers with light connectors.

The public names below are imported on first use (PEP 562), so ``import soe`` and ``soe --help``
do not pay for torch, diffusers or timm.
"""
from __future__ import annotations

from importlib import import_module

_PUBLIC = {
    "BlockListExpert": "soe.generic", "stitch_into": "soe.generic",
    "BlockState": "soe.expert", "Expert": "soe.expert", "TokenLayout": "soe.expert",
    "Connector": "soe.connector", "ConnectorConfig": "soe.schema",
    "Stitcher": "soe.stitcher",
    "get_expert": "soe.registry", "list_experts": "soe.registry", "register_expert": "soe.registry",
    "linear_pairs": "soe.align", "resolve_depth_map": "soe.align",
    "DiffusersExpert": "soe.experts.diffusers_expert",
    "load_stitched": "soe.export",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name == "__version__":
        from soe.cli import _version

        return _version()
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'soe' has no attribute '{name}'")
    value = getattr(import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__():
    return sorted([*globals(), *_PUBLIC])
