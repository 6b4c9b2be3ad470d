"""Faults: a kill mid-checkpoint-write, a killed training run, a non-finite loss."""
import os
import subprocess
import sys
import textwrap
import threading
import time
from concurrent.futures import Future
from pathlib import Path

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file

from soe.cli import main
from soe.cli.stitch import run_training
from soe.errors import NonFiniteLossError
from soe.flow.objective import FlowObjective
from soe.train.checkpoint import AtomicCheckpointIO, read_checkpoint

ROOT = Path(__file__).parents[1]
DEMO = ROOT / "tests" / "recipes" / "tiny.yaml"  # tiny random experts: fast; recipes/demo.yaml is tested in test_first_run.py
QUIET = Console(file=open(os.devnull, "w"))
SHORT = ["data.num_clips=32", "data.batch_size=4", "data.seconds=1.0", "trainer.log_every_n_steps=1"]


# ---- a kill in the middle of a checkpoint write ----------------------------------------------------
WRITER = textwrap.dedent("""
    import os, sys, time, torch
    from soe.train.checkpoint import AtomicCheckpointIO

    real_fdopen = os.fdopen

    class SlowFile:  # forwards to the real file; parks forever once 1 MB has reached the disk
        def __init__(self, f):
            self.f, self.n = f, 0
        def write(self, b):
            out = self.f.write(b)
            self.n += len(b)
            if self.n > 1 << 20:
                self.f.flush(); os.fsync(self.f.fileno())
                print("MIDWRITE", flush=True)
                time.sleep(600)
            return out
        def __getattr__(self, name):
            return getattr(self.f, name)
        def __enter__(self):
            return self
        def __exit__(self, *exc):
            return self.f.__exit__(*exc)

    os.fdopen = lambda *a, **k: SlowFile(real_fdopen(*a, **k))
    AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.ones(4 << 20)}, "global_step": 2}, sys.argv[1])
""")


@pytest.mark.slow
def test_sigkill_mid_checkpoint_write_keeps_the_previous_checkpoint(tmp_path):
    path = tmp_path / "checkpoints" / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.zeros(8)}, "global_step": 1}, path)
    before = path.read_bytes()
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert proc.stdout.readline().strip() == "MIDWRITE"  # a partial temp file is on disk now
        partial = [p for p in path.parent.iterdir() if p.name != "last.ckpt"]
        assert partial and partial[0].stat().st_size > 1 << 20
    finally:
        proc.kill()  # SIGKILL: no handler, no cleanup
        proc.wait()
    assert path.read_bytes() == before  # the partial file never replaced the old one
    ckpt = read_checkpoint(path, mmap=False)
    assert ckpt["global_step"] == 1 and torch.equal(ckpt["state_dict"]["w"], torch.zeros(8))
    AtomicCheckpointIO().save_checkpoint({"state_dict": {}, "global_step": 3}, path)  # the next save sweeps the debris
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]


