"""``sample.cross_guidance``: classifier-free guidance over the other modality (soe/sample/sampler.py).

The reference for "the expert alone" is the same stitch with every connector zeroed (an MLP connector whose weights are
all zero adds exactly nothing), sampled through the public sampler with a hand-written predictor."""
from pathlib import Path

import pytest
import torch
from conftest import batch_for, live_trainable, load_benchmark

from soe.cli import main
from soe.flow.conditioning import given_for_task
from soe.recipe.builders import build_sampler, build_stitcher
from soe.recipe.reading import load_recipe
from soe.sample.sampler import sample, sample_stitched, stitched_predictor
from soe.sample.speed import apply_speed
from soe.schema import SpeedConfig
from soe.train.build import apply_training_setup

TINY = Path(__file__).parents[1] / "tests" / "recipes" / "tiny.yaml"
BASE = ["data.seconds=1.0", "sample.steps=4"]


def live_stitch(*overrides, connectors: bool = True):
    """The tiny recipe's stitch with every LoRA and connector weight non-zero; ``connectors=False``: the same weights
    with every connector zeroed (the experts alone, LoRAs included)."""
    cfg = load_recipe(TINY, [*BASE, *overrides])
    torch.manual_seed(0)
    st = build_stitcher(cfg)
    apply_training_setup(st, cfg)
    live_trainable(st, seed=3)
    if not connectors:
        for p in st.connectors.parameters():
            p.data.zero_()
    return cfg, st.eval()


def conditions(st):
    return {s: getattr(st, s).conditioning(2, 1.0, generator=torch.Generator().manual_seed(1)) for s in ("a", "b")}


def reference_predictor(st, alone, w: float, s: float):
    """Stitched velocities, the audio's conditional rows moved so that after text guidance ``s`` the audio velocity is
    ``u + s (c - u) + (w - 1) (c - c_alone)``; with ``s = 1``: ``c_alone + w (c - c_alone)``."""
    stitched, plain = stitched_predictor(st), stitched_predictor(alone)

    def predict(inputs, mask):
        p, q = stitched(inputs, mask), plain(inputs, None)  # the experts alone read no connector
        cond = torch.ones(p["b"].shape[0], dtype=torch.bool) if mask is None else mask.bool()
        moved = p["b"] + (w - 1.0) / s * (p["b"] - q["b"])
        return {"a": p["a"], "b": torch.where(cond.view(-1, *[1] * (p["b"].dim() - 1)), moved, p["b"])}

    return predict


@pytest.mark.parametrize("text_scale", [1.0, 2.0])
def test_cross_guidance_moves_the_audio_away_from_its_expert_alone(text_scale):
    guidance = f"sample.guidance={{a: 1.0, b: {text_scale}}}"
    cfg, st = live_stitch(guidance, "sample.cross_guidance={b: 1.75}")
    _, alone = live_stitch(guidance, connectors=False)
    settings, cond = build_sampler(cfg), conditions(st)
    assert settings.cross_guidance == {"a": 1.0, "b": 1.75}
    got = sample_stitched(st, cond, 1.0, settings)
    plain = build_sampler(load_recipe(TINY, [*BASE, guidance]))
    reference = sample({"a": st.a, "b": st.b}, cond, 1.0, plain, reference_predictor(st, alone, 1.75, text_scale))
    without = sample_stitched(st, cond, 1.0, plain)
    for side in ("a", "b"):
        torch.testing.assert_close(got[side], reference[side], rtol=1e-5, atol=1e-5)
    assert (got["b"] - without["b"]).abs().max() > 1e-3  # the guidance acts on the audio ...
    assert (got["a"] - without["a"]).abs().max() > 0  # ... and, through the connectors, reaches the video


def test_scale_one_is_the_plain_sampler_and_costs_no_forward():
    cfg, st = live_stitch("sample.cross_guidance={a: 1.0, b: 1.0}")
    calls = {"a": 0, "b": 0}  # forwards of each expert: its first block runs once in each
    hooks = [getattr(st, s).blocks[0].register_forward_pre_hook(lambda *_, s=s: calls.__setitem__(s, calls[s] + 1)) for s in "ab"]
    cond = conditions(st)
    plain = sample_stitched(st, cond, 1.0, build_sampler(load_recipe(TINY, BASE)))
    assert calls == {"a": 4, "b": 4}
    same = sample_stitched(st, cond, 1.0, build_sampler(cfg))
    assert all(torch.equal(same[s], plain[s]) for s in "ab") and calls == {"a": 8, "b": 8}
    crossed = build_sampler(load_recipe(TINY, [*BASE, "sample.cross_guidance={b: 1.5}"]))
    sample_stitched(st, cond, 1.0, crossed)
    assert calls == {"a": 12, "b": 16}  # one more forward of the audio expert per step, none of the video expert
    for h in hooks:
        h.remove()


