"""Sections a Ctrl-C never cuts in half (checkpoint and export file swaps): a stop asked for inside one
happens at its end. :mod:`soe.train.interrupt` decides when a Ctrl-C stops training; this module only defers it.
"""
from __future__ import annotations

import contextlib


class _Critical:
    depth = 0  # nesting of `uninterrupted` blocks
    pending = False  # an immediate stop asked for inside one


@contextlib.contextmanager
def uninterrupted():
    """A block (a file swap) that a Ctrl-C never cuts in half: a stop asked for inside it happens at its end."""
    _Critical.depth += 1
    try:
        yield
    finally:
        _Critical.depth -= 1
    if _Critical.depth == 0 and _Critical.pending:
        _Critical.pending = False
        raise KeyboardInterrupt

