"""Optional extras: features that need a package not every user installs.

``pip install 'soe[tensorboard]'`` (TensorBoard logs), ``'soe[plots]'`` (matplotlib: contact sheets of
generated samples, ``loss_curves.png``), ``'soe[app]'`` (gradio: ``soe app``), ``'soe[all]'``. A feature whose extra is missing says so in one line.
"""
from __future__ import annotations

from importlib.util import find_spec

from soe.errors import SoeError

EXTRAS = {"tensorboard": "tensorboard", "matplotlib": "plots", "gradio": "app"}  # module -> extra that installs it


class MissingExtraError(SoeError, ImportError):
    """A feature needs an optional extra that is not installed."""


def has(module: str) -> bool:
    return find_spec(module) is not None


def missing_message(module: str, feature: str) -> str:
    return f"{feature}: not available without {module} (pip install 'soe[{EXTRAS[module]}]')"


def require(module: str, feature: str) -> None:
    """Raise a one-line :class:`MissingExtraError` naming the extra when ``module`` is not installed."""
    if not has(module):
        raise MissingExtraError(missing_message(module, feature))
