"""What a new user meets first: literal prompts, generate's output folders and messages, encode with
nothing to encode, the thread policy, quiet screens, plots and contact sheets (issue 14)."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from rich.console import Console

from soe.cli import main
from soe.cli.stitch import run_training
from soe.recipe.reading import load_recipe

ROOT = Path(__file__).parents[1]
DEMO = ROOT / "recipes" / "demo.yaml"  # the README's demo: shipped pretrained experts
TINY = ROOT / "tests" / "recipes" / "tiny.yaml"  # random tiny experts: fast
QUIET = Console(file=open("/dev/null", "w"))
SHORT = ["data.num_clips=8", "data.batch_size=2", "data.seconds=1.0", "sample.steps=2", "sample.at_end=false"]


# ---- prompts are free text ---------------------------------------------------------------------
PROMPTS = ["note: a dog barks", "[loud] drums", "costs ${x}", "", "{a: 1}", "a \\${y} b", "- list item", "true", "3.0"]


@pytest.mark.parametrize("text", PROMPTS)
def test_prompt_is_taken_literally(text):
    cfg = load_recipe(TINY, [f"sample.prompt={text}"])
    assert cfg.sample.prompt == text and isinstance(cfg.sample.prompt, str)


def test_prompt_survives_the_saved_run_recipe(tmp_path):
    from omegaconf import OmegaConf

    cfg = load_recipe(TINY, ["sample.prompt=costs ${x}: [loud]"])
    OmegaConf.save(cfg, tmp_path / "recipe.yaml")  # what run_training writes into the run folder
    assert load_recipe(tmp_path / "recipe.yaml").sample.prompt == "costs ${x}: [loud]"


# ---- soe generate ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("gen") / "run"
    run_training(TINY, [*SHORT, "trainer.max_steps=2", f"run_dir={run_dir}"], console=QUIET, progress=False)
    return run_dir


def test_generate_writes_new_folders_in_the_checkpoints_run_and_says_what_it_loaded(trained_run, capsys):
    argv = ["generate", str(TINY), f"ckpt={trained_run}", "prompt=note: [loud] ${x}", "steps=2", "data.seconds=1.0"]
    assert main(argv) == 0
    first = capsys.readouterr()
    assert main([*argv[:2], f"ckpt={trained_run / 'trained'}", *argv[3:]]) == 0  # the trained/ folder works too
    second = capsys.readouterr()
    a, b = trained_run / "generated" / "generate-001", trained_run / "generated" / "generate-002"
    assert (a / "sample_00.mp4").is_file() and (b / "sample_00.mp4").is_file()  # the second run did not overwrite the first
    assert f"loaded {trained_run / 'trained'} (step 2)" in first.out
    assert str(a / "sample_00.png") in first.out and str(b / "sample_00.png") in second.out
    assert "warning" not in first.err


def test_generate_without_ckpt_warns_and_never_writes_into_the_recipes_run(tmp_path, capsys):
    run_dir = tmp_path / "someone_elses_run"
    assert main(["generate", str(TINY), "prompt=", "steps=2", "data.seconds=1.0", f"run_dir={run_dir}"]) == 0
    err = capsys.readouterr().err
    assert "warning: no ckpt= given: sampling UNTRAINED connectors" in " ".join(err.split())
    assert not run_dir.exists()
    assert (Path("outputs") / "tiny-untrained" / "generate-001" / "sample_00.png").is_file()  # in the working folder (tmp)


def test_generate_refuses_an_out_folder_that_holds_samples(trained_run, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "sample_00.mp4").write_bytes(b"precious")
    assert main(["generate", str(TINY), f"ckpt={trained_run}", f"out={out}", "steps=2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: sample.out:") and "already holds samples" in err and len(err.splitlines()) == 1
    assert (out / "sample_00.mp4").read_bytes() == b"precious"


def test_contact_sheet_is_titled(tmp_path):
    from soe.media import contact_sheet
    from soe.sample.generate import sheet_title

    video, audio = torch.zeros(3, 10, 16, 16), torch.zeros(1, 8000)
    title = sheet_title("a dog barks", 300, Path("runs/demo"))
    assert title == '"a dog barks"  ·  step 300  ·  runs/demo'
    assert "untrained" in sheet_title("x", None, None)
    plain = np.asarray(Image.open(contact_sheet(tmp_path / "a.png", video, 10, audio, 8000)).convert("L"))
    titled = np.asarray(Image.open(contact_sheet(tmp_path / "b.png", video, 10, audio, 8000, title=title)).convert("L"))
    dark = [int((img[:30, 300:900] < 128).sum()) for img in (plain, titled)]  # the band above the frames, mid-width
    assert dark[1] > dark[0] + 50, dark  # text there only with a title


def test_contact_sheet_of_partly_silent_audio_prints_no_warning(tmp_path):
    import warnings

    from soe.media import contact_sheet

    audio = torch.zeros(1, 16000)
    audio[0, :8000] = torch.sin(torch.arange(8000) * 0.3)  # a tone, then the exact silence sampling pads with
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # numpy's "divide by zero encountered in log10" reached the screen
        contact_sheet(tmp_path / "s.png", torch.zeros(3, 20, 16, 16), 10, audio, 8000, title="t")
    img = np.asarray(Image.open(tmp_path / "s.png").convert("L"))
    h, w = img.shape
    assert img[int(0.72 * h):int(0.78 * h), int(0.75 * w):int(0.83 * w)].mean() < 40  # its silent end (1.5 s) is black


def test_real_clip_training_does_not_render_the_synthetic_preview():
    from soe.sample.generate import uses_synthetic_preview

    assert uses_synthetic_preview(load_recipe(DEMO))
    latents = load_recipe(DEMO, ["data.kind=latents", "data.path=/some/cache"])
    assert latents.sample.decode == "synthetic_preview" and not uses_synthetic_preview(latents)


# ---- soe encode with nothing to encode ---------------------------------------------------------
@pytest.mark.parametrize("what", ["empty", "zero-byte", "no-audio"])
def test_encode_fails_when_no_window_was_encoded(tmp_path, capsys, what):
    src = tmp_path / "src"
    src.mkdir()
    if what == "zero-byte":
        (src / "clip.mp4").write_bytes(b"")
        (src / "clip.txt").write_text("a clip")
    elif what == "no-audio":
        from soe.media import write_mp4

        write_mp4(src / "clip.mp4", torch.zeros(3, 50, 32, 32), 25)
        (src / "clip.txt").write_text("a silent clip")
    assert main(["encode", str(TINY), str(src), "--out", str(tmp_path / "cache")]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.startswith("error: soe encode: no window was encoded") and len(err.splitlines()) == 1, err
    assert "train with data.kind=latents" not in captured.out
    assert not (tmp_path / "cache").exists()  # nothing left behind: no empty cache, no encode_report.json


def test_a_failed_encode_into_an_existing_folder_removes_only_what_it_wrote(tmp_path, capsys):
    src, out = tmp_path / "src", tmp_path / "cache"
    src.mkdir()
    (out / "old").mkdir(parents=True)
    (out / "old" / "notes.txt").write_text("kept")
    assert main(["encode", str(TINY), str(src), "--out", str(out)]) == 2
    assert "no video files found" in capsys.readouterr().err
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == ["old", "old/notes.txt"]


# ---- threads -----------------------------------------------------------------------------------
def test_thread_policy(monkeypatch):
    from soe.errors import UsageError
    from soe.threads import choose_threads, default_threads

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    n, why = choose_threads()
    assert why == "free cores" and 1 <= n <= max(1, torch.get_num_threads())
    monkeypatch.setattr("os.getloadavg", lambda: (64.0, 0.0, 0.0))
    assert default_threads(8) == 1  # a busy machine: one thread, never torch's 'all cores'
    assert choose_threads(3) == (3, "trainer.threads")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert choose_threads() == (None, "OMP_NUM_THREADS")  # torch already follows it
    monkeypatch.setenv("SOE_NUM_THREADS", "2")
    assert choose_threads(3) == (2, "SOE_NUM_THREADS")  # the environment wins over the recipe
    monkeypatch.setenv("SOE_NUM_THREADS", "many")
    with pytest.raises(UsageError, match="SOE_NUM_THREADS: expected a positive integer"):
        choose_threads()


def test_trainer_threads_is_validated(capsys):
    assert main(["stitch", str(TINY), "trainer.threads=0"]) == 2
    assert "trainer.threads: expected a positive number of CPU threads" in capsys.readouterr().err


# ---- screens -----------------------------------------------------------------------------------
def test_tables_do_not_wrap_when_piped(capsys):
    assert main(["inspect", str(DEMO)]) == 0
    out = capsys.readouterr().out
    for word in ("ace-step-1.5", "modality", "parameters", "trainable", "connector"):
        assert word in out
    assert max(len(line) for line in out.splitlines()) > 80  # laid out wider than rich's 80-column default


def test_loss_plot_has_plain_ticks():
    from soe.train.plots import loss_figure

    fig = loss_figure({"loss_a_video": [(1, 1.45), (10, 0.9), (20, 0.61)], "loss_b_audio": [(1, 3.2), (20, 1.1)]})
    fig.canvas.draw()
    labels = [t.get_text() for ax in fig.axes for t in ax.get_yticklabels() + ax.get_yticklabels(minor=True)]
    assert any(labels) and not any("times" in s or "^" in s for s in labels), labels
    steps = [t.get_text() for ax in fig.axes for t in ax.get_xticklabels()]
    assert steps and all(s.lstrip("−-").isdigit() for s in steps), steps  # whole optimizer steps, not 2.5
    assert [ax.get_title() for ax in fig.axes] == ["video loss (expert a)", "audio loss (expert b)"]


def test_progress_bar_shows_steps_and_each_modality(tmp_path):
    from types import SimpleNamespace

    from soe.train.progress import StepProgressBar

    bar = StepProgressBar()
    trainer = SimpleNamespace(global_step=7, max_steps=300, loggers=[],
                              progress_bar_metrics={"loss_a_video": 0.41, "loss_b_audio": 0.09, "loss": 1.7})
    bar._trainer = trainer
    assert bar._get_train_description(0) == "step 7/300"
    assert bar.get_metrics(trainer, None) == {"video loss": 0.41, "audio loss": 0.09}


@pytest.mark.slow
def test_stitch_screen_is_quiet_and_shows_step_and_modality_losses(tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "soe.cli", "stitch", str(TINY), *SHORT, f"run_dir={run}", "trainer.max_steps=2",
           "trainer.checkpoint_every_n_steps=1"]
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "default"}
    outputs = [subprocess.run(c, capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
               for c in (cmd, [*cmd[:-2], "trainer.max_steps=4", "trainer.checkpoint_every_n_steps=1", "resume=true"])]
    for proc in outputs:
        text = proc.stdout + proc.stderr
        assert proc.returncode == 0, text
        for noise in ("GPU available", "TPU available", "litlogger", "Tip:", "Epoch", "v_num", "exists and is not empty",
                      "weight_norm", "Trainer.fit` stopped", "logging interval", "RuntimeWarning"):
            assert noise not in text, (noise, text)
        assert "video loss" in text and "audio loss" in text
    assert "step 2/2" in outputs[0].stdout and "step 4/4" in outputs[1].stdout


# ---- the demo's shipped experts ----------------------------------------------------------------
PRETRAINED = ROOT / "recipes" / "pretrained"


@pytest.mark.parametrize("folder, model", [("video_expert", "WanTransformer3DModel"), ("audio_expert", "AceStepTransformer1DModel")])
def test_shipped_experts_are_small_official_diffusers_folders(folder, model):
    import diffusers

    path = PRETRAINED / folder / "transformer"
    size = sum(f.stat().st_size for f in (PRETRAINED / folder).rglob("*") if f.is_file())
    assert size < 1_000_000, f"{folder}: {size} bytes"
    loaded = getattr(diffusers, model).from_pretrained(path)  # the family's own loader, no soe involved
    assert sum(p.numel() for p in loaded.parameters()) > 100_000


def test_recipe_relative_weight_paths_are_found_next_to_the_recipe(tmp_path):
    cfg = load_recipe(DEMO)  # the working folder is a tmp folder (conftest), not the checkout
    assert Path(cfg.experts.a.path) == DEMO.parent / "pretrained" / "video_expert"
    assert Path(cfg.experts.b.path).is_dir()
    other = tmp_path / "elsewhere" / "r.yaml"
    other.parent.mkdir()
    other.write_text(DEMO.read_text())
    assert load_recipe(other).experts.a.path == "pretrained/video_expert"  # not next to this recipe: left to the working folder
    given = load_recipe(DEMO, ["experts.a.path=pretrained/video_expert"])  # command line: working-folder paths
    assert given.experts.a.path == "pretrained/video_expert"


def test_training_reports_sync_before_and_after_and_stacks_the_sheets(tmp_path, capsys):
    import json

    from soe.evaluate import sync_eval
    from soe.recipe.builders import build_sampler, build_stitcher
    from soe.sample.sampler import sample

    run = tmp_path / "run"
    overrides = [*SHORT, "trainer.max_steps=2", f"run_dir={run}", "sample.at_start=true", "sample.at_end=true", "sample.sync_clips=2"]
    run_training(TINY, overrides, console=Console(file=open(tmp_path / "screen.txt", "w"), width=200), progress=False)
    report = json.loads((run / "sync.json").read_text())
    assert report["clips"] == 2 and report["experts alone"]["step"] == 0 and report["stitched"]["step"] == 2
    assert 0 <= report["stitched"]["sync"] <= 1 and set(report["stitched"]["frechet"]) == {"video", "audio"}
    # step 0 is exactly the two experts sampled alone (connectors start at zero)
    cfg = load_recipe(TINY, overrides)
    torch.manual_seed(cfg.seed)
    st = build_stitcher(cfg)
    experts = {"a": st.a.eval(), "b": st.b.eval()}
    seconds = cfg.sample.seconds or cfg.data.seconds
    cond, _ = sync_eval.held_out(experts, seconds, 2, cfg.seed)
    with torch.no_grad():
        alone = sample(experts, cond, seconds, build_sampler(cfg))
    assert report["experts alone"]["sync"] == pytest.approx(sync_eval.sync_score(alone, experts, seconds))
    assert "audio-visual sync on 2 held-out clips" in (tmp_path / "screen.txt").read_text()
    assert "swing several-fold from one draw of clips to the next" in (tmp_path / "screen.txt").read_text()
    sheets = [Image.open(run / "samples" / f"step-{s:06d}" / "sample_00.png") for s in (0, 2)]
    both = Image.open(run / "samples" / "before_after.png")
    assert both.size == (sheets[0].size[0], sheets[0].size[1] + sheets[1].size[1])


@pytest.mark.slow
def test_pretrain_command_writes_both_experts_in_their_formats(tmp_path):
    from soe import get_expert
    from soe.cli.pretrain import main as pretrain_main

    result = pretrain_main([str(ROOT / "recipes" / "sync_pretrain.yaml"), "--out", str(tmp_path), "--dtype", "float16",
                            "--eval-clips", "2", "trainer.max_steps=2", "data.num_clips=8", "data.batch_size=2"])
    assert set(result["frechet"]) == {"video", "audio"} and 0 <= result["sync"] <= 1
    video = get_expert("wan2.1").load(tmp_path / "video_expert")
    assert (video.fps, video.height, video.width) == (50.0, 48, 48)  # expert options travel in soe_expert.json
    from safetensors import safe_open

    with safe_open(str(tmp_path / "audio_expert" / "transformer" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}


def test_sync_table_fits_an_80_column_terminal_without_cutting_a_number_or_header():
    from soe.sample.callbacks import SyncReportCallback

    cb = SyncReportCallback(load_recipe(DEMO), "unused", 8)
    cb.scores = {"experts alone": {"step": 0, "sync": 0.218, "frechet": {"video": 0.101, "audio": 0.067}},
                 "stitched": {"step": 250, "sync": 0.277, "frechet": {"video": 0.029, "audio": 0.189}},
                 "truth": {"step": None, "sync": 1.0}}
    console = Console(width=80, record=True, file=open(os.devnull, "w"))
    console.print(cb.table())
    out = console.export_text()
    assert max(len(line) for line in out.splitlines()) <= 80 and "…" not in out
    for text in ("Frechet video", "Frechet audio", "0.218", "0.277", "0.189", "250", "stitched"):
        assert text in out
