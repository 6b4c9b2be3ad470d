"""``soe annotate``: windows per second of each stage, on CPU with tiny random-weight models.

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/annotate_speed.py                # 4 clips of 5 s, 1 s windows
    python benchmarks/annotate_speed.py --clips 8 --seconds 10 --repeats 3

Clips are synthetic mp4s (tests/test_encode.make_clip: H.264 + AAC, 64x96 at 25 fps); the models are the tests'
tiny Whisper and Qwen2.5-Omni folders (tests/annotate_models.py, saved with save_pretrained and loaded through
transformers' own paths, as `soe annotate` loads released ones). Windows are cut as `soe annotate` cuts them
(tests/recipes/tiny.yaml, ``data.seconds``). Stages, each timed over every window of every clip:

- decode: what the captioner reads per window (frames at ``annotate.fps``, its audio at 16 kHz) plus each
  clip's 16 kHz speech track for Whisper (soe.data.media_io);
- ASR: Whisper with word timestamps over each clip, then the midpoint cut (windows/s = windows covered);
- captioner: the Qwen2.5-Omni thinker's caption and sound description of each window (two greedy answers
  of ``--tokens`` tokens).

Random tiny models say nothing about real models' speed: the point is the per-stage split and the
overhead of soe's own steps around the models. Numbers depend on the box's load (printed).
"""
from __future__ import annotations

import argparse
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
    p.add_argument("--repeats", type=int, default=3, help="timed passes (median)")
    args = p.parse_args()

    import torch
    from annotate_models import omni_folder, whisper_folder
    from test_encode import make_clip

    from soe.data.annotate_run import window_plan
    from soe.data.media_io import read_speech, read_windows, safe_probe
    from soe.data.omni import OmniAnnotator, omni_size
    from soe.data.transcript import WhisperTranscriber, join_words, words_in_window
    from soe.data.windows import plan_windows
    from soe.recipe.reading import load_recipe
    from soe.threads import configure_threads

    configure_threads(None)
    fps = 2.0  # annotate.fps
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        clips = []
        for i in range(args.clips):
            make_clip(tmp / f"c{i}.mp4", seconds=args.seconds, size=(64, 96))
            clips.append(tmp / f"c{i}.mp4")
        omni = OmniAnnotator(omni_folder(tmp / "omni"), max_new_tokens=args.tokens)
        whisper = WhisperTranscriber(whisper_folder(tmp / "whisper"), language="en")
        specs, vfps, rate = window_plan(load_recipe(ROOT / "tests" / "recipes" / "tiny.yaml", [f"data.seconds={args.window}"]))
        plans = {}
        for c in clips:
            info = safe_probe(c)
            plans[c] = (info, plan_windows(info.seconds, specs, vfps, rate))
        windows = sum(len(w) for _, w in plans.values())

        def decode():
            media = {}
            for c, (info, planned) in plans.items():
                frames = max(2, int(args.window * fps + 1e-6) // 2 * 2)
                media[c] = (read_windows(c, [(s, frames, int(sp.seconds * 16000)) for s, sp in planned], fps,
                                         omni_size(info.width, info.height, 200704), 16000), read_speech(c, 16000))
            return media

        def asr(media):
            for c, (_, planned) in plans.items():
                audio, first = media[c][1]
                words = whisper(audio, offset=first)
                [join_words(words_in_window(words, s, sp.seconds)) for s, sp in planned]

        def captioner(media):
            for c in plans:
                for video, audio in media[c][0]:
                    for prompt in ("What is seen?", "What is heard?"):
                        omni.describe(video, audio.mean(axis=0), fps, prompt)

        media = decode()  # warm-up: codecs, models' first calls
        asr(media)
        captioner(media)
        times = {"decode": [], "ASR": [], "captioner": []}
        for _ in range(args.repeats):
            t = time.perf_counter()
            media = decode()
            times["decode"].append(time.perf_counter() - t)
            t = time.perf_counter()
            asr(media)
            times["ASR"].append(time.perf_counter() - t)
            t = time.perf_counter()
            captioner(media)
            times["captioner"].append(time.perf_counter() - t)
    load = os.getloadavg()
    print(f"{args.clips} clips x {args.seconds:g} s, {windows} windows of {args.window:g} s; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; median of {args.repeats}")
    print(f"{'stage':<10} {'s / pass':>9} {'windows/s':>10}")
    total = 0.0
    for stage, ts in times.items():
        s = statistics.median(ts)
        total += s
        print(f"{stage:<10} {s:9.3f} {windows / s:10.1f}")
    print(f"{'all':<10} {total:9.3f} {windows / total:10.1f}")


if __name__ == "__main__":
    main()
