"""Memory and speed switches for sampling (and training), all through diffusers' hooks.

``sample.memory``:
  * ``none``: everything on the device.
  * ``offload_blocks``: every block of both experts and every inserted block lives on the CPU and is
    moved to the device just before it runs (diffusers ``apply_group_offloading``, block level, one
    block per group; on CUDA with a side stream that prefetches the next block in the order the
    stitched model runs them). The rest (embeddings, heads, connectors, key/value projections) stays
    on the device: it is small next to the blocks.
  * ``offload_model``: each model (the stitched transformer pair, each codec) is on the device only
    while it is used, like diffusers' ``enable_model_cpu_offload``.

Connectors and new key/value projections are cast to their host expert's dtype (:func:`cast_stitch_modules`).
``sample.storage_dtype: float8_e4m3fn``: weights stored in fp8, each layer cast to the compute dtype
just for its forward (diffusers ``apply_layerwise_casting``; norms, patch embeddings and the
input/output projections stay in the compute dtype). ``sample.compile``: each block compiled on its
own (regional compilation: one graph reused by all blocks of a class, seconds instead of minutes).
``sample.attention_backend``: diffusers' attention dispatcher backend for every processor that goes
through it (Wan's do; ACE-Step's linear attention does not and keeps torch's SDPA).
``sample.cache: first_block``: :mod:`soe.sample.step_cache`.
"""
from __future__ import annotations

import functools

import torch
from diffusers.hooks import HookRegistry, ModelHook, apply_group_offloading, apply_layerwise_casting
from torch import nn

from soe.sample.step_cache import StepCache, apply_step_cache, stitched_blocks
from soe.schema import SpeedConfig, StorageDtype
from soe.train.storage import SKIP_CAST

# Kept in the compute dtype under fp8 storage: diffusers' defaults plus LoRA and ACE-Step's embedders.
_ORDER_HOOK = "soe_offload_order"


# ---- fp8 storage ---------------------------------------------------------------------------------------
def store_in(module: nn.Module, storage_dtype: str, compute_dtype: torch.dtype) -> None:
    """Layerwise casting: ``module``'s layers stored in ``storage_dtype``, computed in ``compute_dtype``.
    Trainable (LoRA) layers and norms are left alone."""
    skip = SKIP_CAST + tuple(getattr(module, "_skip_layerwise_casting_patterns", None) or ())  # the model's own list
    apply_layerwise_casting(module, StorageDtype(storage_dtype).torch, compute_dtype, skip_modules_pattern=skip)


# ---- stitch modules in the sampling dtype --------------------------------------------------------------
def cast_stitch_modules(stitcher) -> list[str]:
    """Connectors and new key/value projections in their host expert's dtype (bf16 when the experts are):
    they train in float32, but sampling runs without autocast and keeps them resident under offloading
    (UniVerse-1: 1.7B parameters, 6.7 GB in float32). Returns the names of the modules cast."""
    done = []
    for d in stitcher.connectors:
        dtype = getattr(stitcher, "b" if d == "a_to_b" else "a").dtype
        mods = [(f"connectors.{d}", stitcher.connectors[d])]
        if stitcher.fusion is not None and d in stitcher.fusion.kv:
            mods.append((f"fusion.kv.{d}", stitcher.fusion.kv[d]))
        for name, m in mods:
            if any(p.dtype != dtype for p in m.parameters()):
                m.to(dtype=dtype)
                done.append(name)
    return done


# ---- block offloading ----------------------------------------------------------------------------------
class _Blocks(nn.Module):
    """A holder whose only child is a ModuleList of the blocks to offload (diffusers' block-level
    offloading makes one group per list entry; the blocks stay owned by their experts)."""

    def __init__(self, blocks):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)


def _move_except(root: nn.Module, skip: set[int], device) -> None:
    """Move every parameter and buffer under ``root`` except those whose id is in ``skip``."""
    for m in root.modules():
        for name, p in m._parameters.items():
            if p is not None and id(p) not in skip:
                p.data = p.data.to(device)
        for name, b in m._buffers.items():
            if b is not None and id(b) not in skip:
                m._buffers[name] = b.to(device)


