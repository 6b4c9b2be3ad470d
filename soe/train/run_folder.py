"""A run folder belongs to one process at a time, and a resume cannot quietly change the run.

* :class:`RunLock`: ``<run_dir>/soe.lock`` held with ``flock`` for the life of the run and naming its
  holder (pid, host, start time). The kernel drops the lock when the holder dies, however it dies,
  so a lock left by a killed run is recognised as stale and taken over; a live holder makes a
  second start fail with one line naming it.
* :func:`check_recipe_changes`: a resume compares the recipe with the run's ``recipe.yaml`` and
  refuses changes to anything that alters the trained function or the batch sequence, unless the
  user names them (``soe stitch ... --allow-changes optim.lr``).
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path

from omegaconf import OmegaConf

from soe.errors import SoeError

LOCK_NAME = "soe.lock"

# Keys a resume may change freely: how long to train, how often to log, checkpoint and sample,
# data-loading processes (the batch sequence is a function of the batch number alone; on a streamed
# cache also of the loader workers per device, see `check_recipe_changes`), the name.
FREE_TO_CHANGE = ("resume", "run_dir", "name", "trainer.max_steps", "trainer.log_every_n_steps",
                  "trainer.checkpoint_every_n_steps", "trainer.on_nonfinite", "data.num_workers", "sample")


class RunFolderError(SoeError, RuntimeError):
    """The run folder is in use by another process, or a resume would change the run."""


class RunLock:
    """An exclusive lock on a run folder, held from :meth:`acquire` until :meth:`release` or exit."""

    def __init__(self, run_dir):
        self.path = Path(run_dir) / LOCK_NAME
        self._fd: int | None = None
        self.stale_holder: dict | None = None  # a dead holder whose lock was taken over

    def holder(self) -> dict | None:
        """Who holds the lock now (None: nobody alive does)."""
        if not self.path.is_file():
            return None
        fd = os.open(self.path, os.O_RDONLY)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                return _read_holder(self.path)
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
        finally:
            os.close(fd)

    def check(self) -> None:
        """Fail (one line naming the holder) if a live process holds the folder; writes nothing."""
        holder = self.holder()
        if holder is not None:
            raise RunFolderError(_busy_message(self.path.parent, holder))

    def acquire(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            raise RunFolderError(_busy_message(self.path.parent, _read_holder(self.path))) from None
        previous = _read_holder(self.path)
        if previous:  # the file names a holder, but nobody holds the lock: that process is gone
            self.stale_holder = previous
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        os.ftruncate(self._fd, 0)  # the file stays (unlinking it would race a waiting opener)
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def _read_holder(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text() or "null")
    except (OSError, ValueError):
        return None


def _busy_message(run_dir: Path, holder: dict | None) -> str:
    who = (f"pid {holder.get('pid')} on host {holder.get('host')} (started {holder.get('started')})"
           if holder else "another process")
    return f"run_dir: '{run_dir}' is in use by {who}; wait for it to finish or choose another run_dir"


# ---- recipe changes on resume -----------------------------------------------------------------------
def _flatten(node, prefix="") -> dict:
    if isinstance(node, dict):
        out = {}
        for k, v in node.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out or {prefix[:-1]: {}}
    return {prefix[:-1]: node}


def _covered(key: str, names) -> bool:
    return any(key == n or key.startswith(n + ".") for n in names)


def recipe_changes(saved, current) -> dict[str, tuple]:
    """``{key: (saved value, current value)}`` for every leaf that differs."""
    a = _flatten(OmegaConf.to_container(saved, resolve=True))
    b = _flatten(OmegaConf.to_container(current, resolve=True))
    return {k: (a.get(k, "<unset>"), b.get(k, "<unset>")) for k in sorted(set(a) | set(b)) if a.get(k, "<unset>") != b.get(k, "<unset>")}


def check_recipe_changes(run_dir, cfg, allow_changes=()) -> dict[str, tuple]:
    """Refuse a resume whose recipe differs from ``<run_dir>/recipe.yaml`` in a key that changes the run.

    Returns the changes accepted (free ones and those named in ``allow_changes``). A cosine schedule
    is a function of ``trainer.max_steps``, so there raising it must be named too.
    """
    from soe.recipe.reading import load_recipe

    saved_file = Path(run_dir) / "recipe.yaml"
    if not saved_file.is_file():
        _check_allowed_keys(allow_changes, cfg)
        return {}
    saved = load_recipe(saved_file)
    _check_allowed_keys(allow_changes, cfg, saved)
    changes = {k: v for k, v in recipe_changes(saved, cfg).items() if k not in ("resume", "run_dir")}
    free = list(FREE_TO_CHANGE)
    if cfg.optim.schedule == "cosine" or saved.optim.schedule == "cosine":
        free.remove("trainer.max_steps")
    _check_stream_workers(cfg, changes.get("data.num_workers"))
    refused = {k: v for k, v in changes.items() if not _covered(k, free) and not _covered(k, allow_changes)}
    if refused:
        shown = "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in list(refused.items())[:4])
        more = f" (and {len(refused) - 4} more)" if len(refused) > 4 else ""
        raise RunFolderError(f"resume: the recipe differs from '{saved_file}' in {shown}{more}; these change the trained "
                             f"function or the batch sequence; pass --allow-changes {' '.join(refused)} to accept them")
    return changes


def _check_allowed_keys(allow_changes, *recipes) -> None:
    """Each ``--allow-changes`` name is a key or section of the recipe (a typo would allow nothing)."""
    from soe.schema.base import closest

    leaves = [leaf for r in recipes for leaf in _flatten(OmegaConf.to_container(r, resolve=True))]
    known = set()
    for leaf in leaves:
        parts = leaf.split(".")
        known.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    for key in allow_changes:
        if key not in known:
            raise RunFolderError(f"--allow-changes {key}: not a key of the recipe{closest(key, sorted(known))}")


def _check_stream_workers(cfg, change) -> None:
    """On a streamed cache each loader worker reads its own share of the chunks, so the batches depend
    on ``data.num_workers`` (0 and 1 alike): a resume that changes it is refused here, before anything
    is written (the loader's checkpoint state refuses it too, for runs started from Python)."""
    if change is None or cfg.data.kind == "synthetic":
        return
    from soe.data.stream_format import is_stream_cache
    from soe.data.streaming import readers_per_device

    old, new = (readers_per_device(v) if isinstance(v, int) else v for v in change)
    if old != new and is_stream_cache(cfg.data.path):
        raise RunFolderError(f"resume: data.num_workers {change[0]!r} -> {change[1]!r}: on a streamed cache each loader worker "
                             f"reads its own chunks, so the batches depend on it (0 counts as 1); resume with "
                             f"data.num_workers={change[0]}")
