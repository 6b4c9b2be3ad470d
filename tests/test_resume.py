"""Exact resume: a run stopped at any point and resumed equals an uninterrupted run bit for bit.

"Equal" means every trainable tensor (connectors, LoRA, loss-balance buffers) and every logged loss.
The recipe is this file's own (tiny experts, LoRA dropout on, a 3-batch data epoch so runs cross
data epochs, a warmup (a cosine schedule is a function of max_steps, so raising it changes the run by design)), so the cases do not depend on the shipped demo.
Resuming at step s to a total T covers both sides of the old failure (T < 2s and T > 2s: Lightning's
restored batch counter against the sampler's length) and a raised ``max_steps``.
"""
import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import Future
from pathlib import Path

import pytest
import torch
from conftest import finished_checkpoint
from rich.console import Console

from soe.cli.stitch import run_training
from soe.train.checkpoint import AtomicCheckpointIO, read_checkpoint
from soe.train.plots import read_run_metrics

ROOT = Path(__file__).parents[1]
QUIET = Console(file=open(os.devnull, "w"))
RECIPE = """\
name: resume-test
seed: 3
experts:
  a: {name: wan2.1, preset: tiny, train: lora, lora: {r: 2, alpha: 2, dropout: 0.2}}
  b: {name: ace-step-1.5, preset: tiny, train: lora, lora: {r: 2, alpha: 2, dropout: 0.2}}
stitch: {pairs: linear, direction: both, connector: {init: trunc_normal}}
flow: {balance: ema}
data: {kind: synthetic, seconds: 1.0, batch_size: 2, num_clips: 6}
optim: {lr: 1.0e-2, warmup_steps: 3}
trainer: {max_steps: 4, accelerator: cpu, log_every_n_steps: 1, checkpoint_every_n_steps: 100}
"""


@pytest.fixture
def recipe(tmp_path) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(RECIPE)
    return path


def train(recipe, run_dir, steps, *overrides):
    return run_training(recipe, [f"run_dir={run_dir}", f"trainer.max_steps={steps}", *overrides], console=QUIET, progress=False)


def assert_same_run(straight, resumed):
    """Trainable tensors bit-equal, and the logged losses of every step bit-equal."""
    a, b = straight.trainable_state_dict(), resumed.trainable_state_dict()
    assert a.keys() == b.keys() and any("lora_A" in k for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def assert_same_logs(straight_dir, resumed_dir, steps):
    ma, mb = read_run_metrics(straight_dir), read_run_metrics(resumed_dir)
    for key in ("loss", "loss_a_video", "loss_b_audio"):
        assert [s for s, _ in ma[key]] == list(range(steps)), key
        assert ma[key] == mb[key], key  # floats compared exactly


@pytest.fixture(scope="module")
def straight_runs(tmp_path_factory):
    """Uninterrupted runs of 5 and 7 steps, shared by the cases below."""
    tmp = tmp_path_factory.mktemp("straight")
    (tmp / "recipe.yaml").write_text(RECIPE)
    return {n: (train(tmp / "recipe.yaml", tmp / f"s{n}", n)["module"], tmp / f"s{n}") for n in (5, 7)}


@pytest.mark.parametrize("first,total", [(3, 5), (2, 7)], ids=["T<2s", "T>2s"])
def test_resume_with_raised_max_steps_is_exact(recipe, tmp_path, straight_runs, first, total):
    train(recipe, tmp_path / "run", first)
    resumed = train(recipe, tmp_path / "run", total, "resume=true")
    assert resumed["trainer"].global_step == total
    assert read_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")["loops"]["fit_loop"]["state_dict"][
        "combined_loader"] == [{"next_batch": total}]  # the loader's position is part of the checkpoint
    module, straight_dir = straight_runs[total]
    assert_same_run(module, resumed["module"])
    assert_same_logs(straight_dir, tmp_path / "run", total)


def test_resume_twice_across_data_epochs_with_a_worker(recipe, tmp_path, straight_runs):
    """Two stops (one mid data epoch), a dataloader worker process: still the uninterrupted run."""
    train(recipe, tmp_path / "run", 2, "data.num_workers=1")
    train(recipe, tmp_path / "run", 4, "data.num_workers=1", "resume=true")
    resumed = train(recipe, tmp_path / "run", 7, "data.num_workers=1", "resume=true")
    module, straight_dir = straight_runs[7]
    assert_same_run(module, resumed["module"])
    assert_same_logs(straight_dir, tmp_path / "run", 7)


