import contextlib
import importlib.util
import os
import subprocess
import sys
import threading
from concurrent.futures import Future
from pathlib import Path

import pytest
import torch

from soe import get_expert, list_experts
from soe.threads import configure_threads

configure_threads()  # the CLI's policy: a busy machine must not slow the suite down 10x


@pytest.fixture(autouse=True)
def _outside_the_checkout(tmp_path, tmp_path_factory, monkeypatch):
    """Every test runs in its own temporary folder: a default run_dir (``runs/<name>``) or output folder
    lands there, never in the checkout, and a demo run already in the checkout cannot interfere.
    The CLI's start-up cache (soe/cli/cache.py) is a new empty folder too: `soe experts` and
    `soe inspect` compute their tables in every test, and nothing lands in the user's cache."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SOE_NUM_THREADS", raising=False)
    monkeypatch.setenv("SOE_CACHE_DIR", str(tmp_path_factory.mktemp("soe-cache")))


LAUNCH_ENV = ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "GROUP_RANK", "LOCAL_WORLD_SIZE",
              "PL_GLOBAL_SEED", "PL_SEED_WORKERS")


@pytest.fixture(autouse=True)
def _no_process_group_left_behind():
    """A run in this process under a distributed strategy (fsdp2 on one rank) leaves its gloo process group and the
    launcher variables behind (MASTER_PORT of a store this process still holds, LOCAL_RANK, NODE_RANK): a later test's
    `soe stitch trainer.devices=2` subprocess inherited them and failed. Each test starts and ends without them."""
    saved = {k: os.environ.get(k) for k in LAUNCH_ENV}
    yield
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def tiny(name: str, seed: int = 0):
    return get_expert(name).tiny(seed).eval()


def batch_for(expert, batch_size=2, seconds=1.0, seed=0):
    return expert.dummy_batch(batch_size, seconds=seconds, generator=torch.Generator().manual_seed(seed))


ALL_EXPERTS = list_experts()


@pytest.fixture(params=ALL_EXPERTS)
def expert_name(request):
    return request.param


def live_trainable(module, seed: int = 1, scale: float = 0.05) -> None:
    """Every trainable tensor of ``module`` set to small random values (zero-init LoRA B and connector outputs would
    hide what a test looks for)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * scale)


def finished_checkpoint(proc: subprocess.Popen, run_dir: Path, timeout: int = 300) -> dict:
    """Wait for a `soe stitch` subprocess (stdout/stderr piped), assert it succeeded, return its last.ckpt."""
    from soe.train.checkpoint import read_checkpoint

    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        proc.kill()
    assert proc.returncode == 0, out[-2000:] + err[-2000:]
    return read_checkpoint(run_dir / "checkpoints" / "last.ckpt", mmap=False)


def load_benchmark(name: str):
    """``benchmarks/<name>.py`` of this checkout as a module (the benchmarks are scripts, not a package)."""
    path = Path(__file__).parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TINY = Path(__file__).parent / "recipes" / "tiny.yaml"
TINY_RUN = ["data.num_clips=32", "data.batch_size=2", "data.seconds=1.0", "trainer.log_every_n_steps=1", "trainer.max_steps=3",
            "trainer.checkpoint_every_n_steps=3", "sample.at_end=false", "trainer.accelerator=cpu", "stitch.connector.init=trunc_normal"]


class TinyStitch:
    """``tiny_stitch(*overrides)``: the run folder of `soe stitch tests/recipes/tiny.yaml` for 3 steps (TINY_RUN) with
    ``overrides``, each distinct run made once per session: tests/test_training.py and tests/test_context_parallel.py
    check the same 2-rank ddp and fsdp2 runs, and every rank of a run pays Python, torch and Lightning's start-up
    (several CPU seconds). A run of several ranks is a subprocess (Lightning starts the other ranks); one rank runs
    in this process. ``start(*overrides)`` begins a run of several ranks in the background, at most two at a time:
    Lightning starts a run's other ranks only once rank 0 is set up, so one run alone leaves a core of two idle."""

    def __init__(self, tmp_path_factory):
        self.tmp = tmp_path_factory
        self.two_at_a_time = threading.Semaphore(2)
        self.runs = {}

    def start(self, *overrides) -> None:
        if overrides not in self.runs and any(o.startswith("trainer.devices=") and o != "trainer.devices=1" for o in overrides):
            env = {k: v for k, v in os.environ.items() if k not in LAUNCH_ENV}  # the starting test's, whenever the run starts
            run = self.runs[overrides] = Future()
            self._ranks(run, self.tmp.mktemp("tiny-stitch") / "run", overrides, env)

    def __call__(self, *overrides) -> Path:
        self.start(*overrides)
        if overrides not in self.runs:
            run_dir = self.tmp.mktemp("tiny-stitch") / "run"
            from rich.console import Console

            from soe.cli.stitch import run_training

            with open(os.devnull, "w") as quiet, contextlib.chdir(run_dir.parent):
                run_training(TINY, [*TINY_RUN, f"run_dir={run_dir}", *overrides], console=Console(file=quiet), progress=False)
            self.runs[overrides] = run_dir
        run = self.runs[overrides]
        return run.result() if isinstance(run, Future) else run

    def _ranks(self, run: Future, run_dir: Path, overrides, env: dict) -> None:
        cmd = [sys.executable, "-m", "soe.cli", "stitch", str(TINY), *TINY_RUN, f"run_dir={run_dir}", *overrides]
        finished = in_background(cmd, run_dir.parent, env, self.two_at_a_time)

        def settle(f: Future) -> None:
            proc = None if f.exception() else f.result()
            if proc is None:
                run.set_exception(f.exception())
            elif proc.returncode == 0:
                run.set_result(run_dir)
            else:
                run.set_exception(AssertionError(f"soe stitch {' '.join(overrides)}: exit {proc.returncode}\n"
                                                 + proc.stdout[-2000:] + proc.stderr[-3000:]))

        finished.add_done_callback(settle)


def in_background(cmd: list[str], cwd: Path, env: dict, limit: threading.Semaphore, timeout: int = 600) -> Future:
    """``subprocess.run(cmd)`` in a thread of its own that waits for ``limit`` first and ends with the command (no
    thread is left when later tests fork with preexec_fn); the Future holds the CompletedProcess or the exception."""
    done = Future()

    def run():
        try:
            with limit:
                done.set_result(subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env))
        except BaseException as e:  # noqa: BLE001 - a timeout: the test waiting on the run fails with it
            done.set_exception(e)

    threading.Thread(target=run, daemon=True).start()
    return done


@pytest.fixture(scope="session")
def tiny_stitch(tmp_path_factory):
    """See TinyStitch."""
    return TinyStitch(tmp_path_factory)
