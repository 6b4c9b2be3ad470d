"""soe — Stitching of Experts: join two pretrained diffusion transformers with light connectors.

The public names below are imported on first use (PEP 562), so ``import soe`` and ``soe --help``
do not pay for torch, diffusers or timm.
"""
from __future__ import annotations

from importlib import import_module

_PUBLIC = {
    "BlockListExpert": "soe.stitch.generic", "stitch_into": "soe.stitch.generic",
    "BlockState": "soe.plugin.expert", "Expert": "soe.plugin.expert", "TokenLayout": "soe.plugin.expert",
    "Connector": "soe.stitch.connector", "ConnectorConfig": "soe.schema",
    "Stitcher": "soe.stitch.stitcher",
    "get_expert": "soe.plugin.registry", "list_experts": "soe.plugin.registry", "register_expert": "soe.plugin.registry",
    "linear_pairs": "soe.stitch.align", "resolve_depth_map": "soe.stitch.align",
    "DiffusersExpert": "soe.experts.diffusers_expert",
    "load_stitched": "soe.interop.export",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name == "__version__":
        from soe.cli.commands import _version

        return _version()
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'soe' has no attribute '{name}'")
    value = getattr(import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__():
    return sorted([*globals(), *_PUBLIC])
