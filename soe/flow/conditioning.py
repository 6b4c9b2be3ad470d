"""Conditioning: which latent positions of a modality are given clean, in training and in sampling.

One mechanism for every expert, through the contract only. A *task* says, per modality, how many
leading latent frames (along the expert's ``latent_time_axis``) are given:

==========  ===========================================================================
``joint``   nothing given (text-to-audio+video; today's behaviour)
``v2a``     the whole video given (sound for a silent video)
``a2v``     the whole audio given (video for a track)
``image``   the first video latent frame given: the reference image's latent (UniVerse-1)
``extend``  the first ``extend_seconds`` of both modalities given (continue a clip)
==========  ===========================================================================

Given positions are replaced by their clean latents on every model call; experts that take one
timestep per latent frame (``Expert.frame_timesteps``) see timestep 0 there, a fully given modality
gets timestep 0 whatever the expert. The loss skips given positions, and a fully given modality is
not denoised at all, yet it still runs, so its hidden states feed the connectors.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from soe.plugin.expert import Expert
from soe.schema.base import choice
from soe.schema.sample import SAMPLING_TASKS as TASKS  # one list: the schema (below flow) checks sample.lora_off with it
from soe.schema.sample import GivenUncond


class TaskError(ValueError):
    """A task the stitch cannot serve (e.g. ``v2a`` without a video expert)."""


def needed_modalities(task: str) -> tuple[str, ...]:
    """The modalities a task needs in the stitch."""
    return {"joint": (), "v2a": ("video", "audio"), "a2v": ("video", "audio"), "image": ("video",), "extend": ()}[task]


GIVEN_MODALITY = {"v2a": "video", "a2v": "audio"}  # tasks where one whole modality is given and the other generated


def check_task(task: str, modalities: dict[str, str], key: str = "flow.tasks", direction: str = "both") -> None:
    """Raise :class:`TaskError` (``<key>.<task>: ...``) when ``task`` is unknown or the experts cannot serve it:
    a missing modality, or a one-way ``direction`` whose connectors run from the generated side to the
    given one (the generated expert would never see what it is given)."""
    if task not in TASKS:
        raise TaskError(f"{key}.{task}: unknown task; expected one of {list(TASKS)}")
    have = sorted(modalities.values())
    for m in needed_modalities(task):
        if m not in have:
            raise TaskError(f"{key}.{task}: needs a {m} expert, this stitch has {have}")
    given = GIVEN_MODALITY.get(task)
    if given is not None and direction in ("a_to_b", "b_to_a"):
        source = {"a_to_b": "a", "b_to_a": "b"}[direction]
        if modalities[source] != given:
            generated = "audio" if given == "video" else "video"
            raise TaskError(f"{key}.{task}: the {given} is given and the {generated} generated, but stitch.direction "
                            f"'{direction}' only carries {modalities[source]} to {given}: the {generated} expert never "
                            f"sees the {given}; use stitch.direction={'b_to_a' if source == 'a' else 'a_to_b'} or both")


def given_frames(task: str, modality: str, n_frames: int, latent_rate: float, extend_seconds: float | None) -> int:
    """How many leading latent frames (of ``n_frames``) of a ``modality`` side ``task`` gives clean."""
    if task == "v2a":
        return n_frames if modality == "video" else 0
    if task == "a2v":
        return n_frames if modality == "audio" else 0
    if task == "image":
        return min(1, n_frames) if modality == "video" else 0
    if task == "extend":
        seconds = n_frames / latent_rate / 2 if extend_seconds is None else extend_seconds
        return max(1, min(n_frames - 1, math.floor(seconds * latent_rate + 1e-6)))  # frames wholly inside the given seconds
    return 0


def prefix_mask(counts: torch.Tensor, n_frames: int) -> torch.Tensor:
    """``(B,)`` leading-frame counts -> ``(B, T)`` bool, True on the given frames."""
    return torch.arange(n_frames, device=counts.device)[None, :] < counts[:, None]


def expand_mask(mask: torch.Tensor, like: torch.Tensor, time_axis: int) -> torch.Tensor:
    """``(B, T)`` frame mask -> a mask broadcastable to the batched latent ``like`` (time at ``time_axis``)."""
    shape = [1] * like.dim()
    shape[0], shape[time_axis] = mask.shape
    return mask.to(like.device).view(shape)


def frame_timestep(expert: Expert, sigma: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The ``timestep`` entry of a batch with given frames: ``sigma`` ``(B,)`` and frame mask ``(B, T)``.

    A fully given sample gets timestep 0 (any expert). Partly given samples get ``(B, T)`` with 0 on
    given frames when the expert takes per-frame timesteps; otherwise they keep the clip's sigma
    (UniVerse-1 feeds Wan2.1 its one timestep while frame 0 is the clean image latent)."""
    full = mask.all(dim=1)
    partly = mask.any(dim=1) & ~full
    if bool(partly.any()) and getattr(expert, "frame_timesteps", False):
        return torch.where(mask.to(sigma.device), torch.zeros((), dtype=sigma.dtype, device=sigma.device), sigma[:, None])
    return torch.where(full.to(sigma.device), torch.zeros_like(sigma), sigma)