def _cli(recipe, run_dir, *overrides):
    return [sys.executable, "-m", "soe.cli", "stitch", str(recipe), f"run_dir={run_dir}", *overrides]


def _wait_for(path: Path, proc, step: int, timeout=240):
    """Block until ``path`` holds a checkpoint of at least ``step`` optimizer steps."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if path.exists():
            try:
                if read_checkpoint(path)["global_step"] >= step:
                    return
            except Exception:  # replaced while being read
                pass
        time.sleep(0.05)
    raise AssertionError(f"no checkpoint of step {step} at {path} (exit {proc.poll()})")


STOPPED_BY = {"SIGKILL": signal.SIGKILL, "SIGINT": signal.SIGINT, "SIGTERM": signal.SIGTERM}
# the run's own process with SIGINT as in a terminal (a pytest started in the background ignores SIGINT and its children
# inherit that), without preexec_fn: the runs start from threads
AS_IN_A_TERMINAL = ("import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
                    "sys.argv = ['soe', *sys.argv[1:]]; runpy.run_module('soe.cli', run_name='__main__', alter_sys=True)")


def _stop_between_checkpoints(run: Path, done: Future, sig, limit: threading.Semaphore) -> None:
    """Start `soe stitch` (400 steps, a checkpoint every 2), send ``sig`` some steps after the checkpoint of step 2,
    wait for the process: ``done`` holds (returncode, stderr)."""
    try:
        with limit:
            run.parent.mkdir(parents=True, exist_ok=True)
            (run.parent / "recipe.yaml").write_text(RECIPE)
            cmd = [sys.executable, "-c", AS_IN_A_TERMINAL, "stitch", str(run.parent / "recipe.yaml"), f"run_dir={run}",
                   "trainer.max_steps=400", "trainer.checkpoint_every_n_steps=2"]
            proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            try:
                _wait_for(run / "checkpoints" / "step-000002.ckpt", proc, 2, timeout=400)
                time.sleep(0.3)  # into the steps after the checkpoint
                proc.send_signal(sig)
                _, err = proc.communicate(timeout=400)  # a graceful Ctrl-C finishes the step and tears down
            finally:
                proc.kill()
                proc.wait()
        done.set_result((proc.returncode, err))
    except BaseException as e:  # noqa: BLE001 - the test waiting on this run fails with it
        done.set_exception(e)


@pytest.fixture(scope="module", autouse=True)
def stopped_runs(request, tmp_path_factory):
    """The stopped runs of the test below that this session selected, started in the background when this module
    starts (two at a time; each pays Python, torch and Lightning's start-up while the in-process cases run)."""
    wanted = [item.callspec.id for item in request.session.items
              if getattr(item, "originalname", None) == "test_stopped_between_checkpoints_resumes_exactly" and item.module is request.module]
    limit, runs = threading.Semaphore(2), {}
    for name in wanted:
        runs[name] = (tmp_path_factory.mktemp(f"stopped-{name}") / "run", Future())
        threading.Thread(target=_stop_between_checkpoints, args=(*runs[name], STOPPED_BY[name], limit), daemon=True).start()
    yield runs
    for _, finished in runs.values():
        finished.exception(timeout=900)  # no run left behind when the module ends


@pytest.mark.slow
@pytest.mark.parametrize("sig", list(STOPPED_BY.values()), ids=list(STOPPED_BY))
def test_stopped_between_checkpoints_resumes_exactly(tmp_path, straight_runs, stopped_runs, sig):
    """Killed (no cleanup), interrupted (Ctrl-C) or terminated (kill, scancel) some steps after a checkpoint: resume from it."""
    run, finished = stopped_runs[sig.name]
    returncode, err = finished.result(timeout=900)
    recipe = run.parent / "recipe.yaml"
    step = read_checkpoint(run / "checkpoints" / "last.ckpt")["global_step"]
    assert 2 <= step < 400
    if sig == signal.SIGKILL:
        assert returncode == -9
    else:  # Ctrl-C or SIGTERM: the step under way finishes and is saved; one line says how to resume; 128 + the signal
        assert returncode == 128 + sig and "Traceback" not in err, err[-2000:]
        who = "Ctrl-C" if sig == signal.SIGINT else sig.name
        assert step > 2 and f"stopped by {who} after step {step}; '{run / 'checkpoints' / 'last.ckpt'}' holds step {step}; " \
            f"resume with: soe stitch {run / 'recipe.yaml'} resume=true" in " ".join(err.split()), err[-2000:]
    total = 7 if step < 7 else step + 1
    resumed = train(recipe, run, total, "resume=true")
    straight = straight_runs[total] if total in straight_runs else (None, None)
    if straight[0] is None:
        straight = (train(recipe, tmp_path / "straight", total)["module"], tmp_path / "straight")
    assert_same_run(straight[0], resumed["module"])
    assert_same_logs(straight[1], run, total)


@pytest.mark.slow
def test_killed_between_a_checkpoint_and_its_log_row_loses_no_row(recipe, tmp_path, straight_runs, monkeypatch):
    """Lightning writes batch k's log row only after the checkpoint of step k+1 is on disk. A kill in
    between (here: right after ``last.ckpt`` of step 4) must not cost the resumed run's logs that row."""
    class Killed(BaseException):  # like SIGKILL: nothing after this point runs (no soe handler catches it)
        pass

    save = AtomicCheckpointIO.save_checkpoint

    def save_then_die(io, checkpoint, path, storage_options=None):
        save(io, checkpoint, path, storage_options)
        if Path(path).name == "last.ckpt" and checkpoint["global_step"] == 4:
            raise Killed

    run = tmp_path / "run"
    monkeypatch.setattr(AtomicCheckpointIO, "save_checkpoint", save_then_die)
    with pytest.raises(Killed):
        train(recipe, run, 7, "trainer.checkpoint_every_n_steps=2")
    monkeypatch.undo()
    assert [s for s, _ in read_run_metrics(run)["loss"]] == [0, 1, 2]  # the window was hit: batch 3's row is missing
    assert read_checkpoint(run / "checkpoints" / "last.ckpt")["global_step"] == 4
    resumed = train(recipe, run, 7, "resume=true")
    module, straight_dir = straight_runs[7]
    assert_same_run(module, resumed["module"])
    assert_same_logs(straight_dir, run, 7)


@pytest.fixture
def ctrl_c_at(monkeypatch):
    """``ctrl_c_at(step, times, sig)``: SIGINT (or ``sig``) this process ``times`` times in the middle of training
    step ``step`` (after the forward, before backward and the optimizer step), as a user's Ctrl-C would land."""
    from soe.train.module import StitchModule

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal, whatever started pytest
    step_fn = StitchModule.training_step

    def arm(step: int, times: int = 1, sig=signal.SIGINT):
        fired = []

        def training_step(module, batch, batch_idx):
            loss = step_fn(module, batch, batch_idx)
            if module.global_step == step and not fired:  # once: a resumed run passes the step again
                fired.append(step)
                for _ in range(times):
                    signal.raise_signal(sig)
            return loss

        monkeypatch.setattr(StitchModule, "training_step", training_step)

    yield arm
    signal.signal(signal.SIGINT, previous)


def test_ctrl_c_finishes_the_step_saves_it_and_resumes_exactly(recipe, tmp_path, straight_runs, ctrl_c_at):
    from soe.train.interrupt import TrainingInterrupted

    run = tmp_path / "run"
    ctrl_c_at(2)
    with pytest.raises(TrainingInterrupted) as info:
        train(recipe, run, 7)
    last = run / "checkpoints" / "last.ckpt"
    assert str(info.value) == (f"stopped by Ctrl-C after step 3; '{last}' holds step 3; resume with: "
                               f"soe stitch {run / 'recipe.yaml'} resume=true")
    assert read_checkpoint(last)["global_step"] == 3  # the step under way was completed, then saved
    assert json.loads((run / "trained" / "soe_trained.json").read_text()) == {"step": 3}
    assert [s for s, _ in read_run_metrics(run)["loss"]] == [0, 1, 2]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler is given back
    resumed = train(recipe, run, 7, "resume=true")
    module, straight_dir = straight_runs[7]
    assert_same_run(module, resumed["module"])
    assert_same_logs(straight_dir, run, 7)


@pytest.fixture
def slurm_job(tmp_path, monkeypatch):
    """Inside SLURM job 4242 (its id only: Lightning does not take over the launch), with an ``scontrol`` that
    records its arguments. Yields the file it writes to."""
    for key in ("SLURM_NTASKS", "SLURM_PROCID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID"):
        monkeypatch.delenv(key, raising=False)
    calls, bin_dir = tmp_path / "scontrol_calls", tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    (bin_dir / "scontrol").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    yield calls


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM], ids=["SIGUSR1", "SIGTERM"])
def test_slurm_signals_finish_the_step_save_it_requeue_and_resume_exactly(recipe, tmp_path, straight_runs, ctrl_c_at,
                                                                          slurm_job, sig):
    """SLURM's warning before the time limit (``--signal=USR1@N``) and a preemption or scancel (SIGTERM) stop the
    run like Ctrl-C: the step under way completes and is saved; SIGUSR1 then requeues the job (after the save);
    the requeued job's ``resume=true`` equals the uninterrupted run."""
    from soe.train.interrupt import TrainingInterrupted

    run = tmp_path / "run"
    assert signal.getsignal(sig) is signal.SIG_DFL
    ctrl_c_at(2, sig=sig)
    with pytest.raises(TrainingInterrupted) as info:
        train(recipe, run, 7)
    last = run / "checkpoints" / "last.ckpt"
    requeued = "; requeued SLURM job 4242" if sig == signal.SIGUSR1 else ""
    assert str(info.value) == (f"stopped by {sig.name} after step 3; '{last}' holds step 3; resume with: "
                               f"soe stitch {run / 'recipe.yaml'} resume=true{requeued}")
    assert info.value.exit_code == 128 + sig
    assert read_checkpoint(last)["global_step"] == 3 and not list(run.glob("hpc_ckpt_*"))  # no Lightning mid-step save
    assert (slurm_job.read_text() if slurm_job.exists() else "") == ("requeue 4242\n" if requeued else "")
    assert signal.getsignal(sig) is signal.SIG_DFL  # the handler is given back
    resumed = train(recipe, run, 7, "resume=true")
    module, straight_dir = straight_runs[7]
    assert_same_run(module, resumed["module"])
    assert_same_logs(straight_dir, run, 7)


