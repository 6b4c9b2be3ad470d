"""`soe annotate`: each training window's own caption, sound description and transcript, then `soe encode` reading them.

Models are tiny random-weight Whisper and Qwen2.5-Omni folders saved like the released ones (tests/annotate_models.py)
and loaded through transformers' own loading paths. Invariants checked: a window keeps exactly the words whose
midpoint it holds; the thinker loaded from the released layout holds the released model's weights and its answer
depends on the window's frames and on its sound, interleaved by time; annotations are cut exactly where encode cuts, cached by
(clip, window, model, prompt) so a rerun computes nothing and another prompt recomputes only its own texts; two
shards equal one process; a killed run resumes; encode reads each window's own text and a clip without
annotations exactly as before; bad input is one line, exit status 2, nothing written.
"""
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from annotate_models import omni_folder, whisper_folder
from rich.console import Console
from test_encode import make_clip

from soe.cli import main
from soe.data.annotate import AnnotatorError
from soe.data.annotate_run import annotate_folder, window_plan
from soe.data.annotation_store import AnnotationStore, clip_hash, read_selection
from soe.data.annotations_file import ROW_FIELDS, work_folder
from soe.data.encode import EncodeConfig, encode_folder
from soe.data.media_io import read_speech, read_windows
from soe.data.omni import OmniAnnotator
from soe.data.stream_read import load_cache
from soe.data.transcript import WhisperTranscriber, Word, join_words, read_words, words_in_window
from soe.data.windows import plan_windows
from soe.errors import UsageError
from soe.recipe.reading import load_recipe
from soe.schema import AnnotateConfig

TINY = Path(__file__).parent / "recipes" / "tiny.yaml"
QUIET = Console(file=open("/dev/null", "w"))
SECONDS = ["data.seconds=1.0"]
TOKENS = "annotate.max_new_tokens=6"
SIDECAR = [{"word": " hello", "start": 0.2, "end": 0.6}, {"word": " across", "start": 0.7, "end": 1.4},  # middle 1.05: window 1
           {"word": " edge", "start": 1.6, "end": 2.5}, {"word": " late", "start": 2.6, "end": 2.9},  # middle 2.05: window 2
           {"word": " after", "start": 3.1, "end": 3.5}]  # after the last window (the clip is 3 s): dropped


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return omni_folder(root / "omni", seed=2), whisper_folder(root / "whisper")  # seed 2: answers differ by window and length


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    d = tmp_path_factory.mktemp("clips")
    make_clip(d / "a.mp4")  # 3 windows of 1 s; a human caption and a word-timed transcript of its own
    (d / "a.txt").write_text("a human caption")
    (d / "a.words.json").write_text(json.dumps({"segments": [{"words": SIDECAR}]}))  # openai-whisper's layout
    make_clip(d / "b.mp4", seconds=2.2, fps=30, size=(64, 96), sr=44100, layout="mono")  # no caption: Whisper transcribes it
    make_clip(d / "short.mp4", seconds=0.6)
    return d


def annotate_cli(src, out, models, *extra, cache=None, recipe=TINY):
    """``soe annotate`` with both tiny models; the cache in ``cache`` (default: ``cache/`` beside ``out``; False: none given)."""
    omni, whisper = models
    cached = [] if cache is False else ["--cache", str(cache or Path(out).parent / "cache")]
    return main(["annotate", str(recipe), str(src), "--out", str(out), "--captioner", str(omni), "--asr", str(whisper), *SECONDS,
                 TOKENS, *cached, *extra])


@pytest.fixture(scope="module")
def annotated(src, models, tmp_path_factory):
    out = tmp_path_factory.mktemp("ann") / "annotations.jsonl"
    assert annotate_cli(src, out, models, "annotate.batch_size=1") == 0  # one window a model call
    return out


def clip_windows(out, clip):
    selection = read_selection(work_folder(out))["selection"]
    return AnnotationStore(work_folder(out)).records[("clip", clip_hash(clip), selection)]["windows"]


def cache_of(out):
    return Path(out).parent / "cache"


def rows(out):
    return [json.loads(line) for line in Path(out).read_text().splitlines()]


def report_of(out):
    return json.loads((work_folder(out) / "annotate_report.json").read_text())


