"""Classifier-free guidance in the joint sampler: one batched forward or two, and the guidance interval."""
import pytest
import torch
from conftest import tiny
from test_universe1 import fused

from soe import Stitcher
from soe.errors import RecipeError
from soe.sample.sampler import make_scheduler, sample, stitched_predictor
from soe.sample.speed import apply_speed
from soe.schema import SamplerConfig, SpeedConfig, build


def hooks(seed=0):
    a, b = tiny("wan2.1", seed), tiny("ace-step", seed + 1)
    torch.manual_seed(seed + 2)
    st = Stitcher(a, b, pairs="linear", direction="a_to_b", connector={"init": "trunc_normal"})
    assert st.engine == "hooks"
    return st


MAKERS = {"hooks": hooks, "fused": lambda: fused()[0]}


def _conditions(st):
    return {"a": st.a.conditioning(1, 1.0, torch.Generator().manual_seed(0)),
            "b": st.b.conditioning(1, 1.0, torch.Generator().manual_seed(1))}


def _run(st, settings, calls=None):
    inner = stitched_predictor(st)

    def predict(inputs, mask):
        if calls is not None:
            calls.append((inputs["a"]["latents"].shape[0], None if mask is None else mask.tolist()))
        return inner(inputs, mask)

    return sample({"a": st.a, "b": st.b}, _conditions(st), 1.0, settings, predict)


@pytest.mark.parametrize("engine", list(MAKERS))
def test_batched_cfg_equals_two_forwards(engine):
    st = MAKERS[engine]()
    settings = {"steps": 4, "guidance": {"a": 1.2, "b": 5.0}}
    calls_one, calls_two = [], []
    one = _run(st, SamplerConfig(**settings, cfg_batched=True), calls_one)
    two = _run(st, SamplerConfig(**settings, cfg_batched=False), calls_two)
    assert [c[0] for c in calls_one] == [2] * 4 and [c[0] for c in calls_two] == [1] * 8
    assert calls_two[1::2] == [(1, [0.0])] * 4  # the unconditional forward's connectors read zeros
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=1e-4, atol=1e-5)
        assert not torch.equal(one[k], _run(st, SamplerConfig(steps=4))[k])  # guidance really acted


def test_steps_outside_the_guidance_interval_call_the_model_once_unguided():
    st = MAKERS["hooks"]()
    guidance = {"a": 1.2, "b": 5.0}
    base = SamplerConfig(steps=6, guidance=guidance, scheduler="euler", shift={"a": 1.0, "b": 1.0})  # no shift: sigmas spread over (0, 1]
    calls = []
    got = _run(st, SamplerConfig(**{**vars(base), "guidance_interval": [0.3, 0.7]}), calls)
    sched = make_scheduler("euler", 1.0)
    sched.set_timesteps(6)
    inside = [0.3 < float(s) <= 0.7 for s in sched.sigmas[:6]]
    assert inside[0] is False and 0 < sum(inside) < 5  # both kinds of step occur
    assert [c[0] for c in calls] == [2 if g else 1 for g in inside]  # skipped steps: one forward of B
    assert all(c[1] is None for c, g in zip(calls, inside) if not g)
    full, none = _run(st, base), _run(st, SamplerConfig(**{**vars(base), "guidance": {"a": 1.0, "b": 1.0}}))
    everywhere = _run(st, SamplerConfig(**{**vars(base), "guidance_interval": [0.0, 1.0]}))
    for k in got:
        assert torch.equal(everywhere[k], full[k])  # (0, 1] holds every step: plain CFG
        assert not torch.equal(got[k], full[k]) and not torch.equal(got[k], none[k])


def test_two_forward_cfg_under_the_step_cache_is_exact_at_threshold_zero():
    st = MAKERS["fused"]()
    settings = SamplerConfig(steps=4, guidance={"a": 1.2, "b": 5.0}, cfg_batched=False)
    ref = _run(st, settings)
    setup = apply_speed(st, SpeedConfig(cache="first_block", cache_threshold=0.0), "cpu")
    got = _run(st, settings)
    assert setup.cache.stats["computed"] == 8 and setup.cache.stats["skipped"] == 0
    assert all(torch.equal(got[k], ref[k]) for k in ref)
    assert {b for b, _ in setup.cache.state.body_res} == {"cond", "uncond"}  # residuals kept per CFG branch


def test_guidance_interval_and_cfg_batched_are_checked():
    with pytest.raises(RecipeError, match="guidance_interval"):
        build(SamplerConfig, {"guidance_interval": [0.8, 0.2]}, "sample")
    with pytest.raises(RecipeError, match="guidance_interval"):
        build(SamplerConfig, {"guidance_interval": [0.2]}, "sample")
