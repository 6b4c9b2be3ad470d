"""`soe encode`: real mp4 files (made here with PyAV) -> latent cache -> training.

Invariants checked: the report names every unusable clip with its reason; windows, buckets and
captions in the index; latents have the experts' shapes and agree in seconds; the cached latents
are exactly each codec's encoding of an independently decoded window (and of no other window), so
decode(latent) is as close to the input as the codec itself allows; a killed run resumes to the
same cache; text encoders match the diffusers / ACE-Step recipe; training reads the result.
"""
import dataclasses
import json
import os
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from rich.console import Console

from soe.cli import main
from soe.data.annotate import AnnotatorError, VLMAnnotator
from soe.data.encode import EncodeConfig, encode_folder
from soe.data.latent_cache import LatentCacheError, validate_clip_shapes
from soe.data.stream_read import load_cache
from soe.data.stream_writer import PartWriter
from soe.recipe.builders import build_expert
from soe.recipe.reading import load_recipe

DEMO = Path(__file__).parents[1] / "tests" / "recipes" / "tiny.yaml"  # tiny random experts: fast; recipes/demo.yaml is tested in test_first_run.py
QUIET = Console(file=open("/dev/null", "w"))
SECONDS = ["data.seconds=1.0"]
V1 = ["experts.b.name=ace-step", "experts.b.options={sample_rate: 25600}"]


def make_clip(path, seconds=3.0, fps=25, size=(64, 64), sr=48000, audio=True, layout="stereo"):
    """Red = fraction of the current second, green = horizontal ramp, blue = odd seconds, a moving
    white square; audio a tone whose pitch steps up every second. Every window looks and sounds different."""
    h, w = size
    with av.open(str(path), "w") as c:
        vs = c.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
        vs.width, vs.height, vs.pix_fmt = w, h, "yuv420p"
        vs.options = {"crf": "10", "preset": "ultrafast"}
        if audio:
            astream = c.add_stream("aac", rate=sr)
            astream.layout = layout
        xx = np.mgrid[0:h, 0:w][1]
        for i in range(int(round(seconds * fps))):
            t = i / fps
            img = np.zeros((h, w, 3), np.uint8)
            img[..., 0], img[..., 1], img[..., 2] = int(255 * (t % 1.0)), xx * 255 // w, 255 * (int(t) % 2)
            x0 = int((t * 20) % (w - 8))
            img[8:16, x0:x0 + 8] = 255
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            frame.pts = i
            for p in vs.encode(frame):
                c.mux(p)
        for p in vs.encode():
            c.mux(p)
        if audio:
            n = int(seconds * sr)
            wave = 0.5 * np.sin(2 * np.pi * np.cumsum(220 * (1 + np.floor(np.arange(n) / sr))) / sr)
            data = np.stack([wave.astype(np.float32)] * (2 if layout == "stereo" else 1))
            for s in range(0, n, 1024):
                fr = av.AudioFrame.from_ndarray(np.ascontiguousarray(data[:, s:s + 1024]), format="fltp", layout=layout)
                fr.sample_rate, fr.pts = sr, s
                for p in astream.encode(fr):
                    c.mux(p)
            for p in astream.encode():
                c.mux(p)
    return Path(path)


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    d = tmp_path_factory.mktemp("clips")
    make_clip(d / "a.mp4")  # 3 windows of 1 s
    (d / "a.txt").write_text("a white square slides while a tone rises")
    sub = d / "sub"
    sub.mkdir()
    make_clip(sub / "b.mov", seconds=2.2, fps=30, size=(64, 96), sr=44100, layout="mono")  # wide, 30 fps, mono 44.1 kHz
    (d / "captions.jsonl").write_text('{"path": "sub/b.mov", "caption": "a wide clip", "audio_caption": "a hum", "lyrics": "la la\\nla"}\n')
    make_clip(d / "silent.mp4", seconds=1.5, audio=False)
    (d / "silent.txt").write_text("no sound")
    make_clip(d / "short.mp4", seconds=0.6)
    (d / "short.txt").write_text("too short")
    make_clip(d / "nocap.mp4", seconds=1.2)
    (d / "corrupt.mp4").write_bytes(np.random.default_rng(0).bytes(4000))
    (d / "corrupt.txt").write_text("unreadable")
    return d


