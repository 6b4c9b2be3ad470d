"""What a stitched forward checks about its two batches before any block runs.

A raw torch error deep inside an expert ("expected mat1 and mat2 to have the same dtype") or a
silent crop (a latent of height 5 patched by 2 becomes 4) turns into one line naming the batch,
the key and what was expected.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch

from soe.errors import SoeError


class BatchError(SoeError, ValueError):
    """A batch an expert cannot take: a missing key, a dtype or batch size that does not match, a latent
    size the patch embedding would crop."""


def check_batch(expert, batch: dict, name: str) -> int:
    """Checks one expert's batch; returns its batch size."""
    if not isinstance(batch, Mapping):
        raise BatchError(f"{name}: expected a dict of tensors (latents, timestep, conditioning), got {type(batch).__name__}")
    needed = ("latents", "timestep", *expert.condition_keys)
    missing = [k for k in needed if k not in batch]
    if missing:
        raise BatchError(f"{name}: missing {missing} (expert '{expert.name}' needs {list(needed)})")
    latents, t = batch["latents"], batch["timestep"]
    if not torch.is_tensor(latents) or not latents.is_floating_point():
        raise BatchError(f"{name}['latents']: expected a floating-point tensor, got {getattr(latents, 'dtype', type(latents).__name__)}")
    if latents.dtype != expert.dtype:
        raise BatchError(f"{name}['latents']: dtype {latents.dtype}, but expert '{expert.name}' computes in {expert.dtype} "
                         "(cast the batch or set the expert's dtype)")
    if not _same_device(latents.device, expert.device):
        raise BatchError(f"{name}['latents']: on {latents.device}, but expert '{expert.name}' is on {expert.device} "
                         "(move the batch to the expert's device)")
    n = latents.shape[0] if latents.dim() else 0
    if n == 0:
        raise BatchError(f"{name}['latents']: shape {list(latents.shape)} holds no sample; expected (batch >= 1, ...)")
    if not torch.is_tensor(t) or t.shape != (n,):
        raise BatchError(f"{name}['timestep']: expected shape ({n},), one flow time per sample, got "
                         f"{list(t.shape) if torch.is_tensor(t) else type(t).__name__}")
    if not t.is_floating_point():  # e.g. diffusers' integer 0..999 scheduler steps
        raise BatchError(f"{name}['timestep']: dtype {t.dtype}; expected floating-point flow times in [0, 1] (soe's convention)")
    check_axes(expert, batch, name)
    for axis, multiple in expert.latent_multiples().items():
        if latents.dim() <= axis or latents.shape[axis] % multiple:
            raise BatchError(f"{name}['latents']: shape {list(latents.shape)}, axis {axis} must be a multiple of "
                             f"{multiple} (the patch size of expert '{expert.name}')")
    for k in expert.condition_keys:
        v = batch[k]
        if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] not in (n, 1):
            raise BatchError(f"{name}['{k}']: batch size {v.shape[0]}, the latents have {n}")
    return n


def _same_device(x: torch.device, y: torch.device) -> bool:
    return x.type == y.type and (x.index is None or y.index is None or x.index == y.index)  # "cuda" is "cuda:<current>"


def check_axes(expert, batch: dict, name: str) -> None:
    """Rank and fixed sizes of each tensor the expert describes (``Expert.batch_axes``)."""
    axes = expert.batch_axes()
    latent_sizes = dict(zip((a for a, _ in axes.get("latents", ())), batch["latents"].shape))
    for key, spec in axes.items():
        v = batch.get(key)
        if not torch.is_tensor(v):
            continue
        want = [latent_sizes.get(size) if isinstance(size, str) else size for _, size in spec]
        if v.dim() != len(spec) or any(w is not None and w != got for w, got in zip(want, v.shape)):
            shown = ", ".join(axis if w is None else f"{axis}={w}" for (axis, _), w in zip(spec, want))
            raise BatchError(f"{name}['{key}']: shape {list(v.shape)}, expert '{expert.name}' expects ({shown})")


def check_batches(a, b, batch_a: dict, batch_b: dict) -> None:
    if not (a.batch_contract and b.batch_contract):  # a plain module's own forward arguments (soe.stitch.generic)
        return
    if a.dtype != b.dtype:  # connectors carry hidden states from one expert into the other
        raise BatchError(f"experts: expert a ('{a.name}') is {a.dtype}, expert b ('{b.name}') is {b.dtype}; stitched experts "
                         "compute in one dtype (for mixed precision keep both float32 and use trainer.precision=bf16-mixed)")
    na, nb = check_batch(a, batch_a, "batch_a"), check_batch(b, batch_b, "batch_b")
    if na != nb:
        raise BatchError(f"batch_a and batch_b: batch sizes {na} and {nb}; the stitched experts run one clip per sample, "
                         "so both need the same batch size")


def cast_batch(expert, batch: dict) -> dict:
    """Floating-point tensors of ``batch`` in the expert's dtype (data is stored in float32 or bf16;
    a bf16 expert trains on bf16 inputs). Integer ids and masks are left as they are."""
    return {k: v.to(expert.dtype) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in batch.items()}