@dataclass
class GivenLatents:
    """Clean latents of one modality and which of its latent frames are given.

    ``clean``: the batched latent (values off the mask are ignored); ``mask``: ``(B, T)`` bool along
    ``time_axis``; ``uncond``: what the unconditional CFG half sees at given frames of a partly given
    modality, ``keep`` the clean latents (diffusers' Wan image-to-video) or ``zeros`` (UniVerse-1's
    zero reference)."""

    clean: torch.Tensor
    mask: torch.Tensor
    time_axis: int
    uncond: str = "keep"

    def __post_init__(self):
        self.uncond = choice(GivenUncond, self.uncond, "uncond")
        t = self.clean.shape[self.time_axis]
        if self.mask.shape != (self.clean.shape[0], t):
            raise ValueError(f"mask: expected shape {(self.clean.shape[0], t)} (batch, latent frames), got {tuple(self.mask.shape)}")

    @property
    def full(self) -> bool:
        """Every frame of every sample given: the modality is not denoised."""
        return bool(self.mask.all())

    def paste(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` with the given frames replaced by the clean latents."""
        return torch.where(expand_mask(self.mask, x, self.time_axis), self.clean.to(x.device, x.dtype), x)

    def uncond_latents(self, x: torch.Tensor) -> torch.Tensor:
        """The unconditional half's input, from the conditional half's (already pasted) ``x``."""
        if self.uncond == "keep" or self.full:
            return x
        return torch.where(expand_mask(self.mask, x, self.time_axis), torch.zeros((), dtype=x.dtype, device=x.device), x)

    def timestep(self, expert: Expert, sigma: torch.Tensor) -> torch.Tensor:
        return frame_timestep(expert, sigma, self.mask)


class TaskMixture:
    """``flow.tasks``: a task drawn per training sample from a stream seeded by (seed, step, rank).

    The draw depends on nothing else, so a resumed run sees the same tasks as an uninterrupted one.
    ``{joint: 1.0}`` (the default) draws nothing and changes nothing.
    """

    def __init__(self, tasks: dict[str, float], experts: dict[str, Expert], seed: int = 0, extend_seconds: float | None = None):
        if not tasks:
            raise TaskError("flow.tasks: expected at least one task with a positive weight, e.g. {joint: 1.0}")
        modalities = {k: e.modality for k, e in experts.items()}
        for name, w in tasks.items():
            check_task(name, modalities)
            if not (isinstance(w, (int, float)) and math.isfinite(w) and w >= 0):
                raise TaskError(f"flow.tasks.{name}: expected a weight >= 0, got {w!r}")
        if not sum(tasks.values()) > 0:
            raise TaskError("flow.tasks: the weights sum to 0; give at least one task a positive weight")
        if extend_seconds is not None and not extend_seconds > 0:
            raise TaskError(f"flow.extend_seconds: expected a positive number of seconds, got {extend_seconds}")
        self.names = [n for n, w in tasks.items() if w > 0]
        self.weights = torch.tensor([float(tasks[n]) for n in self.names], dtype=torch.float64)
        self.modality = modalities
        self.time_axis = {k: e.latent_time_axis for k, e in experts.items()}
        self.rate = {k: e.latent_rate for k, e in experts.items()}
        self.seed, self.extend_seconds = seed, extend_seconds

    @property
    def trivial(self) -> bool:
        """Only ``joint``: nothing is ever given."""
        return self.names == ["joint"]

    def draw(self, batch_size: int, step: int, rank: int = 0) -> list[str]:
        from soe.rng import generator_for  # flow.py uses this module

        g = generator_for(self.seed, "task", step, rank)
        idx = torch.multinomial(self.weights, batch_size, replacement=True, generator=g)
        return [self.names[i] for i in idx.tolist()]

    def masks(self, tasks: list[str], latents: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``(B, T)`` given-frame mask per side for the drawn ``tasks``."""
        out = {}
        for side, x in latents.items():
            n = x.shape[self.time_axis[side]]
            counts = torch.tensor([given_frames(t, self.modality[side], n, self.rate[side], self.extend_seconds) for t in tasks])
            out[side] = prefix_mask(counts, n).to(x.device)
        return out


def task_of(given: dict[str, GivenLatents] | None, modalities: dict[str, str]) -> str:
    """The task a sampling call serves, read off what it keeps clean (the inverse of :func:`given_for_task`):
    nothing -> ``joint``; a whole modality -> ``v2a`` / ``a2v``; only the video's first frames -> ``image``;
    the leading frames of both -> ``extend``."""
    given = {side: g for side, g in (given or {}).items() if bool(g.mask.any())}
    if not given:
        return "joint"
    whole = {modalities[side] for side, g in given.items() if bool(g.mask.all())}
    if whole:
        return "v2a" if "video" in whole else "a2v"
    return "image" if {modalities[side] for side in given} == {"video"} else "extend"


def given_for_task(task: str, experts: dict[str, Expert], clean: dict[str, torch.Tensor],
                   extend_seconds: float | None = None, uncond: str = "keep") -> dict[str, GivenLatents]:
    """What sampling keeps clean for ``task``, from the batched clean latents of the sides it gives."""
    check_task(task, {k: e.modality for k, e in experts.items()}, key="task")
    out = {}
    for side, e in experts.items():
        if side not in clean:
            continue
        x = clean[side]
        axis = e.latent_time_axis
        n = given_frames(task, e.modality, x.shape[axis], e.latent_rate, extend_seconds)
        if n:
            out[side] = GivenLatents(x, prefix_mask(torch.full((x.shape[0],), n), x.shape[axis]).to(x.device), axis, uncond)
    return out