class _PrefetchInOrder(ModelHook):
    """On the first call of ``root``, record the order in which offloaded blocks run; afterwards each
    block's hook prefetches the next one on the side stream (diffusers' lazy prefetching, but over
    the blocks of two experts that take turns)."""

    def __init__(self, blocks):
        super().__init__()
        self.blocks, self.order = blocks, []

    def initialize_hook(self, module):
        for b in self.blocks:
            HookRegistry.check_if_exists_or_initialize(b).register_hook(_Track(self.order), _ORDER_HOOK)
        return module

    def post_forward(self, module, output):
        from diffusers.hooks.group_offloading import _GROUP_OFFLOADING

        for b in self.blocks:
            b._diffusers_hook.remove_hook(_ORDER_HOOK, recurse=False)
        seen, order = set(), []
        for b in self.order:  # a block retried (fused engine) counts once, at its first run
            if id(b) not in seen:
                seen.add(id(b))
                order.append(b._diffusers_hook.get_hook(_GROUP_OFFLOADING))
        for cur, nxt in zip(order, order[1:]):
            cur.next_group = nxt.group
            nxt.group.onload_self = False
        module._diffusers_hook.remove_hook(_PREFETCH_HOOK, recurse=False)
        return output


class _Track(ModelHook):
    def __init__(self, order):
        super().__init__()
        self.order = order

    def pre_forward(self, module, *args, **kwargs):
        self.order.append(module)
        return args, kwargs


_PREFETCH_HOOK = "soe_offload_prefetch"


def offload_blocks(root: nn.Module, blocks: list[nn.Module], device) -> None:
    """Blocks on the CPU, each onloaded to ``device`` for its forward; everything else of ``root`` on ``device``."""
    device = torch.device(device)
    in_blocks = {id(t) for b in blocks for t in [*b.parameters(), *b.buffers()]}
    _move_except(root, in_blocks, device)
    stream = device.type == "cuda"
    for b in blocks:
        b.to("cpu")
    apply_group_offloading(_Blocks(blocks), onload_device=device, offload_device="cpu", offload_type="block_level",
                           num_blocks_per_group=1, use_stream=stream, non_blocking=stream)
    if stream:
        HookRegistry.check_if_exists_or_initialize(root).register_hook(_PrefetchInOrder(blocks), _PREFETCH_HOOK)


# ---- whole-model offloading ----------------------------------------------------------------------------
class ModelOffload:
    """Each member is moved to ``device`` when used and the others go back to the CPU (one at a time)."""

    def __init__(self, device):
        self.device, self.members = torch.device(device), []

    def onload(self, module: nn.Module) -> None:
        for m in self.members:
            if m is not module:
                m.to("cpu")
        module.to(self.device)

    def add_module(self, module: nn.Module) -> None:
        """Onload ``module`` whenever its forward runs."""
        self.members.append(module)
        module.to("cpu")
        HookRegistry.check_if_exists_or_initialize(module).register_hook(_OnloadHook(self), "soe_model_offload")

    def add_methods(self, module: nn.Module, names=("encode", "decode")) -> None:
        """Onload ``module`` whenever one of its methods ``names`` runs (codecs are called by method)."""
        self.members.append(module)
        module.to("cpu")
        for name in names:
            fn = getattr(module, name, None)
            if fn is not None:
                setattr(module, name, functools.wraps(fn)(functools.partial(self._call, module, fn)))

    def _call(self, module, fn, *args, **kwargs):
        self.onload(module)
        args = tuple(a.to(self.device) if torch.is_tensor(a) else a for a in args)
        return fn(*args, **kwargs)


class _OnloadHook(ModelHook):
    def __init__(self, offload: ModelOffload):
        super().__init__()
        self.offload = offload

    def pre_forward(self, module, *args, **kwargs):
        self.offload.onload(module)
        return args, kwargs


# ---- attention backend, compile ------------------------------------------------------------------------
def set_attention_backend(modules, backend: str) -> list[str]:
    """Point every attention processor that uses diffusers' dispatcher at ``backend``; returns the
    names of the attention modules set (processors wrapped by soe's injection are unwrapped)."""
    from diffusers.models.attention_dispatch import AttentionBackendName

    name = AttentionBackendName(backend)
    done = []
    for root in modules:
        for path, m in root.named_modules():
            proc = getattr(m, "processor", None)
            inner = getattr(proc, "inner", proc) if proc is not None else None
            if inner is not None and "_attention_backend" in vars(type(inner)) | vars(inner):
                inner._attention_backend = name
                done.append(path)
    return done


