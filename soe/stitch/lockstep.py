"""The lockstep engine: both experts' split forwards side by side, exchanging at every mapped pair.

Each expert runs ``embed`` -> blocks -> ``head`` (the plugin's split forward). At a mapped pair
``(i, j)`` block ``i`` of a and block ``j`` of b run, then the connectors fire. Without options this
is the plain two-way stitch: each connector reads the source block's output and its result is added
to the host block's output, both from the pre-exchange states (the exchange is symmetric). Options,
each from the recipe's ``stitch`` section, any combination:

* ``depth: insert_interpolated`` (soe/stitch/depth.py): the shallower expert runs an expanded block list
  with blocks of its own interleaved; indices below are in that run order.
* ``inject.<direction>.tap``: the connector reads a point inside the source block (a tap point the
  plugin declares) instead of its output.
* ``inject.<direction>.mode: attention_kv`` (soe/stitch/attention_kv.py): the connector output becomes
  extra key/value tokens of attentions inside the host block, computed inside that block. A host
  block that needs a tap of the other expert's paired block which has not run yet waits: the pair's
  two blocks are retried in turn until both ran (UniVerse-1 reads audio after its self-attention
  while the audio block reads video before its cross-attention).

In-block parts (taps, processors, pre-norm joins) are named hooks (soe/stitch/named_hooks.py) that are
idle outside a stitched call. A block recomputed in backward (gradient checkpointing) finds its
call again through its input and recomputes its connector tokens, so gradients are unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.utils.weak import WeakTensorKeyDictionary

from soe.plugin.expert import Batch, BlockState, Expert
from soe.schema.stitch import InjectConfig
from soe.stitch.align import resample_time
from soe.stitch.attention_kv import KVProjection, submodule, wrap_processor
from soe.stitch.named_hooks import NamedHooks, hook_name

if TYPE_CHECKING:
    from soe.stitch.depth import ExpandedStack
    from soe.stitch.stitcher import Stitcher


class _Pending(Exception):
    """A block needs a tap of a block of the other expert that has not run yet (retried after it)."""


def sides(direction: str) -> tuple[str, str]:
    """(source, host) of a direction."""
    return ("a", "b") if direction == "a_to_b" else ("b", "a")



# ---- hooks outside compiled graphs, once soe compiles ------------------------------------------------
_compiling = False  # set by keep_hooks_out_of_graphs: hooks installed from then on are wrapped at once


def outside_graphs(fn):
    """``fn`` (a tap, enter or join hook) as it must run under ``torch.compile``: outside the graph, so the block index
    and the call's dicts never become guards and blocks of one kind share one graph. ``torch.compiler.disable`` imports
    torch._dynamo (~1.4 s), which commands that never compile (``soe inspect``, training) should not pay: the hook is
    only marked here, and wrapped by keep_hooks_out_of_graphs (soe.sample.speed.compile_blocks) when soe compiles."""
    if _compiling:
        return torch.compiler.disable(fn)
    fn._soe_outside_graphs = True
    return fn


def keep_hooks_out_of_graphs(blocks) -> None:
    """Wrap the marked hooks (outside_graphs) already registered on ``blocks`` and their submodules in
    ``torch.compiler.disable``, and every one installed later (a restitch) at once."""
    global _compiling
    _compiling = True
    for block in blocks:
        for module in block.modules():
            for registered in (module._forward_pre_hooks, module._forward_hooks):
                for key, fn in list(registered.items()):
                    if getattr(fn, "_soe_outside_graphs", False) and not getattr(fn, "_torchdynamo_disable", False):
                        registered[key] = torch.compiler.disable(fn)  # same key: the hook's handle still removes it

@dataclass
class _Call:
    layouts: dict
    source_mask: torch.Tensor | None
    taps: dict = field(default_factory=dict)  # (side, block) -> what a connector reads, (B, N_side, D_side)
    extras: dict = field(default_factory=dict)  # (direction, host block) -> attention_kv tokens (B, T_host, D_host)


class LockstepEngine:
    """Runs a :class:`~soe.stitch.stitcher.Stitcher` through both split forwards; see the module docstring."""

    def __init__(self, stitcher: Stitcher, stacks: dict[str, ExpandedStack | None], inject: dict[str, InjectConfig]):
        self.st = stitcher
        self.stacks, self.inject = stacks, inject  # inject: one spec per direction that has connectors
        # direction -> {host block: source block}
        self.host_of = {d: {(j if sides(d)[1] == "b" else i): (i if sides(d)[1] == "b" else j) for i, j in stitcher.pairs}
                        for d in inject}
        # source blocks whose output is what an attention_kv connector reads (a tap point is read by its hook)
        self._output_taps = {(sides(d)[0], i) for d, s in inject.items() if s.mode == "attention_kv" and s.tap is None
                             for i in self.host_of[d].values()}
        self._call: _Call | None = None
        self._active: tuple | None = None  # (call, side, block) of the block running now
        # Block input -> the call it belongs to (a checkpointed block recomputing in backward); weak:
        # entries die with the activations.
        self._call_of_input = WeakTensorKeyDictionary()

    # ---- the run order ---------------------------------------------------------------------------
    def expert(self, side: str) -> Expert:
        return getattr(self.st, side)

    def num_blocks(self, side: str) -> int:
        s = self.stacks.get(side)
        return len(s) if s is not None else self.expert(side).num_blocks

    def block(self, side: str, k: int) -> nn.Module:
        s = self.stacks.get(side)
        return s.module(self.expert(side), k) if s is not None else self.expert(side).blocks[k]

    def run_block(self, side: str, k: int, state: BlockState) -> BlockState:
        s = self.stacks.get(side)
        return s.run(self.expert(side), k, state) if s is not None else self.expert(side).run_block(k, state)

    # ---- hooks -----------------------------------------------------------------------------------
    def install(self, hooks: NamedHooks) -> None:
        fusion = self.st.fusion
        for direction, spec in self.inject.items():
            src, host = sides(direction)
            in_block = []  # (side, block) this direction has hooks inside of
            if spec.tap is not None:
                self._install_taps(hooks, direction, spec.tap)
                in_block += [(src, i) for i in sorted(set(self.host_of[direction].values()))]
            if spec.mode == "attention_kv":
                for k in sorted(self.host_of[direction]):
                    self._install_targets(hooks, direction, spec, k, fusion.kv[direction][f"{k:02d}"])
                in_block += [(host, k) for k in sorted(self.host_of[direction])]
            for side, k in in_block:
                hooks.forward_pre_hook(hook_name(direction, side, k, "enter"), self.block(side, k), self._enter(direction, side, k),
                                       "", "marks the block as running in this call (also when recomputed in backward)")

    def _install_taps(self, hooks: NamedHooks, direction: str, tap: str) -> None:
        side = sides(direction)[0]
        expert = self.expert(side)
        points = getattr(expert, "tap_points", {}) or {}
        if tap not in points:
            raise ValueError(f"inject.tap: expert '{expert.name}' declares no tap point '{tap}'; declared: {sorted(points)}")
        path, where = points[tap]
        for k in sorted(set(self.host_of[direction].values())):
            mod = submodule(self.block(side, k), path, f"tap_points[{tap!r}] of '{expert.name}'")
            name, does = hook_name(direction, side, k, "tap"), f"keeps the {where} of {path} ('{tap}') for the connector"
            # outside a compiled graph (as _enter and _join): the block index and the call's dicts never become guards
            if where == "input":
                hook = outside_graphs(lambda m, a, kw, k=k: self._tap(side, k, Expert.block_input_hidden(a, kw)))
                hooks.forward_pre_hook(name, mod, hook, path, does)
            else:
                hook = outside_graphs(lambda m, a, out, k=k: self._tap(side, k, expert.block_output_hidden(out)))
                hooks.forward_hook(name, mod, hook, path, does)

    def _install_targets(self, hooks: NamedHooks, direction: str, spec: InjectConfig, k: int, kv: nn.ModuleDict) -> None:
        host = sides(direction)[1]
        block = self.block(host, k)
        for t in spec.targets:
            attn = block.get_submodule(t.attention)  # checked when the projections were built (Fusion)
            proc = wrap_processor(attn.processor, self, direction, k, t, kv[t.attention.replace(".", "_")])
            hooks.processor(hook_name(direction, host, k, f"kv.{t.attention}"), attn, proc, t.attention,
                            f"{t.mode} attention over extra key/value tokens from the connector")
            if t.pre_norm is not None:
                norm = submodule(block, t.pre_norm, "inject.targets.pre_norm")
                hooks.forward_pre_hook(hook_name(direction, host, k, f"join.{t.pre_norm}"), norm, self._join(direction, k),
                                       t.pre_norm, f"appends the connector tokens to the input (split off again in {t.attention})")

    def _enter(self, direction: str, side: str, k: int):
        hosting = sides(direction)[1] == side

        def hook(module, args, kwargs):
            call = self._call
            if call is None:  # idle, or a checkpointed block recomputing in backward: same call as its input
                call = self._call_of_input.get(self.expert(side).block_input_hidden(args, kwargs))
            elif self.st.training or torch.is_grad_enabled():
                self._call_of_input[self.expert(side).block_input_hidden(args, kwargs)] = call
            self._active = (call, side, k) if call is not None else None
            if call is not None and hosting:  # connector tokens are computed inside the block that uses them,
                call.extras.pop((direction, k), None)  # so a checkpoint recompute saves what the forward saved

        return outside_graphs(hook)

    def _tap(self, side: str, k: int, hidden: torch.Tensor) -> None:
        act = self._active
        if act is None or act[1] != side or act[2] != k:
            return None
        call = act[0]
        split = self.st.split_of(side)  # context parallel: this rank's tokens only
        n = split.local_tokens(call.layouts[side]) if split is not None else call.layouts[side].num_tokens
        # injected tokens joined at the end are not the expert's own
        call.taps.setdefault((side, k), hidden[:, :n])
        return None

    def _join(self, direction: str, k: int):
        def hook(module, args, kwargs):
            ctx = self.context(direction, k)
            if ctx is None:
                return None
            hidden = Expert.block_input_hidden(args, kwargs)
            extra = self.extra_tokens(ctx[0], direction, k).to(hidden.dtype)
            hidden = torch.cat([hidden, extra], dim=1)  # (B, N + T, D): same norm and modulation as the host tokens
            return ((hidden, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": hidden})

        return outside_graphs(hook)

    # ---- what the in-block parts read ------------------------------------------------------------
    def context(self, direction: str, k: int) -> tuple[_Call, Expert] | None:
        """``(call, host expert)`` while host block ``k`` of ``direction`` runs in a stitched call, else None."""
        act = self._active
        if act is None or act[1] != sides(direction)[1] or act[2] != k:
            return None
        return act[0], self.expert(act[1])

    def extra_tokens(self, call: _Call, direction: str, k: int) -> torch.Tensor:
        """Connector output for host block ``k``: one token per host time step ``(B, T_host, D_host)``."""
        key = (direction, k)
        if key not in call.extras:
            src, host = sides(direction)
            i = self.host_of[direction][k]
            if (src, i) not in call.taps:
                raise _Pending(f"{direction} block {k} waits for {src} block {i}")
            conn = self.st.connector_for(direction, k)
            h = self.st.connector_input(call.taps[(src, i)])  # (B, N_src, D_src); the CFG mask applies per target
            steps = conn.pool_steps(h, call.layouts[src], self.st.split_of(src))  # (B, T_src, D_src or 3 * D_src)
            steps = resample_time(steps, call.layouts[src], call.layouts[host], conn.resample)  # (B, T_host, D_src)
            call.extras[key] = conn.map_steps(steps)  # (B, T_host, D_host)
        return call.extras[key]

    # ---- the run ---------------------------------------------------------------------------------
    def run(self, batch_a: Batch, batch_b: Batch, source_mask=None) -> tuple[torch.Tensor, torch.Tensor]:
        st = self.st
        batches = {"a": batch_a, "b": batch_b}
        layouts = {s: self.expert(s).token_layout(batches[s]) for s in "ab"}
        call = _Call(layouts, source_mask)
        states = {s: self.expert(s).embed(batches[s]) for s in "ab"}
        done = {"a": 0, "b": 0}  # blocks run so far in each expert
        self._call = call
        try:
            for i, j in st.pairs:
                for s, stop in (("a", i), ("b", j)):
                    states[s] = self._advance(call, s, states[s], done, stop)
                pending = {"a": i, "b": j}
                while pending:  # a block waiting for the other's tap is retried after it
                    seen, ran = len(call.taps), False
                    for s in list(pending):
                        try:
                            states[s] = self._one(call, s, pending[s], states[s])
                        except _Pending:
                            continue
                        del pending[s]
                        ran = True
                    if pending and not ran and len(call.taps) == seen:
                        raise RuntimeError(f"stitcher: blocks {i} (a) and {j} (b) each wait for the other's tap")
                done["a"], done["b"] = i + 1, j + 1
                pre = {s: states[s].hidden for s in "ab"}  # pre-exchange states: the add exchange is symmetric
                for direction, spec in self.inject.items():
                    if spec.mode == "add":
                        src, host = sides(direction)
                        i_src, k = (i, j) if src == "a" else (j, i)
                        read = call.taps.get((src, i_src)) if spec.tap is not None else None
                        read = pre[src] if read is None else read
                        delta = st.connector_for(direction, k)(st.connector_input(read, source_mask), layouts[src], layouts[host],
                                                               st.split_of(src), st.split_of(host))
                        states[host] = states[host].replace(states[host].hidden + delta.to(pre[host].dtype))
            for s in "ab":
                states[s] = self._advance(call, s, states[s], done, self.num_blocks(s))
        finally:
            self._call, self._active = None, None
        return self.expert("a").head(states["a"], batch_a), self.expert("b").head(states["b"], batch_b)

    def _advance(self, call: _Call, side: str, state: BlockState, done: dict, stop: int) -> BlockState:
        for k in range(done[side], stop):
            state = self._one(call, side, k, state)
        done[side] = max(done[side], stop)
        return state

    def _one(self, call: _Call, side: str, k: int, state: BlockState) -> BlockState:
        out = self.run_block(side, k, state)
        self._active = None
        if (side, k) in self._output_taps:
            call.taps.setdefault((side, k), out.hidden)
        return out


class Fusion(nn.Module):
    """The modules the lockstep engine's options add: inserted blocks (``inserted.<side>.<block>``) and
    new key/value projections (``kv.<direction>.<host block>.<attention>``). Owned by the Stitcher as
    ``fusion``, so they save, load and train with it; the experts are never edited."""

    def __init__(self, engine: LockstepEngine, device=None, dtype=None):
        super().__init__()
        self.stacks, self.inject = engine.stacks, engine.inject
        self.inserted = nn.ModuleDict({side: s.inserted for side, s in self.stacks.items() if s is not None and len(s.inserted)})
        self.kv = nn.ModuleDict()
        for direction, spec in self.inject.items():
            if spec.mode != "attention_kv":
                continue
            host_name = sides(direction)[1]
            host = engine.expert(host_name)
            kv = nn.ModuleDict()
            for k in sorted(engine.host_of[direction]):
                block = engine.block(host_name, k)
                mods = nn.ModuleDict()
                for t in spec.targets:
                    attn = submodule(block, t.attention, f"inject.targets.attention of '{host.name}'")
                    if not hasattr(attn, "set_processor"):
                        raise ValueError(f"inject.targets.attention: '{t.attention}' of '{host.name}' is not a diffusers attention module")
                    source = submodule(block, t.copy_from or t.attention, "inject.targets.copy_from")
                    kv_proj = KVProjection(host.hidden_size, attn, source, t.init, device, dtype)
                    # where its values come from, for FSDP2's meta build (soe.train.sharding.draw_kv)
                    kv_proj.origin = (host_name, k, t.attention, t.copy_from or t.attention, str(t.init))
                    mods[t.attention.replace(".", "_")] = kv_proj
                    if t.pre_norm is not None:
                        submodule(block, t.pre_norm, "inject.targets.pre_norm")
                kv[f"{k:02d}"] = mods
            self.kv[direction] = kv
