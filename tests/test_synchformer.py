"""`desync` / `sync_offset` through their real loading path: a tiny random Synchformer saved by the test as
``synchformer/synchformer_state_dict.pth`` + ``config.json``, read back by ``soe eval --models``. Checked: value
ranges and the offset grid, determinism, the windowing arithmetic against a direct reading of av-benchmark's
DeSync (segments of 16 frames every 8 at 25 fps and of 10,240 samples every 5,120 at 16 kHz; the first and the
last 14), the mel filter bank against librosa's, the 25 fps resampling and the resize, and bad inputs (exit 2, one
line). Parity with the official code is tests/test_synchformer_official.py (needs a checkout)."""
import json
from fractions import Fraction

import numpy as np
import pytest
import torch
from test_eval import write_wav

from soe.cli.commands import main
from soe.evaluate import desync
from soe.evaluate.decode import decode_clip
from soe.evaluate.synchformer import Synchformer, SynchformerConfig
from soe.evaluate.synchformer import preprocess as pre
from soe.media import write_mp4

TINY = SynchformerConfig(dim=16, video_depth=1, video_heads=2, image_size=32, audio_depth=1, audio_heads=2,
                         audio_intermediate=32, sync_layers=1, sync_heads=2)


def save_synchformer(models, cfg=TINY, seed=0):
    folder = models / "synchformer"
    folder.mkdir(parents=True)
    torch.manual_seed(seed)
    model = Synchformer(cfg)
    g = torch.Generator().manual_seed(seed)
    state = {k: torch.randn(v.shape, generator=g) * 0.5 for k, v in model.state_dict().items()}
    torch.save(state, folder / "synchformer_state_dict.pth")
    (folder / "config.json").write_text(cfg.to_json())
    return folder


def make_av_clip(folder, stem, seconds=5.0, fps=25, seed=0):
    """Moving noise video (32x48) with a 16 kHz noise track, ``seconds`` long."""
    g = torch.Generator().manual_seed(seed)
    n = int(round(seconds * fps))
    video = torch.rand(3, n, 32, 48, generator=g) * 2 - 1
    audio = torch.randn(1, int(seconds * 16000), generator=g) * 0.2
    path = write_mp4(folder / f"{stem}.mp4", video, fps, audio, 16000)
    write_wav(folder / f"{stem}.wav", audio, sr=16000)
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("sf")
    save_synchformer(root / "models")
    make_av_clip(root / "clips", "a", 5.0, seed=1)
    make_av_clip(root / "clips", "b", 6.0, fps=24, seed=2)
    make_av_clip(root / "clips", "short", 3.0, seed=3)
    return root


def test_soe_eval_desync(tiny, capsys):
    out = tiny / "eval.json"
    rc = main(["eval", str(tiny / "clips"), "--metrics", "desync,sync_offset", "--models", str(tiny / "models"),
               "--out", str(out), "--device", "cpu"])
    assert rc == 1  # the 3 s clip has no value: it is named and listed under failed
    result = json.loads(out.read_text())
    assert set(result["clips"]) == {"a", "b", "short"} and "short" in result["failed"] and "4.80 s" in result["failed"]["short"]
    grid = np.linspace(-2, 2, 21)
    for stem in ("a", "b"):
        v = result["clips"][stem]
        assert 0.0 <= v["desync"] <= 2.0 and -2.0 <= v["sync_offset"] <= 2.0 and abs(v["sync_offset"]) <= v["desync"] + 1e-9
        # two windows: each value is the mean of two grid points
        assert np.isclose(2 * v["desync"] / 0.2, round(2 * v["desync"] / 0.2), atol=1e-6)
    assert result["models"]["synchformer"]["sha256"]["synchformer_state_dict.pth"]
    scorer = desync.DesyncScorer(tiny / "models" / "synchformer")
    clip = decode_clip("a", tiny / "clips" / "a.mp4")
    offs = scorer.offsets(clip.frames, clip.fps, clip.audio_at(16000))
    assert offs == scorer.offsets(clip.frames, clip.fps, clip.audio_at(16000))  # deterministic
    assert all(np.isclose(o, grid).any() for o in offs)
    assert result["clips"]["a"]["desync"] == pytest.approx(np.mean(np.abs(offs)))
    assert result["clips"]["a"]["sync_offset"] == pytest.approx(np.mean(offs))


