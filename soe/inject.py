"""Attention key/value injection, in-block taps, and the fused lockstep run (UniVerse-1 style fusion).

``inject: attention_kv``: the connector output becomes extra key/value tokens of chosen attention
modules of the host block. Nothing in an expert is replaced: the attention module's *processor* is
wrapped (``set_processor``; restored by ``unstitch``), taps and pre-norm joins are forward hooks, and
new key/value projections live in the Stitcher (``fusion.kv.<direction>.<block>.<attention>``).

Per target attention:
* ``mode: concat``: the extra keys join the host's keys in one softmax (UniVerse-1 text cross-attn);
  ``parallel``: a separate attention over the extra keys is added before ``to_out`` (UniVerse-1
  video self-attn, a decoupled branch).
* ``window``: each host token attends only to the extra tokens of its own time step.
* ``pre_norm``: a host block module whose input the extra tokens join, so they get the host's own
  normalisation and modulation (UniVerse-1 concatenates them before Wan's norm1/norm2).
* ``rope`` (``complex`` = Wan/diffusers pairs, ``cat`` = Qwen2/ACE-Step table): 1-D temporal RoPE on
  the extra keys, by time step; ``rope_query`` also rotates the host queries by their time step.
* ``init: copy``: new k/v projections (and key norm) start as copies of ``copy_from``'s to_k/to_v.

Init: unlike ``add``, extra keys change the host softmax, so a fresh ``attention_kv`` stitch does
NOT reproduce the experts exactly (UniVerse-1 does not either). What holds: the wrapped attention
equals the original one when no tokens are injected, and unstitching restores the experts exactly.
"""
from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from soe.align import resample_time
from soe.inject_spec import InjectSpec, KVTarget

class _Pending(Exception):
    """A block needs tokens from a block of the other expert that has not run yet (retried later)."""


def _submodule(block: nn.Module, path: str, where: str) -> nn.Module:
    try:
        return block.get_submodule(path)
    except AttributeError:
        names = [n for n, _ in block.named_children()]
        raise ValueError(f"{where}: the block has no module '{path}'; its children: {names}") from None


def _first_hidden(args, kwargs):
    return args[0] if args else kwargs["hidden_states"]


# ---- rotary embedding of time steps ----------------------------------------------------------------
def rope_time(x: torch.Tensor, pos: torch.Tensor, style: str, theta: float) -> torch.Tensor:
    """Rotate ``x (B, H, S, d)`` by 1-D positions ``pos (S,)``.

    ``complex``: channel pairs (2i, 2i+1) turn by ``pos * theta^(-2i/d)`` (Wan / diffusers).
    ``cat``: the Qwen2 table ``cat(f, f)`` applied to interleaved pairs (ACE-Step v1's processors).
    """
    d = x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, d, 2, device=x.device, dtype=torch.float64) / d)  # (d/2,)
    ang = pos.to(torch.float64)[:, None] * inv[None]  # (S, d/2)
    if style == "complex":
        cos, sin = ang.cos().repeat_interleave(2, -1), ang.sin().repeat_interleave(2, -1)  # (S, d)
    else:
        cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()
    x1, x2 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    rotated = torch.stack([-x2, x1], -1).flatten(-2)  # (B, H, S, d)
    return (x.float() * cos.float() + rotated * sin.float()).to(x.dtype)


