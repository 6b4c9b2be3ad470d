"""The Stitcher: two experts joined by connectors between mapped blocks, run by one of two engines.

* **hooks** (soe/stitch/hook_engine.py; one-way only): each expert runs its own native forward; named
  forward hooks on the mapped blocks read the source and add the connector output to the host.
  Needs nothing but each expert's block list, so any model can take part (soe/stitch/generic.py).
* **lockstep** (soe/stitch/lockstep.py; any direction): both experts run their split forwards side by side
  and exchange at each mapped pair. Inserted blocks (``depth``), taps and attention key/value
  injection (``inject``) are options of this engine.

``engine: auto`` picks the hook engine for a one-way stitch without options, else lockstep. For a
one-way stitch both engines compute the same function (tested). Everything the Stitcher puts on an
expert is a named hook (``stitcher.hooks``, soe/stitch/named_hooks.py); ``unstitch()`` removes them all.
"""
from __future__ import annotations

import torch
from torch import nn

from soe.errors import UnstitchedError, UsageError
from soe.plugin.expert import Batch, Expert
from soe.schema import ConnectorConfig, DepthConfig, InjectConfig, StitchConfig, build
from soe.stitch.align import Pairs, resolve_depth_map
from soe.stitch.batch_check import check_batches
from soe.stitch.connector import Connector
from soe.stitch.depth import expand_stacks
from soe.stitch.hook_engine import HookEngine
from soe.stitch.lockstep import Fusion, LockstepEngine
from soe.stitch.named_hooks import NamedHooks