@pytest.mark.parametrize("seconds", [4.8, 5.0, 5.3, 6.0, 8.0, 10.0])
def test_windows_follow_the_definition(tiny, seconds):
    """Segments and windows read straight off av-benchmark: start positions i*8 (frames) / i*5120 (samples) whose
    segment fits in the first min(seconds, 8) s; offsets of the first 14 and the last 14; DeSync = mean |offset|."""
    used = min(seconds, desync.MAX_SECONDS)
    n_frames, n_samples = int(25 * used), int(16000 * used)
    starts_v = [s for s in range(0, n_frames) if s % 8 == 0 and s + 16 <= n_frames]
    starts_a = [s for s in range(0, n_samples, 5120) if s + 10240 <= n_samples]
    assert len(starts_v) == len(starts_a) == pre.num_segments(n_frames, 16, 8) == pre.num_segments(n_samples, 10240, 5120)
    scorer = desync.DesyncScorer(tiny / "models" / "synchformer")
    frames = np.random.default_rng(0).integers(0, 255, (int(25 * seconds), 32, 32, 3), dtype=np.uint8)
    audio = np.random.default_rng(1).standard_normal(int(16000 * seconds)).astype(np.float32) * 0.1
    vis = scorer.model.video_features(pre.video_segments(frames, 25.0, used, 32))
    seen, classes = [], iter([3, 17])

    def fake_logits(v, a):  # record each window, answer a known class
        seen.append((v, a))
        return torch.nn.functional.one_hot(torch.tensor([next(classes)]), 21).float()

    scorer.model.offset_logits = fake_logits
    offs = scorer.offsets(frames, 25.0, audio)
    grid = np.linspace(-2, 2, 21)
    assert offs == pytest.approx([grid[3], grid[17]])
    s = len(starts_v)
    assert torch.allclose(seen[0][0][0], vis[:14], atol=1e-5) and torch.allclose(seen[1][0][0], vis[s - 14: s], atol=1e-5)
    assert seen[0][1].shape == (1, 14, 6, 16)
    assert pre.segment(torch.arange(n_samples), 10240, 5120)[-1][0].item() == starts_a[-1]


def test_mel_bank_resample_and_resize():
    import librosa

    ref = librosa.filters.mel(sr=16000, n_fft=1024, n_mels=128, fmin=0.0, fmax=8000.0, htk=True, norm=None)  # (128, 513)
    assert np.abs(pre.mel_filters().numpy().T - ref).max() < 1e-4  # float32 here (as torchaudio), float64 in librosa
    assert (pre.resample_indices(50, 25.0) == np.arange(50)).all()
    assert (pre.resample_indices(100, 50.0) == np.arange(0, 100, 2)).all()
    assert (pre.resample_indices(10, 12.5) == np.repeat(np.arange(10), 2)).all()
    x = np.random.default_rng(0).integers(0, 255, (2, 224, 224, 3), dtype=np.uint8)
    out = pre.resize_crop(x)
    assert torch.allclose(out, torch.from_numpy(x).permute(0, 3, 1, 2).float() / 127.5 - 1, atol=1e-6)  # no resize: scaling only
    wide = pre.resize_crop(np.zeros((1, 120, 200, 3), np.uint8) + 255)
    assert wide.shape == (1, 3, 224, 224) and torch.allclose(wide, torch.ones_like(wide))


def _ffmpeg_fps(n: int, rate: Fraction) -> np.ndarray:
    """Input index of each frame ffmpeg's own ``fps=25`` filter (PyAV's libavfilter) emits for ``n`` frames at ``rate``."""
    import av

    graph = av.filter.Graph()
    src = graph.add_buffer(width=16, height=16, format="gray", time_base=1 / rate)
    fps, sink = graph.add("fps", "25"), graph.add("buffersink")
    src.link_to(fps)
    fps.link_to(sink)
    graph.configure()
    out = []
    for i in [*range(n), None]:
        if i is None:
            graph.push(None)
        else:
            frame = av.VideoFrame.from_ndarray(np.full((16, 16), i % 256, np.uint8), format="gray")
            frame.pts, frame.time_base = i, 1 / rate
            graph.push(frame)
        while True:
            try:
                out.append(int(graph.pull().to_ndarray()[0, 0]))
            except (av.error.BlockingIOError, av.error.EOFError):
                break
    return np.array(out)


@pytest.mark.parametrize("rate", [Fraction(24), Fraction(30000, 1001), Fraction(50), Fraction(16)])
def test_resampling_is_ffmpegs_fps_filter(rate):
    ours, theirs = pre.resample_indices(120, float(rate)), _ffmpeg_fps(120, rate)
    # without frame durations ffmpeg stops after the last input timestamp; with a container's durations it runs to the end
    assert len(theirs) >= len(ours) - 2 and (ours[: len(theirs)] == theirs[: len(ours)]).all()


def test_bad_synchformer_folders(tiny, tmp_path, capsys):
    clips = tiny / "clips"
    empty = tmp_path / "m1" / "synchformer"
    empty.mkdir(parents=True)
    wrong = save_synchformer(tmp_path / "m2")
    (wrong / "config.json").write_text(json.dumps({"model_type": "clap"}))
    other = save_synchformer(tmp_path / "m3")
    (other / "config.json").write_text(json.dumps({"model_type": "synchformer", "dim": 24}))
    for models, needle in ((tmp_path / "m1", "synchformer_state_dict.pth"), (tmp_path / "m2", "'clap'"),
                           (tmp_path / "m3", "synchformer_state_dict.pth")):
        out = tmp_path / f"{models.name}.json"
        rc = main(["eval", str(clips), "--metrics", "desync", "--models", str(models), "--out", str(out), "--device", "cpu"])
        err = capsys.readouterr().err
        assert rc == 2 and not out.exists() and needle in err, err