def encode(src, out, overrides=(), **kw):
    cfg = load_recipe(DEMO, [*SECONDS, *overrides])
    return encode_folder(cfg, src, out, kw.pop("settings", EncodeConfig(shard_size=2)), console=QUIET, progress=False, **kw)


@pytest.fixture(scope="module")
def demo_cache(src, tmp_path_factory):
    out = tmp_path_factory.mktemp("cache") / "demo"
    return out, encode(src, out)


def experts_of(*overrides):
    cfg = load_recipe(DEMO, [*SECONDS, *overrides])
    return {s: build_expert(cfg, s) for s in ("a", "b")}


def cached(out):
    """meta, rows and windows, in clip order (the index lists windows in the order their chunks were committed)."""
    meta, rows, windows = load_cache(out)
    order = sorted(range(len(rows)), key=lambda i: (rows[i]["source"], rows[i]["start"]))
    return meta, [rows[i] for i in order], [windows[i] for i in order]


def test_report_lists_every_skipped_clip_and_index_lists_windows(demo_cache):
    out, report = demo_cache
    assert report.by_reason == {"no audio": 1, "too short": 1, "unreadable": 1, "no caption": 1}
    assert {s["path"] for s in report.skipped} == {"silent.mp4", "short.mp4", "corrupt.mp4", "nocap.mp4"}
    assert (report.clips, report.clips_encoded, report.windows_new, report.windows_cached) == (6, 2, 5, 0)
    assert report.seconds_new == pytest.approx(5.0) and report.shards == 3  # shard_size 2
    meta, rows, _ = cached(out)
    assert meta["experts"] == {"a": "wan2.1", "b": "ace-step-1.5"} and meta["encode"]["sample_rate"] == 48000
    assert [(r["source"], r["start"]) for r in rows] == [("a.mp4", 0.0), ("a.mp4", 1.0), ("a.mp4", 2.0), ("sub/b.mov", 0.0), ("sub/b.mov", 1.0)]
    assert len({r["id"] for r in rows}) == 5 and {r["bucket"] for r in rows} == {"1s@64x64"}
    assert rows[3]["caption"] == "a wide clip" and rows[3]["audio_caption"] == "a hum"  # from captions.jsonl
    assert (out / "encode_report.json").is_file() and not list(out.glob("*.tmp"))


def test_shapes_fit_the_experts_and_agree_in_seconds(demo_cache):
    out, _ = demo_cache
    _, rows, clips = cached(out)
    experts = experts_of()
    validate_clip_shapes(clips, rows, experts, out)  # what PairedLatentDataModule checks
    for clip in clips:
        assert clip["a"]["latents"].shape == (4, 7, 8, 8) and clip["b"]["latents"].shape == (25, 4)
        video_s = clip["a"]["latents"].shape[1] / experts["a"].latent_rate  # 7 / 6.25 s: 25 frames = 1 + 4 * 6
        audio_s = clip["b"]["latents"].shape[0] / experts["b"].latent_rate  # 25 / 25 s
        assert abs(video_s - audio_s) <= 1 / experts["a"].latent_rate
        assert clip["a"]["encoder_hidden_states"].shape == (8, 32)


def reference_window(path, start, frames, samples):
    """The same window decoded the plain way: every frame and sample from the start (a.mp4 is already at
    the target 25 fps, 64x64, 48 kHz stereo, so no resampling is involved)."""
    with av.open(str(path)) as c:
        video = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])
    with av.open(str(path)) as c:
        audio = np.concatenate([f.to_ndarray() for f in c.decode(audio=0)], axis=1)
    k, i = round(start * 25), round(start * 48000)
    v = torch.from_numpy(video[k:k + frames]).permute(3, 0, 1, 2)[None].float() / 127.5 - 1  # (1, 3, F, H, W)
    return v, torch.from_numpy(audio[:, i:i + samples])[None]  # (1, 2, N)


