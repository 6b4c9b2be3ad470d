"""What ``soe experts`` lists, read without importing the expert plugins (so without torch).

A plugin registers its class in the ``soe.experts`` entry-point group (``name = "module:Class"``,
soe/plugin/registry.py). Importing that module imports torch and the model library, which costs seconds, so
a plugin may also declare a short, torch-free description of the class under the same name in the
``soe.experts.info`` group: an entry point that loads a plain dict of the class attributes
``modality``, ``presets`` (its keys, in order) and ``source``::

    # pyproject.toml
    [project.entry-points."soe.experts.info"]
    my-expert = "my_pkg.info:TOY"

    # my_pkg/info.py (imports nothing heavy, and neither does my_pkg/__init__.py)
    TOY = {"modality": "audio", "presets": ["base", "tiny"], "source": "my_pkg.ToyModel"}

Experts without a description (or with one that is not such a dict) are listed from their class, as
before: only slower. ``soe experts check NAME`` checks that the description equals the class
(``soe.testing``), so the two cannot drift apart unnoticed; soe's own descriptions are in
``soe/experts/info.py``. Classes registered at run time (``@register_expert``) are listed from the class.
"""
from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass
from importlib.metadata import entry_points

CLASS_GROUP = "soe.experts"
INFO_GROUP = "soe.experts.info"
INFO_KEYS = ("modality", "presets", "source")


@dataclass(frozen=True)
class ExpertListing:
    """One row of ``soe experts``: the class attributes it shows, and the module that defines the expert."""

    name: str
    modality: str
    presets: tuple[str, ...]
    source: str
    plugin: str

    @classmethod
    def of_class(cls, expert_cls) -> "ExpertListing":
        return cls(expert_cls.name, expert_cls.modality, tuple(expert_cls.presets), expert_cls.source, expert_cls.__module__)


def info_dict(expert_cls) -> dict:
    """What a plugin declares in ``soe.experts.info`` for ``expert_cls`` (to compare or to copy into its own info)."""
    return {"modality": expert_cls.modality, "presets": list(expert_cls.presets), "source": expert_cls.source}


def parse_info(name: str, info, plugin: str) -> ExpertListing | None:
    """``info`` as a listing row; None when it is not a dict of the three keys with plain values."""
    if not isinstance(info, Mapping) or set(info) != set(INFO_KEYS):
        return None
    presets = info["presets"]
    if not (isinstance(info["modality"], str) and isinstance(info["source"], str) and isinstance(presets, (list, tuple))
            and all(isinstance(p, str) for p in presets)):
        return None
    return ExpertListing(name, info["modality"], tuple(presets), info["source"], plugin)


def _groups() -> tuple[dict, dict]:
    """The installed ``soe.experts`` and ``soe.experts.info`` entry points by name (each scan reads every
    installed distribution's metadata: ~3 ms)."""
    return ({ep.name: ep for ep in entry_points(group=CLASS_GROUP)}, {ep.name: ep for ep in entry_points(group=INFO_GROUP)})


def declared_info(name: str, groups: tuple[dict, dict] | None = None) -> ExpertListing | None:
    """The row the ``soe.experts.info`` entry point ``name`` describes; None without one (or when it cannot load).
    ``groups``: ``_groups()`` when the caller already has them."""
    classes, infos = groups or _groups()
    info = infos.get(name)
    if info is None or name not in classes:
        return None
    try:
        value = info.load()
    except Exception:  # a broken description only means listing from the class
        return None
    return parse_info(name, value, classes[name].value.partition(":")[0].strip())


def listings() -> list[ExpertListing]:
    """Every expert ``soe experts`` shows, by name. Imports a plugin only when it declares no description."""
    groups = _groups()
    registry = sys.modules.get("soe.plugin.registry")  # imported only by code that registered classes at run time
    runtime = dict(registry._REGISTRY) if registry is not None else {}
    rows = []
    for name in sorted(set(groups[0]) | set(runtime)):
        row = declared_info(name, groups) if name not in runtime else None
        if row is None:
            from soe.plugin.registry import get_expert

            row = ExpertListing.of_class(get_expert(name))
        rows.append(row)
    return rows
