"""The ``soe`` command: ``commands`` (argparse and one small function per subcommand; start-up imports
only argparse and rich, each subcommand imports what it uses), ``stitch`` (a training run: run folder, lock,
Trainer, callbacks, end-of-run samples), ``pretrain`` (``python -m soe.cli.pretrain``: each expert alone on
the synthetic task, the demo's shipped experts), ``app`` (``soe app``: the Gradio app over a loaded stitch), ``tables`` (rich tables of experts, block pairs, hooks) and
``cache`` (the start-up cache of those tables). The top layer: may import every other part of soe.
"""
from soe.cli.commands import main

__all__ = ["main"]
