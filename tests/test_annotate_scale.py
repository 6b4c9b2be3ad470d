"""`soe annotate` at scale: windows batched through the models, decoding ahead of them, one cache for every run.

Invariants checked: a batch (left-padded, masked, greedy) gives each window what it gets alone, for the Qwen2.5-Omni
thinker, an image-text captioner and Whisper; a run's rows do not depend on ``annotate.batch_size`` or
``--workers``; a second recipe cutting the same windows into another ``--out`` calls no model (the cache lives
in ``--cache`` / ``$SOE_CACHE_DIR/annotate``, not beside the output); Whisper hears a clip longer than 30 s in
30 s chunks and each window's language from that window's own sound; an image-text ``--captioner`` writes
captions and no sound descriptions; a window the file ends before is skipped alone, its clip's other
windows kept, and ``soe encode`` leaves that window out too.
"""
import dataclasses
import json
import shutil
from pathlib import Path

import test_annotate
import torch
from annotate_models import image_text_folder
from test_annotate import QUIET, SECONDS, TINY, annotate_cli, cache_lines, cache_of, report_of, rows
from test_encode import make_clip

from soe.cli import main
from soe.data import annotate_run, encode
from soe.data.annotate import VLMAnnotator
from soe.data.encode import EncodeConfig, encode_folder
from soe.data.media_io import read_speech, read_windows, safe_probe
from soe.data.omni import OmniAnnotator
from soe.data.transcript import WhisperTranscriber, words_in_window
from soe.recipe.reading import load_recipe

models, src, annotated = test_annotate.models, test_annotate.src, test_annotate.annotated  # the same module-scoped fixtures


def media(n_frames, seed):
    g = torch.Generator().manual_seed(seed)
    frames = torch.randint(0, 255, (n_frames, 56, 84, 3), generator=g, dtype=torch.uint8).numpy()
    return frames, torch.randn(8000 * n_frames, generator=g).numpy() * 0.1  # the sound of n_frames at 2 frames a second


def test_a_batch_gives_each_window_what_it_gets_alone(models):
    omni = OmniAnnotator(models[0], max_new_tokens=6)
    windows, prompts = [media(2, 0), media(4, 1), media(2, 2)], ["What is seen?", "Describe every sound you hear, briefly.", "Heard?"]
    batch = omni.inputs(windows, 2.0, prompts)
    mask = batch["attention_mask"]
    assert bool(mask[:, -1].all()) and not bool(mask[:, 0].all())  # shorter inputs padded on the left
    with torch.no_grad():
        together = omni.model(**batch, use_audio_in_video=True).logits[:, -1]
        alone = [omni.model(**omni.inputs([w], 2.0, [p]), use_audio_in_video=True).logits[0, -1] for w, p in zip(windows, prompts)]
    for i in range(3):
        torch.testing.assert_close(together[i], alone[i], rtol=1e-4, atol=1e-4)  # padding masked, positions its own
    assert not torch.allclose(alone[0], alone[1]) and not torch.allclose(alone[0], alone[2])  # each window its own answer
    assert omni.describe_batch(windows, 2.0, prompts) == [omni.describe(*w, 2.0, p) for w, p in zip(windows, prompts)]


def test_whisper_batches_clips_and_detects_each_windows_language(src, models):
    whisper = WhisperTranscriber(models[1])
    clips = [read_speech(src / name) for name in ("a.mp4", "b.mp4", "short.mp4")]  # 3 s, 2.2 s, 0.6 s
    alone = [whisper(audio, offset=first) for audio, first in clips]
    assert whisper.transcribe(clips, batch_size=3) == alone and alone[0] != alone[1]
    pieces = [clips[0][0][:16000], clips[1][0][16000:32000], clips[0][0][32000:48000]]
    assert whisper.languages(pieces, batch_size=2) == [whisper.languages([p])[0] for p in pieces] == ["en"] * 3
    assert WhisperTranscriber(models[1], language="en").languages(pieces) == ["en"] * 3  # told, not detected