class Stitcher(nn.Module):
    """Join expert ``a`` and expert ``b`` with connectors at the block pairs of a depth map.

    ``pairs``: ``"linear"``, ``{"every": k}``, ``"identity"`` or explicit ``[(i_a, j_b), ...]``.
    ``direction``: ``"a_to_b"``, ``"b_to_a"`` or ``"both"``. ``detach_source``: no gradient flows
    back into the source expert through a connector (UniVerse-1). Connectors live under
    ``connectors.<direction>.<host block index>``, never inside the experts. ``depth`` and
    ``inject`` are options of the lockstep engine (soe/stitch/lockstep.py); the modules they add live
    under ``fusion``. ``engine``: ``"auto"``, ``"hooks"`` or ``"lockstep"``.
    """

    def __init__(
        self,
        a: Expert,
        b: Expert,
        pairs="linear",
        direction: str = "both",
        detach_source: bool = True,
        connector: ConnectorConfig | dict | None = None,
        engine: str = "auto",
        device=None,
        dtype=None,
        depth: DepthConfig | dict | None = None,
        inject: dict | None = None,
    ):
        super().__init__()
        for side, e in (("a", a), ("b", b)):
            if not isinstance(e, Expert):
                raise UsageError(f"Stitcher: expert {side} is a {type(e).__name__}; expected a soe.Expert (see `soe experts`, "
                                 "or soe.stitch.generic.BlockListExpert / stitch_into for a plain model)")
        if a is b or a.model is b.model:
            raise UsageError(f"Stitcher: experts a and b are the same model ('{a.name}'); stitching joins two different experts")
        # the options' own checks (soe/schema/stitch.py): a bad value raises a RecipeError (a ValueError) naming it
        opts = build(StitchConfig, dict(pairs=pairs, direction=direction, detach_source=detach_source, engine=engine,
                                        connector=connector, depth=depth, inject=inject or {}))
        direction, engine, spec, depth, inject = opts.direction, opts.engine, opts.connector, opts.depth, opts.inject
        self.a, self.b = a, b
        # Options of the lockstep engine: depth expansion (soe/stitch/depth.py), taps and attention_kv (soe/stitch/lockstep.py).
        stacks = expand_stacks(a, b, depth)
        fused = any(stacks.values()) or any(v.mode != "add" or v.tap is not None for v in inject.values())
        if fused and engine == "hooks":
            raise ValueError("engine 'hooks' cannot run depth expansion, taps or attention_kv; use 'lockstep' or 'auto'")
        depths = [len(stacks[s]) if stacks[s] is not None else e.num_blocks for s, e in (("a", a), ("b", b))]
        self.pairs: Pairs = resolve_depth_map(pairs, *depths)
        self.direction, self.detach_source, self.spec = direction, detach_source, spec
        self.engine = ("hooks" if direction != "both" and not fused else "lockstep") if engine == "auto" else engine
        device = device if device is not None else a.device

        self.connectors = nn.ModuleDict({d: nn.ModuleDict() for d in ("a_to_b", "b_to_a") if direction in (d, "both")})
        for d, key, src_dim, dst_dim in self.connector_plan():
            self.connectors[d][key] = Connector(src_dim, dst_dim, spec, device=device, dtype=dtype)
        inject = {d: inject.get(d, InjectConfig()) for d in self.connectors}  # one spec per direction, "add" by default
        self.fusion: Fusion | None = None  # inserted blocks and new k/v projections, when the options ask for them
        if self.engine == "hooks":
            self._engine = HookEngine(self)
        else:
            self._engine = LockstepEngine(self, stacks, inject)
            if fused:
                self.fusion = Fusion(self._engine, device, dtype)
        self.hooks = NamedHooks()
        self.context = None  # a ContextSplit when one expert's tokens are split across ranks (soe/stitch/context_parallel.py)
        self.cfg_group = None  # sampling with parallel.cfg: the process group of the two guided halves (soe/sample/parallel.py)
        self._stitched = False
        self.restitch()

    # ---- bookkeeping ---------------------------------------------------------------------------
    @property
    def source_host(self) -> tuple[str, str]:
        """Names of (source, host) for a one-way stitch."""
        return ("a", "b") if self.direction == "a_to_b" else ("b", "a")

    def connector_plan(self) -> list[tuple[str, str, int, int]]:
        """``(direction, key, source width, host width)`` of each connector in the order they are built
        (a pair list may name one host block twice: the later connector replaces the earlier). FSDP2
        builds them again in this order, drawing what this constructor drew (``soe.train.sharding``)."""
        a, b = self.a.hidden_size, self.b.hidden_size
        plan = [("a_to_b", f"{j:02d}", a, b) for _, j in self.pairs] if "a_to_b" in self.connectors else []
        return plan + ([("b_to_a", f"{i:02d}", b, a) for i, _ in self.pairs] if "b_to_a" in self.connectors else [])

    def split_of(self, side: str):
        """The ``ContextSplit`` of expert ``side`` when its tokens are split across ranks (context parallel), else None."""
        ctx = self.context
        return ctx if ctx is not None and ctx.side == side else None

    def connector_for(self, direction: str, host_block: int) -> Connector:
        return self.connectors[direction][f"{host_block:02d}"]

    def connector_input(self, hidden: torch.Tensor, source_mask: torch.Tensor | None = None) -> torch.Tensor:
        """What a connector reads from a source hidden state: detached (``detach_source``, UniVerse-1),
        and zeroed for samples whose mask is 0 (the unconditional half of classifier-free guidance
        sees no cross-modal input)."""
        h = hidden.detach() if self.detach_source else hidden
        if source_mask is not None:
            h = h * source_mask.to(h.dtype).view(-1, *([1] * (h.dim() - 1)))
        return h

    def run_order(self, side: str) -> list[nn.Module]:
        """Expert ``side``'s blocks in the order the stitched model runs them (inserted blocks included)."""
        if isinstance(self._engine, LockstepEngine):
            return [self._engine.block(side, k) for k in range(self._engine.num_blocks(side))]
        return list(getattr(self, side).blocks)

    def unstitch(self) -> None:
        """Remove every hook and wrapped attention processor (``hooks``): each expert runs its own
        forward again, without connectors. What else was done to the experts stays: LoRA layers
        that peft added for training, trained weights, gradient checkpointing."""
        self.hooks.remove_all()
        self._stitched = False

    def restitch(self) -> None:
        """Install the hooks again after ``unstitch()`` (connectors and fusion modules were kept)."""
        if self._stitched:
            return
        try:
            self._engine.install(self.hooks)
        except Exception:
            self.hooks.remove_all()  # a tap point or module an expert does not have: leave the experts as they were
            raise
        self._stitched = True

    # ---- public --------------------------------------------------------------------------------
    def forward(self, batch_a: Batch, batch_b: Batch, source_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Predictions of both experts, with hidden states exchanged at the mapped blocks.

        ``source_mask`` ``(B,)``: multiplies what connectors read per sample; 0 = no cross-modal
        input for that sample (the unconditional half of a batched CFG call).
        """
        if not self._stitched:
            raise UnstitchedError("Stitcher: called after unstitch() (its hooks were removed); call restitch() first, "
                                  "or build a new Stitcher, to run the experts together")
        check_batches(self.a, self.b, batch_a, batch_b)
        if self.context is not None:  # a sequence split across ranks must split evenly: one line, before any rank runs
            side = self.context.side
            self.context.span(getattr(self, side).token_layout(batch_a if side == "a" else batch_b))
        return self._engine.run(batch_a, batch_b, source_mask)

    def extra_repr(self) -> str:
        return f"direction={self.direction!r}, engine={self.engine!r}, pairs={len(self.pairs)}, detach_source={self.detach_source}"
