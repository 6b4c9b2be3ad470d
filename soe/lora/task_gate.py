"""What an expert's LoRA learns from, per training sample: ``lora.tasks``, ``lora.preserve``, ``lora.lr_scale``.

A stitch trained on a task mixture (``flow.tasks``) updates each expert's LoRA on every sample. At demo scale the
audio expert's LoRA, trained jointly, learns a quieter, sparser audio than the expert alone (docs/evidence.md).
Three ways to hold it, each a key of ``experts.<side>.lora``:

* ``tasks``: the LoRA receives the gradient of the samples of these tasks only (the others still train the
  connectors and the other expert, and still run through the LoRA: only its gradient is stopped, per sample);
* ``preserve``: a weight; adds ``preserve * |pred - pred with this LoRA off|^2`` (the stitched prediction with the
  LoRA switched off, connectors on, no gradient) to the expert's loss on every sample it is scored on: the LoRA
  may change the prediction only as far as the flow loss pays for it;
* ``lr_scale``: the LoRA's learning rate relative to ``optim.lr`` (connectors keep ``optim.lr``);
* ``off_tasks``: the samples of these tasks run without the LoRA in training (as ``sample.lora_off`` samples them).

And one for sampling, ``sample.lora_off`` (:func:`loras_off`, applied by ``soe.sample.sampler.sample_stitched``):
per side, the sampling tasks that run that expert without its LoRA. Measured on the sync experiment
(docs/evidence.md): the audio LoRA trained with the task mixture is what makes the jointly sampled audio quieter;
sampling joint (and image) without it, every connector on, gives the experts-alone audio back while the
connectors keep the sync; v2a keeps the LoRA, which is where it learnt to follow a finished video.

Hand-written: peft offers switching an adapter off for a whole model (``disable_adapter()``, on a ``PeftModel``,
which soe does not wrap experts in) but not per sample, nor without touching ``requires_grad``. A forward hook on
each adapted layer's ``lora_B`` does both: it returns the output, the output without gradient (per sample), or
zeros. Hooks only: no expert module is replaced, and :meth:`LoraGate.remove` restores everything.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from soe.lora.adapters import ADAPTER
from soe.plugin.expert import Expert


class LoraGate:
    """Forward hooks on one expert's LoRA (peft ``lora_B`` of adapter ``soe``).

    ``learn``: ``(B,)`` bool or None; samples marked False run through the LoRA without sending it gradient.
    Inside :meth:`off` the LoRA adds nothing (the expert as if it had no adapter)."""

    def __init__(self, expert: Expert, tasks: list[str] | None = None, off_tasks: list[str] | None = None):
        from peft.tuners.lora import LoraLayer

        self.tasks = None if tasks is None else list(tasks)
        self.off_tasks = list(off_tasks or [])
        self.learn: torch.Tensor | None = None
        self.use: torch.Tensor | None = None  # (B,) bool: samples that run through the LoRA (lora.off_tasks: the others not)
        self.enabled = True
        layers = [m.lora_B[ADAPTER] for m in expert.model.modules() if isinstance(m, LoraLayer) and ADAPTER in m.lora_B]
        self.handles = [layer.register_forward_hook(self._hook) for layer in layers]

    def __len__(self) -> int:
        return len(self.handles)

    def _hook(self, module, args, out):
        if not self.enabled:
            return torch.zeros_like(out)
        if self.use is not None and out.shape[0] == self.use.shape[0]:
            out = torch.where(self.use.to(out.device).view(-1, *([1] * (out.dim() - 1))), out, torch.zeros_like(out))
        if self.learn is None or out.shape[0] != self.learn.shape[0]:
            return out
        keep = self.learn.to(out.device).view(-1, *([1] * (out.dim() - 1)))  # (B, 1, ...)
        return torch.where(keep, out, out.detach())

    def set_tasks(self, drawn: list[str]) -> None:
        """Mark the samples of this step by their drawn tasks (one per sample)."""
        self.learn = None if self.tasks is None else torch.tensor([t in self.tasks for t in drawn])
        self.use = torch.tensor([t not in self.off_tasks for t in drawn]) if self.off_tasks else None

    @contextmanager
    def off(self):
        self.enabled = False
        try:
            yield
        finally:
            self.enabled = True

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


@dataclass
class LoraTraining:
    """Per side: a :class:`LoraGate` (``lora.tasks`` or ``lora.preserve`` set) and the preservation weight."""

    gates: dict[str, LoraGate] = field(default_factory=dict)
    preserve: dict[str, float] = field(default_factory=dict)  # side -> weight, only where > 0
    lr_scale: dict[str, float] = field(default_factory=dict)  # side -> factor, only where != 1

    def mark(self, drawn: list[str]) -> None:
        for gate in self.gates.values():
            gate.set_tasks(drawn)

    @contextmanager
    def off(self, sides):
        """The LoRA of every side in ``sides`` switched off (for the preservation targets)."""
        gates = [self.gates[s] for s in sides]
        for g in gates:
            g.enabled = False
        try:
            yield
        finally:
            for g in gates:
                g.enabled = True


@contextmanager
def loras_off(experts: dict[str, Expert], sides):
    """Every LoRA of the experts of ``sides`` adds nothing inside the block (hooks, removed after). An expert
    without LoRA layers (the untrained stitch, ``soe generate`` without ``ckpt``) already runs without one."""
    gates = [LoraGate(experts[side]) for side in sides]
    for gate in gates:
        gate.enabled = False
    try:
        yield
    finally:
        for g in gates:
            g.remove()


def preservation_error(pred: torch.Tensor, ref: torch.Tensor, target: dict, loss_space: str) -> torch.Tensor:
    """Mean squared distance of ``pred`` to ``ref`` (both velocities) in the expert's loss space, over the
    positions the flow loss scores (``target['loss_mask']``; everywhere without one)."""
    err = (pred.float() - ref.float()) ** 2
    if loss_space == "x0":  # x0_pred = x_t - sigma * v: the distance of the two x0 predictions
        err = err * target["sigma"].float() ** 2
    keep = target.get("loss_mask")
    if keep is None:
        return err.mean()
    return (err * keep).sum() / keep.sum().clamp(min=1)
