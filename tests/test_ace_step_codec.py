"""ACE-Step v1's music codec (music DCAE + vocoder) in the checkpoint's own folder layout.

Checked without the official code: the vocoder's state dict is the checkpoint's (713 keys / 103M
parameters at the released size, weight_g / weight_v, stored mel buffers) and loads strictly from a
folder written in that layout; the mel front end equals a from-the-formula numpy reference and
torchaudio's slaney filterbank values; lengths follow both rate conventions, and at UniVerse-1's
25.6 kHz a clip gives as many audio latents as Wan's VAE gives video latents; decode inverts the
framing; bad folders and rates fail with one line naming the file or key, exit 2, nothing written.
Parity with the official classes where a checkout is given: ``SOE_ACE_STEP_REF`` (ace-step/ACE-Step, 44.1 kHz)
and ``SOE_UNIVERSE1_REF`` (Dorniwang/UniVerse-1-code, 25.6 kHz); see ``test_official_parity``.
"""
import json
import math
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from soe.errors import CheckpointError, SoeError
from soe.experts.ace_step_v1_codec import DCAE_FOLDER, VOCODER_FOLDER, MusicCodec, SampleRateError
from soe.experts.ace_step_v1_mel import LogMelSpectrogram, hz_to_mel, mel_to_hz, slaney_mel_filterbank
from soe.experts.ace_step_v1_vocoder import WEIGHTS, MusicVocoder, VocoderConfig, load_vocoder


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These convolutions are tiny: a second intra-op thread only waits on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A tiny random codec saved in the ACE-Step v1 checkpoint layout."""
    root = tmp_path_factory.mktemp("ace_ckpt")
    MusicCodec.tiny(seed=3).save(root)
    return root


@pytest.fixture(scope="module")
def codecs(folder):
    """The saved codec loaded at each rate convention."""
    return {rate: MusicCodec.load(folder, sample_rate=rate) for rate in (44100, 25600)}


def tone(samples: int, channels: int = 2, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(samples) / 25600
    x = 0.4 * torch.sin(2 * math.pi * 330 * t) + 0.05 * torch.randn(samples, generator=g)
    return torch.stack([x * (1 - 0.3 * c) for c in range(channels)])[None]  # (1, C, samples)


# ---- checkpoint layout ----------------------------------------------------------------------------
def test_released_vocoder_has_the_checkpoints_keys_and_size():
    with torch.device("meta"):
        v = MusicVocoder(VocoderConfig())
    sd = v.state_dict()
    assert len(sd) == 713
    assert 102e6 < sum(p.numel() for p in v.parameters()) < 104e6
    for key in ("head.conv_pre.weight_g", "head.conv_pre.weight_v", "head.ups.6.weight_v", "head.resblocks.27.convs2.2.weight_g",
                "backbone.channel_layers.0.0.weight", "backbone.stages.2.8.gamma", "mel_transform.mel_scale.fb",
                "mel_transform.spectrogram.window"):
        assert key in sd, key
    assert not any(k.endswith(".weight") for k in sd if ".conv" in k and k.startswith("head."))  # every head conv is weight-normalised
    assert sd["head.ups.0.weight_g"].shape == (1024, 1, 1)  # one gain per input channel of the transposed conv (axis 0)


def test_folder_layout_loads_strictly_and_reproduces_the_codec(folder):
    assert json.loads((folder / DCAE_FOLDER / "config.json").read_text())["_class_name"] == "AutoencoderDC"
    assert json.loads((folder / VOCODER_FOLDER / "config.json").read_text())["_class_name"] == "ADaMoSHiFiGANV1"
    keys = set(load_file(folder / VOCODER_FOLDER / WEIGHTS))
    assert {"mel_transform.mel_scale.fb", "mel_transform.spectrogram.window", "head.conv_post.weight_g"} <= keys
    codec, again = MusicCodec.tiny(seed=3), MusicCodec.load(folder, sample_rate=44100)
    x = tone(3 * 4096)
    z = again.encode(x)
    torch.testing.assert_close(z, codec.encode(x), rtol=0, atol=0)
    torch.testing.assert_close(again.decode(z), codec.decode(z), rtol=0, atol=0)
    assert MusicCodec.tiny(seed=4).encode(x).sub(z).abs().max() > 1e-3  # the weights matter


def test_stored_mel_buffers_are_the_ones_used(folder, tmp_path):
    import shutil

    shutil.copytree(folder, tmp_path / "c")
    weights = tmp_path / "c" / VOCODER_FOLDER / WEIGHTS
    state = load_file(weights)
    state["mel_transform.mel_scale.fb"] = state["mel_transform.mel_scale.fb"] * 2.0
    save_file(state, str(weights))
    base, doubled = (load_vocoder(f / VOCODER_FOLDER) for f in (folder, tmp_path / "c"))
    x = tone(8192)[0]
    diff = doubled.mel_transform(x) - base.mel_transform(x)
    loud = base.mel_transform(x) > math.log(1e-5) + 1  # above the log floor, doubling adds log 2
    assert torch.allclose(diff[loud], torch.full_like(diff[loud], math.log(2.0)), atol=1e-5)


# ---- mel front end ---------------------------------------------------------------------------------
def test_hann_window_is_periodic():
    w = LogMelSpectrogram().spectrogram.window.double()
    n = torch.arange(2048, dtype=torch.float64)
    torch.testing.assert_close(w, 0.5 - 0.5 * torch.cos(2 * math.pi * n / 2048), atol=5e-7, rtol=0)  # fp32 rounding
    assert w[0] == 0 and abs(w[1024] - 1) < 1e-7 and torch.allclose(w[1:], w[1:].flip(0), atol=5e-7)  # w[n] = w[N - n]


def test_slaney_scale_and_filterbank_values():
    assert hz_to_mel(1000.0) == pytest.approx(15.0) and hz_to_mel(40.0) == pytest.approx(0.6)
    assert hz_to_mel(6400.0) == pytest.approx(42.0)  # 27 mels per factor 6.4 above 1 kHz
    assert float(mel_to_hz(torch.tensor(42.0, dtype=torch.float64))) == pytest.approx(6400.0)
    fb = slaney_mel_filterbank(1025, 44100, 40, 16000, 128)  # (1025, 128)
    # torchaudio.functional.melscale_fbanks(1025, 40, 16000, 128, 44100, "slaney", "slaney") at these entries
    for (i, j), v in {(3, 0): 0.03075237013399601, (100, 60): 0.003686578944325447, (700, 126): 0.0021659801714122295,
                      (10, 4): 0.0, (300, 100): 0.0}.items():
        assert float(fb[i, j]) == pytest.approx(v, abs=2e-7), (i, j)
    assert fb.argmax(0)[[0, 10, 64, 127]].tolist() == [3, 16, 115, 722]
    assert float(fb.sum()) == pytest.approx(5.944012641906738, rel=1e-5)
    bins = 22050 / 1024
    area = fb.sum(0) * bins  # slaney normalisation: every triangle has unit area in Hz
    assert torch.allclose(area[64:], torch.ones(64), atol=0.03)


def test_log_mel_equals_the_formula():
    """numpy float64: reflect pad 768 | frames of 2048 every 512 | periodic Hann | DFT | sqrt(|X|^2 + 1e-6) | slaney fb | log(max(., 1e-5))."""
    x = tone(5000, channels=2, seed=1)[0].double().numpy()  # (2, 5000)
    xp = np.pad(x, ((0, 0), (768, 768)), mode="reflect")
    frames = (xp.shape[1] - 2048) // 512 + 1
    n = np.arange(2048)
    window = 0.5 - 0.5 * np.cos(2 * np.pi * n / 2048)
    f = np.arange(1025)[:, None]
    dft = np.exp(-2j * np.pi * f * n[None] / 2048)  # (1025, 2048)
    seg = np.stack([xp[:, k * 512 : k * 512 + 2048] for k in range(frames)], -1)  # (2, 2048, frames)
    spec = np.einsum("fn,cnt->cft", dft, seg * window[None, :, None])
    mag = np.sqrt(spec.real**2 + spec.imag**2 + 1e-6)
    fb = _slaney_fb_loop(1025, 44100, 40.0, 16000.0, 128)
    ref = np.log(np.maximum(np.einsum("cft,fm->cmt", mag, fb), 1e-5))
    out = LogMelSpectrogram(44100, f_min=40, f_max=16000).float()(torch.from_numpy(x).float())
    assert out.shape == (2, 128, 5000 // 512) == ref.shape
    np.testing.assert_allclose(out.numpy(), ref, atol=2e-4)


def _slaney_fb_loop(n_freqs, sr, fmin, fmax, n_mels):
    def to_mel(f):
        return f / (200 / 3) if f < 1000 else 15 + math.log(f / 1000) * 27 / math.log(6.4)

    def to_hz(m):
        return m * 200 / 3 if m < 15 else 1000 * math.exp((m - 15) * math.log(6.4) / 27)

    lo, hi = to_mel(fmin), to_mel(fmax)
    edges = [to_hz(lo + (hi - lo) * i / (n_mels + 1)) for i in range(n_mels + 2)]
    fb = np.zeros((n_freqs, n_mels))
    for k in range(n_freqs):
        f = k * (sr // 2) / (n_freqs - 1)
        for m in range(n_mels):
            a, c, b = edges[m], edges[m + 1], edges[m + 2]
            tri = (f - a) / (c - a) if f <= c else (b - f) / (b - c)
            fb[k, m] = max(0.0, tri) * 2 / (b - a)
    return fb


# ---- lengths, rates, round trip -----------------------------------------------------------------
@pytest.mark.parametrize("frames", [1, 5, 13])
def test_universe1_audio_latents_match_wan_video_latents(codecs, frames):
    from soe.experts.codecs import WanVideoCodec

    video_latents = WanVideoCodec.tiny(16, 25.0).encode(torch.zeros(1, 3, frames, 8, 8)).shape[2]
    codec = codecs[25600]
    samples = frames * 1024  # the same clip: `frames` video frames at 25 fps = 1024 samples each at 25.6 kHz
    z = codec.encode(tone(samples))
    assert z.shape == (1, 8, 16, video_latents) and codec.latent_frames(samples) == video_latents
    assert codec.clip_samples(video_latents) == samples
    y = codec.decode(z)
    assert y.shape == (1, 2, samples)  # the prelude is dropped again: audio starts with video frame 0


@pytest.mark.parametrize("rate", [44100, 25600])
def test_lengths_rate_and_expert_agree(folder, codecs, rate):
    from soe.experts.ace_step import AceStepV1Expert

    expert = AceStepV1Expert.from_config({**AceStepV1Expert.presets["tiny"], "sample_rate": rate})
    codec = expert.codec(folder)
    assert isinstance(codec, MusicCodec) and codec.rate == rate and codec.modality == "audio" and codec.prelude == (rate == 25600) * 3072
    codec = codecs[rate]
    assert rate / codec.frame_hop == pytest.approx(expert.latent_rate)
    for samples in (4096, 2 * 4096 + 1, 3 * 4096 + 1024, 3 * 4096 + 1600):
        z = codec.encode(tone(samples))
        assert z.shape[-1] == codec.latent_frames(samples)
        if rate == 44100:  # zero-padded on the right to whole latent frames
            assert z.shape[-1] == math.ceil(samples / 4096)
            assert codec.decode(z).shape == (1, 2, z.shape[-1] * 4096) == (1, 2, codec.clip_samples(z.shape[-1]))
        assert expert.token_layout({"latents": z}).grid == (z.shape[-1],)


def test_mono_is_the_stereo_copy(codecs):
    codec = codecs[25600]
    mono = tone(5 * 1024, channels=1)
    torch.testing.assert_close(codec.encode(mono), codec.encode(mono.repeat(1, 2, 1)), rtol=0, atol=0)


def test_long_clips_decode_in_windows(folder):
    codec = MusicCodec.load(folder, sample_rate=44100)
    mel = torch.randn(1, 128, 200, generator=torch.Generator().manual_seed(1)) - 4
    # vocoder windows carry a margin past the receptive field: the same samples as one call
    assert 200 > 40 + 2 * (codec.vocoder.receptive_field() + 8)  # really windowed
    torch.testing.assert_close(codec.vocoder.decode(mel, window=40), codec.vocoder(mel), atol=1e-5, rtol=0)
    z = torch.randn(1, 8, 16, 10, generator=torch.Generator().manual_seed(0))
    whole = codec.decode(z)
    codec.decode_window = 4  # DCAE windows (its attention is global: close, not equal)
    windowed = codec.decode(z)
    assert windowed.shape == whole.shape == (1, 2, 10 * 4096) and torch.isfinite(windowed).all()


def test_bf16_runs(folder):
    codec = MusicCodec.load(folder, sample_rate=25600, dtype=torch.bfloat16)
    assert codec.dcae.dtype == torch.bfloat16
    z = codec.encode(tone(5 * 1024).bfloat16())
    y = codec.decode(z)
    assert z.shape == (1, 8, 16, 2) and y.shape == (1, 2, 5 * 1024) and torch.isfinite(y).all()
    ref = MusicCodec.load(folder, sample_rate=25600).encode(tone(5 * 1024))
    assert (z - ref).abs().max() < 0.1 * ref.abs().max()


def test_tiny_codec_without_a_folder_still_works():
    from soe.experts.ace_step import AceStepV1Expert
    from soe.plugin.codec import FrameAudioCodec

    codec = AceStepV1Expert.from_config(AceStepV1Expert.presets["tiny"]).codec()
    assert isinstance(codec, FrameAudioCodec) and codec.encode(tone(8192)).shape == (1, 8, 16, 2)


# ---- bad input --------------------------------------------------------------------------------------
def test_bad_codec_folders_and_rates(folder, tmp_path):
    import shutil

    from soe.experts.codecs import WanVideoCodec

    WanVideoCodec.tiny(16, 25.0).vae.save_pretrained(tmp_path / "wan" / "vae")
    with pytest.raises(CheckpointError, match=r"not an ACE-Step v1 checkpoint root.*AutoencoderKLWan"):
        MusicCodec.load(tmp_path / "wan", 44100)
    shutil.copytree(folder, tmp_path / "c")
    weights = tmp_path / "c" / VOCODER_FOLDER / WEIGHTS
    state = load_file(weights)
    del state["head.ups.1.weight_g"]
    save_file(state, str(weights))
    with pytest.raises(CheckpointError, match=r"music_vocoder/diffusion_pytorch_model.safetensors: missing key 'head.ups.1.weight_g'"):
        MusicCodec.load(tmp_path / "c", 44100)
    cfg = tmp_path / "c" / DCAE_FOLDER / "config.json"
    cfg.write_text(json.dumps({**json.loads(cfg.read_text()), "_class_name": "AutoencoderOobleck"}))
    with pytest.raises(CheckpointError, match="AutoencoderOobleck"):
        MusicCodec.load(tmp_path / "c", 44100)
    with pytest.raises(SampleRateError, match="not 48000") as err:
        MusicCodec.load(folder, 48000)
    assert isinstance(err.value, SoeError) and err.value.exit_code == 2


def test_soe_encode_refuses_a_bad_codec_folder_with_exit_2(folder, tmp_path, capsys):
    from soe.cli import main

    demo = Path(__file__).parents[1] / "tests" / "recipes" / "tiny.yaml"
    (tmp_path / "clips").mkdir()
    out = tmp_path / "cache"
    v1 = ["experts.b.name=ace-step", "experts.b.options={sample_rate: 48000}"]
    for codec_path, message in ((folder, "not 48000"), (tmp_path / "clips", "not an ACE-Step v1 checkpoint root")):
        assert main(["encode", str(demo), str(tmp_path / "clips"), "--out", str(out), *v1, f"experts.b.codec_path={codec_path}"]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1
        assert not out.exists()


# ---- official parity (only where an official checkout is given) ----------------------------------------
OFFICIAL = {  # rate -> (env var naming a checkout, module path of its MusicDCAE)
    44100: ("SOE_ACE_STEP_REF", "acestep.music_dcae.music_dcae_pipeline"),  # ace-step/ACE-Step
    25600: ("SOE_UNIVERSE1_REF", "fastvideo.models.music_dcae.music_dcae_pipeline"),  # Dorniwang/UniVerse-1-code
}


@pytest.mark.parametrize("rate", sorted(OFFICIAL))
def test_official_parity(folder, rate):
    """Encode + decode against the official MusicDCAE (torchaudio must be importable), 5e-4 of peak, fp32."""
    env, module = OFFICIAL[rate]
    if not os.environ.get(env):
        pytest.skip(f"set {env} to an official checkout to compare with it")
    sys.path.insert(0, os.environ[env])
    import importlib

    official = importlib.import_module(module).MusicDCAE
    dcae, voc = str(folder / DCAE_FOLDER), str(folder / VOCODER_FOLDER)
    off = (official(44100, dcae, voc) if rate == 44100 else official(rate, rate, dcae, voc)).eval()
    ours = MusicCodec.load(folder, rate)
    for samples in (5 * 4096 + 1000, 1024 * (1 + 4 * 9)):
        if rate == 25600 and (samples + 3072) % 4096 >= 512:
            continue  # the released UniVerse-1 code cannot encode this length (its DCAE needs 8 | mel frames)
        x = tone(samples)
        z_off = off.encode(x, sr=rate)[0]
        w_off = torch.stack(off.decode(z_off, sr=rate)[1])[..., ours.prelude :]  # soe drops the prelude it encoded
        assert (ours.encode(x) - z_off).abs().max() <= 5e-4 * z_off.abs().max()
        assert (ours.decode(z_off) - w_off).abs().max() <= 5e-4 * w_off.abs().max()


def test_codec_folders_are_refused_across_families(folder, tmp_path):
    """The ACE-Step v1 root given to Wan's or an Oobleck codec, and a Wan VAE given to Stable Audio's: one-line errors."""
    from soe.experts.codecs import OobleckAudioCodec, WanVideoCodec

    with pytest.raises(CheckpointError, match="no AutoencoderKLWan folder"):
        WanVideoCodec.load(folder, 25.0)
    WanVideoCodec.tiny(16, 25.0).vae.save_pretrained(tmp_path / "wan" / "vae")
    with pytest.raises(CheckpointError, match=r"vae/config.json: _class_name is 'AutoencoderKLWan', expected 'AutoencoderOobleck'"):
        OobleckAudioCodec.load(tmp_path / "wan")
    (tmp_path / "wan" / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="cannot load AutoencoderKLWan"):
        WanVideoCodec.load(tmp_path / "wan", 25.0)
