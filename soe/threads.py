"""How many CPU threads torch uses for one soe process.

torch's default (one thread per physical core) is fast on an idle machine and falls off a cliff as
soon as another process wants a core: its OpenMP workers wait on each other and one training step
of the demo went from 0.1 s to 8 s. ``benchmarks/threads.py`` measures 1 vs 2 threads with and
without a competing process: on 2 cores, 2 threads gain at most a few percent when the machine is
idle and lose 4-80x when one other process is busy, so soe leaves half the cores free:

- ``SOE_NUM_THREADS=N`` (environment) or ``trainer.threads: N`` (recipe) set the count explicitly;
- an explicit ``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS`` is respected (torch already read it);
- otherwise soe uses half the cores this process may run on, fewer if the load average says they
  are busy, at least 1 and at most torch's own default.

Only CPU work is affected (GPU kernels do not use these threads).
"""
from __future__ import annotations

import os

ENV_VAR = "SOE_NUM_THREADS"


def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def default_threads(torch_default: int) -> int:
    """Half the usable cores, no more than look free (load average), within [1, torch's default]."""
    cores = _usable_cores()
    try:
        busy = os.getloadavg()[0]
    except (AttributeError, OSError):
        busy = 0.0
    free = int(cores - busy + 0.5)  # round: a core at 50% load still counts as free
    return max(1, min(torch_default, cores // 2, free))


def choose_threads(recipe_value: int | None = None) -> tuple[int | None, str]:
    """(thread count or None to leave torch alone, where the choice came from)."""
    import torch

    env = os.environ.get(ENV_VAR, "").strip()
    if env:
        try:
            n = int(env)
        except ValueError:
            n = 0
        if n < 1:
            from soe.errors import UsageError

            raise UsageError(f"{ENV_VAR}: expected a positive integer, got {env!r}")
        return n, ENV_VAR
    if recipe_value is not None:
        return int(recipe_value), "trainer.threads"
    if os.environ.get("OMP_NUM_THREADS") or os.environ.get("MKL_NUM_THREADS"):
        return None, "OMP_NUM_THREADS"
    return default_threads(torch.get_num_threads()), "free cores"


def configure_threads(recipe_value: int | None = None) -> int:
    """Apply :func:`choose_threads` to torch; returns the thread count torch now uses."""
    import torch

    n, _ = choose_threads(recipe_value)
    if n is not None and n != torch.get_num_threads():
        torch.set_num_threads(n)
    return torch.get_num_threads()