@pytest.mark.slow
def test_second_ctrl_c_stops_at_once_keeping_the_last_checkpoint(recipe, tmp_path, straight_runs, ctrl_c_at):
    from soe.train.interrupt import TrainingInterrupted

    run = tmp_path / "run"
    ctrl_c_at(3, times=2)  # the second one interrupts step 3 itself: nothing of it may be saved
    with pytest.raises(TrainingInterrupted) as info:
        train(recipe, run, 7, "trainer.checkpoint_every_n_steps=2")
    last = run / "checkpoints" / "last.ckpt"
    assert str(info.value).startswith(f"stopped by Ctrl-C during training; '{last}' holds step 2; resume with: ")
    assert read_checkpoint(last)["global_step"] == 2
    resumed = train(recipe, run, 7, "resume=true")
    module, straight_dir = straight_runs[7]
    assert_same_run(module, resumed["module"])
    assert_same_logs(straight_dir, run, 7)


def test_ctrl_c_in_the_cli_prints_one_line_exits_130_and_skips_end_of_run_sampling(recipe, tmp_path, capsys, ctrl_c_at):
    from soe.cli import main

    run = tmp_path / "run"
    ctrl_c_at(1)
    assert main(["stitch", str(recipe), f"run_dir={run}", "trainer.max_steps=7", "sample.at_end=true", "sample.steps=2",
                 "sample.decode=synthetic_preview"]) == 130
    err = " ".join(capsys.readouterr().err.split())
    assert err.endswith(f"interrupted: stopped by Ctrl-C after step 2; '{run / 'checkpoints' / 'last.ckpt'}' holds step 2; "
                        f"resume with: soe stitch {run / 'recipe.yaml'} resume=true"), err
    assert "Traceback" not in err and not (run / "samples").exists()