def log_lines(out):
    return (work_folder(out) / "parts" / "part-0-of-1.jsonl").read_text().splitlines()


def cache_lines(cache):
    return [line for log in sorted((Path(cache) / "parts").glob("*.jsonl")) for line in log.read_text().splitlines()]


def test_a_window_keeps_the_words_whose_midpoint_it_holds(tmp_path):
    words = [Word(w["word"], w["start"], w["end"]) for w in SIDECAR]
    windows = [[w.text for w in words_in_window(words, s, 1.0)] for s in (0.0, 1.0, 2.0)]
    assert windows == [[" hello"], [" across"], [" edge", " late"]]  # "across" spans 0.7-1.4 s: window 1 only
    assert sum(windows, []) == [w.text for w in words[:-1]]  # every word in at most one window, in order
    assert join_words(words[2:4]) == "edge late" and join_words([Word("你", 0, 1), Word("好", 1, 2)]) == "你好"
    assert join_words([Word("plain", 0, 1), Word("words", 1, 2)]) == "plain words" and join_words([]) == ""
    layouts = {"list.json": SIDECAR, "segments.json": {"segments": [{"words": SIDECAR[:2]}, {"words": SIDECAR[2:]}]},
               "chunks.json": {"chunks": [{"text": w["word"], "timestamp": [w["start"], w["end"]]} for w in SIDECAR]}}
    for name, data in layouts.items():  # a list of words, openai-whisper / WhisperX, the transformers pipeline
        (tmp_path / name).write_text(json.dumps(data))
        assert read_words(tmp_path / name) == words, name
    for bad, message in (("{", "not a readable JSON"), ('[{"word": "x", "start": 2, "end": 1}]', "word 0 needs"),
                         ('{"chunks": 3}', "expected a list of words"),
                         ('[{"word": "b", "start": 2, "end": 3}, {"word": "a", "start": 1, "end": 2}]', "words out of order: word 1")):
        (tmp_path / "bad.json").write_text(bad)
        with pytest.raises(UsageError, match=message) as err:
            read_words(tmp_path / "bad.json")
        assert str(tmp_path / "bad.json") in str(err.value) and "\n" not in str(err.value)


def test_whisper_words_are_its_pipelines_word_timestamps_on_the_clip_timeline(src, models, tmp_path):
    from transformers import pipeline

    audio, first = read_speech(src / "b.mp4")
    assert audio.ndim == 1 and abs(len(audio) / 16000 - 2.2) < 0.05
    offset = first + 10.0
    words = WhisperTranscriber(models[1], language="en")(audio, offset=offset)
    ref = pipeline("automatic-speech-recognition", model=str(models[1]))(
        {"raw": audio, "sampling_rate": 16000}, return_timestamps="word", generate_kwargs={"task": "transcribe", "language": "en"})
    ref = [(c["text"], offset + c["timestamp"][0]) for c in ref["chunks"] if c["text"].strip()]
    assert words and [(w.text, w.start) for w in words] == ref
    assert all(10.0 <= w.start <= w.end <= 10.0 + first + 2.3 for w in words)
    (tmp_path / "config.json").write_text('{"model_type": "whisper"}')  # no weights, no tokenizer
    with pytest.raises(AnnotatorError, match="annotate.whisper: .* is not a speech recognition model"):
        WhisperTranscriber(tmp_path)


