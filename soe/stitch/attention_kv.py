"""Attention key/value injection: a connector's output as extra key/value tokens of a host attention.

``inject: attention_kv`` (UniVerse-1 style fusion): the connector output becomes extra key/value
tokens of chosen attention modules of the host block. Nothing in an expert is replaced: the
attention module's *processor* is wrapped (``set_processor``, recorded as a named hook and restored
by ``unstitch``) and new key/value projections live in the Stitcher
(``fusion.kv.<direction>.<block>.<attention>``). The lockstep engine (soe/stitch/lockstep.py) installs the
wrappers and hands them the tokens; this file is the attention arithmetic.

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
equals the original one when no tokens are injected, and unstitching removes every wrapper.
"""
from __future__ import annotations

import copy
import inspect

import torch
from torch import nn

from soe.plugin.attention import attend
from soe.plugin.expert import Expert
from soe.schema.stitch import KVTargetConfig


def submodule(block: nn.Module, path: str, where: str) -> nn.Module:
    """``block.get_submodule(path)``, or a one-line ``ValueError`` naming ``where`` and the block's children."""
    try:
        return block.get_submodule(path)
    except AttributeError:
        names = [n for n, _ in block.named_children()]
        raise ValueError(f"{where}: the block has no module '{path}'; its children: {names}") from None


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
        # in the projections' dtype (float32 by default), not the host's: k reaches it straight from self.k
        self.norm_k = copy.deepcopy(norm).to(dtype=self.k.weight.dtype) if isinstance(norm, nn.Module) else None
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
        tokens = tokens.to(self.k.weight.dtype)  # float32 projections read a bfloat16 host when sampling without autocast
        k, v = self.k(tokens), self.v(tokens)  # (B, T, H*d)
        if self.norm_k is not None:
            k = self.norm_k(k)
        return k.unflatten(2, (heads, -1)).transpose(1, 2), v.unflatten(2, (heads, -1)).transpose(1, 2)  # (B, H, T, d)