@pytest.mark.slow
def test_two_ddp_ranks_resume_exactly(recipe, tmp_path):
    """2 CPU processes (DDP over gloo): 2 steps + resume to 4 equals 4 straight steps, rank by rank. The straight run
    and the first 2 steps run side by side (Lightning starts rank 1 only once rank 0 is set up: one run leaves a core idle)."""
    ddp = ["trainer.devices=2", "trainer.strategy=ddp", "trainer.accelerator=cpu", "data.num_clips=8"]

    def start(run_dir, steps, *extra):
        return subprocess.Popen(_cli(recipe, run_dir, *ddp, f"trainer.max_steps={steps}", *extra),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)

    finish = finished_checkpoint

    straight_proc = start(tmp_path / "straight", 4)
    try:
        finish(start(tmp_path / "split", 2), tmp_path / "split")
        resumed = finish(start(tmp_path / "split", 4, "resume=true"), tmp_path / "split")
    finally:
        straight = finish(straight_proc, tmp_path / "straight")
    assert resumed["global_step"] == straight["global_step"] == 4
    assert resumed["state_dict"].keys() == straight["state_dict"].keys()
    for k, v in straight["state_dict"].items():
        assert torch.equal(v, resumed["state_dict"][k]), k
    assert read_run_metrics(tmp_path / "split")["loss"] == read_run_metrics(tmp_path / "straight")["loss"]
