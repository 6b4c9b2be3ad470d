"""soe's own error types: every problem a user can fix is one of these, reported by ``soe`` as one line.

``SoeError`` is the common base; ``soe.cli.main`` (the ``soe`` command) prints ``error: <message>`` and exits with the
error's ``exit_code`` (2 for bad input: recipes, checkpoint folders, latent caches, arguments; 1 for a
training run that stopped on a non-finite loss or a full disk). Library callers catch ``SoeError`` (or the
``ValueError``/``FloatingPointError`` each subclass also is).
"""
from __future__ import annotations


class SoeError(Exception):
    """Base of soe's user-facing errors; the message is one line naming the key or file at fault."""

    exit_code = 2


class RecipeError(SoeError, ValueError):
    """A recipe problem, reported as one line: ``<key>: <what is wrong and what was expected>``."""



class CheckpointError(SoeError, ValueError):
    """A checkpoint folder or file that cannot be used: missing, truncated, wrong shapes, dtypes or keys."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """No checkpoint where one was expected (``Expert.load`` of a missing folder); names the files looked for."""


class UnstitchedError(SoeError, RuntimeError):
    """A Stitcher called after ``unstitch()`` (its hooks are gone): ``restitch()`` it first."""


class DataError(SoeError, ValueError):
    """Training data that cannot form the requested batches."""


class UsageError(SoeError, ValueError):
    """Bad command-line arguments (unknown subcommand, missing recipe, ...)."""


class NonFiniteLossError(SoeError, FloatingPointError):
    """A NaN/inf training loss with ``trainer.on_nonfinite: stop``; names the modality and step."""

    exit_code = 1


class DiskFullError(SoeError, OSError):
    """No space left (or quota exceeded) while writing a checkpoint or an export; names the path.
    The write was abandoned whole: the previous file or folder is intact."""

    exit_code = 1


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped by Ctrl-C, SIGTERM or SIGUSR1 (a ``KeyboardInterrupt``, so ``except Exception`` never
    swallows it). The message says which checkpoint a resume uses and how to resume; ``soe`` prints it and
    exits with ``exit_code``: 128 + the signal's number (130 for Ctrl-C), what shells report for such a stop."""

    exit_code = 130  # 128 + SIGINT

    def __init__(self, message: str = "", exit_code: int = 130):
        super().__init__(message)
        self.exit_code = exit_code


DISK_FULL_ERRNOS = (28, 122)  # ENOSPC, EDQUOT


def without_loader_advice(err: BaseException) -> str:
    """A loader's message without advice that does not apply to soe users (diffusers suggests
    ``low_cpu_mem_usage=False`` / ``ignore_mismatched_sizes=True``, arguments soe never passes)."""
    import re

    sentences = re.split(r"(?<=[.!])\s+", " ".join(str(err).split()))
    kept = [s for s in sentences if "low_cpu_mem_usage" not in s and "ignore_mismatched_sizes" not in s]
    return " ".join(kept) or type(err).__name__


def one_line(err: BaseException, limit: int = 400) -> str:
    """A (possibly multi-line) exception message squeezed onto one line, at most ``limit`` characters."""
    text = " ".join(str(err).split()) or type(err).__name__
    if len(text) <= limit:
        return text
    cut = text[: limit - 4]
    return (cut.rsplit(" ", 1)[0] if " " in cut else cut) + " ..."  # never mid-word