@torch.no_grad()
def test_cached_latents_are_the_codec_encoding_of_their_window_and_round_trip(src, demo_cache):
    out, _ = demo_cache
    _, rows, clips = cached(out)
    experts = experts_of()
    codec_v, codec_a = experts["a"].codec(), experts["b"].codec()  # the same tiny codecs (seeded)
    picks = (0, 2)  # windows at 0 s and 2 s of a.mp4
    refs = [reference_window(src / "a.mp4", rows[k]["start"], 25, 48000) for k in picks]
    ev, ea = codec_v.encode(torch.cat([v for v, _ in refs])), codec_a.encode(torch.cat([a for _, a in refs]))
    enc = [(ev[i: i + 1], ea[i: i + 1]) for i in range(len(picks))]
    for k in range(len(picks)):
        zv, za = clips[picks[k]]["a"]["latents"][None], clips[picks[k]]["b"]["latents"][None]
        torch.testing.assert_close(zv, enc[k][0], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(za, enc[k][1], atol=1e-4, rtol=1e-4)
        for j in set(range(len(picks))) - {k}:  # non-vacuous: the other window encodes to clearly different latents
            assert (zv - enc[j][0]).abs().mean() > 100 * (zv - enc[k][0]).abs().mean() + 1e-3
            assert (za - enc[j][1]).abs().mean() > 100 * (za - enc[k][1]).abs().mean() + 1e-3
    v, a = refs[0]  # round trip of one window (decoding is the slow part on CPU), both latents in one batch
    for codec, z, x in ((codec_v, clips[0]["a"]["latents"][None], v), (codec_a, clips[0]["b"]["latents"][None], a)):
        y, y_own = codec.decode(torch.cat([z, codec.encode(x)])).chunk(2)
        n = min(x.shape[-1], y.shape[-1])  # Oobleck decodes one sample short
        own = (y_own[..., :n] - x[..., :n]).pow(2).mean()  # the codec's own error on this window
        ours = (y[..., :n] - x[..., :n]).pow(2).mean()
        assert ours <= own * 1.001 + 1e-6


def test_video_is_cropped_resampled_and_audio_resampled(src):
    from soe.data.media_io import read_windows

    (frames, audio), = read_windows(src / "sub" / "b.mov", [(1.0, 21, 48000)], 25.0, (64, 64), 48000)
    assert frames.shape == (21, 64, 64, 3) and audio.shape == (2, 48000)
    green = frames[..., 1].astype(float)  # the ramp of the central 64 of 96 columns: 255 * 16/96 .. 255 * 80/96
    assert 35 < green[:, 20:40, 1].mean() < 50 and 205 < green[:, 20:40, -2].mean() < 220
    red = frames[:, 30:, 30, 0].astype(float).mean(1)  # 255 * fraction of the second, sampled at 25 fps
    assert np.abs(red - 255 * (np.arange(21) / 25)).max() < 12
    assert np.allclose(audio[0], audio[1]) and 0.3 < np.abs(audio).max() <= 0.55  # mono upmixed, level kept


def test_resume_after_a_kill_gives_the_same_cache(src, demo_cache, tmp_path, monkeypatch):
    ref_out, _ = demo_cache
    src_a = tmp_path / "src"  # a.mp4 alone: 3 windows, the first 3 of the demo cache (same ids)
    src_a.mkdir()
    for name in ("a.mp4", "a.txt"):
        (src_a / name).symlink_to(src / name)
    src, out = src_a, tmp_path / "killed"
    real_commit, calls = PartWriter._commit, []

    def dying_commit(self, bucket, records):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # killed after the first shard
        real_commit(self, bucket, records)

    monkeypatch.setattr(PartWriter, "_commit", dying_commit)
    with pytest.raises(KeyboardInterrupt):
        encode(src, out)
    monkeypatch.setattr(PartWriter, "_commit", real_commit)
    log = out / "parts" / "part-0-of-1.jsonl"
    assert sum(len(json.loads(line)["rows"]) for line in log.read_text().splitlines()) == 2
    with pytest.raises(LatentCacheError, match="not merged yet"):  # nothing half-written is readable
        load_cache(out)
    # what else a kill can leave: a torn log line, a chunk written but never committed, litdata's part index
    with open(log, "a") as f:
        f.write('{"bucket": "1s@64x64", "chu')
    chunks = out / "windows" / "1s@64x64"
    (chunks / "chunk-0-7.bin").write_bytes((chunks / "chunk-0-0.bin").read_bytes())
    (chunks / "0.index.json").write_text("{}")
    report = encode(src, out)
    assert (report.windows_cached, report.windows_new) == (2, 1)
    _, rows, clips = cached(out)
    _, ref_rows, ref_clips = cached(ref_out)
    ref_rows, ref_clips = ref_rows[:3], ref_clips[:3]
    assert [r["id"] for r in rows] == [r["id"] for r in ref_rows]  # no duplicates, nothing lost, same order
    for c, rc in zip(clips, ref_clips):
        for side in ("a", "b"):
            assert c[side].keys() == rc[side].keys()
            for k in c[side]:
                torch.testing.assert_close(c[side][k], rc[side][k], atol=1e-5, rtol=1e-5)
    assert not list(out.rglob("*.tmp")) and not (chunks / "chunk-0-7.bin").exists() and not (chunks / "0.index.json").exists()
    again = encode(src, out)  # a finished cache: nothing to do
    assert (again.windows_new, again.windows_cached) == (0, 3)
    with pytest.raises(Exception, match="other settings"):
        encode(src, out, ["data.seconds=2.0"])


def test_annotator_captions_windows_without_one(src, tmp_path):
    seen = []

    def fake(frames, audio, sample_rate):
        seen.append((frames.shape, audio.shape, sample_rate))
        return f"window {len(seen)}"

    folder = tmp_path / "one"
    folder.mkdir()
    (folder / "nocap.mp4").symlink_to(src / "nocap.mp4")
    encode(folder, tmp_path / "cache", annotator=fake)
    _, rows, _ = load_cache(tmp_path / "cache")
    assert [(r["caption"], r.get("annotated")) for r in rows] == [("window 1", True)]
    assert seen == [((25, 64, 64, 3), (2, 48000), 48000)]
    with pytest.raises(AnnotatorError, match="no transformers model"):
        VLMAnnotator(tmp_path)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text('{"model_type": "nonsense"}')
    with pytest.raises(AnnotatorError, match="not a vision-language model"):
        VLMAnnotator(tmp_path / "bad")


def test_cli_bad_input_is_one_line_and_exit_2(src, tmp_path, capsys):
    assert main(["encode", str(DEMO), str(tmp_path / "missing"), "--out", str(tmp_path / "c")]) == 2
    assert main(["encode", str(DEMO), str(src), "--out", str(tmp_path / "c"), "--workers", "many"]) == 2
    assert main(["encode", str(DEMO), str(src), "--out", str(tmp_path / "c"), "encode.batch_size=0"]) == 2
    assert main(["encode", str(DEMO), str(src), "--out", str(tmp_path / "c"), "experts.a.codec_path=/nowhere"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 4 and all(line.startswith("error:") for line in err)
    assert "source folder not found" in err[0] and "--workers" in err[1] and "encode.batch_size" in err[2] and "codec_path" in err[3]


def tiny_umt5_folder(folder: Path, d_model: int, words: list[str]) -> Path:
    """A random 1-layer UMT5 encoder + a WordLevel tokenizer, saved the way real checkpoints are (no network)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    torch.manual_seed(0)
    model = UMT5EncoderModel(UMT5Config(vocab_size=len(vocab), d_model=d_model, d_kv=8, d_ff=32, num_layers=1, num_heads=2))
    return folder, fast, model


WORDS = "a white square slides while tone rises wide clip hum".split()


def wan_text_folder(root: Path) -> Path:
    _, tok, model = tiny_umt5_folder(root, 32, WORDS)
    model.save_pretrained(root / "text_encoder")
    tok.save_pretrained(root / "tokenizer")
    return root


def ace_text_folder(root: Path) -> Path:
    from tokenizers import Tokenizer, models

    _, tok, model = tiny_umt5_folder(root, 768, WORDS)
    model.save_pretrained(root / "umt5-base")
    tok.save_pretrained(root / "umt5-base")
    lyric = Tokenizer(models.BPE({c: i for i, c in enumerate("abcdefghijklmnopqrstuvwxyz")}, []))
    lyric.add_special_tokens(["[en]", "[SPACE]"])
    lyric.save(str(root / "vocab.json"))
    return root


@torch.no_grad()
def test_text_encoders_follow_diffusers_and_ace_step(tmp_path):
    from soe import get_expert
    from soe.experts.text_encoders import LYRIC_LINE_END, LYRIC_START

    wan = get_expert("wan2.1").tiny()
    enc = wan.text_encoder(wan_text_folder(tmp_path / "wan"))
    h = enc(["a white  square", "wide clip hum tone rises"])["encoder_hidden_states"]  # (2, text_len 8, 32)
    assert h.shape == (2, 8, 32)
    assert h[0, :3].abs().min() > 0 and (h[0, 3:] == 0).all() and (h[1, 5:] == 0).all()  # zeros past each prompt
    ids = enc.tokenizer(["a white square"], padding="max_length", max_length=8, return_tensors="pt")
    ref = enc.encoder(ids.input_ids, ids.attention_mask).last_hidden_state  # diffusers: states of real tokens kept as is
    torch.testing.assert_close(h[0, :3], ref[0, :3])

    v1 = get_expert("ace-step").tiny()
    enc = v1.text_encoder(ace_text_folder(tmp_path / "ace"))
    out = enc(["a hum", "wide clip"], lyrics=["la la\n\nab", None])
    assert out["text_hidden_states"].shape == (2, 256, 768) and out["text_attention_mask"][0].sum() == 2
    assert (out["speaker_embeds"] == 0).all() and out["speaker_embeds"].shape == (2, 512)
    lyric = out["lyric_token_ids"][0][: int(out["lyric_mask"][0].sum())].tolist()
    assert lyric[0] == LYRIC_START and lyric.count(LYRIC_LINE_END) == 3 and lyric[-1] == LYRIC_LINE_END
    assert out["lyric_mask"][1].sum() == 0 and (out["lyric_token_ids"][1] == 0).all()  # no lyrics: ACE-Step's empty
    with pytest.raises(NotImplementedError, match="ace-step-1.5"):
        get_expert("ace-step-1.5").tiny().text_encoder(tmp_path)


@pytest.mark.slow
def test_wan_with_ace_step_v1_text_encoders_workers_and_aspect_buckets(src, tmp_path):
    """UniVerse-1's pair (audio at 25.6 kHz, both latents at 6.25/s) with real (tiny) text encoders,
    two decode processes, and aspect-ratio buckets."""
    te = [f"experts.a.text_encoder_path={wan_text_folder(tmp_path / 'wan')}", f"experts.b.text_encoder_path={ace_text_folder(tmp_path / 'ace')}"]
    out = tmp_path / "v1"
    settings = EncodeConfig(shard_size=2, resolutions=[[64, 64], [64, 96]])
    report = encode(src, out, [*V1, *te], settings=settings, workers=2)
    assert report.windows_new == 5 and report.by_reason["no audio"] == 1
    meta, rows, clips = cached(out)
    assert meta["experts"]["b"] == "ace-step" and meta["encode"]["sample_rate"] == 25600
    assert [r["bucket"] for r in rows] == ["1s@64x64"] * 3 + ["1s@64x96"] * 2 and rows[3]["resolution"] == [64, 96]
    experts = experts_of(*V1)
    validate_clip_shapes(clips, rows, experts, out)
    for clip, row in zip(clips, rows):
        w = 8 if row["resolution"] == [64, 64] else 12
        assert clip["a"]["latents"].shape == (4, 7, 8, w) and clip["b"]["latents"].shape == (8, 16, 7)  # 1 s = 25 frames: 7 latents each
        assert clip["b"]["text_hidden_states"].shape == (256, 768) and clip["b"]["lyric_token_ids"].dtype == torch.long
    assert clips[3]["b"]["lyric_mask"].sum() > 0 and clips[0]["b"]["lyric_mask"].sum() == 0  # b.mov has lyrics
    cfg = load_recipe(DEMO, [*SECONDS, *V1, *te])
    enc = experts["b"].text_encoder(cfg.experts.b.text_encoder_path)
    want = enc(["a hum"])["text_hidden_states"][0]  # the audio caption, padded to 256 tokens by the encoder
    assert meta["storage"]["text"] == "bfloat16" and (want[-1] == 0).all()  # stored trimmed, padded back at load
    assert torch.equal(clips[3]["b"]["text_hidden_states"], want.bfloat16().float())
    sequential = encode(src, tmp_path / "seq", [*V1, *te], settings=settings)
    _, _, seq = cached(tmp_path / "seq")
    for c, s in zip(clips, seq):
        torch.testing.assert_close(c["a"]["latents"], s["a"]["latents"])  # workers change nothing
    assert sequential.windows_new == 5


@pytest.mark.slow
def test_training_runs_on_the_encoded_cache(demo_cache, tmp_path):
    from soe.cli.stitch import run_training

    out, _ = demo_cache
    result = run_training(DEMO, [*SECONDS, "data.kind=latents", f"data.path={out}", "data.batch_size=2", "trainer.max_steps=2",
                                 "trainer.log_every_n_steps=1", f"run_dir={tmp_path / 'run'}"], console=QUIET, progress=False)
    assert result["trainer"].global_step == 2


def _encode_cli(src, out, *extra):
    return [sys.executable, "-m", "soe.cli", "encode", str(DEMO), str(src),
            "--out", str(out), *SECONDS, "encode.shard_size=2", *extra]


@pytest.mark.slow
def test_two_processes_encoding_shards_equal_one_process(src, tmp_path):
    """`soe encode --shard 0/2` and `--shard 1/2` at once (2 CPU processes; the last one merges) against
    one `soe encode` process over the same clips."""
    out, one = tmp_path / "sharded", tmp_path / "one"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1]), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen(_encode_cli(src, o, *extra), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for o, extra in ((out, ("--shard", "0/2")), (out, ("--shard", "1/2")), (one, ()))]
    for p in procs:
        _, err = p.communicate(timeout=900)
        assert p.returncode == 0, err[-2000:]
    ref_meta, ref_rows, ref_windows = cached(one)
    meta, rows, windows = cached(out)
    assert meta["parts"] == 2 and meta["buckets"] == ref_meta["buckets"] and meta["text_lengths"] == ref_meta["text_lengths"]
    assert {p.name for p in (out / "parts").glob("*.done")} == {"part-0-of-2.done", "part-1-of-2.done"}
    drop = lambda r: {k: v for k, v in r.items() if k != "chunk"}  # noqa: E731  (chunk file names differ)
    assert [drop(r) for r in rows] == [drop(r) for r in ref_rows]
    for w, rw in zip(windows, ref_windows):
        for side in ("a", "b"):
            assert w[side].keys() == rw[side].keys()
            assert all(torch.equal(w[side][k], rw[side][k]) for k in w[side] if k != "latents")  # text states: bit-equal
            # latents: the codec sees other batches (a part holds other windows), float32 rounding differs by ~1e-7
            torch.testing.assert_close(w[side]["latents"], rw[side]["latents"], rtol=1e-5, atol=1e-5)


def test_same_shard_twice_and_bad_shard_are_one_line(src, tmp_path, capsys):
    out = tmp_path / "busy"
    holder = PartWriter(out, {"a": "wan2.1", "b": "ace-step-1.5"}, {}, part=1, parts=2)  # another process holds 1/2
    try:
        assert main(["encode", str(DEMO), str(src), "--out", str(out), "--shard", "1/2", *SECONDS]) == 2
    finally:
        holder.close()
    assert main(["encode", str(DEMO), str(src), "--out", str(out), "--shard", "2/2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "shard 1/2 is being encoded by another process" in err[0] and "--shard expects I/N" in err[1]
    assert not list(out.rglob("*.bin")) and not (out / "index.jsonl").exists()  # nothing written


def make_vfr_mkv(path, video_s=2.5, audio_s=3.4, size=(64, 64), sr=48000):
    """A variable-frame-rate Matroska clip: video pts in ms with irregular gaps (30-50 ms, ~25 fps on average),
    an audio track of another length; Matroska stores no per-stream duration, only the container's (the longest)."""
    h, w = size
    with av.open(str(path), "w", format="matroska") as c:
        vs = c.add_stream("libx264", rate=25)
        vs.width, vs.height, vs.pix_fmt, vs.time_base = w, h, "yuv420p", Fraction(1, 1000)
        vs.options = {"crf": "10", "preset": "ultrafast", "bf": "0"}
        astream = c.add_stream("aac", rate=sr)
        astream.layout = "stereo"
        t, i = 0, 0
        while t < video_s * 1000:
            img = np.zeros((h, w, 3), np.uint8)
            img[..., 0] = int(255 * (t / 1000 % 1.0))
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            frame.pts, frame.time_base = t, Fraction(1, 1000)
            for p in vs.encode(frame):
                c.mux(p)
            t, i = t + (30, 50, 40, 35, 45)[i % 5], i + 1
        for p in vs.encode():
            c.mux(p)
        n = int(audio_s * sr)
        wave = np.stack([(0.3 * np.sin(2 * np.pi * 440 * np.arange(n) / sr)).astype(np.float32)] * 2)
        for s in range(0, n, 1024):
            fr = av.AudioFrame.from_ndarray(np.ascontiguousarray(wave[:, s:s + 1024]), format="fltp", layout="stereo")
            fr.sample_rate, fr.pts = sr, s
            for p in astream.encode(fr):
                c.mux(p)
        for p in astream.encode():
            c.mux(p)
    return Path(path)


def test_probe_measures_streams_without_a_duration(tmp_path):
    from soe.data.media_io import probe

    longer_audio = make_vfr_mkv(tmp_path / "a.mkv", video_s=2.5, audio_s=3.4)  # last frame at 2.480 s, shown 40 ms
    with av.open(str(longer_audio)) as c:
        assert c.streams.video[0].duration is None and c.duration / av.time_base > 3.3  # the premise
    assert probe(longer_audio).seconds == pytest.approx(2.52, abs=1e-3)
    shorter_audio = make_vfr_mkv(tmp_path / "b.mkv", video_s=2.5, audio_s=1.7)
    assert 1.7 <= probe(shorter_audio).seconds <= 1.75  # AAC pads to whole 1024-sample frames


def test_vfr_mkv_gets_the_windows_of_its_real_extent(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    make_vfr_mkv(src / "vfr.mkv")  # 2.52 s of video, 3.4 s of audio, 3.42 s container: two windows of 1 s
    (src / "vfr.txt").write_text("a red fade")
    report = encode(src, tmp_path / "out")
    assert report.skipped == [] and (report.windows_new, report.clips_encoded) == (2, 1)
    _, rows, _ = cached(tmp_path / "out")
    assert [(r["source"], r["start"]) for r in rows] == [("vfr.mkv", 0.0), ("vfr.mkv", 1.0)]
    from soe.data.media_io import read_windows

    (frames, _), = read_windows(src / "vfr.mkv", [(1.0, 25, 48000)], 25.0, (64, 64), 48000)
    red = frames[:, 32, 32, 0].astype(float)  # each target time gets the frame nearest to it: red = 255 * its time's fraction
    assert np.abs(red - 255 * (np.arange(25) / 25)).max() < 20


def test_a_window_that_fails_to_read_keeps_the_clips_other_windows(src, tmp_path, monkeypatch):
    from soe.data import encode as encode_module
    from soe.data.media_io import safe_probe

    def too_long(path):  # a probe that overstates the clip (as the container's duration can): a window past its end
        info = safe_probe(path)
        return dataclasses.replace(info, seconds=info.seconds + 1.0) if Path(path).name == "a.mp4" else info

    monkeypatch.setattr(encode_module, "safe_probe", too_long)
    only = tmp_path / "src"
    only.mkdir()
    for name in ("a.mp4", "a.txt"):
        (only / name).write_bytes((src / name).read_bytes())
    report = encode(only, tmp_path / "out")
    assert report.by_reason == {"truncated window": 1} and report.skipped[0]["path"] == "a.mp4"
    assert "3.00s" in report.skipped[0]["detail"] and (report.windows_new, report.clips_encoded) == (3, 1)
    _, rows, _ = cached(tmp_path / "out")
    assert [r["start"] for r in rows] == [0.0, 1.0, 2.0]