# ---- new key/value projections ---------------------------------------------------------------------
class KVProjection(nn.Module):
    """Key/value projections (and key norm) for injected tokens; copies of a host attention's at init."""

    def __init__(self, dim: int, attn: nn.Module, source: nn.Module, init: str = "copy", device=None, dtype=None):
        super().__init__()
        inner_k, inner_v = attn.to_k.out_features, attn.to_v.out_features
        self.k = nn.Linear(dim, inner_k, bias=attn.to_k.bias is not None, device=device, dtype=dtype)
        self.v = nn.Linear(dim, inner_v, bias=attn.to_v.bias is not None, device=device, dtype=dtype)
        norm = getattr(attn, "norm_k", None)  # the host normalises its keys: so do the new ones
        self.norm_k = copy.deepcopy(norm) if isinstance(norm, nn.Module) else None
        if init == "copy":
            for mine, theirs, name in ((self.k, source.to_k, "to_k"), (self.v, source.to_v, "to_v")):
                if theirs.weight.shape != mine.weight.shape:
                    raise ValueError(f"inject.copy_from: {name} is {tuple(theirs.weight.shape)}, the new projection "
                                     f"{tuple(mine.weight.shape)}; injected tokens have width {dim}")
                if mine.weight.device.type != "meta":
                    with torch.no_grad():
                        mine.weight.copy_(theirs.weight)
                        if mine.bias is not None:
                            mine.bias.copy_(theirs.bias)
            src_norm = getattr(source, "norm_k", None)
            if self.norm_k is not None and isinstance(src_norm, nn.Module) and self.k.weight.device.type != "meta":
                self.norm_k.load_state_dict(src_norm.state_dict())

    def forward(self, tokens: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = self.k(tokens), self.v(tokens)  # (B, T, H*d)
        if self.norm_k is not None:
            k = self.norm_k(k)
        return k.unflatten(2, (heads, -1)).transpose(1, 2), v.unflatten(2, (heads, -1)).transpose(1, 2)  # (B, H, T, d)


# ---- the attention-processor wrapper ---------------------------------------------------------------
class KVProcessor:
    """Wraps a host attention processor: original behaviour when idle, extra keys/values when injecting."""

    def __init__(self, inner, fusion: "Fusion", direction: str, k: int, target: KVTarget):
        self.inner, self.fusion, self.direction, self.k, self.target = inner, fusion, direction, k, target

    def __getattr__(self, name):  # diffusers inspects processor attributes (signatures, backends)
        inner = self.__dict__.get("inner")
        if inner is None:
            raise AttributeError(name)
        return getattr(inner, name)

    def __call__(self, attn, *args, **kwargs):
        f = self.fusion
        ctx = f.context(self.direction, self.k)
        if ctx is None:
            return self.inner(attn, *args, **kwargs)
        run, host = ctx
        t = self.target
        extra = f.extra_tokens(run, self.direction, self.k)  # (B, T, D_host), may raise _Pending
        hidden = _first_hidden(args, kwargs)
        if t.pre_norm is not None:  # the tokens joined the host's pre-norm input: split them off again
            hidden, extra = hidden[:, : -extra.shape[1]], hidden[:, -extra.shape[1]:]
            args, kwargs = ((hidden, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": hidden})
        if t.cfg_mask and run.source_mask is not None:
            extra = extra * run.source_mask.to(extra.dtype).view(-1, 1, 1)
        q, k, v, bias = host.attention_qkv(attn, args, kwargs)  # (B, H, S, d), (B, H, L, d), bias (B, 1|H, S, L) or None
        kv = f.kv[self.direction][f"{self.k:02d}"][t.attention.replace(".", "_")]
        ke, ve = kv(extra.to(q.dtype), attn.heads)  # (B, H, T, d)
        layout = run.layouts[f.host_side(self.direction)]
        q_step = torch.arange(layout.num_steps, device=q.device).repeat_interleave(layout.tokens_per_step)  # (S,)
        k_step = torch.arange(ke.shape[2], device=q.device)  # one extra token per host time step
        if t.rope != "none":
            ke = rope_time(ke, k_step, t.rope, t.rope_theta)
            if t.rope_query:
                q = rope_time(q, q_step, t.rope, t.rope_theta)
        extra_bias = None
        if t.window:
            extra_bias = torch.zeros(q.shape[2], ke.shape[2], device=q.device, dtype=q.dtype)
            extra_bias.masked_fill_(q_step[:, None] != k_step[None], float("-inf"))
            extra_bias = extra_bias[None, None]  # (1, 1, S, T)
        if t.mode == "concat":
            if bias is not None or extra_bias is not None:
                b = bias if bias is not None else q.new_zeros(1, 1, q.shape[2], k.shape[2])
                e = extra_bias if extra_bias is not None else q.new_zeros(1, 1, q.shape[2], ke.shape[2])
                bias = torch.cat([b.expand(-1, -1, q.shape[2], -1), e.expand(b.shape[0], b.shape[1], -1, -1)], dim=-1)
            out = F.scaled_dot_product_attention(q, torch.cat([k, ke], 2), torch.cat([v, ve], 2), attn_mask=bias)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
            out = out + F.scaled_dot_product_attention(q, ke, ve, attn_mask=extra_bias)
        out = out.transpose(1, 2).flatten(2).to(hidden.dtype)  # (B, S, H*d)
        return attn.to_out[1](attn.to_out[0](out))


def wrap_processor(inner, fusion, direction, k, target) -> KVProcessor:
    """A KVProcessor whose ``__call__`` shows the inner processor's signature: diffusers drops call
    keyword arguments that the processor's signature does not name."""
    sig = inspect.signature(type(inner).__call__)

    def __call__(self, attn, *args, **kwargs):
        return KVProcessor.__call__(self, attn, *args, **kwargs)

    __call__.__signature__ = sig
    cls = type("KVProcessor", (KVProcessor,), {"__call__": __call__})
    return cls(inner, fusion, direction, k, target)


@dataclass
class _FusedRun:
    layouts: dict
    source_mask: torch.Tensor | None
    taps: dict = field(default_factory=dict)  # (side, virtual block) -> tapped hidden
    extras: dict = field(default_factory=dict)  # (direction, host block) -> (B, T_host, D_host)


class Fusion(nn.Module):
    """Inserted blocks, new k/v projections and the hooks that run a fused (interleaved) lockstep step."""

    def __init__(self, stitcher, stacks: dict, inject: dict[str, InjectSpec], device=None, dtype=None):
        super().__init__()
        self.inserted = nn.ModuleDict({side: s.inserted for side, s in stacks.items() if s is not None and len(s.inserted)})
        self.kv = nn.ModuleDict()
        object.__setattr__(self, "_st", stitcher)  # not a submodule
        self.stacks, self.inject = stacks, inject
        self._active: tuple | None = None  # (run, side, virtual block) of the block running now
        self._handles: list = []
        self._processors: list = []  # (attention module, original processor)
        self._run: _FusedRun | None = None
        self._host_of = {}  # direction -> {host block: source block}
        for direction, spec in inject.items():
            src, host = self.sides(direction)
            pairs = stitcher.pairs
            self._host_of[direction] = {(j if host == "b" else i): (i if host == "b" else j) for i, j in pairs}
            if spec.tap is not None:
                self._install_taps(src, spec.tap)
            if spec.mode == "attention_kv":
                self._install_targets(direction, spec, device, dtype)
        for side in ("a", "b"):
            for k in range(self.num_blocks(side)):
                self._handles.append(self.block(side, k).register_forward_pre_hook(self._enter(side, k), with_kwargs=True))

    # -- structure -----------------------------------------------------------------------------------
    @staticmethod
    def sides(direction: str) -> tuple[str, str]:
        return ("a", "b") if direction == "a_to_b" else ("b", "a")

    def host_side(self, direction: str) -> str:
        return self.sides(direction)[1]

    def expert(self, side: str):
        return getattr(self._st, side)

    def num_blocks(self, side: str) -> int:
        s = self.stacks.get(side)
        return len(s) if s is not None else self.expert(side).num_blocks

    def block(self, side: str, k: int) -> nn.Module:
        s = self.stacks.get(side)
        return s.module(self.expert(side), k) if s is not None else self.expert(side).blocks[k]

    def run_block(self, side: str, k: int, state):
        s = self.stacks.get(side)
        return s.run(self.expert(side), k, state) if s is not None else self.expert(side).run_block(k, state)

    # -- hooks ---------------------------------------------------------------------------------------
    def _enter(self, side, k):
        def hook(module, args, kwargs):
            run = self._run
            if run is None:  # a checkpointed block recomputing in backward: same call as its input
                run = self._st._run_of_input.get(self.expert(side).block_input_hidden(args, kwargs))
                if run is not None:  # its connector output was computed inside the block: compute it again
                    for direction in self.inject:  # (the recomputation must save what the forward saved)
                        if self.host_side(direction) == side:
                            run.extras.pop((direction, k), None)
            elif self._st.training or torch.is_grad_enabled():
                self._st._run_of_input[self.expert(side).block_input_hidden(args, kwargs)] = run
            self._active = (run, side, k) if run is not None else None
            if run is not None:  # connector outputs are computed inside the block that uses them, so a
                for d in self.inject:  # checkpoint recompute saves the same tensors as the forward did
                    if self.host_side(d) == side:
                        run.extras.pop((d, k), None)

        return hook

    def _install_taps(self, side: str, tap: str):
        expert = self.expert(side)
        points = getattr(expert, "tap_points", {}) or {}
        if tap not in points:
            raise ValueError(f"inject.tap: expert '{expert.name}' declares no tap point '{tap}'; declared: {sorted(points)}")
        path, where = points[tap]
        for k in range(self.num_blocks(side)):
            mod = _submodule(self.block(side, k), path, f"tap_points[{tap!r}] of '{expert.name}'")
            if where == "input":
                h = mod.register_forward_pre_hook(lambda m, a, kw, k=k: self._tap(side, k, _first_hidden(a, kw)), with_kwargs=True)
            else:
                h = mod.register_forward_hook(lambda m, a, out, k=k: self._tap(side, k, expert.block_output_hidden(out)))
            self._handles.append(h)

    def _tap(self, side, k, hidden):
        act = self._active
        if act is None or act[1] != side or act[2] != k:
            return None
        run = act[0]
        n = run.layouts[side].num_tokens  # injected tokens joined at the end are not the expert's own
        run.taps.setdefault((side, k), hidden[:, :n])
        return None

    def _install_targets(self, direction: str, spec: InjectSpec, device, dtype):
        _, host_name = self.sides(direction)
        host = self.expert(host_name)
        kv = nn.ModuleDict()
        for k in sorted(self._host_of[direction]):
            block = self.block(host_name, k)
            mods = nn.ModuleDict()
            for t in spec.targets:
                attn = _submodule(block, t.attention, f"inject.targets.attention of '{host.name}'")
                if not hasattr(attn, "set_processor"):
                    raise ValueError(f"inject.targets.attention: '{t.attention}' of '{host.name}' is not a diffusers attention module")
                source = _submodule(block, t.copy_from or t.attention, "inject.targets.copy_from")
                mods[t.attention.replace(".", "_")] = KVProjection(host.hidden_size, attn, source, t.init, device, dtype)
                self._processors.append((attn, attn.processor))
                attn.set_processor(wrap_processor(attn.processor, self, direction, k, t))
                if t.pre_norm is not None:
                    norm = _submodule(block, t.pre_norm, "inject.targets.pre_norm")
                    self._handles.append(norm.register_forward_pre_hook(self._join(direction, k, host_name), with_kwargs=True))
            kv[f"{k:02d}"] = mods
        self.kv[direction] = kv

    def _join(self, direction, k, host_name):
        def hook(module, args, kwargs):
            ctx = self.context(direction, k)
            if ctx is None:
                return None
            hidden = _first_hidden(args, kwargs)
            extra = self.extra_tokens(ctx[0], direction, k).to(hidden.dtype)
            hidden = torch.cat([hidden, extra], dim=1)  # (B, N + T, D): same norm and modulation as the host tokens
            return ((hidden, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": hidden})

        return hook

    def context(self, direction: str, k: int):
        act = self._active
        if act is None or act[1] != self.host_side(direction) or act[2] != k:
            return None
        return act[0], self.expert(act[1])

    def extra_tokens(self, run: _FusedRun, direction: str, k: int) -> torch.Tensor:
        """Connector output for host block ``k``: one token per host time step ``(B, T_host, D_host)``."""
        key = (direction, k)
        if key not in run.extras:
            src, host = self.sides(direction)
            i = self._host_of[direction][k]
            if (src, i) not in run.taps:
                raise _Pending(f"{direction} block {k} waits for {src} block {i}")
            conn = self._st.connector_for(direction, k)
            h = self._st._source_state(run.taps[(src, i)])  # (B, N_src, D_src), detached per recipe
            steps = conn.pool_steps(h, run.layouts[src])  # (B, T_src, D_src or 3 * D_src)
            steps = resample_time(steps, run.layouts[src], run.layouts[host], conn.resample)  # (B, T_host, D_src)
            run.extras[key] = conn.mlp(conn.norm(steps))  # (B, T_host, D_host)
        return run.extras[key]

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for attn, proc in self._processors:
            attn.set_processor(proc)
        self._processors.clear()

    # -- the fused lockstep run ------------------------------------------------------------------------
    def forward(self, batch_a, batch_b, source_mask=None):
        st = self._st
        ex = {"a": st.a, "b": st.b}
        batches = {"a": batch_a, "b": batch_b}
        layouts = {s: ex[s].token_layout(batches[s]) for s in ex}
        run = _FusedRun(layouts, source_mask)
        states = {s: ex[s].embed(batches[s]) for s in ex}
        nxt = {"a": 0, "b": 0}
        self._run = run
        try:
            for i, j in st.pairs:
                for s, stop in (("a", i), ("b", j)):
                    states[s] = self._advance(run, s, states[s], nxt, stop)
                pending = {"a": i, "b": j}
                while pending:  # interleave: a block waiting for the other's tap is retried after it
                    seen = len(run.taps)
                    for s in list(pending):
                        try:
                            states[s] = self._one(run, s, pending[s], states[s])
                        except _Pending:
                            continue
                        del pending[s]
                    if pending and len(run.taps) == seen:
                        raise RuntimeError(f"stitcher: blocks {i} (a) and {j} (b) each wait for the other's tap")
                nxt["a"], nxt["b"] = i + 1, j + 1
                pre = {s: states[s].hidden for s in ex}  # pre-exchange states: the add exchange is symmetric
                for direction, spec in self.inject.items():
                    if spec.mode == "add":
                        src, host = self.sides(direction)
                        k = j if host == "b" else i
                        tap = run.taps.get((src, i if src == "a" else j), pre[src])
                        delta = st.connector_for(direction, k)(st._source_state(tap, source_mask), layouts[src], layouts[host])
                        states[host] = states[host].replace(states[host].hidden + delta.to(pre[host].dtype))
            for s in ex:
                states[s] = self._advance(run, s, states[s], nxt, self.num_blocks(s))
        finally:
            self._run, self._active = None, None
        return ex["a"].head(states["a"], batch_a), ex["b"].head(states["b"], batch_b)

    def _advance(self, run, side, state, nxt, stop):
        for k in range(nxt[side], stop):
            state = self._one(run, side, k, state)
        nxt[side] = max(nxt[side], stop)
        return state

    def _one(self, run, side, k, state):
        out = self.run_block(side, k, state)
        self._active = None
        if not self._declares_tap(side):  # the tap is the block output
            run.taps.setdefault((side, k), out.hidden)
        return out

    def _declares_tap(self, side) -> bool:
        return any(spec.tap is not None for d, spec in self.inject.items() if self.sides(d)[0] == side)