def compile_blocks(blocks, **kwargs) -> None:
    """Regional compilation: each block's own ``forward`` compiled in place (``torch.compile``), like
    diffusers' ``compile_repeated_blocks``, but applied before offloading and the step cache wrap the block:
    their Python bookkeeping (which group is on the device, skip or compute) stays outside the graph, and
    so do the stitch's block pre-hooks (they run in ``nn.Module.__call__``). What runs inside a block
    (taps, joins, key/value processors) keeps its per-call state out of the graph itself
    (soe/stitch/lockstep.py, soe/stitch/attention_kv.py), so blocks of one kind share one graph: no
    recompilation after the first sampling step (tests/test_compile.py)."""
    from soe.stitch.attention_kv import keep_lookups_out_of_graphs
    from soe.stitch.lockstep import keep_hooks_out_of_graphs

    keep_lookups_out_of_graphs()
    keep_hooks_out_of_graphs(blocks)
    for b in blocks:
        if not getattr(b, "_soe_compiled", False):
            b.forward = torch.compile(b.forward, **kwargs)
            b._soe_compiled = True


# ---- the whole setup -----------------------------------------------------------------------------------
class SpeedSetup:
    """What :func:`apply_speed` did; ``cache`` is the step cache (or None), ``offload`` the model offloader."""

    def __init__(self, spec: SpeedConfig, device, cache: StepCache | None, offload: ModelOffload | None, attention: list[str]):
        self.spec, self.device, self.cache, self.offload, self.attention = spec, torch.device(device), cache, offload, attention

    def prepare_codecs(self, codecs: dict) -> dict:
        """Codecs for decoding under this setup: on the device, or onloaded when used; VAE tiling on
        whenever memory is being saved (``memory != none``)."""
        for c in codecs.values():
            vae = getattr(c, "vae", None)
            if self.spec.memory != "none" and hasattr(vae, "enable_tiling"):
                vae.enable_tiling()
            if self.offload is not None:
                self.offload.add_methods(c)
            else:
                c.to(self.device)
        return codecs


def apply_speed(stitcher, spec: SpeedConfig, device=None) -> SpeedSetup:
    """Apply ``spec`` to a built Stitcher (on any device; weights move where ``spec`` says).

    Order matters: connectors and key/value projections cast to their host's dtype, layerwise casting, then
    compile (each block's own forward, casting hooks inside), then offloading, then the step cache (its hooks
    wrap the offloading ones, so a skipped block is never onloaded)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    experts = [stitcher.a, stitcher.b]
    compute = {id(e): e.dtype for e in experts}
    cast_stitch_modules(stitcher)
    if spec.storage_dtype is not None:
        for e in experts:
            store_in(e.model, spec.storage_dtype, compute[id(e)])
        if stitcher.fusion is not None:
            for side, blocks in stitcher.fusion.inserted.items():
                store_in(blocks, spec.storage_dtype, compute[id(getattr(stitcher, side))])
    for e in experts:
        e._execution_device = device  # the sampler puts latents here, whatever device the weights wait on
    blocks = stitched_blocks(stitcher)
    if spec.compile:
        compile_blocks([b for side in ("a", "b") for b in blocks[side]])
    offload = None
    if spec.memory == "offload_blocks":
        offload_blocks(stitcher, [b for side in ("a", "b") for b in blocks[side]], device)
    elif spec.memory == "offload_model":
        offload = ModelOffload(device)
        offload.add_module(stitcher)
    else:
        stitcher.to(device)
    cache = None
    if spec.cache == "first_block":
        cache = apply_step_cache(stitcher, spec.cache_threshold)
    roots = experts + ([stitcher.fusion] if stitcher.fusion is not None else [])  # inserted blocks have attentions too
    attention = set_attention_backend(roots, spec.attention_backend) if spec.attention_backend else []
    return SpeedSetup(spec, device, cache, offload, attention)


def _step_caches(experts) -> list[StepCache]:
    caches = {id(c): c for e in experts if (c := getattr(e, "_soe_step_cache", None)) is not None}
    return list(caches.values())


def reset_step_caches(experts) -> None:
    """Reset the step cache attached to any of ``experts`` (once per sampling run)."""
    for cache in _step_caches(experts):
        cache.reset()


def set_step_cache_branch(experts, branch: str) -> None:
    """Name the forward that runs next (``cfg``, ``cond``, ``uncond``): a step cache compares and reuses
    residuals within one branch, so CFG's two forwards per step never read each other's. A forward begins here,
    so the last one's heads are forgotten (one expert's forward alone, ``alone:b``, leaves only its own head run)."""
    for cache in _step_caches(experts):
        cache.state.branch = branch
        cache.state.heads_done, cache.state.skip = set(), None
