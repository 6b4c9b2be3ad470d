"""The rich consoles soe prints to.

On a terminal rich fits output to the window. Piped into a file or a CI log, rich would assume 80
columns and fold table cells mid-word ("modalit y"); there, soe lays lines out at ``PIPE_WIDTH``
columns instead (``COLUMNS`` still wins when set).
"""
from __future__ import annotations

import os

from rich.console import Console

PIPE_WIDTH = 200


def make_console(stderr: bool = False, **kwargs) -> Console:
    console = Console(stderr=stderr, **kwargs)
    if not console.is_terminal and "width" not in kwargs and not os.environ.get("COLUMNS"):
        console.width = PIPE_WIDTH
    return console


def console_kwargs() -> dict:
    """Arguments for a rich console created by another library (Lightning's progress bar)."""
    probe = Console()
    return {"width": PIPE_WIDTH} if not probe.is_terminal and not os.environ.get("COLUMNS") else {}