def test_the_thinker_loads_from_the_released_layout_and_sees_and_hears_the_window(src, models, tmp_path, monkeypatch):
    from safetensors.torch import load_file
    from transformers import Qwen2_5OmniForConditionalGeneration

    annotator = OmniAnnotator(models[0], max_new_tokens=6)
    full = Qwen2_5OmniForConditionalGeneration.from_pretrained(models[0]).eval()  # the released model, as transformers loads it
    loaded, reference = annotator.model.state_dict(), full.thinker.state_dict()
    assert loaded.keys() == reference.keys() and all(torch.equal(loaded[k], reference[k]) for k in loaded)
    fingerprint = lambda tensors: sorted((tuple(t.shape), float(t.double().sum())) for t in tensors)  # noqa: E731
    assert fingerprint(load_file(models[0] / "model.safetensors").values()) == fingerprint(loaded.values())  # every tensor stored, loaded
    frames = torch.randint(0, 255, (8, 56, 84, 3), generator=torch.Generator().manual_seed(0), dtype=torch.uint8).numpy()  # 4 s
    audio = torch.randn(64000, generator=torch.Generator().manual_seed(1)).numpy() * 0.1
    inputs = annotator.inputs([(frames, audio)], 2.0, ["What is heard?"])
    ids, tok = inputs["input_ids"][0].tolist(), annotator.processor.tokenizer
    video, sound = [i for i, t in enumerate(ids) if t == tok.video_token_id], [i for i, t in enumerate(ids) if t == tok.audio_token_id]
    assert video and len(sound) == 100  # 4 s of sound heard: 25 audio tokens per second
    assert min(video) < min(sound) < max(video) < max(sound)  # picture and sound interleaved by time, in 2 s chunks
    assert "What is heard?" in tok.decode(ids)

    @torch.no_grad()
    def next_token_logits(frames, audio):
        return annotator.model(**annotator.inputs([(frames, audio)], 2.0, ["What is heard?"]), use_audio_in_video=True).logits[0, -1]

    seen_and_heard = next_token_logits(frames, audio)
    assert not torch.allclose(seen_and_heard, next_token_logits(frames, audio[::-1].copy()))  # it hears the sound
    assert not torch.allclose(seen_and_heard, next_token_logits(frames[::-1].copy(), audio))  # it sees the frames
    answer = annotator.describe(frames, audio, 2.0, "What is heard?")
    assert answer and answer == annotator.describe(frames, audio, 2.0, "What is heard?")  # greedy: the same window, the same text
    thinker_only = omni_folder(tmp_path / "thinker", full=False)
    assert OmniAnnotator(thinker_only, max_new_tokens=6).describe(frames, audio, 2.0, "What is heard?")  # the thinker alone loads too
    (tmp_path / "vlm").mkdir()
    (tmp_path / "vlm" / "config.json").write_text('{"model_type": "qwen2_vl"}')
    with pytest.raises(AnnotatorError, match=r"annotate.omni: .* holds a 'qwen2_vl' model, expected Qwen2.5-Omni"):
        OmniAnnotator(tmp_path / "vlm")
    monkeypatch.setattr("importlib.metadata.version", lambda name: "4.57.1")  # before Qwen2.5-Omni took a decoded audio track
    with pytest.raises(AnnotatorError, match=r"annotate.omni: needs transformers >= 5.25, found 4.57.1 \(pip install 'soe\[annotate\]'\)"):
        OmniAnnotator(models[0])


def test_windows_are_cut_where_encode_cuts_and_transcripts_at_word_midpoints(src, models, annotated):
    cfg = load_recipe(TINY, SECONDS)
    specs, fps, rate = window_plan(cfg)
    a, b = clip_windows(annotated, src / "a.mp4"), clip_windows(annotated, src / "b.mp4")
    assert [(w["start"], w["seconds"]) for w in a] == [(s, sp.seconds) for s, sp in plan_windows(3.0, specs, fps, rate)] == [
        (0.0, 1.0), (1.0, 1.0), (2.0, 1.0)]
    assert [w["transcript"] for w in a] == ["hello", "across", "edge late"]  # the sidecar wins over Whisper
    store = AnnotationStore(cache_of(annotated))
    (words,) = [r["words"] for k, r in store.records.items() if k[0] == "words"]  # Whisper ran for b.mp4 only
    words = [Word(*w) for w in words]
    assert [w["transcript"] for w in b] == [join_words(words_in_window(words, s, 1.0)) for s in (0.0, 1.0)]
    assert all(w["caption"] and w["sound"] for w in a + b)
    omni = OmniAnnotator(models[0], max_new_tokens=6)
    settings = AnnotateConfig()
    for clip, windows, field, size in (("a.mp4", a, "caption", (56, 56)), ("b.mp4", b, "sound", (56, 84))):  # whole 28 px patches
        media = read_windows(src / clip, [(w["start"], 2, 16000) for w in windows], 2.0, size, 16000)  # 2 frames a second
        prompt = getattr(settings, f"{field}_prompt")
        assert [w[field] for w in windows] == [omni.describe(v, s.mean(axis=0), 2.0, prompt) for v, s in media]  # each its own window
    report = report_of(annotated)
    assert report["skipped_by_reason"] == {"too short": 1} and report["windows"] == 5
    assert (report["texts_new"], report["transcribed_new"], report["sidecar_transcripts"]) == (10, 1, 1)


