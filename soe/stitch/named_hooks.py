"""Every change a stitch makes to an expert module, under a readable name, removable in one call.

Both engines put torch hooks on expert blocks (and, for ``attention_kv``, swap attention
processors). Each is recorded here as ``soe.<direction>.<side>.<block>.<what>``, e.g.
``soe.a_to_b.b.03.add`` (the hook engine adds the a -> b connector output to block 3 of expert b)
or ``soe.b_to_a.a.00.attn1`` (attention ``attn1`` of block 0 of expert a takes extra key/value
tokens). ``<block>`` is the index in the stitched run order, inserted blocks included. ``soe
inspect`` lists them; ``Stitcher.unstitch`` removes them all.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

KINDS = {
    "forward_hook": "forward hook",
    "forward_pre_hook": "forward pre-hook",
    "processor": "attention processor",
}


@dataclass(frozen=True)
class NamedHook:
    name: str  # soe.<direction>.<side>.<block>.<what>
    target: str  # module inside the block ("" = the block itself)
    kind: str  # a key of KINDS
    does: str  # one short phrase

    @property
    def direction(self) -> str:
        return self.name.split(".")[1]

    @property
    def side(self) -> str:
        return self.name.split(".")[2]

    @property
    def block(self) -> int:
        return int(self.name.split(".")[3])


def hook_name(direction: str, side: str, block: int, what: str) -> str:
    return f"soe.{direction}.{side}.{block:02d}.{what}"


class NamedHooks:
    """The hooks and processor swaps one Stitcher installed, in installation order."""

    def __init__(self):
        self._undo: dict[str, Callable[[], None]] = {}
        self._info: dict[str, NamedHook] = {}

    def forward_hook(self, name: str, module: nn.Module, fn, target: str, does: str, with_kwargs: bool = False) -> None:
        self._add(NamedHook(name, target, "forward_hook", does), module.register_forward_hook(fn, with_kwargs=with_kwargs).remove)

    def forward_pre_hook(self, name: str, module: nn.Module, fn, target: str, does: str) -> None:
        self._add(NamedHook(name, target, "forward_pre_hook", does), module.register_forward_pre_hook(fn, with_kwargs=True).remove)

    def processor(self, name: str, attn: nn.Module, processor, target: str, does: str) -> None:
        original = attn.processor
        attn.set_processor(processor)
        self._add(NamedHook(name, target, "processor", does), lambda: attn.set_processor(original))

    def _add(self, info: NamedHook, undo: Callable[[], None]) -> None:
        if info.name in self._info:
            undo()
            raise RuntimeError(f"stitcher: hook {info.name!r} is installed twice")
        self._info[info.name], self._undo[info.name] = info, undo

    def __iter__(self):
        return iter(self._info.values())

    def __len__(self) -> int:
        return len(self._info)

    def names(self) -> list[str]:
        return list(self._info)

    def remove_all(self) -> None:
        """Undo in reverse order (a processor swapped twice gets its very first one back)."""
        for name in reversed(list(self._undo)):
            self._undo.pop(name)()
            del self._info[name]
