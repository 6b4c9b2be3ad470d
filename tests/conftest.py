import importlib.util
import os
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


def load_benchmark(name: str):
    """``benchmarks/<name>.py`` of this checkout as a module (the benchmarks are scripts, not a package)."""
    path = Path(__file__).parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