def test_the_annotations_file_has_one_row_per_window_with_its_own_words(src, models, annotated):
    got = rows(annotated)
    assert [(r["path"], r["start"], r["end"]) for r in got] == [("a.mp4", 0.0, 1.0), ("a.mp4", 1.0, 2.0), ("a.mp4", 2.0, 3.0),
                                                                ("b.mp4", 0.0, 1.0), ("b.mp4", 1.0, 2.0)]
    assert all(set(r) == set(ROW_FIELDS) for r in got[:3])  # a.mp4: its own transcript, no language
    assert all(set(r) == {*ROW_FIELDS, "language"} for r in got[3:])  # b.mp4: Whisper transcribed it
    a = got[:3]  # a word goes to the window holding its midpoint; "after" (3.1-3.5 s) is past the last window
    assert [[w["text"] for w in r["words"]] for r in a] == [["hello"], ["across"], ["edge", "late"]]
    assert [r["lyrics"] for r in a] == ["hello", "across", "edge late"] and a[1]["words"] == [{"start": 0.7, "end": 1.4, "text": "across"}]
    for r, w in zip(got, clip_windows(annotated, src / "a.mp4") + clip_windows(annotated, src / "b.mp4")):
        assert (r["caption"], r["audio_caption"], r["lyrics"]) == (w["caption"], w["sound"], w["transcript"])
    assert a[0]["models"]["asr"] == "a.words.json" and got[3]["models"]["asr"].startswith("whisper@")
    assert a[0]["models"]["captioner"].startswith("omni@") and a[0]["models"]["audio_caption_prompt"] == AnnotateConfig().sound_prompt


def test_words_in_captions_jsonl_and_no_speech_is_empty_lyrics(tmp_path):
    d = tmp_path / "clips"
    d.mkdir()
    make_clip(d / "x.mp4")  # 3 s: three windows, speech in the first only
    words = [{"word": "one", "start": 0.1, "end": 0.4}, {"word": "two", "start": 0.5, "end": 1.3}]  # middle 0.9: window 0
    (d / "captions.jsonl").write_text(json.dumps({"path": "x.mp4", "caption": "c", "words": words}) + "\n")
    assert main(["annotate", str(TINY), str(d), *SECONDS, "--cache", str(tmp_path / "cache")]) == 0  # no model; default --out
    got = rows(d / "annotations.jsonl")
    assert [r["lyrics"] for r in got] == ["one two", "", ""] and [r["caption"] for r in got] == [None] * 3
    assert got[0]["models"] == {"captioner": None, "caption_prompt": None, "audio_caption_prompt": None, "asr": "captions.jsonl"}
    assert not (tmp_path / "cache").exists()  # no model: nothing to cache


def test_rerun_computes_nothing_another_prompt_only_its_texts_and_a_kill_resumes(src, models, annotated, tmp_path, capsys):
    out, cache = tmp_path / "annotations.jsonl", tmp_path / "cache"
    shutil.copytree(cache_of(annotated), cache)  # the cache of another run, into another --out
    assert annotate_cli(src, out, models) == 0
    report = report_of(out)
    assert (report["texts_new"], report["texts_cached"], report["transcribed_new"], report["transcribed_cached"]) == (0, 10, 0, 1)
    assert set(report["batches"].values()) == {0} and out.read_text() == annotated.read_text()  # no model call, the same rows
    lines, cached = log_lines(out), cache_lines(cache)
    assert cached == cache_lines(cache_of(annotated))  # nothing added to the cache
    assert annotate_cli(src, out, models) == 0  # a rerun of the same run into its own file
    assert log_lines(out) == lines and cache_lines(cache) == cached and out.read_text() == annotated.read_text()  # no record again
    prompt = "Sounds: ${not.a.key} # all of them"  # free text, taken literally
    assert annotate_cli(src, out, models, f"annotate.sound_prompt={prompt}") == 2  # another run: the file is not overwritten
    assert "exists and was not written by this run" in capsys.readouterr().err and out.read_text() == annotated.read_text()
    out.unlink()  # annotate again with another prompt: the cache stays
    assert annotate_cli(src, out, models, f"annotate.sound_prompt={prompt}") == 0
    report = report_of(out)
    assert (report["texts_new"], report["texts_cached"]) == (5, 5)  # the sound descriptions only
    assert report["batches"] == {"asr": 0, "language": 0, "captioner": 1}  # five windows, one batch of annotate.batch_size=8
    assert read_selection(work_folder(out))["sound"]["prompt"] == prompt and rows(out)[0]["models"]["audio_caption_prompt"] == prompt
    assert [r["caption"] for r in rows(out)] == [r["caption"] for r in rows(annotated)]
    whole = out.read_text()
    (log,) = (cache / "parts").glob("*.jsonl")
    lines = log.read_text().splitlines()  # [..., the batch's five sound descriptions]
    log.write_text("\n".join(lines[:-2]) + "\n" + lines[-2][:25])  # killed while writing the batch's fourth record
    out.unlink()  # (a killed run never wrote the file)
    assert annotate_cli(src, out, models, f"annotate.sound_prompt={prompt}") == 0
    report = report_of(out)
    assert report["texts_new"] == 2 and all(json.loads(line) for line in cache_lines(cache))  # the torn record and the next recomputed
    assert out.read_text() == whole  # the resumed run wrote what the uninterrupted one did