def test_rows_do_not_depend_on_batch_size_or_workers(src, models, annotated, tmp_path):
    out = tmp_path / "batched.jsonl"  # annotated: one window a model call, decoded in this process's thread
    assert annotate_cli(src, out, models, "annotate.batch_size=3", "--workers", "2") == 0  # decoded in two processes
    assert out.read_text() == annotated.read_text()
    got = rows(out)
    assert len({r["caption"] for r in got}) > 1 and len({r["audio_caption"] for r in got}) > 1  # each window its own text
    report, one_by_one = report_of(out), report_of(annotated)
    assert (report["texts_new"], report["transcribed_new"]) == (one_by_one["texts_new"], one_by_one["transcribed_new"]) == (10, 1)
    assert one_by_one["batches"]["captioner"] == 10 and report["batches"]["captioner"] == 4  # 10 texts: 3 + 3 + 3 + 1
    ours = sorted(json.loads(line)["text"] for line in cache_lines(tmp_path / "cache") if '"field": "caption"' in line)
    assert ours == sorted(json.loads(line)["text"] for line in cache_lines(cache_of(annotated)) if '"field": "caption"' in line)


def test_a_second_recipe_with_the_same_windows_makes_no_model_call(src, models, annotated, tmp_path, monkeypatch):
    second = tmp_path / "second.yaml"  # another training recipe: same experts and data.seconds, so the same windows
    second.write_text(TINY.read_text().replace("name: tiny", "name: second").replace("lr: 2.0e-3", "lr: 1.0e-4")
                      .replace("direction: both ", "direction: a_to_b "))
    assert load_recipe(second, SECONDS).name == "second"
    monkeypatch.setenv("SOE_CACHE_DIR", str(tmp_path / "soe"))  # the default cache: $SOE_CACHE_DIR/annotate
    shutil.copytree(cache_of(annotated), tmp_path / "soe" / "annotate")

    def no_call(*args, **kwargs):
        raise AssertionError("a model was called")

    for cls, name in ((OmniAnnotator, "describe_batch"), (WhisperTranscriber, "transcribe"), (WhisperTranscriber, "languages")):
        monkeypatch.setattr(cls, name, no_call)
    out = tmp_path / "other" / "annotations.jsonl"  # another --out: its own FILE.parts/, the shared cache
    out.parent.mkdir()
    assert annotate_cli(src, out, models, recipe=second, cache=False) == 0
    report = report_of(out)
    assert (report["texts_new"], report["texts_cached"], report["transcribed_new"], report["transcribed_cached"]) == (0, 10, 0, 1)
    assert out.read_text() == annotated.read_text() and not (out.parent / "cache").exists()


def test_whisper_hears_a_long_clip_in_30_s_chunks_and_each_window_its_own_language(models, tmp_path, monkeypatch):
    d = tmp_path / "clips"
    d.mkdir()
    make_clip(d / "long.mp4", seconds=35.0)  # longer than Whisper's 30 s
    heard = []
    languages = WhisperTranscriber.languages

    def spy(self, audios, batch_size=1):
        heard.extend(len(a) for a in audios)
        return languages(self, audios, batch_size)

    monkeypatch.setattr(WhisperTranscriber, "languages", spy)
    out = tmp_path / "long.jsonl"
    assert main(["annotate", str(TINY), str(d), "--out", str(out), "--asr", str(models[1]), "--cache", str(tmp_path / "cache"),
                 "data.seconds=5.0"]) == 0
    got = rows(out)
    assert [(r["start"], r["end"]) for r in got] == [(5.0 * k, 5.0 * k + 5.0) for k in range(7)]
    whisper = WhisperTranscriber(models[1])
    audio, first = read_speech(d / "long.mp4")
    reference = whisper.pipe({"raw": audio, "sampling_rate": 16000}, return_timestamps="word", chunk_length_s=30,
                             generate_kwargs={"task": "transcribe"})["chunks"]  # the pipeline's chunked long-form mode
    words = whisper(audio, offset=first)
    assert [(w.text, w.start - first) for w in words] == [(c["text"], c["timestamp"][0]) for c in reference if c["text"].strip()]
    assert max(w.start for w in words) > 30.0  # the words past Whisper's first 30 s are heard
    for r in got:
        own = words_in_window(words, r["start"], 5.0)
        assert [(w["text"], w["start"]) for w in r["words"]] == [(w.text.strip(), w.start) for w in own]
        assert r["language"] == ("en" if own else None)  # detected where the window holds words
    assert heard == [5 * 16000] * sum(bool(r["words"]) for r in got) and heard  # each from its own window's 5 s