# ---- the attention-processor wrapper ---------------------------------------------------------------
class KVProcessor:
    """Wraps a host attention processor: original behaviour when idle, extra keys/values when injecting.

    ``engine`` feeds it (soe/stitch/lockstep.py): ``engine.context(direction, k)`` is ``None``
    when this block is not running inside a stitched call, else ``(call, host expert)``;
    ``engine.extra_tokens(call, direction, k)`` gives the connector output ``(B, T_host, D_host)``.

    Compiled blocks (``sample.compile``): everything that reads the engine's per-call Python state
    (which call, which block, the token dictionaries) is in :meth:`lookup`, which runs outside the graph
    (``torch.compiler.disable``) and hands back tensors only; the attention arithmetic is traced. So the
    block index, the call object and the dictionaries never become guards, and one graph serves every
    block of a kind at every step. Attention goes through diffusers' dispatcher (:func:`soe.plugin.attention.attend`)
    with the wrapped processor's ``_attention_backend``.
    """

    _own = ("inner", "engine", "direction", "k", "target", "kv")

    def __init__(self, inner, engine, direction: str, k: int, target: KVTargetConfig, kv: KVProjection):
        for name, value in zip(self._own, (inner, engine, direction, k, target, kv)):
            object.__setattr__(self, name, value)

    def __setattr__(self, name, value):  # diffusers configures processors (context parallel, backends): the inner one,
        if name in self._own:  # so it keeps its settings when unstitch() puts it back
            object.__setattr__(self, name, value)
        else:
            setattr(self.inner, name, value)

    def __getattr__(self, name):  # diffusers inspects processor attributes (signatures, backends)
        inner = self.__dict__.get("inner")
        if inner is None:
            raise AttributeError(name)
        return getattr(inner, name)

    def lookup(self):  # outside the graph under torch.compile: see keep_lookups_out_of_graphs
        """``None`` when idle, else ``(host expert, extra tokens (B, T, D_host), CFG mask (B, 1, 1) or None,
        time step of each of this rank's host tokens (S,), whether the host is split by context parallelism)``."""
        ctx = self.engine.context(self.direction, self.k)
        if ctx is None:
            return None
        call, host = ctx
        extra = self.engine.extra_tokens(call, self.direction, self.k)  # (B, T, D_host); may wait for the other expert
        mask = call.source_mask.view(-1, 1, 1) if self.target.cfg_mask and call.source_mask is not None else None
        host_side = "b" if self.direction == "a_to_b" else "a"
        layout, split = call.layouts[host_side], self.engine.st.split_of(host_side)
        if split is not None:  # context parallel: the queries are this rank's tokens
            q_step = split.steps(layout, extra.device)  # (S,)
        else:
            q_step = torch.arange(layout.num_steps, device=extra.device).repeat_interleave(layout.tokens_per_step)  # (S,)
        return host, extra, mask, q_step, split is not None

    def __call__(self, attn, *args, **kwargs):
        got = self.lookup()
        if got is None:
            return self.inner(attn, *args, **kwargs)
        host, extra, mask, q_step, split = got
        t = self.target
        hidden = Expert.block_input_hidden(args, kwargs)
        if t.pre_norm is not None:  # the tokens joined the host's pre-norm input: split them off again
            hidden, extra = hidden[:, : -extra.shape[1]], hidden[:, -extra.shape[1]:]
            args, kwargs = ((hidden, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": hidden})
        if mask is not None:
            extra = extra * mask.to(extra.dtype)
        q, k, v, bias = host.attention_qkv(attn, args, kwargs)  # (B, H, S, d), (B, H, L, d), bias (B, 1|H, S, L) or None
        ke, ve = (x.to(q.dtype) for x in self.kv(extra, attn.heads))  # (B, H, T, d)
        # a self-attention of a split expert attends over the whole sequence: diffusers' context-parallel attention
        parallel = getattr(self.inner, "_parallel_config", None) if split and _is_self_attention(args, kwargs) else None
        k_step = torch.arange(ke.shape[2], device=q.device)  # one extra token per host time step
        if t.rope != "none":
            ke = rope_time(ke, k_step, t.rope, t.rope_theta)
            if t.rope_query:
                q = rope_time(q, q_step, t.rope, t.rope_theta)
        backend = getattr(self.inner, "_attention_backend", None)
        if t.mode == "concat":
            if parallel is not None:
                raise ValueError(f"inject.targets: mode 'concat' into the self-attention '{t.attention}' of an expert split by "
                                 "parallel.context is not supported (one softmax over keys held by other ranks); use mode 'parallel'")
            if bias is not None or t.window:
                b = bias if bias is not None else q.new_zeros(1, 1, q.shape[2], k.shape[2])
                e = _window_bias(q_step, k_step, q.dtype) if t.window else q.new_zeros(1, 1, q.shape[2], ke.shape[2])
                bias = torch.cat([b.expand(-1, -1, q.shape[2], -1), e.expand(b.shape[0], b.shape[1], -1, -1)], dim=-1)
            out = attend(q, torch.cat([k, ke], 2), torch.cat([v, ve], 2), bias, backend)
        else:
            if parallel is not None:  # (B, S, H, d) in and out, Ulysses all-to-all across the split
                from diffusers.models.attention_dispatch import dispatch_attention_fn

                out = dispatch_attention_fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=bias,
                                            backend=backend, parallel_config=parallel).transpose(1, 2)
            else:
                out = attend(q, k, v, bias, backend)
            if t.window:  # a softmax over the one token of its own time step: that token's value, exactly
                out = out + ve.index_select(2, q_step)  # (B, H, S, d)
            else:
                out = out + attend(q, ke, ve, None, backend)
        out = out.transpose(1, 2).flatten(2).to(hidden.dtype)  # (B, S, H*d)
        return attn.to_out[1](attn.to_out[0](out))


def _window_bias(q_step: torch.Tensor, k_step: torch.Tensor, dtype) -> torch.Tensor:
    """Additive mask ``(1, 1, S, T)``: each host token sees only the extra token of its own time step."""
    bias = torch.zeros(q_step.shape[0], k_step.shape[0], device=q_step.device, dtype=dtype)
    return bias.masked_fill_(q_step[:, None] != k_step[None], float("-inf"))[None, None]


def _is_self_attention(args: tuple, kwargs: dict) -> bool:
    """A diffusers processor call ``(hidden_states, encoder_hidden_states, ...)`` without encoder states."""
    ctx = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
    return ctx is None


_CLASSES: dict[type, type] = {}


def wrap_processor(inner, engine, direction: str, k: int, target: KVTargetConfig, kv: KVProjection) -> KVProcessor:
    """A KVProcessor whose ``__call__`` shows the inner processor's signature: diffusers drops call
    keyword arguments that the processor's signature does not name. One class per inner processor
    class (not per block): a compiled block guards on the processor's type."""
    cls = _CLASSES.get(type(inner))
    if cls is None:
        def __call__(self, attn, *args, **kwargs):
            return KVProcessor.__call__(self, attn, *args, **kwargs)

        __call__.__signature__ = inspect.signature(type(inner).__call__)
        cls = _CLASSES[type(inner)] = type("KVProcessor", (KVProcessor,), {"__call__": __call__})
    return cls(inner, engine, direction, k, target, kv)


def keep_lookups_out_of_graphs() -> None:
    """``KVProcessor.lookup`` runs outside the graph under ``torch.compile`` (``torch.compiler.disable``: it reads the
    engine's per-call state and hands back tensors only). Applied by soe.sample.speed before it compiles, not at
    import: importing torch._dynamo costs ~1.4 s that commands which never compile (``soe inspect``) should not pay."""
    if not getattr(KVProcessor.lookup, "_torchdynamo_disable", False):
        KVProcessor.lookup = torch.compiler.disable(KVProcessor.lookup)