def test_two_shards_equal_one_process(src, models, annotated, tmp_path):
    out = tmp_path / "sharded.jsonl"
    assert annotate_cli(src, out, models, "--shard", "1/2", "--workers", "1") == 0
    assert not out.exists()  # part 0 is not done yet
    assert annotate_cli(src, out, models, "--shard", "0/2") == 0  # the last to finish merges
    assert sorted(p.name for p in (work_folder(out) / "parts").glob("*.jsonl")) == ["part-0-of-2.jsonl", "part-1-of-2.jsonl"]
    assert out.read_text() == annotated.read_text()


def test_encode_reads_each_windows_own_text_and_unannotated_clips_as_before(src, annotated, tmp_path):
    folder = tmp_path / "src"
    shutil.copytree(src, folder)
    shutil.copy(annotated, folder / "annotations.jsonl")  # where soe encode looks by default
    make_clip(folder / "c.mp4", seconds=1.2)  # added after annotating: its own caption, as without annotations
    (folder / "c.txt").write_text("a caption of c")
    cfg = load_recipe(TINY, SECONDS)
    assert main(["encode", str(TINY), str(folder), "--out", str(tmp_path / "cache"), *SECONDS]) == 0
    _, got, windows = load_cache(tmp_path / "cache")
    by_id = {r["id"]: (r, w) for r, w in zip(got, windows)}
    ordered = sorted(got, key=lambda r: (r["source"], r["start"]))
    want = {(r["path"], r["start"]): r for r in rows(annotated)}
    for row in ordered[:5]:
        w = want[row["source"], row["start"]]
        assert (row["caption"], row["audio_caption"], row.get("lyrics"), row["annotations"]) == (
            w["caption"], w["audio_caption"], w["lyrics"] or None, True)
    assert [(r["source"], r["caption"]) for r in ordered[5:]] == [("c.mp4", "a caption of c")] and "annotations" not in ordered[5]
    a_states = [by_id[r["id"]][1]["b"] for r in ordered[:3]]  # a.mp4's windows: lyrics "hello", "across", "edge late"
    audio = [k for k in a_states[0] if k != "latents"]
    assert audio and all(not torch.equal(a_states[0][k], a_states[1][k]) for k in audio if a_states[0][k].is_floating_point())
    encode_folder(cfg, folder, tmp_path / "plain", EncodeConfig(), console=QUIET, progress=False)  # without annotations
    _, plain_rows, plain_windows = load_cache(tmp_path / "plain")
    (c_row, c_window), = [(r, w) for r, w in zip(plain_rows, plain_windows) if r["source"] == "c.mp4"]
    row, window = by_id[c_row["id"]]
    assert {k: v for k, v in row.items() if k != "chunk"} == {k: v for k, v in c_row.items() if k != "chunk"}
    for side in ("a", "b"):
        assert all(torch.equal(window[side][k], c_window[side][k]) for k in window[side] if k != "latents")  # the same text states
        # latents: the codec saw another batch (other windows beside c's), float32 rounding differs by ~1e-7
        torch.testing.assert_close(window[side]["latents"], c_window[side]["latents"], rtol=1e-5, atol=1e-5)
    assert {r["source"] for r in plain_rows} == {"a.mp4", "c.mp4"}  # b.mp4 has no caption of its own


