"""The Stable Audio Open and WAN2.2 TI2V families, and cross-family stitching of every kind of pair
(video+audio, audio+audio, video+video) in both directions: init invariance and a training step."""
import math
from pathlib import Path

import pytest
import torch
from conftest import batch_for, tiny

from soe import ConnectorConfig, Stitcher, get_expert

PAIRS = [
    ("wan2.2-ti2v", "stable-audio-open"), ("stable-audio-open", "wan2.2-ti2v"),  # video + audio
    ("stable-audio-open", "ace-step-1.5"), ("ace-step-1.5", "stable-audio-open"),  # audio + audio
    ("ace-step", "stable-audio-open"),
    ("wan2.2-ti2v", "wan2.1"), ("wan2.1", "wan2.2-ti2v"),  # video + video
]
DIRECTIONS = ["a_to_b", "b_to_a", "both"]


def meta_params(name: str, preset: str) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in get_expert(name).from_preset(preset, device="meta").parameters())


# ---- Stable Audio Open ---------------------------------------------------------------------------
def test_stable_audio_open_real_size_on_meta():
    assert meta_params("stable-audio-open", "1.0") == 1_056_939_136  # the 1057M DiT of stable-audio-open-1.0


def test_stable_audio_layout_is_oobleck_rate_without_the_global_token():
    e = tiny("stable-audio-open")
    b = batch_for(e, 2, 2.0)
    assert b["latents"].shape[-1] == math.ceil(2.0 * 44100 / 2048) == 44  # whole latents covering 2 s
    layout = e.token_layout(b)
    assert layout.axes == ("t",) and math.isclose(layout.time_rate, 44100 / 2048) and layout.grid == (44,)
    with torch.no_grad():
        state = e.embed(b)
    assert state.hidden.shape == (2, 44, e.hidden_size) and state.extras["global_token"].shape == (2, 1, e.hidden_size)


def test_stable_audio_rectified_flow_conversion_is_exact():
    """The RF point (1-s) x0 + s eps reaches the model as cos(phi) x0 + sin(phi) eps at time phi*2/pi,
    and the exact v = cos(phi) eps - sin(phi) x0 comes back out as the RF velocity eps - x0."""
    e = tiny("stable-audio-open")
    x0, eps = torch.randn(4, 4, 10, dtype=torch.float64), torch.randn(4, 4, 10, dtype=torch.float64)
    s = torch.tensor([0.0, 0.3, 0.5, 1.0], dtype=torch.float64)
    batch = {"latents": (1 - s[:, None, None]) * x0 + s[:, None, None] * eps, "timestep": s}
    z, t = e._model_inputs(batch)
    phi = (t * math.pi / 2)[:, None, None]
    torch.testing.assert_close(t, torch.tensor([0.0, 2 / math.pi * math.atan(0.3 / 0.7), 0.5, 1.0], dtype=torch.float64))
    torch.testing.assert_close(z, torch.cos(phi) * x0 + torch.sin(phi) * eps)
    v = torch.cos(phi) * eps - torch.sin(phi) * x0
    torch.testing.assert_close(e._velocity(v, z, batch), eps - x0)


def test_wan22_codec_compresses_4x16x16_into_48_channels():
    e = tiny("wan2.2-ti2v")
    codec, latents = e.codec(), batch_for(e, 1, 1.0)["latents"]
    assert latents.shape[1:2] == (48,) and latents.shape[-2:] == (8, 8)  # 128 px / 16
    with torch.no_grad():
        video = codec.decode(latents)
        assert video.shape == (1, 3, 1 + 4 * (latents.shape[2] - 1), 128, 128) and codec.rate == 24
        assert codec.encode(video).shape == latents.shape


def test_stable_audio_codec_is_oobleck_at_2048_hop():
    e = tiny("stable-audio-open")
    codec, latents = e.codec(), batch_for(e, 1, 1.0)["latents"]  # (1, 4, 22)
    with torch.no_grad():
        audio = codec.decode(latents)
        assert audio.shape == (1, 2, 22 * 2048) and codec.rate == 44100
        assert codec.encode(audio).shape == latents.shape


# ---- WAN2.2 TI2V-5B ------------------------------------------------------------------------------
def test_wan22_ti2v_real_size_on_meta():
    assert meta_params("wan2.2-ti2v", "5b") == 4_999_787_712  # Wan2.2-TI2V-5B