def test_an_image_text_captioner_writes_captions_batched(src, tmp_path):
    vl = image_text_folder(tmp_path / "vl")
    out = tmp_path / "vl.jsonl"
    assert main(["annotate", str(TINY), str(src), "--out", str(out), "--captioner", str(vl), "--cache", str(tmp_path / "cache"),
                 *SECONDS, "annotate.max_new_tokens=6", "annotate.batch_size=4"]) == 0
    got = rows(out)
    assert [(r["path"], r["start"]) for r in got] == [("a.mp4", 0.0), ("a.mp4", 1.0), ("a.mp4", 2.0), ("b.mp4", 0.0), ("b.mp4", 1.0)]
    assert all(r["audio_caption"] is None and r["models"]["audio_caption_prompt"] is None for r in got)  # it does not hear
    assert got[0]["models"]["captioner"].startswith("vl@") and [r["lyrics"] for r in got[:3]] == ["hello", "across", "edge late"]
    captioner = VLMAnnotator(vl, max_new_tokens=6)
    prompt = got[0]["models"]["caption_prompt"]
    for clip, size in (("a.mp4", (56, 56)), ("b.mp4", (56, 84))):
        windows = [r for r in got if r["path"] == clip]
        frames = [v for v, _ in read_windows(src / clip, [(r["start"], 2, 16000) for r in windows], 2.0, size, 16000)]
        assert [r["caption"] for r in windows] == [captioner.caption_batch([v], prompt)[0] for v in frames]  # each window alone
        assert captioner.caption_batch(frames, prompt) == [r["caption"] for r in windows]
    assert report_of(out)["batches"] == {"asr": 0, "language": 0, "captioner": 2}  # 5 windows, 4 a call


def test_a_window_the_file_ends_before_is_skipped_alone(src, models, tmp_path, monkeypatch):
    def too_long(path):  # a probe that overstates the clip (as a container's duration can): a window past its end
        info = safe_probe(path)
        return dataclasses.replace(info, seconds=info.seconds + 1.0) if Path(path).name == "a.mp4" else info

    monkeypatch.setattr(annotate_run, "safe_probe", too_long)
    d = tmp_path / "clips"
    d.mkdir()
    for name in ("a.mp4", "a.txt", "a.words.json"):
        shutil.copy(src / name, d / name)
    out = d / "annotations.jsonl"
    assert annotate_cli(d, out, models) == 0
    report = report_of(out)
    assert report["skipped_by_reason"] == {"truncated window": 1} and "3.00s" in report["skipped"][0]["detail"]
    assert (report["clips_annotated"], report["windows"], report["texts_new"]) == (1, 3, 6)  # the clip's 3 good windows
    assert [r["start"] for r in rows(out)] == [0.0, 1.0, 2.0] and all(r["caption"] for r in rows(out))

    monkeypatch.setattr(encode, "safe_probe", too_long)  # soe encode, probing the same: the window without a row is left out
    cfg = load_recipe(TINY, SECONDS)
    enc = encode_folder(cfg, d, tmp_path / "latents", EncodeConfig(annotations=str(out)), console=QUIET, progress=False)
    assert enc.by_reason == {"not annotated": 1} and (enc.windows_new, enc.clips_encoded) == (3, 1)
