"""Context parallel: one sample's long token sequence split across the ranks of a ``cp`` group.

The split expert (the one with the longest sequence, a video transformer) runs under diffusers' own context
parallelism: ``ContextParallelConfig`` + ``ModelMixin.enable_parallelism`` with the model's ``_cp_plan``
(Wan: the rotary tables and the input of ``blocks.0`` split along tokens, ``proj_out`` gathered), and its
attention through diffusers' Ulysses all-to-all (``dispatch_attention_fn``). Ring attention needs an attention
kernel that returns the log-sum-exp; diffusers' ``native`` (SDPA) backend, the one that runs on CPU, does not,
so on CPU only Ulysses runs (``ring`` stays 1 in the mesh).

Hand-written here, because neither diffusers nor torch knows a stitch:

* :func:`enable_context_parallel`, the one shim: diffusers builds the parallel config's device as
  ``torch.device(accelerator, rank % torch.accelerator.device_count())``, which divides by zero on a machine
  without an accelerator (a CUDA build of torch on CPU included). It passes soe's mesh and, where no
  accelerator is present, resolves the config on the CPU for that one model (an attribute of the instance,
  removed again), so tests and CPU runs use exactly diffusers' code path otherwise.
* :class:`ContextSplit`: what the stitch does with a split sequence. A connector reading the split side pools
  per time step from partial sums, all-reduced across the group (``(B, T, D)`` vectors, not the tokens); a
  connector writing into it adds only the rank's own tokens; attention k/v injection forms its windows and
  rotary positions from the rank's own time steps. The other expert (audio: a few hundred tokens) and
  everything it reads are replicated.
* :func:`scale_split_gradients`: the gradient of the split expert's prediction is multiplied by the group size
  (its loss value is untouched). Every rank computes the same loss; diffusers' gather hands each rank the gradient
  of its own tokens, and the all-reduce above hands every rank the full gradient of the pooled vectors, so a plain
  average of the gradients over all ranks (DDP, or FSDP2 over ``dp`` then an average over ``cp``) equals the
  gradient of one process holding the whole sequence.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from soe.errors import UsageError
from soe.plugin.expert import Expert, TokenLayout
from soe.stitch.align import broadcast_to_grid, partial_pool_steps, token_steps

MESH_DIMS = ("dp", "cfg", "ring", "ulysses")  # soe's world mesh; cp = ("ring", "ulysses") flattened


def world_mesh(context: int, device_type: str = "cpu", cfg: bool = False):
    """The world as a DeviceMesh ``(dp, cfg, ring=1, ulysses=context)`` named :data:`MESH_DIMS` (torch.distributed is
    initialised): consecutive ranks share a sample, as in Lightning's ``(data_parallel, tensor_parallel)`` mesh.
    diffusers reads its ``ring`` and ``ulysses`` dimensions; ``cfg`` (2 with CFG parallel, sampling) holds the
    guided batch's two halves; the data-parallel ranks are ``mesh["dp"]``."""
    from torch.distributed.device_mesh import init_device_mesh

    world, group = dist.get_world_size(), context * (2 if cfg else 1)
    if world % group:
        raise UsageError(f"parallel.context: {group} ranks per sample do not divide the {world} ranks of this run")
    return init_device_mesh(device_type, (world // group, 2 if cfg else 1, 1, context), mesh_dim_names=MESH_DIMS)


def enable_context_parallel(model: torch.nn.Module, mesh) -> None:
    """Run a diffusers model with Ulysses context parallelism over ``mesh["ring", "ulysses"]``.

    The one shim soe needs (see the module docstring): on a machine without an accelerator the model's
    ``_resolve_parallel_config`` is replaced, for this call and this instance only, by the same steps on the
    CPU device with ``mesh``."""
    from diffusers import ContextParallelConfig
    from diffusers.models._modeling_parallel import ParallelConfig

    config = ContextParallelConfig(ring_degree=mesh["ring"].size(), ulysses_degree=mesh["ulysses"].size(), mesh=mesh)
    if getattr(model, "_cp_plan", None) is None:
        raise UsageError(f"parallel.context: {type(model).__name__} has no context-parallel plan (_cp_plan) in diffusers")
    heads = getattr(model.config, "num_attention_heads", None)
    if heads is not None and heads % config.ulysses_degree:
        raise UsageError(f"parallel.context: {config.ulysses_degree} does not divide the {heads} attention heads of "
                         f"{type(model).__name__} (Ulysses splits heads)")

    def resolve_on_cpu(cfg):
        cfg = ParallelConfig(context_parallel_config=cfg) if isinstance(cfg, ContextParallelConfig) else cfg
        cfg.setup(dist.get_rank(), dist.get_world_size(), torch.device("cpu"), mesh=mesh)
        model._parallel_config = cfg
        return cfg

    no_accelerator = not torch.accelerator.is_available() or torch.accelerator.device_count() == 0
    if no_accelerator:
        model._resolve_parallel_config = resolve_on_cpu  # instance attribute: the class's method stays untouched
    try:
        model.enable_parallelism(config=config)
    finally:
        if no_accelerator:
            del model._resolve_parallel_config


@dataclass
class ContextSplit:
    """Expert ``side``'s tokens split evenly across ``group``: rank ``rank`` of ``size`` holds the ``rank``-th
    contiguous part (diffusers' ``EquipartitionSharder``). Everything a stitch does with that side goes through
    these methods (the engines and the connectors ask ``Stitcher.split_of(side)``)."""

    side: str
    group: object
    rank: int
    size: int

    def span(self, layout: TokenLayout) -> tuple[int, int]:
        """``(start, stop)`` of this rank's tokens; a sequence that does not divide by the group is refused."""
        n = layout.num_tokens
        if n % self.size:
            raise UsageError(f"parallel.context={self.size}: expert {self.side} has {n} tokens {layout.grid}, which do not "
                             f"split evenly; choose data.seconds / sample.seconds or a resolution giving a multiple of {self.size}")
        c = n // self.size
        return self.rank * c, (self.rank + 1) * c

    def local_tokens(self, layout: TokenLayout) -> int:
        start, stop = self.span(layout)
        return stop - start

    def pool(self, hidden: torch.Tensor, layout: TokenLayout, mode: str = "mean") -> torch.Tensor:
        """``pool_steps`` of the whole sequence from this rank's tokens ``(B, n, D)``: partial sums, all-reduced
        (its backward all-reduces the gradient, which every rank's tokens then receive in full)."""
        from torch.distributed.nn.functional import all_reduce

        part = partial_pool_steps(hidden, layout, self.span(layout)[0], mode)  # (B, T, D or 3 * D)
        return all_reduce(part, group=self.group)

    def broadcast(self, steps: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
        """``broadcast_to_grid`` restricted to this rank's tokens: ``(B, T, D) -> (B, n, D)``."""
        return broadcast_to_grid(steps, layout, *self.span(layout))

    def steps(self, layout: TokenLayout, device=None) -> torch.Tensor:
        """The time step of each of this rank's tokens ``(n,)``."""
        return token_steps(layout, *self.span(layout), device)


def split_stitcher(stitcher, mesh, side: str | None = None) -> ContextSplit:
    """Split the long expert of ``stitcher`` across ``mesh["ring", "ulysses"]`` (diffusers' context parallelism)
    and tell the stitch (``stitcher.context``). ``side``: which expert, else the one with more tokens per second
    of a one-second batch."""
    if side is None:
        side = max("ab", key=lambda s: _tokens_per_second(getattr(stitcher, s)))
    expert = getattr(stitcher, side)
    enable_context_parallel(expert.model, mesh)
    group = mesh["ring", "ulysses"]._flatten().get_group()
    split = ContextSplit(side, group, dist.get_rank(group), dist.get_world_size(group))
    stitcher.context = split
    return split


def _tokens_per_second(expert: Expert) -> float:
    layout = expert.token_layout(expert.dummy_batch(1, seconds=1.0))
    return layout.num_tokens / layout.seconds


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


def scale_split_gradients(stitcher, preds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``preds`` (``{"a": ..., "b": ...}``) with the gradient of the split side's prediction times the group size
    (values unchanged; see the module docstring). Without a split: ``preds`` as they are."""
    split = getattr(stitcher, "context", None)
    if split is None:
        return preds
    return {s: _ScaleGrad.apply(p, float(split.size)) if s == split.side else p for s, p in preds.items()}


def average_over_context(parameters, split: ContextSplit) -> None:
    """Average gradients over the ranks of one sample (FSDP2 reduces over ``dp`` only): local shards in place."""
    for p in parameters:
        if p.grad is not None:
            g = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
            dist.all_reduce(g, group=split.group)
            g /= split.size
