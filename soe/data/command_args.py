"""What ``soe encode`` and ``soe annotate`` share on the command line: ``--out DIR`` / ``--workers N`` /
``--shard I/N`` given after the positionals (argparse leaves them among the ``key=value`` overrides), part
``I/N`` itself, and the checks of the output folder and of the experts' folders (what a failed run wrote is
removed by :mod:`soe.outputs`)."""
from __future__ import annotations

from pathlib import Path

from soe.errors import RecipeError, UsageError

OPTIONS = {"--out": "--out DIR", "--workers": "--workers N", "--shard": "--shard I/N", "--annotations": "--annotations FILE",
           "--asr": "--asr PATH", "--captioner": "--captioner PATH", "--device": "--device D"}


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


def options_among(args: list[str], out, workers, shard=None, command: str = "soe encode", allowed=("--out", "--workers", "--shard"),
                  extra: dict | None = None) -> tuple:
    """``(out, workers, shard, the other args)``: the ``allowed`` options found among ``args``; any other allowed
    option's value goes into ``extra`` under its name (``extra["--asr"]``)."""
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
            elif opt != "--workers":
                if extra is None:
                    raise UsageError(f"{command}: unknown option '{opt}'")
                extra[opt] = value
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


RUN_FOLDER_ENTRIES = ("checkpoints", "trained", "soe.lock")  # what `soe stitch` keeps in a run folder


def check_folders(src, out, command: str, what: str) -> None:
    """The source folder ``src`` exists, and ``out`` is a place for the ``what`` (soe.outputs.check_output: a
    writable folder outside the source) that is not a run folder of ``soe stitch`` (an existing ``what`` is fine:
    the command resumes there)."""
    from soe.outputs import check_output

    if not Path(src).is_dir():
        raise UsageError(f"{command}: source folder not found: '{src}'")
    key = f"{command} --out"
    check_output(out, key, sources=[src])
    held = [n for n in RUN_FOLDER_ENTRIES if (Path(out) / n).exists()]
    if held:
        raise UsageError(f"{key}: '{out}' is a run folder of `soe stitch` (holds {', '.join(held)}); choose a folder of its own "
                         f"for the {what}")


def check_expert_folders(cfg, keys: tuple[str, ...]) -> None:
    """Each expert's folders named by ``keys`` (``path``, ``codec_path``, ...) exist where the recipe gives one
    (a Hub repo id is fetched, or found in the Hugging Face cache: soe.recipe.hub_paths)."""
    from soe.recipe.hub_paths import local_weights

    for side in ("a", "b"):
        for key in keys:
            p = local_weights(cfg.experts[side], side, key)
            if p is not None and not Path(p).is_dir():
                raise RecipeError(f"experts.{side}.{key}: folder not found: '{p}'")
