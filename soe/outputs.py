"""Output places: where a command writes, checked before it starts and tidied when it fails.

Every command that writes a folder (``soe stitch`` its run, ``soe generate`` its samples, ``soe encode``
its cache, ``soe export`` and ``soe convert`` their output) goes through :func:`check_output` first and
runs inside :func:`removed_on_failure`, so that

* a place that cannot be written (under a file, in a read-only or full folder, without permission) is
  one line naming the key, before any model is built;
* a place inside the command's own source (``--out RUN/trained``, ``DST`` inside ``SRC``) is refused;
* a place holding earlier results (named by the command: ``universe1.json``, ``checkpoints/``, ...) is
  refused unless the user asked to replace them (``--force``, ``resume=true``);
* a command that fails leaves nothing it created: the folders it made are removed whole, and in a
  folder that existed, the entries that were not there before.
"""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from pathlib import Path

from soe.errors import SoeError


class OutputError(SoeError, ValueError):
    """An output place that cannot be used; the message names the key (``--out``, ``sample.out``, ...)."""


def _first_existing(path: Path) -> Path:
    for p in (path, *path.parents):
        if p.exists() or p.is_symlink():
            return p
    return Path(path.anchor or ".")


def _reason(err: OSError) -> str:
    return {errno.EROFS: "read-only file system", errno.EACCES: "permission denied", errno.EPERM: "permission denied",
            errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded"}.get(
        err.errno, err.strerror or type(err).__name__)


def _inside(path: Path, other: Path) -> bool:
    return path == other or other in path.parents


def check_output(path, key: str, *, sources=(), results=(), replace: bool = False, replace_hint: str = "--force") -> Path:
    """``path`` as a folder this command may write, or a one-line :class:`OutputError` naming ``key``.

    ``sources``: files or folders the command reads; the output may not lie inside one of them.
    ``results``: names (globs) of earlier results inside ``path``; refused unless ``replace``
    (``replace_hint`` says how the user asks for that). Writes nothing: writability is probed with a
    temporary file in the nearest existing folder, removed at once.
    """
    path = Path(path)
    for p in (path, *path.parents):
        if p.exists() and not p.is_dir():
            raise OutputError(f"{key}: '{p}' is a file, expected a folder" + (f" for '{path}'" if p != path else ""))
    resolved = path.resolve()
    for src in sources:
        if src is not None and _inside(resolved, Path(src).resolve()):
            raise OutputError(f"{key}: '{path}' is inside '{src}', which this command reads; choose a folder outside it")
    if path.is_dir() and not replace:
        held = sorted({q.name for pattern in results for q in path.glob(pattern)})
        if held:
            raise OutputError(f"{key}: '{path}' already holds earlier results ({', '.join(held[:4])}); choose another "
                              f"folder or pass {replace_hint} to replace them")
    probe_writable(path, key)
    return path


def probe_writable(path: Path, key: str) -> None:
    """Create (and remove) a temporary file in the nearest existing folder of ``path``."""
    folder = _first_existing(Path(path))
    try:
        fd, name = tempfile.mkstemp(prefix=".soe-probe-", dir=folder)
        os.close(fd)
        os.unlink(name)
    except OSError as err:
        raise OutputError(f"{key}: cannot write to '{folder}' ({_reason(err)})") from None


@contextlib.contextmanager
def removed_on_failure(path, key: str | None = None):
    """Run the body; if it raises, remove what it created under ``path`` (the folders it made whole,
    else the new entries of an existing folder) and re-raise. An ``OSError`` of the file system
    (read-only, permission, full disk) raised while writing becomes a one-line :class:`OutputError`
    naming ``key`` when ``key`` is given."""
    path = Path(path)
    root = new_root(path)
    before = set(path.rglob("*")) if root is None and path.is_dir() else set()
    try:
        yield path
    except BaseException as err:
        remove_new(path, root, before)
        if key is not None and isinstance(err, OSError) and not isinstance(err, SoeError) and err.errno in (
                errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOSPC, errno.EDQUOT):
            raise OutputError(f"{key}: cannot write '{err.filename or path}' ({_reason(err)})") from None
        raise


def new_root(path) -> Path | None:
    """The outermost folder of ``path``'s own path that does not exist yet (what a command would create), or None."""
    return next((p for p in reversed([Path(path), *Path(path).parents]) if not p.exists()), None)


def remove_new(path: Path, new_root: Path | None, before: set[Path]) -> None:
    """Remove the folder a command created (``new_root``), else the entries under ``path`` not in ``before``."""
    if new_root is not None:
        shutil.rmtree(new_root, ignore_errors=True)
        return
    if not path.is_dir():
        return
    for p in sorted(set(path.rglob("*")) - before, key=lambda p: len(p.parts), reverse=True):  # files before folders
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
