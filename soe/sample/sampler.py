"""Joint flow sampling over a Stitcher: both modalities integrate from independent noise.

One timestep grid is shared (``steps`` steps from sigma=1 to 0); each modality's scheduler applies
its own expert's shift to it. Classifier-free guidance per modality: the conditional and the
unconditional halves run in one batch (``cfg_batched``; or in two forwards, for a lower activation
peak); the unconditional half drops text conditioning (zeros, or the expert's encoded negative
prompt, ``Expert.null_condition``) and its connectors read zeros (no cross-modal input).
``guidance_interval: [lo, hi]`` guides only where a modality's sigma lies in ``(lo, hi]``
(Kynkaanniemi et al. 2024, "Applying guidance in a limited interval"); at steps where no modality
guides, the unconditional forward is not run at all.

Cross-modal guidance (``cross_guidance``, per modality, stitched sampling only): the side's velocity gains
``(w - 1) x (stitched - its expert alone)``, the expert alone being one more forward of that expert with the same text
and no connectors (the hooks are idle outside a stitched call). With text guidance 1 this is
``alone + w x (stitched - alone)``: classifier-free guidance whose condition is the other modality (composed with the
text's as in Brooks et al. 2023, InstructPix2Pix, one scale per condition). Written here: no diffusers pipeline guides
one expert by another's hidden states. Deterministic for a seed.
"""
from __future__ import annotations

from contextlib import nullcontext

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

from soe.flow.conditioning import GivenLatents, task_of
from soe.plugin.expert import Batch, Expert
from soe.rng import generator_for
from soe.sample.speed import reset_step_caches, set_step_cache_branch
from soe.schema import SamplerConfig


def make_scheduler(kind: str, shift: float):
    if kind == "euler":
        return FlowMatchEulerDiscreteScheduler(shift=shift)
    return UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=shift)


def _cat(batches: list[Batch]) -> Batch:
    return {k: torch.cat([b[k] for b in batches]) if torch.is_tensor(batches[0][k]) else batches[0][k] for k in batches[0]}


def guided(cond: torch.Tensor, uncond: torch.Tensor | None, scale: float) -> torch.Tensor:
    """Classifier-free guidance; scale 1 is exactly the conditional prediction."""
    return cond if uncond is None or scale == 1.0 else uncond + scale * (cond - uncond)


@torch.no_grad()
def sample(experts: dict[str, Expert], conditions: dict[str, Batch], seconds: float, settings: SamplerConfig,
           predict=None, progress=None, negative: dict[str, Batch] | None = None,
           given: dict[str, GivenLatents] | None = None) -> dict[str, torch.Tensor]:
    """Clean latents per side, integrated jointly from noise.

    ``predict(inputs: dict[side, batch], source_mask) -> dict[side, velocity]`` runs the model(s):
    a Stitcher for joint sampling, or each expert alone (``predict=None``) for the reference.
    ``conditions[side]`` holds the conditioning of ``B`` samples (batch axis first); ``negative[side]``
    (optional) the encoded negative prompt for experts whose null branch uses one.
    ``given[side]`` (soe/flow/conditioning.py): latent frames given clean, pasted into the input of every
    call and into the result; a fully given side is not integrated, it only feeds the connectors.
    """
    given = given or {}
    sides = list(experts)
    reset_step_caches(experts.values())  # a step cache must not carry residuals over from the last run
    bsz = next(iter(conditions[sides[0]].values())).shape[0]
    lat = {}
    for k in sides:
        e = experts[k]
        g = generator_for(settings.seed, "sample-noise", f"{k}:{e.modality}")  # independent noise per modality
        lat[k] = torch.randn(e.latent_shape(bsz, seconds), generator=g).to(e.device, torch.float32)
        if k in given:
            lat[k] = given[k].paste(lat[k])
    scheds = {}
    for k in sides:
        shift = settings.shift.get(k) or experts[k].flow_shift
        scheds[k] = make_scheduler(settings.scheduler, shift)
        scheds[k].set_timesteps(settings.steps, device=lat[k].device)
    scales = {k: settings.guidance.get(k, 1.0) for k in sides}
    uncond = {k: experts[k].unconditional(conditions[k], (negative or {}).get(k)) for k in sides}
    cross = {k: float(settings.cross_guidance.get(k, 1.0)) for k in sides} if predict is not None else {}  # stitched only
    crossed = [k for k in sides if cross.get(k, 1.0) != 1.0 and not (k in given and given[k].full)]
    predict = predict or _experts_alone(experts)

    def branch(name):
        set_step_cache_branch(experts.values(), name)

    for i in range(settings.steps):
        sigmas = {k: float(scheds[k].sigmas[i]) for k in sides}
        guide = {k: scales[k] != 1.0 and _in_interval(sigmas[k], settings.guidance_interval) for k in sides}
        cond_in, uncond_in = {}, {}
        for k in sides:
            sigma = scheds[k].sigmas[i].to(lat[k].device)
            x, t = lat[k], sigma.expand(bsz)
            if k in given:  # given frames clean on every call (timestep 0 where the expert takes one per frame)
                x, t = given[k].paste(x), given[k].timestep(experts[k], t)
            cond_in[k] = {**conditions[k], "latents": x.to(experts[k].dtype), "timestep": t.to(experts[k].dtype)}
            x_u = given[k].uncond_latents(cond_in[k]["latents"]) if k in given else cond_in[k]["latents"]
            uncond_in[k] = {**uncond[k], "latents": x_u, "timestep": cond_in[k]["timestep"]}
        preds = _predict_cfg(predict, cond_in, uncond_in, any(guide.values()), settings.cfg_batched is not False, bsz, branch)
        alone = _alone(experts, cond_in, crossed, branch)
        for k in sides:
            if k in given and given[k].full:
                continue  # a given modality is not denoised
            c, u = preds[k]
            v = guided(c, u if guide[k] else None, scales[k])
            if k in alone:
                v = v + (cross[k] - 1.0) * (c - alone[k])
            lat[k] = scheds[k].step(v, scheds[k].timesteps[i], lat[k]).prev_sample
        if progress is not None:
            progress(i + 1, settings.steps)
    return {k: given[k].paste(lat[k]) if k in given else lat[k] for k in sides}


