"""``soe annotate``: windows per second of each stage, batched and one at a time side by side, with tiny random-weight models.

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/annotate_speed.py            # 4 clips of 5 s, 1 s windows, batch 8 vs 1
    python benchmarks/annotate_speed.py --clips 8 --seconds 10 --batch 16 --repeats 3 --device cuda

Clips are synthetic mp4s (tests/test_encode.make_clip: H.264 + AAC, 64x96 at 25 fps); the models are the tests'
tiny Whisper and Qwen2.5-Omni folders (tests/annotate_models.py, saved with save_pretrained and loaded through
transformers' own paths, as `soe annotate` loads released ones). Windows are cut as `soe annotate` cuts them
(tests/recipes/tiny.yaml, ``data.seconds``). Stages, each timed over every window of every clip, in the same
process one after the other, with ``annotate.batch_size`` = 1 and = ``--batch``:

- decode: what the captioner reads per window (frames at ``annotate.fps``, its audio at 16 kHz) plus each
  clip's 16 kHz speech track for Whisper (soe.data.media_io; not batched: the same work in both columns, so
  its ratio shows the noise of the box);
- ASR: Whisper with word timestamps over each clip (``batch`` clips a call), the midpoint cut, and the language
  of each window holding words (``batch`` windows a call); windows/s = windows covered;
- captioner: the Qwen2.5-Omni thinker's caption and sound description of each window (two greedy answers of
  ``--tokens`` tokens; ``batch`` answers a call);
- run: the whole ``soe annotate`` (annotate_folder into a fresh cache: probing, hashing, decoding ahead in a
  thread, both models, the log and the annotations file; the models' loading included).

Every batched stage's output is checked equal to the one-at-a-time output. Random tiny models say nothing
about real models' speed: the point is the per-stage split, what batching buys at a given size, and the
overhead of soe's own steps around the models. Numbers depend on the box's load (printed).
"""
from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--clips", type=int, default=4)
    p.add_argument("--seconds", type=float, default=5.0, help="length of each clip")
    p.add_argument("--window", type=float, default=1.0, help="data.seconds: the window length")
    p.add_argument("--tokens", type=int, default=8, help="annotate.max_new_tokens")
    p.add_argument("--batch", type=int, default=8, help="annotate.batch_size measured against 1")
    p.add_argument("--repeats", type=int, default=3, help="timed passes (median)")
    p.add_argument("--device", default="cpu", help="annotate.device")
    args = p.parse_args()

    import torch
    from annotate_models import omni_folder, whisper_folder
    from rich.console import Console
    from test_encode import make_clip

    from soe.data.annotate_run import annotate_folder, window_plan
    from soe.data.media_io import read_speech, read_windows, safe_probe
    from soe.data.omni import OmniAnnotator, omni_size
    from soe.data.transcript import WhisperTranscriber, join_words, words_in_window
    from soe.data.windows import plan_windows
    from soe.recipe.reading import load_recipe
    from soe.schema import AnnotateConfig
    from soe.threads import configure_threads

    configure_threads(None)
    fps = 2.0  # annotate.fps
    quiet = Console(file=io.StringIO())
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "clips").mkdir()
        clips = []
        for i in range(args.clips):
            make_clip(tmp / "clips" / f"c{i}.mp4", seconds=args.seconds, size=(64, 96))
            clips.append(tmp / "clips" / f"c{i}.mp4")
        omni_path, whisper_path = omni_folder(tmp / "omni"), whisper_folder(tmp / "whisper")
        omni = OmniAnnotator(omni_path, max_new_tokens=args.tokens, device=args.device)
        whisper = WhisperTranscriber(whisper_path, device=args.device)
        cfg = load_recipe(ROOT / "tests" / "recipes" / "tiny.yaml", [f"data.seconds={args.window}"])
        specs, vfps, rate = window_plan(cfg)
        plans = {}
        for c in clips:
            info = safe_probe(c)
            plans[c] = (info, plan_windows(info.seconds, specs, vfps, rate))
        windows = sum(len(w) for _, w in plans.values())

        def decode(_batch):
            media = {}
            for c, (info, planned) in plans.items():
                frames = max(2, int(args.window * fps + 1e-6) // 2 * 2)
                media[c] = (read_windows(c, [(s, frames, int(sp.seconds * 16000)) for s, sp in planned], fps,
                                         omni_size(info.width, info.height, 200704), 16000), read_speech(c, 16000))
            return media

        def asr(batch, media):
            tracks = [media[c][1] for c in plans]
            words = whisper.transcribe(tracks, batch_size=batch)
            pieces = []
            for (c, (_, planned)), clip_words, (audio, first) in zip(plans.items(), words, tracks):
                for s, sp in planned:
                    if words_in_window(clip_words, s, sp.seconds):
                        i0 = max(0, round((s - first) * 16000))
                        pieces.append(audio[i0: i0 + round(sp.seconds * 16000)])
                    join_words(words_in_window(clip_words, s, sp.seconds))
            return words, whisper.languages(pieces, batch_size=batch)

        def captioner(batch, media):
            items = [((video, audio.mean(axis=0)), prompt) for c in plans for video, audio in media[c][0]
                     for prompt in ("What is seen?", "What is heard?")]
            texts = []
            for i in range(0, len(items), batch):
                chunk = items[i: i + batch]
                texts += omni.describe_batch([m for m, _ in chunk], fps, [q for _, q in chunk])
            return texts

        def run(batch):
            settings = AnnotateConfig(captioner=str(omni_path), whisper=str(whisper_path), max_new_tokens=args.tokens, batch_size=batch,
                                      device=args.device, cache=str(tmp / f"cache-{time.perf_counter_ns()}"))
            out = tmp / f"out-{time.perf_counter_ns()}.jsonl"
            annotate_folder(cfg, tmp / "clips", out, settings, console=quiet, progress=False)
            return out.read_text()

        stages = {"decode": lambda b, m: decode(b), "ASR": asr, "captioner": captioner, "run": lambda b, m: run(b)}
        sizes = (1, args.batch)
        media = decode(1)
        results = {}
        for name, fn in stages.items():  # warm-up, and the batched output checked against one at a time
            outs = [fn(b, media) for b in sizes]
            results[name] = name == "decode" or outs[0] == outs[1]  # decode: the same reads either way
        times = {(name, b): [] for name in stages for b in sizes}
        for _ in range(args.repeats):
            for name, fn in stages.items():
                for b in sizes:
                    t = time.perf_counter()
                    fn(b, media)
                    times[name, b].append(time.perf_counter() - t)
    load = os.getloadavg()
    print(f"{args.clips} clips x {args.seconds:g} s, {windows} windows of {args.window:g} s; device {args.device}; torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads; load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; "
          f"median of {args.repeats}")
    print(f"{'stage':<10} {'batch 1 s':>10} {'windows/s':>10} {f'batch {args.batch} s':>11} {'windows/s':>10} {'speed-up':>9} {'same out':>9}")
    for name in stages:
        one, many = (statistics.median(times[name, b]) for b in sizes)
        print(f"{name:<10} {one:10.3f} {windows / one:10.1f} {many:11.3f} {windows / many:10.1f} {one / many:8.2f}x {results[name]!s:>9}")


if __name__ == "__main__":
    main()
