"""How many CPU threads torch uses for one soe process.

torch's default (one thread per physical core) is fast on an idle machine and falls off a cliff as
soon as another process wants a core: its OpenMP workers wait on each other. ``benchmarks/threads.py``
times one demo training step at 1 and 2 threads, with and without a deliberate ``yes > /dev/null``
competitor, interleaved in one run (2-core shared machine, median of 3 rounds x 5 steps)::

    machine                     1 thread     2 threads
    as found (load ~2)          0.101 s      0.108 s  (x1.07)
    + 1 busy process            0.116 s      0.482 s  (x4.2 slower than 1 thread)

(the issue that started this saw 0.1 s vs 8 s per step under a second process). One thread loses
little where two would win and wins big where two lose, so soe leaves cores free:

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
