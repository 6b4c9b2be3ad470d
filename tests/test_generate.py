"""Joint sampling, codecs, mp4 + contact sheet, `soe generate`, sampling during training."""
from pathlib import Path

import av
import pytest
import torch
from conftest import tiny
from PIL import Image
from rich.console import Console

from soe import ConnectorConfig, Stitcher
from soe.cli import main
from soe.cli.stitch import run_training
from soe.sample.sampler import guided, sample, sample_stitched
from soe.schema import SamplerConfig

DEMO = Path(__file__).parents[1] / "tests" / "recipes" / "tiny.yaml"  # tiny random experts: fast; recipes/demo.yaml is tested in test_first_run.py
QUIET = Console(file=open("/dev/null", "w"))


def pair(init="zero", b_name="ace-step-1.5"):
    a, b = tiny("wan2.1", 0), tiny(b_name, 1)
    torch.manual_seed(5)
    return Stitcher(a, b, connector=ConnectorConfig(init=init))


def conditions(st, n=2):
    return {"a": st.a.conditioning(n, 1.0, torch.Generator().manual_seed(0)),
            "b": st.b.conditioning(n, 1.0, torch.Generator().manual_seed(1))}


@pytest.mark.parametrize("scheduler", ["euler", "unipc"])
@pytest.mark.parametrize("b_name", ["ace-step-1.5", "ace-step"])
def test_zero_init_joint_sampling_equals_each_expert_alone(scheduler, b_name):
    st = pair(b_name=b_name)
    s = SamplerConfig(steps=5, scheduler=scheduler, guidance={"a": 1.2, "b": 5.0})
    joint = sample_stitched(st, conditions(st), 1.0, s)
    alone = sample({"a": st.a, "b": st.b}, conditions(st), 1.0, s)
    for k in ("a", "b"):
        assert torch.equal(joint[k], alone[k])
        assert torch.isfinite(joint[k]).all()


def test_sampling_is_deterministic_for_a_seed_and_noise_is_independent_per_modality():
    st = pair(init="trunc_normal")
    s0, s1 = SamplerConfig(steps=3, seed=0), SamplerConfig(steps=3, seed=1)
    x, y, z = (sample_stitched(st, conditions(st), 1.0, s) for s in (s0, s0, s1))
    assert all(torch.equal(x[k], y[k]) for k in x)
    assert not torch.allclose(x["a"], z["a"])


def test_cfg_scale_one_is_the_conditional_prediction():
    c, u = torch.randn(3), torch.randn(3)
    assert guided(c, u, 1.0) is c
    torch.testing.assert_close(guided(c, u, 3.0), u + 3 * (c - u))
    # and sampling with scales 1 never runs an unconditional branch
    st = pair(init="trunc_normal")
    seen = []

    def predict(inputs, mask):
        seen.append(mask)
        pa, pb = st(inputs["a"], inputs["b"], source_mask=mask)
        return {"a": pa, "b": pb}

    sample({"a": st.a, "b": st.b}, conditions(st), 1.0, SamplerConfig(steps=2, guidance={"a": 1.0, "b": 1.0}), predict)
    assert seen == [None, None]


def test_unconditional_branch_gets_no_cross_modal_input():
    st = pair(init="trunc_normal").eval()
    ba = {**conditions(st)["a"], "latents": torch.randn(st.a.latent_shape(2, 1.0)), "timestep": torch.full((2,), 0.5)}
    bb = {**conditions(st)["b"], "latents": torch.randn(st.b.latent_shape(2, 1.0)), "timestep": torch.full((2,), 0.5)}
    mask = torch.tensor([1.0, 0.0])  # sample 0 conditional, sample 1 unconditional
    with torch.no_grad():
        pa, pb = st(ba, bb, source_mask=mask)
        bb2 = {**bb, "latents": bb["latents"] + torch.randn_like(bb["latents"])}  # change only the audio input
        pa2, _ = st(ba, bb2, source_mask=mask)
    assert not torch.allclose(pa[0], pa2[0])  # conditional video hears the audio
    assert torch.equal(pa[1], pa2[1])  # unconditional video does not


def test_tiny_codecs_have_the_experts_latent_shapes():
    wan, ace15, ace1 = tiny("wan2.1"), tiny("ace-step-1.5"), tiny("ace-step")
    v = wan.codec()
    with torch.no_grad():
        z = v.encode(torch.rand(1, 3, 9, 64, 64) * 2 - 1)
        assert z.shape == (1, 4, 3, 8, 8) and v.decode(z).shape == (1, 3, 9, 64, 64)
        a = ace15.codec()
        z = a.encode(torch.rand(1, 2, 48000) * 2 - 1)
        assert z.shape == ace15.latent_shape(1, 1.0) and a.rate == 48000
        f = ace1.codec()
        z = torch.randn(ace1.latent_shape(1, 1.0)) * 0.01
        torch.testing.assert_close(f.encode(f.decode(z)), z, atol=1e-5, rtol=1e-4)  # decode is the exact inverse on latents


