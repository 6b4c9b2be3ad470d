"""What an ``inject`` section of a recipe means: how a connector reaches its host block.

``add`` puts the connector output on the host block's output (the default); ``attention_kv`` makes
it extra key/value tokens of chosen attention modules (see soe/attention_kv.py and soe/lockstep.py for the mechanism).
"""
from __future__ import annotations

from dataclasses import dataclass, field

INJECT_MODES = ("add", "attention_kv")
KV_MODES = ("concat", "parallel")
ROPE_STYLES = ("none", "complex", "cat")
KV_INITS = ("copy", "random")


@dataclass(frozen=True)
class KVTarget:
    attention: str  # module path inside the host block, e.g. "attn2"
    mode: str = "concat"
    window: bool = False
    pre_norm: str | None = None
    rope: str = "none"
    rope_theta: float = 10000.0
    rope_query: bool = False
    init: str = "copy"
    copy_from: str | None = None  # null = ``attention`` itself
    cfg_mask: bool = True  # ``source_mask`` zeroes these tokens (unconditional CFG branch)

    def __post_init__(self):
        for key, value, allowed in (("mode", self.mode, KV_MODES), ("rope", self.rope, ROPE_STYLES), ("init", self.init, KV_INITS)):
            if value not in allowed:
                raise ValueError(f"inject.targets.{key}: expected one of {list(allowed)}, got {value!r}")


@dataclass(frozen=True)
class InjectSpec:
    """How one direction's connector reaches the host: ``add`` to the block output or ``attention_kv``."""

    mode: str = "add"
    tap: str | None = None  # a tap point the source plugin declares; null = the block output
    targets: tuple[KVTarget, ...] = field(default_factory=tuple)

    def __post_init__(self):
        if self.mode not in INJECT_MODES:
            raise ValueError(f"inject.mode: expected one of {list(INJECT_MODES)}, got {self.mode!r}")
        targets = tuple(t if isinstance(t, KVTarget) else KVTarget(**t) for t in self.targets)
        object.__setattr__(self, "targets", targets)
        if self.mode == "attention_kv" and not targets:
            raise ValueError("inject.targets: attention_kv needs at least one target attention")
        if self.mode == "add" and targets:
            raise ValueError("inject.targets: only attention_kv takes targets")
