"""`soe eval`: the command (eval.json, table, exit codes, bad inputs) and AV-Align on synthetic mp4s whose
motion and clicks happen at known times, compared with a direct reading of the definition (OpenCV's own
decode, librosa.load, the loops as TempoTokens/MOVA write them)."""
import json
import subprocess
import sys
import wave
from pathlib import Path

import numpy as np
import pytest
import torch

from soe.cli.commands import main
from soe.evaluate import av_align as ava
from soe.evaluate.decode import decode_clip, find_clips
from soe.media import write_mp4

FPS, SIZE, SECONDS, SR = 25, 64, 2.0, 44_100
MOTION_FRAMES = (10, 25, 40)  # the square jumps into a new place at these frames (0.4, 1.0, 1.6 s)


def square_video(jumps=MOTION_FRAMES) -> torch.Tensor:
    """(3, F, H, W) in [-1, 1]: a white square on black that jumps 8 px right at each frame in ``jumps``."""
    n = int(SECONDS * FPS)
    video = -torch.ones(3, n, SIZE, SIZE)
    x = 12
    for f in range(n):
        if f in jumps:
            x += 8
        video[:, f, 24:40, x: x + 16] = 1.0
    return video


def clicks(times, sr=SR) -> torch.Tensor:
    """(1, N): 10 ms bursts of seeded noise at ``times`` (s), silence elsewhere."""
    audio = torch.zeros(1, int(SECONDS * sr))
    g = torch.Generator().manual_seed(0)
    for t in times:
        i = int(round(t * sr))
        audio[0, i: i + sr // 100] = 0.8 * (2 * torch.rand(sr // 100, generator=g) - 1)
    return audio


def write_wav(path: Path, audio: torch.Tensor, sr=SR) -> None:
    pcm = (audio[0].clamp(-1, 1).numpy() * 32767).astype(np.int16)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(sr)
        w.writeframes(pcm.tobytes())


def make_clip(folder: Path, stem: str, shift: float = 0.0, wav: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    audio = clicks([f / FPS + shift for f in MOTION_FRAMES])
    path = write_mp4(folder / f"{stem}.mp4", square_video(), FPS, audio, SR)
    if wav:
        write_wav(folder / f"{stem}.wav", audio)
    return path


def official_av_align(mp4: Path, wav: Path) -> tuple[float, np.ndarray]:
    """AV-Align read straight off the definition: OpenCV's own decode (BGR), librosa.load (22,050 Hz mono), the loops."""
    import cv2
    import librosa

    cap = cv2.VideoCapture(str(mp4))
    fps, frames = cap.get(cv2.CAP_PROP_FPS), []
    ok, frame = cap.read()
    while ok:
        frames.append(frame)
        ok, frame = cap.read()
    cap.release()

    def of(a, b):
        flow = cv2.calcOpticalFlowFarneback(cv2.cvtColor(a, cv2.COLOR_BGR2GRAY), cv2.cvtColor(b, cv2.COLOR_BGR2GRAY),
                                            None, 0.5, 3, 15, 3, 5, 1.2, 0)
        return cv2.mean(cv2.magnitude(flow[..., 0], flow[..., 1]))[0]

    traj = [of(frames[0], frames[1])] + [of(frames[i - 1], frames[i]) for i in range(1, len(frames))]
    video = [i / fps for i in range(1, len(traj) - 1) if traj[i - 1] < traj[i] > traj[i + 1] and traj[i] >= 0.1]
    y, sr = librosa.load(str(wav))
    audio = librosa.frames_to_time(librosa.onset.onset_detect(onset_envelope=librosa.onset.onset_strength(y=y, sr=sr), sr=sr), sr=sr)
    used, inter = [False] * len(video), 0
    for a in audio:
        for j, v in enumerate(video):
            if not used[j] and v - 1 / fps < a < v + 1 / fps:
                used[j], inter = True, inter + 1
                break
    union = len(audio) + len(video) - inter
    return (inter / union if union else 0.0), np.array(traj)


def tree(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): p.stat().st_mtime_ns for p in root.rglob("*")}


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("clips")
    make_clip(folder, "sync")
    make_clip(folder, "late", shift=0.3)
    make_clip(folder, "aac_only", wav=False)
    return folder


def test_eval_workers_finish_after_this_process_decoded_video(clips, tmp_path):
    """``--workers`` after a decode in the same process (as the app or a notebook does): forked workers inherited
    FFmpeg's state, and PyAV 18.1.1's frame conversion waited forever on slice threads that exist only in the parent
    (the suite hung here); spawned workers finish. In a subprocess, so a hang is a timeout, not a stuck suite."""
    out = tmp_path / "eval.json"
    code = ("import sys\nfrom soe.cli.commands import main\nfrom soe.evaluate.decode import decode_clip, find_clips\n"
            f"[decode_clip(stem, path) for stem, path in find_clips({str(clips)!r}).items()]\n"
            f"sys.exit(main(['eval', {str(clips)!r}, '--out', {str(out)!r}, '--workers', '2']))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(out.read_text())["clips"]["sync"] == {"av_align": 1.0}


def test_av_align_is_one_on_the_motion_and_zero_when_shifted(clips):
    sync = decode_clip("sync", clips / "sync.mp4")
    assert sync.fps == FPS and sync.frames.shape == (int(SECONDS * FPS), SIZE, SIZE, 3)
    traj = ava.flow_trajectory(sync.frames)
    np.testing.assert_allclose(ava.video_peaks(traj, FPS), np.array(MOTION_FRAMES) / FPS)  # the jumps, nothing else
    assert ava.clip_av_align(sync) == 1.0
    assert ava.clip_av_align(decode_clip("late", clips / "late.mp4")) == 0.0
    assert ava.clip_av_align(decode_clip("aac_only", clips / "aac_only.mp4")) == 1.0  # the mp4's own AAC track


@pytest.mark.parametrize("stem", ["sync", "late"])
def test_av_align_equals_a_direct_reading_of_the_definition(clips, stem):
    expected, traj = official_av_align(clips / f"{stem}.mp4", clips / f"{stem}.wav")
    clip = decode_clip(stem, clips / f"{stem}.mp4")
    np.testing.assert_allclose(ava.flow_trajectory(clip.frames), traj, atol=0.02)  # PyAV's vs OpenCV's RGB conversion
    assert ava.clip_av_align(clip) == expected


def test_peak_iou_matches_each_video_peak_once():
    fps = 25.0
    assert ava.peak_iou(np.array([1.0, 1.01]), np.array([1.0]), fps) == 1 / 2  # two clicks, one motion: 1 / (2 + 1 - 1)
    assert ava.peak_iou(np.array([1.0]), np.array([1.04]), fps) == 0.0  # exactly one frame apart is not closer than one
    assert ava.peak_iou(np.array([]), np.array([]), fps) == 0.0
    assert list(ava.video_peaks(np.array([0, 0.5, 0.2, 0.05, 0.09, 0.0, 0.3, 0.3, 0.1]), 10.0)) == [0.1]


def test_eval_command_writes_json_and_table(clips, tmp_path, capsys):
    out = tmp_path / "eval.json"
    assert main(["eval", str(clips), "--out", str(out), "--workers", "2"]) == 0
    result = json.loads(out.read_text())
    assert result["clips"] == {"aac_only": {"av_align": 1.0}, "late": {"av_align": 0.0}, "sync": {"av_align": 1.0}}
    assert result["mean"] == {"av_align": pytest.approx(2 / 3)}
    assert result["failed"] == {} and result["set"] == {}
    assert set(result["skipped"]) == {"clap_score", "clip_score", "id_consistency", "wer", "desync", "sync_offset", "fd_audio", "fd_video"}
    assert "TempoTokens" in result["definitions"]["av_align"]
    text = capsys.readouterr().out
    assert "av_align" in text and "0.6667" in text
    # the same numbers in one process; an existing file is kept unless --force
    assert main(["eval", str(clips), "--out", str(out), "--metrics", "av_align"]) == 2
    assert main(["eval", str(clips), "--out", str(out), "--metrics", "av_align", "--force"]) == 0
    assert json.loads(out.read_text())["clips"] == result["clips"]


def test_a_clip_that_cannot_be_decoded_is_named_and_the_others_evaluated(clips, tmp_path, capsys):
    folder = tmp_path / "mixed"
    folder.mkdir()
    (folder / "sync.mp4").write_bytes((clips / "sync.mp4").read_bytes())
    (folder / "broken.mp4").write_bytes(b"not a video at all")
    assert main(["eval", str(folder), "--metrics", "av_align"]) == 1
    result = json.loads((folder / "eval.json").read_text())
    assert list(result["failed"]) == ["broken"] and result["clips"] == {"sync": {"av_align": 1.0}}
    err = [line for line in capsys.readouterr().err.splitlines() if "broken" in line]
    assert len(err) == 1 and "broken.mp4" in err[0]


def test_run_folder_gives_its_generated_clips(clips, tmp_path):
    run = tmp_path / "run"
    (run / "generated" / "a").mkdir(parents=True)
    (run / "generated" / "a" / "sample_00.mp4").write_bytes((clips / "sync.mp4").read_bytes())
    assert list(find_clips(run)) == ["generated/a/sample_00"]


@pytest.mark.parametrize("args, needle", [
    (["eval", "{missing}"], "no such folder"),
    (["eval", "{empty}"], "no video files"),
    (["eval", "{clips}", "--metrics", "av_align,fvd"], "unknown metric 'fvd'"),
    (["eval", "{clips}", "--models", "{missing}"], "--models"),
    (["eval", "{clips}", "--models", "{wrong_kind}"], "holds a 'whisper' model"),
    (["eval", "{clips}", "--models", "{no_config}"], "expected a transformers model folder"),
    (["eval", "{clips}", "--prompts", "{bad_prompts}"], "bad.jsonl:2"),
    (["eval", "{clips}", "--reference", "{missing}"], "--reference"),
    (["eval", "{clips}", "--workers", "-1"], "--workers"),
])
def test_bad_inputs_are_one_line_exit_2_and_write_nothing(clips, tmp_path, capsys, args, needle):
    empty, wrong, noconf = tmp_path / "empty", tmp_path / "models", tmp_path / "models2"
    empty.mkdir()
    (wrong / "clip").mkdir(parents=True)
    (wrong / "clip" / "config.json").write_text(json.dumps({"model_type": "whisper"}))
    (noconf / "dino").mkdir(parents=True)
    (tmp_path / "bad.jsonl").write_text('{"id": "sync", "prompt": "a"}\nnot json\n')
    paths = dict(missing=tmp_path / "nope", empty=empty, clips=clips, wrong_kind=wrong, no_config=noconf,
                 bad_prompts=tmp_path / "bad.jsonl")
    before, before_clips = tree(tmp_path), tree(clips)
    capsys.readouterr()
    assert main([a.format(**paths) for a in args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error:") and needle in err
    assert tree(tmp_path) == before and tree(clips) == before_clips