def test_bad_input_is_one_line_exit_2_nothing_written(src, models, annotated, tmp_path, capsys):
    out = tmp_path / "out.jsonl"
    (tmp_path / "vlm").mkdir()
    (tmp_path / "vlm" / "config.json").write_text('{"model_type": "qwen2_vl"}')
    bad = {}
    for name, file, text in (("sidecar", "x.words.json", "[{"), ("order", "x.words.json", json.dumps(SIDECAR[::-1])),
                             ("listed", "captions.jsonl", json.dumps({"path": "x.mp4", "words": SIDECAR[::-1]}))):
        bad[name] = tmp_path / name
        bad[name].mkdir()
        make_clip(bad[name] / "x.mp4", seconds=1.0)
        (bad[name] / file).write_text(text)
    taken = tmp_path / "taken.jsonl"
    taken.write_text("{}\n")
    omni, whisper = (str(m) for m in models)
    cases = [
        (["annotate", str(TINY), str(tmp_path / "missing"), "--out", str(out)], "source folder not found"),
        (["annotate", str(TINY), str(src), "--out", str(out), "annotate.fps=0"], "annotate.fps: expected frames per second > 0"),
        (["annotate", str(TINY), str(src), "--out", str(out), "annotate.colour=red"], "annotate.colour"),
        (["annotate", str(TINY), str(src), "--out", str(out), "--captioner", "/nowhere"], "--captioner: model folder not found"),
        (["annotate", str(TINY), str(src), "--out", str(out), f"annotate.omni={tmp_path / 'vlm'}"], "expected Qwen2.5-Omni"),
        (["annotate", str(TINY), str(src), "--out", str(out), "--captioner", whisper], r"config.json' holds a 'whisper' model, expected Qwen"),
        (["annotate", str(TINY), str(src), "--out", str(out), "--asr", omni], r"--asr: .*config.json' holds a 'qwen2_5_omni' model, expected Whisper"),
        (["annotate", str(TINY), str(bad["sidecar"]), "--out", str(out), "--asr", whisper], "x.words.json: not a readable JSON"),
        (["annotate", str(TINY), str(bad["order"]), "--out", str(out)], "x.words.json: words out of order"),
        (["annotate", str(TINY), str(bad["listed"]), "--out", str(out)], r"captions.jsonl \(x.mp4\): words out of order"),
        (["annotate", str(TINY), str(src), "--out", str(taken), "--asr", whisper], "taken.jsonl' exists and was not written by this run"),
        (["annotate", str(TINY), str(src), "--out", str(out), "--shard", "2/2"], "--shard expects I/N"),
        (["annotate", str(TINY), str(src), "--out", str(out), "annotate.batch_size=0"], "annotate.batch_size: expected a positive integer"),
        (["annotate", str(TINY), str(src), "--out", str(out), "--asr", whisper, "--cache", str(taken)], "--cache: expected a folder"),
        (["encode", str(TINY), str(src), "--out", str(out), "--annotations", "/nowhere.jsonl"], "--annotations: annotations file not found"),
        (["encode", str(TINY), str(src), "--out", str(out), "--annotations", str(taken)], "taken.jsonl: line 1: expected a row"),
        (["encode", str(TINY), str(src), "--out", str(out), "--annotations", str(annotated), "encode.durations=[0.5]"],
         r"the window 0-1 s of 'a.mp4' is not one this encode cuts \(0.5 s long\)"),
    ]
    for args, message in cases:
        assert main(args + SECONDS) == 2, args
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and "\n" not in err and re.search(message, err), (args, err)
        assert not out.exists() and not work_folder(out).exists() and taken.read_text() == "{}\n", args  # nothing written
        assert not any(p.name.endswith(".parts") or p.name == "annotations.jsonl" for d in bad.values() for p in d.iterdir()), args
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="nothing to annotate with"):
        annotate_folder(load_recipe(TINY, SECONDS), tmp_path / "empty", out, AnnotateConfig(), console=QUIET, progress=False)
    assert not out.exists() and not work_folder(out).exists()