def _in_interval(sigma: float, interval) -> bool:
    return interval is None or interval[0] < sigma <= interval[1]


def _predict_cfg(predict, cond: dict[str, Batch], uncond: dict[str, Batch], use_cfg: bool, batched: bool, bsz: int,
                 branch) -> dict:
    """``{side: (conditional, unconditional or None)}`` float32 velocities: one forward of ``2B`` (``batched``),
    two of ``B``, or the conditional one alone (no side guides at this step). The unconditional half's
    connectors read zeros (``source_mask`` 0). ``branch(name)`` names each forward for the step cache."""
    device = next(iter(cond.values()))["latents"].device
    if not use_cfg:
        branch("cond")
        return {k: (v.float(), None) for k, v in predict(cond, None).items()}
    if batched:
        mask = torch.cat([torch.ones(bsz), torch.zeros(bsz)]).to(device)
        branch("cfg")
        preds = predict({k: _cat([cond[k], uncond[k]]) for k in cond}, mask)
        return {k: (v[:bsz].float(), v[bsz:].float()) for k, v in preds.items()}
    branch("cond")
    c = predict(cond, None)  # all ones: the connectors read as in the conditional half of the batched call
    branch("uncond")
    u = predict(uncond, torch.zeros(bsz, device=device))
    return {k: (c[k].float(), u[k].float()) for k in c}


def _alone(experts: dict[str, Expert], cond: dict[str, Batch], sides: list[str], branch) -> dict[str, torch.Tensor]:
    """``{side: float32 velocity}`` of each of ``sides``' experts alone on the conditional inputs (cross-modal guidance)."""
    out = {}
    for k in sides:
        branch(f"alone:{k}")
        out[k] = experts[k](cond[k]).float()
    return out


def _experts_alone(experts):
    def predict(inputs, source_mask):
        return {k: experts[k](inputs[k]) for k in inputs}

    return predict


def stitched_predictor(stitcher):
    def predict(inputs, source_mask):
        pa, pb = stitcher(inputs["a"], inputs["b"], source_mask=source_mask)
        return {"a": pa, "b": pb}

    group = getattr(stitcher, "cfg_group", None)  # parallel.cfg: the guided halves on two ranks (soe/sample/parallel.py)
    if group is not None:
        from soe.sample.parallel import cfg_parallel

        return cfg_parallel(predict, group)
    return predict


def sample_stitched(stitcher, conditions: dict[str, Batch], seconds: float, settings: SamplerConfig, progress=None,
                    negative: dict[str, Batch] | None = None, given: dict[str, GivenLatents] | None = None):
    experts = {"a": stitcher.a, "b": stitcher.b}
    off, switched = lora_off_sides(settings, given, experts), nullcontext()
    if off:
        from soe.lora.task_gate import loras_off  # peft's layer types, only when a LoRA is switched off

        switched = loras_off(experts, off)
    with switched:
        return sample(experts, conditions, seconds, settings, stitched_predictor(stitcher), progress, negative=negative, given=given)


def lora_off_sides(settings: SamplerConfig, given: dict[str, GivenLatents] | None, experts: dict[str, Expert]) -> list[str]:
    """The sides whose LoRA ``sample.lora_off`` switches off for the task this call serves (read off ``given``)."""
    if not settings.lora_off:
        return []
    task = task_of(given, {side: e.modality for side, e in experts.items()})
    return [side for side, tasks in sorted(settings.lora_off.items()) if task in tasks]
