"""The run folder: one owner at a time, resumes that cannot silently change the run, a final
checkpoint before end-of-run sampling, and a full disk that leaves the previous checkpoint usable."""
import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file

from soe.cli import main
from soe.cli.stitch import run_training
from soe.train import checkpoint as checkpoint_module
from soe.train.checkpoint import read_checkpoint
from soe.train.run_folder import RunFolderError, RunLock

ROOT = Path(__file__).parents[1]
QUIET = Console(file=open(os.devnull, "w"))
RECIPE = """\
name: folder-test
seed: 1
experts:
  a: {name: wan2.1, preset: tiny, train: lora, lora: {r: 2, alpha: 2}}
  b: {name: ace-step-1.5, preset: tiny, train: lora, lora: {r: 2, alpha: 2}}
data: {kind: synthetic, seconds: 1.0, batch_size: 2, num_clips: 4}
trainer: {max_steps: 1, accelerator: cpu, log_every_n_steps: 1, checkpoint_every_n_steps: 1}
"""
HOLDER = """
import sys, time
from soe.train.run_folder import RunLock
RunLock(sys.argv[1]).acquire()
print("LOCKED", flush=True)
time.sleep(600)
"""


@pytest.fixture
def recipe(tmp_path) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(RECIPE)
    return path


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def hold_lock(run_dir: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "LOCKED"
    return proc


def test_a_second_start_names_the_holder_and_writes_nothing(recipe, tmp_path, capsys):
    run = tmp_path / "run"
    holder = hold_lock(run)
    try:
        before = snapshot(run)
        for extra in ([], ["resume=true"]):
            assert main(["stitch", str(recipe), f"run_dir={run}", *extra]) == 2
            err = one_line_error(capsys)
            assert f"run_dir: '{run}' is in use by pid {holder.pid} on host " in err, err
        assert snapshot(run) == before  # only the holder's lock file, untouched
    finally:
        holder.kill()
        holder.wait()


def test_a_stale_lock_from_a_killed_process_is_taken_over(recipe, tmp_path):
    run = tmp_path / "run"
    holder = hold_lock(run)
    holder.kill()  # SIGKILL: the lock file still names it, the kernel released the lock
    holder.wait()
    assert str(holder.pid) in (run / "soe.lock").read_text()
    assert RunLock(run).holder() is None
    console = Console(record=True, file=open(os.devnull, "w"))
    run_training(recipe, [f"run_dir={run}"], console=console, progress=False)
    assert f"took over the lock of pid {holder.pid}" in console.export_text()
    assert (run / "checkpoints" / "last.ckpt").is_file()
    lock = RunLock(run).acquire()  # released at the end of the run
    lock.release()


def test_resume_refuses_recipe_changes_unless_named(recipe, tmp_path, capsys):
    run = tmp_path / "run"
    run_training(recipe, [f"run_dir={run}"], console=QUIET, progress=False)
    before = snapshot(run)
    for change in ("optim.lr=0.5", "seed=7", "data.batch_size=1", "flow.balance=ema", "experts.b.lora.r=3"):
        assert main(["stitch", str(recipe), f"run_dir={run}", "resume=true", "trainer.max_steps=2", change]) == 2
        err = one_line_error(capsys)
        key = change.split("=")[0]
        assert f"resume: the recipe differs from '{run / 'recipe.yaml'}' in {key}: " in err, err
        assert f"--allow-changes {key}" in err, err
    assert snapshot(run) == before  # nothing written, recipe.yaml keeps the original settings
    # free changes (longer run, cadence, workers) pass; named ones pass; each start keeps its recipe
    assert main(["stitch", str(recipe), f"run_dir={run}", "resume=true", "trainer.max_steps=2", "trainer.log_every_n_steps=2",
                 "--allow-changes", "optim.lr", "optim.lr=0.5"]) == 0
    from omegaconf import OmegaConf

    first, second = (OmegaConf.load(run / "logs" / f"version_{i}" / "recipe.yaml") for i in (0, 1))
    assert first.optim.lr == 1e-4 and second.optim.lr == 0.5 and OmegaConf.load(run / "recipe.yaml").optim.lr == 0.5


def test_cosine_schedule_makes_max_steps_a_change_of_the_run(recipe, tmp_path):
    run = tmp_path / "run"
    run_training(recipe, [f"run_dir={run}", "optim.schedule=cosine"], console=QUIET, progress=False)
    with pytest.raises(RunFolderError, match="trainer.max_steps: 1 -> 2"):
        run_training(recipe, [f"run_dir={run}", "optim.schedule=cosine", "resume=true", "trainer.max_steps=2"], console=QUIET)
    run_training(recipe, [f"run_dir={run}", "optim.schedule=cosine", "resume=true", "trainer.max_steps=2"], console=QUIET,
                 progress=False, allow_changes=["trainer.max_steps"])


def test_sampling_problems_fail_before_the_first_step(recipe, tmp_path, capsys):
    run = tmp_path / "run"
    text = tmp_path / "conditions.txt"
    text.write_text("not tensors")
    for bad, key in ((["experts.a.name=ace-step-1.5"], "generate: an mp4 with sound needs one video and one audio expert"),
                     ([f"sample.conditions={text}"], f"sample.conditions: '{text}' is not a safetensors file")):
        assert main(["stitch", str(recipe), f"run_dir={run}", "sample.at_end=true", *bad]) == 2
        assert one_line_error(capsys).startswith(f"error: {key}")
        assert not run.exists()


@pytest.mark.slow
def test_last_checkpoint_holds_the_final_step_before_end_of_run_sampling(recipe, tmp_path, monkeypatch):
    """3 steps saving every 2: last.ckpt is step 3 (not 2), and on disk when the sampler starts."""
    from soe.sample import generate

    seen = {}

    def render(stitcher, cfg, out_dir, **kw):
        seen["step"] = read_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")["global_step"]
        raise RuntimeError("sampling failed")

    monkeypatch.setattr(generate, "render_samples", render)
    with pytest.raises(RuntimeError, match="sampling failed"):
        run_training(recipe, [f"run_dir={tmp_path / 'run'}", "trainer.max_steps=3", "trainer.checkpoint_every_n_steps=2",
                              "sample.at_end=true"], console=QUIET, progress=False)
    assert seen["step"] == 3
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["last.ckpt", "step-000002.ckpt"]
    assert RunLock(tmp_path / "run").holder() is None  # a failed run releases its folder


def test_disk_full_names_the_file_and_keeps_the_previous_checkpoint(recipe, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    real_save, calls = torch.save, {"n": 0}

    def filling_save(obj, f, *a, **k):  # the third checkpoint file runs out of space half-way
        calls["n"] += 1
        if calls["n"] < 3:
            return real_save(obj, f, *a, **k)
        f.write(b"\0" * 1000)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint_module.torch, "save", filling_save)
    assert main(["stitch", str(recipe), f"run_dir={run}", "trainer.max_steps=3"]) == 1  # a stopped run, not bad input
    err = one_line_error(capsys)
    assert err.startswith(f"error: checkpoint '{run / 'checkpoints'}") and "no space left on the device" in err, err
    ckpts = run / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["last.ckpt", "step-000001.ckpt"]  # no half-written file
    monkeypatch.setattr(checkpoint_module.torch, "save", real_save)
    last = read_checkpoint(ckpts / "last.ckpt", mmap=False)
    assert last["global_step"] == 1
    exported = load_file(run / "trained" / "connectors.safetensors")  # trained/ matches that checkpoint, not later
    for k, v in exported.items():
        assert torch.equal(v, last["state_dict"][f"stitcher.connectors.{k}"]), k
    assert RunLock(run).holder() is None
