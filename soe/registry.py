"""Expert registry: built-ins register with a decorator next to their definition; third-party
plugins register through the ``soe.experts`` entry-point group, discovered lazily on first lookup."""
from __future__ import annotations

import difflib
from importlib import import_module
from importlib.metadata import entry_points

from soe.errors import SoeError
from soe.expert import Expert

ENTRY_POINT_GROUP = "soe.experts"
_BUILTIN_MODULES = ("experts.wan", "experts.ace_step_15", "experts.ace_step", "experts.stable_audio", "experts.wan22")

_REGISTRY: dict[str, type[Expert]] = {}
_discovered = False


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


def _discover() -> None:
    global _discovered
    if _discovered:
        return
    _discovered = True
    for mod in _BUILTIN_MODULES:
        try:
            import_module(mod)
        except ModuleNotFoundError as e:  # a built-in still being written must not break the rest
            if e.name != mod:
                raise
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        obj = ep.load()  # importing the module runs its @register_expert
        if isinstance(obj, type) and issubclass(obj, Expert) and obj.name not in _REGISTRY:
            register_expert(obj)


def get_expert(name: str) -> type[Expert]:
    """The expert class registered as ``name``; an unknown name lists the known ones."""
    _discover()
    if name not in _REGISTRY:
        known = sorted(_REGISTRY)
        close = difflib.get_close_matches(name, known, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise UnknownExpertError(f"unknown expert '{name}'; known experts: {', '.join(known)}.{hint}")
    return _REGISTRY[name]


def list_experts() -> list[str]:
    _discover()
    return sorted(_REGISTRY)
