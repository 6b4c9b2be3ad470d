"""Rectified flow per modality: timesteps, independent noise streams, noising, loss.

Convention (Wan, ACE-Step): ``x_t = (1 - sigma) * x0 + sigma * eps`` and the model predicts the
velocity ``eps - x0``. Each expert declares its schedule shift (``flow_shift``) and the space its
loss lives in (``flow_loss``: ``velocity`` = plain velocity MSE as Wan; ``x0`` = MSE of
``x0_pred = x_t - sigma * v``, i.e. a sigma^2-weighted velocity loss, as ACE-Step v1).
"""
from __future__ import annotations

import torch
from torch import nn

from soe.flow.conditioning import TaskMixture, expand_mask, frame_timestep
from soe.plugin.expert import Batch, Expert
from soe.rng import generator_for
from soe.schema.base import choice
from soe.schema.train import Balance, Density, Timesteps


def shift_sigma(sigma: torch.Tensor, shift: float) -> torch.Tensor:
    """Timestep shift of SD3/Wan: ``s*sigma / (1 + (s-1)*sigma)``; shift > 1 spends more time at high noise."""
    return shift * sigma / (1 + (shift - 1) * sigma)


def sample_base_times(n: int, density: str, generator: torch.Generator) -> torch.Tensor:
    """Unshifted flow times in (0, 1): ``uniform`` or ``logit_normal`` (sigmoid of a standard normal)."""
    if choice(Density, density, "flow.density") == Density.uniform:
        return torch.rand(n, generator=generator)
    return torch.sigmoid(torch.randn(n, generator=generator))


