"""What ``soe encode`` and ``soe annotate`` share on the command line: ``--out DIR`` / ``--workers N`` /
``--shard I/N`` given after the positionals (argparse leaves them among the ``key=value`` overrides), part
``I/N`` itself, the checks of the output folder and of the experts' folders, and removing what a run that fails wrote."""
from __future__ import annotations

import shutil
from pathlib import Path

from soe.errors import RecipeError, UsageError

OPTIONS = {"--out": "--out DIR", "--workers": "--workers N", "--shard": "--shard I/N"}


def parse_shard(text: str | None, command: str = "soe encode") -> tuple[int, int]:
    """``"I/N"`` -> ``(I, N)`` with ``0 <= I < N``; ``None`` -> ``(0, 1)``."""
    if text is None:
        return 0, 1
    i, slash, n = str(text).partition("/")
    try:
        part, parts = int(i), int(n)
    except ValueError:
        part = parts = -1
    if not slash or parts < 1 or not 0 <= part < parts:
        raise UsageError(f"{command}: --shard expects I/N with 0 <= I < N (e.g. 0/8), got {text!r}")
    return part, parts


def options_among(args: list[str], out, workers, shard=None, command: str = "soe encode", allowed=tuple(OPTIONS)) -> tuple:
    """``(out, workers, shard, the other args)``: the ``allowed`` options found among ``args``."""
    rest, i = [], 0
    while i < len(args):
        opt, _, inline = args[i].partition("=") if args[i].startswith("--") else (args[i], "", "")
        if opt in allowed:
            value = inline or (args[i + 1] if i + 1 < len(args) else None)
            if value is None:
                raise UsageError(f"{command}: {opt} needs a value")
            i += 1 if inline else 2
            if opt == "--out":
                out = value
            elif opt == "--shard":
                shard = value
            else:
                try:
                    workers = int(value)
                except ValueError:
                    raise UsageError(f"{command}: --workers expects an integer, got {value!r}") from None
            continue
        if args[i].startswith("-"):
            raise UsageError(f"{command}: unknown option '{args[i]}' (options: {', '.join(OPTIONS[o] for o in allowed)})")
        rest.append(args[i])
        i += 1
    return out, workers, shard, rest


def check_folders(src, out, command: str, what: str) -> None:
    """``out`` can become a folder (no file on its path) and the source folder ``src`` exists."""
    for p in (Path(out), *Path(out).parents):
        if p.exists() and not p.is_dir():
            raise UsageError(f"{command} --out: '{p}' is a file, expected a folder for the {what} '{out}'")
    if not Path(src).is_dir():
        raise UsageError(f"{command}: source folder not found: '{src}'")


def check_expert_folders(cfg, keys: tuple[str, ...]) -> None:
    """Each expert's folders named by ``keys`` (``path``, ``codec_path``, ...) exist where the recipe gives one."""
    for side in ("a", "b"):
        for key in keys:
            p = cfg.experts[side][key]
            if p is not None and not Path(p).is_dir():
                raise RecipeError(f"experts.{side}.{key}: folder not found: '{p}'")


def new_root(out) -> Path | None:
    """The outermost folder of ``out``'s path that does not exist yet (what a run creates), or None."""
    return next((p for p in reversed([Path(out), *Path(out).parents]) if not p.exists()), None)


def remove_new(out: Path, root: Path | None, before: set[Path]) -> None:
    """Remove what a run wrote: the folder it created (``root``), else the paths under ``out`` that were
    not there ``before``."""
    if root is not None:
        shutil.rmtree(root, ignore_errors=True)
        return
    for p in sorted(set(out.rglob("*")) - before, key=lambda p: len(p.parts), reverse=True):  # files before their folders
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
