"""The Stitcher: two experts, connectors between mapped blocks, and the two engines that run them.

* **hooks** (one-way only): the source expert runs its own native forward while capture hooks keep
  the outputs of mapped blocks; then the host runs its own native forward while injection hooks add
  the connector outputs. Needs nothing but each expert's block list.
* **lockstep** (any direction): both experts run through their split forward side by side; at each
  mapped pair both blocks run, then both connectors fire from the pre-exchange states (symmetric).

For a one-way stitch both engines compute the same function (tested).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.weak import WeakTensorKeyDictionary

from soe.align import Pairs, resolve_depth_map
from soe.batch_check import check_batches
from soe.connector import Connector
from soe.depth import expand_stacks
from soe.expert import Batch, BlockState, Expert, TokenLayout
from soe.inject import Fusion
from soe.schema import ConnectorConfig, DepthConfig, InjectConfig, StitchConfig, build


@dataclass
class _HookRun:
    """Per-call context the hooks read; they never mutate anything else (pure under recompute)."""

    layouts: dict[str, TokenLayout]
    source_mask: torch.Tensor | None = None
    captured: dict[int, torch.Tensor] = field(default_factory=dict)


class Stitcher(nn.Module):
    """Join expert ``a`` and expert ``b`` with connectors at the block pairs of a depth map.

    ``pairs``: ``"linear"``, ``{"every": k}``, ``"identity"`` or explicit ``[(i_a, j_b), ...]``.
    ``direction``: ``"a_to_b"``, ``"b_to_a"`` or ``"both"``. ``detach_source``: no gradient flows
    back into the source expert through a connector (UniVerse-1). Connectors live under
    ``connectors.<direction>.<host block index>``, never inside the experts.
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
        # the options' own checks (soe/schema/stitch.py): a bad value raises a RecipeError (a ValueError) naming it
        opts = build(StitchConfig, dict(pairs=pairs, direction=direction, detach_source=detach_source, engine=engine,
                                        connector=connector, depth=depth, inject=inject or {}))
        direction, engine, spec, depth, inject = opts.direction, opts.engine, opts.connector, opts.depth, opts.inject
        self.a, self.b = a, b
        # Depth expansion and attention injection (soe/depth.py, soe/inject.py) run fused, in lockstep.
        stacks = expand_stacks(a, b, depth)
        fused = any(stacks.values()) or any(v.mode != "add" or v.tap is not None for v in inject.values())
        if fused and engine == "hooks":
            raise ValueError("engine 'hooks' cannot run depth expansion, taps or attention_kv; use 'lockstep' or 'auto'")
        depths = [len(stacks[s]) if stacks[s] is not None else e.num_blocks for s, e in (("a", a), ("b", b))]
        self.pairs: Pairs = resolve_depth_map(pairs, *depths)
        self.direction, self.detach_source, self.spec = direction, detach_source, spec
        self.engine = ("hooks" if direction != "both" and not fused else "lockstep") if engine == "auto" else engine
        device = device if device is not None else a.device

        self.connectors = nn.ModuleDict()
        if direction in ("a_to_b", "both"):
            self.connectors["a_to_b"] = nn.ModuleDict(
                {f"{j:02d}": Connector(a.hidden_size, b.hidden_size, spec, device=device, dtype=dtype) for _, j in self.pairs}
            )
        if direction in ("b_to_a", "both"):
            self.connectors["b_to_a"] = nn.ModuleDict(
                {f"{i:02d}": Connector(b.hidden_size, a.hidden_size, spec, device=device, dtype=dtype) for i, _ in self.pairs}
            )
        self._run: _HookRun | None = None
        # Block input -> the call it belongs to, so a block recomputed in backward (non-reentrant
        # gradient checkpointing) gets the same injection; weak: entries die with the activations.
        self._run_of_input = WeakTensorKeyDictionary()
        self._handles: list = []
        self._stitched = True
        self.fusion = None
        if fused:
            directions = [d for d in ("a_to_b", "b_to_a") if d in self.connectors]
            self.fusion = Fusion(self, stacks, {d: inject.get(d, InjectConfig()) for d in directions}, device, dtype)
        elif direction != "both":
            self._install_hooks()

    # ---- bookkeeping ---------------------------------------------------------------------------
    @property
    def source_host(self) -> tuple[str, str]:
        """Names of (source, host) for a one-way stitch."""
        return ("a", "b") if self.direction == "a_to_b" else ("b", "a")

    def connector_for(self, direction: str, host_block: int) -> Connector:
        return self.connectors[direction][f"{host_block:02d}"]

    def unstitch(self) -> None:
        """Remove every hook: the experts behave exactly as before stitching."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        if self.fusion is not None:
            self.fusion.remove()  # hooks off, original attention processors back
        self._stitched = False

    @property
    def is_stitched(self) -> bool:
        return self._stitched

    def _source_state(self, hidden: torch.Tensor, source_mask: torch.Tensor | None = None) -> torch.Tensor:
        """What a connector reads: detached (UniVerse-1), and zeroed for samples whose mask is 0
        (the unconditional branch of classifier-free guidance sees no cross-modal input)."""
        h = hidden.detach() if self.detach_source else hidden
        if source_mask is not None:
            h = h * source_mask.to(h.dtype).view(-1, *([1] * (h.dim() - 1)))
        return h

    # ---- hook engine ---------------------------------------------------------------------------
    def _install_hooks(self) -> None:
        src_name, host_name = self.source_host
        src, host = getattr(self, src_name), getattr(self, host_name)
        direction = self.direction
        for i_a, j_b in self.pairs:
            i_src, j_host = (i_a, j_b) if direction == "a_to_b" else (j_b, i_a)
            self._handles.append(src.blocks[i_src].register_forward_hook(self._capture_hook(src, i_src)))
            self._handles.append(host.blocks[j_host].register_forward_hook(
                self._inject_hook(host, i_src, j_host, src_name, host_name), with_kwargs=True))

    def _capture_hook(self, src: Expert, i_src: int):
        def hook(module, args, output):
            if self._run is not None:  # idle outside a stitched hook-engine call
                self._run.captured[i_src] = src.block_output_hidden(output)

        return hook

    def _inject_hook(self, host: Expert, i_src: int, j_host: int, src_name: str, host_name: str):
        conn = self.connector_for(self.direction, j_host)

        def hook(module, args, kwargs, output):
            block_input = host.block_input_hidden(args, kwargs)
            run = self._run
            if run is not None:
                self._run_of_input[block_input] = run
            else:  # outside a stitcher call, unless this is a checkpointed block recomputing
                run = self._run_of_input.get(block_input)
                if run is None:
                    return None
            if i_src not in run.captured:
                raise RuntimeError(f"stitcher: block {i_src} of expert {src_name} did not run before host block {j_host}")
            hidden = host.block_output_hidden(output)  # (B, N_host, D_host)
            delta = conn(self._source_state(run.captured[i_src], run.source_mask), run.layouts[src_name], run.layouts[host_name])
            return host.with_block_output_hidden(output, hidden + delta.to(hidden.dtype))

        return hook

    def _run_hook_engine(self, batch_a: Batch, batch_b: Batch, source_mask=None) -> tuple[torch.Tensor, torch.Tensor]:
        batches = {"a": batch_a, "b": batch_b}
        src_name, host_name = self.source_host
        self._run = _HookRun(layouts={"a": self.a.token_layout(batch_a), "b": self.b.token_layout(batch_b)}, source_mask=source_mask)
        try:
            preds = {src_name: getattr(self, src_name)(batches[src_name])}  # fills run.captured
            preds[host_name] = getattr(self, host_name)(batches[host_name])  # hooks inject
        finally:
            self._run = None
        return preds["a"], preds["b"]

    # ---- lockstep engine -----------------------------------------------------------------------
    def _run_lockstep_engine(self, batch_a: Batch, batch_b: Batch, source_mask=None) -> tuple[torch.Tensor, torch.Tensor]:
        la, lb = self.a.token_layout(batch_a), self.b.token_layout(batch_b)
        sa, sb = self.a.embed(batch_a), self.b.embed(batch_b)
        na = nb = 0  # next block to run in each expert
        for i, j in self.pairs:
            sa, na = self._run_blocks(self.a, sa, na, i + 1)
            sb, nb = self._run_blocks(self.b, sb, nb, j + 1)
            ha, hb = sa.hidden, sb.hidden  # pre-exchange states: the exchange is symmetric
            if "b_to_a" in self.connectors:
                sa = sa.replace(ha + self.connector_for("b_to_a", i)(self._source_state(hb, source_mask), lb, la).to(ha.dtype))
            if "a_to_b" in self.connectors:
                sb = sb.replace(hb + self.connector_for("a_to_b", j)(self._source_state(ha, source_mask), la, lb).to(hb.dtype))
        sa, _ = self._run_blocks(self.a, sa, na, self.a.num_blocks)
        sb, _ = self._run_blocks(self.b, sb, nb, self.b.num_blocks)
        return self.a.head(sa, batch_a), self.b.head(sb, batch_b)

    @staticmethod
    def _run_blocks(expert: Expert, state: BlockState, start: int, stop: int) -> tuple[BlockState, int]:
        for k in range(start, stop):
            state = expert.run_block(k, state)
        return state, max(start, stop)

    # ---- public --------------------------------------------------------------------------------
    def forward(self, batch_a: Batch, batch_b: Batch, source_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Predictions of both experts, with hidden states exchanged at the mapped blocks.

        ``source_mask`` ``(B,)``: multiplies what connectors read per sample; 0 = no cross-modal
        input for that sample (the unconditional half of a batched CFG call).
        """
        if not self._stitched:
            raise RuntimeError("this Stitcher was unstitched; build a new one to run the experts together")
        check_batches(self.a, self.b, batch_a, batch_b)
        if self.fusion is not None:
            return self.fusion(batch_a, batch_b, source_mask)
        if self.engine == "hooks":
            return self._run_hook_engine(batch_a, batch_b, source_mask)
        return self._run_lockstep_engine(batch_a, batch_b, source_mask)

    def connector_parameters(self):
        return self.connectors.parameters()

    def extra_repr(self) -> str:
        return f"direction={self.direction!r}, engine={self.engine!r}, pairs={len(self.pairs)}, detach_source={self.detach_source}"