class FlowObjective(nn.Module):
    """Noising and loss for the two modalities of a stitch.

    ``timesteps="shared"``: one base time per clip for both modalities (each then shifted by its own
    expert's shift); ``"independent"``: a base time per clip per modality. Noise always comes from a
    separate generator stream per modality derived from (seed, modality, step, rank), so audio and
    video noise are never correlated, whatever their shapes. ``balance="ema"`` divides each
    modality's loss by a running mean of itself so neither scale drowns the other.

    ``tasks`` (soe/flow/conditioning.py): a task per sample (v2a, a2v, image, extend, ...) whose given
    latent frames stay clean in ``x_t`` (timestep 0 where the expert takes one per frame) and carry
    no loss. ``None`` or ``{joint: 1.0}`` leaves every step exactly as without it.
    """

    def __init__(self, experts: dict[str, Expert], timesteps: str = "shared", density: str = "logit_normal",
                 shifts: dict[str, float] | None = None, weights: dict[str, float] | None = None,
                 balance: str = "none", momentum: float = 0.99, seed: int = 0, tasks: TaskMixture | None = None,
                 source_dropout: float = 0.0):
        super().__init__()
        timesteps, balance = choice(Timesteps, timesteps, "flow.timesteps"), choice(Balance, balance, "flow.balance")
        density = choice(Density, density, "flow.density")
        self.sides = list(experts)
        self.modality = {k: e.modality for k, e in experts.items()}
        self.loss_space = {k: getattr(e, "flow_loss", "velocity") for k, e in experts.items()}
        self.shifts = {k: float((shifts or {}).get(k) or e.flow_shift) for k, e in experts.items()}
        self.weights = {k: float((weights or {}).get(k, 1.0)) for k in experts}
        self.timesteps, self.density, self.balance, self.momentum, self.seed = timesteps, density, balance, momentum, seed
        self.tasks = None if tasks is None or tasks.trivial else tasks
        self.source_dropout = float(source_dropout)
        self._experts = experts  # plain dict: not registered as submodules (they belong to the stitcher)
        # running loss means live in buffers so they are checkpointed and resume exactly
        self.register_buffer("loss_ema", torch.zeros(len(self.sides)))
        self.register_buffer("ema_steps", torch.zeros((), dtype=torch.long))

    def _label(self, side: str) -> str:
        return f"{side}:{self.modality[side]}"

    def sigmas(self, batch_size: int, step: int, rank: int = 0) -> dict[str, torch.Tensor]:
        """Flow time sigma in (0, 1) per modality, shape ``(B,)`` each."""
        if self.timesteps == "shared":
            u = sample_base_times(batch_size, self.density, generator_for(self.seed, "time", step, rank))
            base = {k: u for k in self.sides}
        else:
            base = {k: sample_base_times(batch_size, self.density, generator_for(self.seed, "time", self._label(k), step, rank))
                    for k in self.sides}
        return {k: shift_sigma(base[k], self.shifts[k]) for k in self.sides}

    def source_mask(self, batch_size: int, step: int, rank: int = 0) -> torch.Tensor | None:
        """``flow.source_dropout``: ``(B,)`` 0 for the samples whose connectors read nothing this step, else 1;
        None when off. Drawn from (seed, step, rank) only: resume-exact."""
        if not self.source_dropout:
            return None
        drop = torch.rand(batch_size, generator=generator_for(self.seed, "source", step, rank)) < self.source_dropout
        return (~drop).float()

    def noise(self, side: str, like: torch.Tensor, step: int, rank: int = 0) -> torch.Tensor:
        g = generator_for(self.seed, "noise", self._label(side), step, rank)
        return torch.randn(like.shape, generator=g).to(like.device, like.dtype)

    def noised(self, clean: dict[str, Batch], step: int, rank: int = 0) -> tuple[dict[str, Batch], dict[str, dict]]:
        """Model inputs (``latents`` = x_t, ``timestep`` = sigma) and what the loss needs, per side."""
        bsz = next(iter(clean.values()))["latents"].shape[0]
        sig = self.sigmas(bsz, step, rank)
        given, drawn = None, ["joint"] * bsz
        if self.tasks is not None:  # drawn from (seed, step, rank) only: resume-exact
            drawn = self.tasks.draw(bsz, step, rank)
            given = self.tasks.masks(drawn, {k: clean[k]["latents"] for k in self.sides})
        inputs, targets = {}, {}
        for k in self.sides:
            x0 = clean[k]["latents"]
            eps = self.noise(k, x0, step, rank)
            s = sig[k].to(x0.device, x0.dtype).view(-1, *([1] * (x0.dim() - 1)))
            x_t = (1 - s) * x0 + s * eps
            timestep = sig[k].to(x0.device, x0.dtype)
            targets[k] = {"x0": x0, "eps": eps, "x_t": x_t, "sigma": s, "tasks": drawn}
            if given is not None:
                m = expand_mask(given[k], x0, self.tasks.time_axis[k])  # True on given frames
                x_t = torch.where(m, x0, x_t)  # given frames stay clean on every call
                timestep = frame_timestep(self._experts[k], timestep, given[k])
                targets[k].update(x_t=x_t, loss_mask=(~m).expand_as(x0), task_given=given[k])
            inputs[k] = {**clean[k], "latents": x_t, "timestep": timestep}
        return inputs, targets

    def modality_loss(self, side: str, pred: torch.Tensor, target: dict) -> torch.Tensor:
        pred = pred.float()
        if self.loss_space[side] == "x0":
            err = (target["x_t"].float() - target["sigma"].float() * pred - target["x0"].float()) ** 2
        else:
            err = (pred - (target["eps"].float() - target["x0"].float())) ** 2
        keep = target.get("loss_mask")
        if keep is None:
            return torch.mean(err)
        # mean over the positions that are not given; a side given everywhere contributes 0 (and no gradient)
        return (err * keep).sum() / keep.sum().clamp(min=1)

    def loss_scale(self, side: str) -> float | torch.Tensor:
        """What :meth:`forward` multiplies ``side``'s loss by in the total: its weight, over its running mean
        with ``balance=ema`` (so a term added to the total on that side's scale weighs like its loss)."""
        mean = self.loss_ema[self.sides.index(side)]
        if self.balance == "none" or self.ema_steps == 0 or not bool(mean > 0):
            return self.weights[side]
        return self.weights[side] / mean

    def forward(self, preds: dict[str, torch.Tensor], targets: dict[str, dict]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Total loss and the per-modality losses (unweighted, for logging)."""
        losses = {k: self.modality_loss(k, preds[k], targets[k]) for k in self.sides}
        if self.balance == "none":
            return sum(self.weights[k] * losses[k] for k in self.sides), losses
        current = torch.stack([losses[k].detach() for k in self.sides])
        if self.training:
            with torch.no_grad():
                first = self.ema_steps == 0
                if self.tasks is not None:  # a side given everywhere this step has no loss: its mean waits
                    present = torch.tensor([bool(targets[k]["loss_mask"].any()) for k in self.sides], device=current.device)
                    first = self.loss_ema == 0  # per side: no loss seen yet
                new = torch.where(first, current, self.momentum * self.loss_ema + (1 - self.momentum) * current)
                self.loss_ema.copy_(new if self.tasks is None else torch.where(present, new, self.loss_ema))
                self.ema_steps += 1
        scale = self.loss_ema.clamp(min=1e-8) if self.ema_steps > 0 else current.clamp(min=1e-8)
        total = sum(self.weights[k] * losses[k] / scale[n] for n, k in enumerate(self.sides))
        return total, losses