def test_generate_from_a_trained_demo_run_writes_mp4_with_both_streams(tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_training(DEMO, ["data.num_clips=16", "data.batch_size=4", "data.seconds=1.0", "trainer.max_steps=2",
                        f"run_dir={run_dir}"], console=QUIET, progress=False)
    out = tmp_path / "samples"
    code = main(["generate", str(DEMO), f"ckpt={run_dir}", "prompt=a bouncing ball", "seconds=2", "seed=0", "steps=4",
                 f"out={out}", "data.seconds=1.0", "sample.guidance={a: 1.2, b: 5.0}", "sample.decode=codec"])
    assert code == 0, capsys.readouterr().err
    mp4, png = out / "sample_00.mp4", out / "sample_00.png"
    with av.open(str(mp4)) as c:
        vs, au = c.streams.video[0], c.streams.audio[0]
        frames = sum(1 for _ in c.decode(video=0))
        # 2 s -> 13 latent frames at 6.25/s (12.5 rounded up) -> 1 + 4 * 12 = 49 frames at 25 fps
        assert frames == 49 and vs.average_rate == 25
        assert au.rate == 48000 and au.channels == 2
        v_dur, a_dur = float(vs.duration * vs.time_base), float(au.duration * au.time_base)
        assert v_dur == pytest.approx(1.96) and a_dur == pytest.approx(v_dur, abs=1024 / 48000)
    assert Image.open(png).size == (1200, 600)


def test_sampling_callback_renders_during_training(tmp_path):
    run_dir = tmp_path / "run"
    run_training(DEMO, ["data.num_clips=16", "data.batch_size=4", "data.seconds=1.0", "trainer.max_steps=2", f"run_dir={run_dir}",
                        "sample.every_n_steps=1", "sample.steps=2"], console=QUIET, progress=False)
    for step in (1, 2):
        assert (run_dir / "samples" / f"step-{step:06d}" / "sample_00.mp4").is_file()


def test_mp4_resamples_audio_rates_aac_cannot_store(tmp_path):
    from soe.media import write_mp4

    tone = torch.sin(torch.arange(25600 * 2) / 25600 * 2 * torch.pi * 440)[None] * 0.5  # 2 s at UniVerse-1's 25.6 kHz
    video = torch.zeros(3, 50, 32, 32)  # 2 s at 25 fps
    path = write_mp4(tmp_path / "x.mp4", video, 25, tone, 25600)
    with av.open(str(path)) as c:
        au, vs = c.streams.audio[0], c.streams.video[0]
        assert au.rate == 32000  # next AAC rate above 25.6 kHz
        assert float(au.duration * au.time_base) == pytest.approx(float(vs.duration * vs.time_base), abs=1024 / 32000)
        samples = torch.cat([torch.from_numpy(f.to_ndarray()) for f in c.decode(audio=0)], dim=1)[0]
    spectrum = torch.fft.rfft(samples[4096:36864])
    peak_hz = spectrum.abs().argmax().item() * 32000 / 32768
    assert abs(peak_hz - 440) < 5  # the tone survived resampling and AAC


def test_synthetic_preview_shows_and_sounds_the_ground_truth_events():
    """Decoding a ground-truth synthetic clip with the preview codec: the square is lowest and the
    tone loudest at the bounce times."""

    from soe.data.datamodule import SyntheticAVDataModule
    from soe.data.synthetic import BounceClip, SyntheticPreviewCodec
    from soe.evaluate.metrics import audio_onsets, av_align, video_motion_events

    video, audio = tiny("wan2.1"), tiny("ace-step-1.5")
    dm = SyntheticAVDataModule({"a": video, "b": audio}, seconds=4.0, num_clips=1, seed=3)
    clip, truth = dm.make_clip(0), BounceClip.sample(3, 0)
    v = SyntheticPreviewCodec(video).decode(clip["a"]["latents"][None])[0]  # (3, F, H, W)
    a = SyntheticPreviewCodec(audio).decode(clip["b"]["latents"][None])[0]  # (1, N)
    assert v.shape[:2] == (3, 4 * clip["a"]["latents"].shape[1]) and a.shape[1] == 4 * 16000
    bright = (v[0] + 1) / 2  # (F, H, W)
    rows = torch.arange(bright.shape[1], dtype=torch.float32).view(1, -1, 1)
    height = 1 - ((bright * rows).sum((1, 2)) / bright.sum((1, 2))) / (bright.shape[1] - 1)
    loud = a[0].reshape(-1, 640).abs().amax(1)  # per 40 ms
    bounces = truth.bounce_times(4.0).numpy()
    inner = bounces[(bounces > 0.2) & (bounces < 3.8)]
    assert av_align(video_motion_events(height.numpy(), 25.0), inner, tolerance=0.2) > 0.6
    assert av_align(audio_onsets(loud.numpy(), 25.0), inner, tolerance=0.1) > 0.6


def test_negative_prompt_is_the_null_branch_of_experts_that_take_one():
    """Wan's null branch is its encoded negative prompt (UniVerse-1: the embedding of ""), not zeros;
    ACE-Step zeroes its text whatever negative it is given."""
    st = pair(b_name="ace-step")
    cond = conditions(st)
    neg = {"a": {"encoder_hidden_states": torch.randn_like(cond["a"]["encoder_hidden_states"][:1])},
           "b": {"text_hidden_states": torch.randn_like(cond["b"]["text_hidden_states"][:1])}}
    seen = []

    def predict(inputs, source_mask):
        seen.append(inputs)
        return {"a": st.a(inputs["a"]), "b": st.b(inputs["b"])}

    s = SamplerConfig(steps=2, scheduler="euler", guidance={"a": 3.0, "b": 2.0})
    with_neg = sample({"a": st.a, "b": st.b}, cond, 1.0, s, predict=predict, negative=neg)
    null_a, null_b = seen[0]["a"]["encoder_hidden_states"][2:], seen[0]["b"]["text_hidden_states"][2:]
    assert torch.equal(null_a, neg["a"]["encoder_hidden_states"].expand_as(null_a))
    assert not null_b.any() and torch.equal(seen[0]["b"]["lyric_mask"][2:], cond["b"]["lyric_mask"])
    zeros = sample({"a": st.a, "b": st.b}, cond, 1.0, s, predict=predict)
    assert not seen[-1]["a"]["encoder_hidden_states"][2:].any()
    assert not torch.allclose(with_neg["a"], zeros["a"])