def test_wan22_layout_is_6_latent_frames_per_second_and_16x_spatial():
    cls = get_expert("wan2.2-ti2v")
    with torch.device("meta"):
        real = cls.from_preset("5b", device="meta")
    assert real.latent_shape(1, 5.0) == (1, 48, 30, 704 // 16, 1280 // 16)  # 5 s at 24 fps, 720p
    e = tiny("wan2.2-ti2v")
    layout = e.token_layout(batch_for(e, 1, 2.0))
    assert layout.axes == ("t", "h", "w") and layout.time_rate == 6.0 and layout.grid == (12, 4, 4)


def test_wan22_image_to_video_conditions_the_first_frame():
    e = tiny("wan2.2-ti2v")
    b = batch_for(e, 2, 1.0)
    b["image_latents"] = torch.randn(2, 48, 1, 8, 8)
    other = dict(b, latents=b["latents"].clone())
    other["latents"][:, :, 0] = 7.0  # the noisy first frame is replaced by the clean image latent
    with torch.no_grad():
        out = e(b)
        torch.testing.assert_close(e.split_forward(b), out, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(e(other), out)
        assert not torch.allclose(e(dict(b, image_latents=None)), out)


# ---- cross-family stitching ----------------------------------------------------------------------
def make(a_name, b_name, direction, init="zero"):
    a, b = tiny(a_name, 0), tiny(b_name, 1)
    torch.manual_seed(2)
    st = Stitcher(a, b, direction=direction, connector=ConnectorConfig(init=init))
    return st, batch_for(a, 2, 1.0, seed=3), batch_for(b, 2, 1.0, seed=4)


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("a_name, b_name", PAIRS)
def test_cross_family_stitch_starts_exact_and_trains_connectors_only(a_name, b_name, direction):
    st, ba, bb = make(a_name, b_name, direction)
    with torch.no_grad():  # init invariance: zero-init connectors reproduce each expert exactly
        ref_a, ref_b = st.a(ba), st.b(bb)
        pa, pb = st(ba, bb)
        assert torch.equal(pa, ref_a) and torch.equal(pb, ref_b)

    # one training step: experts frozen, connectors train
    st.requires_grad_(False)
    st.connectors.requires_grad_(True)
    frozen = {n: p.detach().clone() for n, p in st.named_parameters() if not n.startswith("connectors.")}
    opt = torch.optim.AdamW([p for p in st.parameters() if p.requires_grad], lr=1e-2)
    pa, pb = st(ba, bb)
    loss = (pa - torch.randn_like(pa)).square().mean() + (pb - torch.randn_like(pb)).square().mean()
    loss.backward()
    assert torch.isfinite(loss)
    with_grad = {n for n, p in st.named_parameters() if p.grad is not None}
    assert with_grad == {n for n, _ in st.named_parameters() if n.startswith("connectors.")}
    opt.step()
    assert all(torch.equal(p, frozen[n]) for n, p in st.named_parameters() if n in frozen)
    with torch.no_grad():  # the stepped connectors now carry signal into each host, and only there
        pa, pb = st(ba, bb)
    hosts = {"a_to_b": "b", "b_to_a": "a", "both": "ab"}[direction]
    assert torch.equal(pa, ref_a) == ("a" not in hosts)
    assert torch.equal(pb, ref_b) == ("b" not in hosts)


@pytest.mark.slow
def test_new_families_train_through_the_recipe(tmp_path):
    """WAN2.2 TI2V + Stable Audio Open through the Lightning recipe path (demo recipe, overrides)."""
    from rich.console import Console

    from soe.cli.stitch import run_training

    demo = Path(__file__).parents[1] / "tests" / "recipes" / "tiny.yaml"
    result = run_training(demo, ["data.num_clips=8", "data.batch_size=2", "data.seconds=1.0", "trainer.max_steps=2",
                                 f"run_dir={tmp_path}/run", "experts.a.name=wan2.2-ti2v", "experts.b.name=stable-audio-open",
                                 "sample.steps=2"],  # the demo renders an mp4 at the end: both codecs run
                          console=Console(file=open("/dev/null", "w")), progress=False)
    st = result["module"].stitcher
    assert result["trainer"].global_step == 2 and (st.a.name, st.b.name) == ("wan2.2-ti2v", "stable-audio-open")
    assert any("lora_B" in n and p.abs().sum() > 0 for n, p in st.b.named_parameters())
