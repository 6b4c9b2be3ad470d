"""Expert registry over the ``soe.experts`` entry-point group.

Built-in experts (``soe.experts.*``) and third-party plugins register the same way: an entry point
``name = "module:ExpertClass"`` in their package metadata. Looking a name up imports only that one
plugin module, so listing names or building one expert never imports every model family.
``@register_expert`` adds a class defined at run time (tests, notebooks) under its ``name``.
"""
from __future__ import annotations

import difflib
from importlib.metadata import entry_points

from soe.errors import SoeError
from soe.plugin.expert import Expert

ENTRY_POINT_GROUP = "soe.experts"

_REGISTRY: dict[str, type[Expert]] = {}


class UnknownExpertError(SoeError, KeyError):
    """No expert registered under that name; the message lists the known ones."""

    def __str__(self):  # KeyError quotes its message; keep it readable
        return str(self.args[0])


def register_expert(cls: type[Expert]) -> type[Expert]:
    """Class decorator: make ``cls`` available as ``get_expert(cls.name)``."""
    if not (isinstance(cls, type) and issubclass(cls, Expert)):
        raise TypeError(f"@register_expert expects a subclass of soe.Expert, got {cls!r}")
    if not cls.name or not cls.modality:
        raise ValueError(f"{cls.__qualname__} must set class attributes 'name' and 'modality'")
    other = _REGISTRY.get(cls.name)
    if other is not None and other.__qualname__ != cls.__qualname__:
        raise ValueError(f"expert name '{cls.name}' is already registered by {other.__module__}.{other.__qualname__}")
    _REGISTRY[cls.name] = cls
    return cls


def _entry_points() -> dict:
    """Installed ``soe.experts`` entry points by name (package metadata only; nothing is imported)."""
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def _load(ep) -> type[Expert]:
    obj = ep.load()  # imports the plugin module (its @register_expert, if any, runs here)
    if not (isinstance(obj, type) and issubclass(obj, Expert)):
        raise TypeError(f"entry point '{ep.name}' of group '{ENTRY_POINT_GROUP}' loads {obj!r}, not a subclass of soe.Expert")
    if obj.name != ep.name:
        raise ValueError(f"entry point '{ep.name}' of group '{ENTRY_POINT_GROUP}' loads {obj.__qualname__} whose name is "
                         f"'{obj.name}'; the entry-point name and the class attribute 'name' must agree")
    if _REGISTRY.get(obj.name) is not obj:
        register_expert(obj)
    return obj


def get_expert(name: str) -> type[Expert]:
    """The expert class registered as ``name``; an unknown name lists the known ones."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    ep = _entry_points().get(name)
    if ep is None:
        known = list_experts()
        close = difflib.get_close_matches(name, known, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise UnknownExpertError(f"unknown expert '{name}'; known experts: {', '.join(known)}.{hint}")
    return _load(ep)


def list_experts() -> list[str]:
    """Every known expert name: installed entry points and classes registered at run time."""
    return sorted(set(_REGISTRY) | set(_entry_points()))