def test_a_given_side_is_not_guided_and_the_sampled_side_is():
    cfg, st = live_stitch("sample.cross_guidance={b: 2.0}")
    experts = {"a": st.a, "b": st.b}
    truth = {s: batch_for(getattr(st, s), 2, seed=9)["latents"].float() for s in "ab"}
    cond, crossed, plain = conditions(st), build_sampler(cfg), build_sampler(load_recipe(TINY, BASE))
    a2v = given_for_task("a2v", experts, truth)  # the audio is given: nothing to guide
    assert all(torch.equal(x, y) for x, y in zip(sample_stitched(st, cond, 1.0, crossed, given=a2v).values(),
                                                 sample_stitched(st, cond, 1.0, plain, given=a2v).values()))
    v2a = given_for_task("v2a", experts, truth)  # the audio is sampled from the given video: guided
    got, ref = sample_stitched(st, cond, 1.0, crossed, given=v2a), sample_stitched(st, cond, 1.0, plain, given=v2a)
    assert torch.equal(got["a"], ref["a"]) and (got["b"] - ref["b"]).abs().max() > 1e-3


def test_step_cache_is_exact_at_threshold_zero_and_still_skips_with_cross_guidance():
    cfg, st = live_stitch("sample.cross_guidance={b: 1.5}", "sample.guidance={a: 1.0, b: 3.0}")
    settings, cond = build_sampler(cfg), conditions(st)
    ref = sample_stitched(st, cond, 1.0, settings)
    setup = apply_speed(st, SpeedConfig(cache="first_block", cache_threshold=0.0), "cpu")
    got = sample_stitched(st, cond, 1.0, settings)
    assert all(torch.equal(got[k], ref[k]) for k in ref)
    assert setup.cache.stats["computed"] == 4 and setup.cache.stats["skipped"] == 0  # the audio alone decides nothing
    setup.cache.state.threshold = 1e9
    sample_stitched(st, cond, 1.0, settings)
    assert setup.cache.stats["computed"] == 1 and setup.cache.stats["skipped"] == 3  # its forwards do not block skipping


@pytest.mark.parametrize("override, expected", [
    ("sample.cross_guidance={c: 2.0}", "sample.cross_guidance.c: expected keys 'a' and 'b'"),
    ("sample.cross_guidance={b: -1.0}", "sample.cross_guidance.b: expected a positive finite number"),
])
def test_bad_cross_guidance_is_one_line(override, expected, capsys):
    assert main(["inspect", str(TINY), override]) == 2
    err = capsys.readouterr().err.strip()
    assert expected in err and "\n" not in err


def test_the_benchmarks_flow_window_over_every_step_is_the_samplers_cross_guidance():
    """benchmarks/cross_guidance.py's ``W@LO:HI`` predictor: over all flow times it is the recipe key; over part, neither."""
    window = load_benchmark("cross_guidance").audio_guided_in_window
    cfg, st = live_stitch("sample.cross_guidance={b: 1.75}")
    cond, plain = conditions(st), build_sampler(load_recipe(TINY, BASE))
    experts = {"a": st.a, "b": st.b}
    key = sample_stitched(st, cond, 1.0, build_sampler(cfg))
    everywhere = sample(experts, cond, 1.0, plain, window(st, 1.75, -1.0, 2.0))
    for side in ("a", "b"):
        torch.testing.assert_close(everywhere[side], key[side], rtol=1e-5, atol=1e-5)
    part = sample(experts, cond, 1.0, plain, window(st, 1.75, 0.8, 1.0))["b"]  # sigmas 1, 0.90 | 0.75, 0.50 (shift 3)
    unguided = sample_stitched(st, cond, 1.0, plain)["b"]
    assert (part - key["b"]).abs().max() > 1e-4 and (part - unguided).abs().max() > 1e-4
