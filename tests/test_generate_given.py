"""`soe generate RECIPE image= | video= | audio= | extend=`: conditioning media end to end on tiny experts."""
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from soe.cli import main
from soe.media import write_mp4

# random-weight tiny experts, written per test: independent of how the shipped demo recipe evolves
TINY = """
name: given
experts:
  a: {name: wan2.1, preset: tiny, train: lora, lora: {r: 4, alpha: 4}}
  b: {name: ace-step-1.5, preset: tiny, train: lora, lora: {r: 4, alpha: 4}}
stitch: {pairs: linear, direction: both, connector: {init: zero}}
flow: {balance: ema}
data: {kind: synthetic, seconds: 1.0, batch_size: 4, num_clips: 16}
trainer: {max_steps: 2, accelerator: cpu, log_every_n_steps: 1}
sample: {decode: codec, num_samples: 1, steps: 2, seconds: 1.0}
"""
FAST = ["seconds=1", "steps=2"]


def tiny_recipe(folder: Path) -> Path:
    path = folder / "tiny_recipe.yaml"
    path.write_text(TINY)
    return path


def clip(path, seconds=1.2, fps=25, sound=True, size=(48, 80)):
    """A moving bar (and a 440 Hz tone): a small mp4 of ``seconds``."""
    f = int(round(seconds * fps))
    video = -torch.ones(3, f, *size)
    for i in range(f):
        video[:, i, :, (i * 3) % size[1]: (i * 3) % size[1] + 6] = 1.0
    t = torch.arange(int(seconds * 16000)) / 16000
    audio = 0.5 * torch.sin(2 * torch.pi * 440 * t)[None] if sound else None
    return write_mp4(path, video, fps, audio, 16000 if sound else None)


def wav(path, seconds=1.5):
    with av.open(str(path), "w") as c:
        s = c.add_stream("pcm_s16le", rate=16000)
        s.layout = "mono"
        x = (0.3 * np.sin(2 * np.pi * 220 * np.arange(int(seconds * 16000)) / 16000) * 32767).astype(np.int16)[None]
        frame = av.AudioFrame.from_ndarray(x, format="s16", layout="mono")
        frame.sample_rate = 16000
        for p in s.encode(frame):
            c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path


def png(path):
    img = np.zeros((90, 120, 3), np.uint8)
    img[30:60, 40:80] = 255
    Image.fromarray(img).save(path)
    return path


def generate(tmp_path, *args):
    out = tmp_path / "out"
    return main(["generate", str(tiny_recipe(tmp_path)), *FAST, f"out={out}", *args]), out


def expert_latents(out):
    return load_file(out / "latents.safetensors")


@pytest.mark.parametrize("mode", ["image", "video", "audio", "extend"])
def test_each_mode_writes_an_mp4_whose_given_latents_are_the_encoded_input(tmp_path, mode, capsys):
    from soe.recipe.builders import build_stitcher
    from soe.recipe.reading import load_recipe
    from soe.sample.generate import given_inputs, load_codecs

    media = {"image": lambda: png(tmp_path / "ref.png"), "video": lambda: clip(tmp_path / "silent.mp4", sound=False),
             "audio": lambda: wav(tmp_path / "track.wav"), "extend": lambda: clip(tmp_path / "start.mp4", seconds=0.6)}[mode]()
    code, out = generate(tmp_path, f"{mode}={media}", "extend_seconds=0.5")
    assert code == 0, capsys.readouterr().err
    with av.open(str(out / "sample_00.mp4")) as c:
        assert c.streams.video and c.streams.audio
    assert (out / "sample_00.png").is_file()
    # what was given is exactly the input encoded by the expert's own codec, and the rest was sampled
    cfg = load_recipe(tiny_recipe(tmp_path), [f"sample.{mode}={media}", "sample.extend_seconds=0.5"])
    torch.manual_seed(cfg.seed)
    st = build_stitcher(cfg)
    given = given_inputs(st, cfg, load_codecs(st, cfg), 1, 1.0)
    lat = expert_latents(out)
    assert set(given.latents) == {"image": {"a"}, "video": {"a"}, "audio": {"b"}, "extend": {"a", "b"}}[mode]
    for side, g in given.latents.items():
        x, ref = lat[f"{side}/latents"].movedim(g.time_axis, 1), g.clean.float().movedim(g.time_axis, 1)
        assert torch.equal(x[g.mask], ref[g.mask])
        if not g.full:
            assert not torch.allclose(x[~g.mask], ref[~g.mask])


def test_video_to_audio_writes_the_input_video_as_the_video_track(tmp_path, capsys):
    src = clip(tmp_path / "silent.mp4", seconds=2.0, sound=False, size=(64, 64))
    code, out = generate(tmp_path, f"video={src}")
    assert code == 0, capsys.readouterr().err
    with av.open(str(src)) as a, av.open(str(out / "sample_00.mp4")) as b:
        fa = [f.to_ndarray(format="rgb24").astype(float) for f in a.decode(video=0)]
        fb = [f.to_ndarray(format="rgb24").astype(float) for f in b.decode(video=0)]
    assert len(fb) == 25  # 1 s at 6.25 latent frames/s -> 7 latent frames (whole latents, rounded up) -> 1 + 4*6 frames
    assert max(np.abs(x - y).mean() for x, y in zip(fa, fb)) < 8  # the input itself (two H.264 passes)


@pytest.mark.parametrize("args, message", [
    (lambda p: [f"video={wav(p / 'a.wav')}"], "has no video stream"),
    (lambda p: [f"audio={clip(p / 's.mp4', sound=False)}"], "has no audio stream"),
    (lambda p: [f"video={clip(p / 'short.mp4', seconds=0.4)}"], "shorter than the"),
    (lambda p: [f"audio={wav(p / 'short.wav', seconds=0.3)}"], "shorter than the"),
    (lambda p: [f"video={clip(p / 'v.mp4')}", f"audio={wav(p / 'a.wav')}"], "one conditioning input at a time"),
    (lambda p: ["image=missing.png"], "sample.image: not found"),
    (lambda p: [f"extend={clip(p / 'e.mp4')}", "extend_seconds=1.0"], "leaves nothing to generate"),
    (lambda p: [f"image={clip(p / 'x.mp4')}", "experts.a.name=ace-step-1.5", "experts.a.preset=tiny"], "needs a video expert"),
])
def test_bad_conditioning_input_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, args, message):
    code, out = generate(tmp_path, *args(tmp_path))
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]  # (a no-ckpt warning may precede it)
    assert code == 2 and len(errors) == 1 and message in errors[0] and "Traceback" not in err, err
    assert not out.exists()