def test_failed_checkpoint_write_leaves_the_old_file_and_no_temp(tmp_path):
    path = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"global_step": 1}, path)
    with pytest.raises(Exception):
        io.save_checkpoint({"global_step": 2, "bad": lambda: None}, path)  # lambdas do not pickle
    assert read_checkpoint(path)["global_step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


# ---- a killed training run resumes to the same weights ---------------------------------------------
def _train(run_dir, *overrides):
    return run_training(DEMO, [*SHORT, f"run_dir={run_dir}", *overrides], console=QUIET, progress=False)


def _exported(folder: Path) -> dict:
    return {f"{p.relative_to(folder)}:{k}": v for p in sorted(folder.rglob("*.safetensors")) for k, v in load_file(p).items()}


def _killed_at_its_first_checkpoint(killed: Path, done: Future) -> None:
    """`soe stitch` (60 steps, a checkpoint every 2) SIGKILLed once its first checkpoint is on disk; ``done`` holds its
    exit status."""
    cmd = [sys.executable, "-m", "soe.cli", "stitch", str(DEMO), *SHORT, f"run_dir={killed}", "trainer.max_steps=60",
           "trainer.checkpoint_every_n_steps=2"]
    try:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        last = killed / "checkpoints" / "last.ckpt"
        try:
            deadline = time.time() + 400
            while not last.exists() and proc.poll() is None and time.time() < deadline:
                time.sleep(0.02)
            assert last.exists(), "the run never wrote a checkpoint"
        finally:
            proc.kill()
            proc.wait()
        done.set_result(proc.returncode)
    except BaseException as e:  # noqa: BLE001 - the test waiting on this run fails with it
        done.set_exception(e)


@pytest.fixture(scope="module", autouse=True)
def killed_run(request, tmp_path_factory):
    """The killed run of the test below, started in the background when this module starts (when that test is selected):
    its start-up (Python, torch, Lightning) overlaps the in-process cases."""
    if not any(getattr(item, "originalname", None) == "test_killed_run_resumes_to_identical_weights" and item.module is request.module
               for item in request.session.items):
        yield None
        return
    killed, done = tmp_path_factory.mktemp("killed") / "killed", Future()
    threading.Thread(target=_killed_at_its_first_checkpoint, args=(killed, done), daemon=True).start()
    yield killed, done
    done.exception(timeout=900)  # no run left behind when the module ends


# ---- non-finite losses ------------------------------------------------------------------------------
def inject_nan(monkeypatch, side: str, step: int):
    """The ``side`` loss of training step ``step`` becomes NaN (the graph stays intact)."""
    real, calls = FlowObjective.modality_loss, {"a": 0, "b": 0}

    def patched(self, s, pred, target):
        loss = real(self, s, pred, target)
        calls[s] += 1
        return loss * float("nan") if s == side and calls[s] == step + 1 else loss

    monkeypatch.setattr(FlowObjective, "modality_loss", patched)


@pytest.mark.slow
def test_nonfinite_loss_stops_with_one_line_naming_modality_and_step(tmp_path, monkeypatch, capsys):
    inject_nan(monkeypatch, "b", step=2)
    argv = ["stitch", str(DEMO), *SHORT, f"run_dir={tmp_path / 'run'}", "trainer.max_steps=5"]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("error: non-finite audio loss (expert b) = nan at step 2; training stopped"), err


@pytest.mark.slow
def test_nonfinite_loss_skip_skips_that_optimizer_step(tmp_path, monkeypatch):
    inject_nan(monkeypatch, "a", step=1)
    with pytest.warns(RuntimeWarning, match=r"non-finite video loss \(expert a\) = nan at step 1: skipped"):
        result = _train(tmp_path / "run", "trainer.max_steps=3", "trainer.on_nonfinite=skip")
    module = result["module"]
    assert module.skipped_steps == [1]
    assert torch.isfinite(module.objective.loss_ema).all()  # the bad loss never reached the balance EMA
    for p in module.trainable_parameters():
        assert torch.isfinite(p).all()
    opt = result["trainer"].optimizers[0]
    steps = {int(s["step"]) for s in opt.state.values()}
    assert steps == {result["trainer"].global_step - 1}  # AdamW stepped every step but the skipped one


def test_nonfinite_stop_is_a_floating_point_error_for_library_callers(tmp_path, monkeypatch):
    inject_nan(monkeypatch, "a", step=0)
    with pytest.raises(FloatingPointError, match=r"non-finite video loss \(expert a\) = nan at step 0") as info:
        _train(tmp_path / "run", "trainer.max_steps=2")
    assert isinstance(info.value, NonFiniteLossError)


def test_pretrain_expert_stops_on_a_nonfinite_loss_with_the_one_line_error(monkeypatch):
    """``pretrain_expert`` trains through ExpertModule, which skips StitchModule.__init__: the
    non-finite check must still find its setting and stop with the one-line error."""
    from soe.data.datamodule import SyntheticAVDataModule
    from soe.plugin.registry import get_expert
    from soe.train.single import pretrain_expert

    expert = get_expert("wan2.1").tiny()
    data = SyntheticAVDataModule({"a": expert}, seconds=1.0, num_clips=8, batch_size=2)
    inject_nan(monkeypatch, "a", step=1)
    with pytest.raises(NonFiniteLossError, match=r"^non-finite video loss \(expert a\) = nan at step 1; training stopped"):
        pretrain_expert(expert, data, "a", max_steps=2, accelerator="cpu")


# ---- the killed run (last in this file: its process starts with the module and runs beside the cases above) ----
@pytest.mark.slow
def test_killed_run_resumes_to_identical_weights(tmp_path, killed_run):
    killed, done = killed_run
    returncode = done.result(timeout=900)
    last = killed / "checkpoints" / "last.ckpt"
    assert returncode == -9
    step = read_checkpoint(last)["global_step"]
    assert 2 <= step < 60
    total = [f"trainer.max_steps={step + 2}", "trainer.checkpoint_every_n_steps=2"]
    resumed = _train(killed, *total, "resume=true")
    straight = _train(tmp_path / "straight", *total)
    assert resumed["trainer"].global_step == straight["trainer"].global_step == step + 2
    a, b = straight["module"].trainable_state_dict(), resumed["module"].trainable_state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ea, eb = _exported(tmp_path / "straight" / "trained"), _exported(killed / "trained")  # connectors + peft adapters
    assert ea.keys() == eb.keys() and any("lora_a" in k for k in ea)
    for k in ea:
        assert torch.equal(ea[k], eb[k]), k
