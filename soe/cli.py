"""The ``soe`` command: ``experts``, ``inspect``, ``stitch``.

Bad input (recipe keys, paths, names) prints one line naming the problem and exits with status 2.
"""
from __future__ import annotations

import argparse
import sys

from rich.console import Console

from soe.config import RecipeError

console = Console(stderr=False)
err_console = Console(stderr=True)


def _cmd_experts(args) -> int:
    from soe.registry import get_expert, list_experts
    from soe.report import experts_table

    console.print(experts_table([get_expert(n) for n in list_experts()]))
    return 0


def _cmd_inspect(args) -> int:
    import torch

    from soe.builders import build_stitcher
    from soe.config import load_recipe, validate_recipe
    from soe.report import print_tables, stitch_tables

    cfg = load_recipe(args.recipe, args.overrides)
    validate_recipe(cfg, check_paths=False)
    with torch.device("meta"):  # architecture only: full-size recipes inspect in seconds
        st = build_stitcher(cfg, device="meta", load_weights=False)
    from soe.lora import apply_training_setup

    apply_training_setup(st, cfg)
    print_tables(stitch_tables(st), console)
    return 0


def _cmd_stitch(args) -> int:
    from soe.train.run import run_training

    run_training(args.recipe, args.overrides, console=console)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="soe", description="Stitching of Experts: join two pretrained diffusion transformers.")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("experts", help="list registered experts").set_defaults(func=_cmd_experts)
    for name, func, help_ in (("inspect", _cmd_inspect, "show block pairs, connector shapes and parameter counts (meta device)"),
                              ("stitch", _cmd_stitch, "train a stitched model from a recipe")):
        sp = sub.add_parser(name, help=help_)
        sp.add_argument("recipe", help="recipe YAML file")
        sp.add_argument("overrides", nargs="*", help="key=value overrides, e.g. trainer.max_steps=10")
        sp.set_defaults(func=func)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except RecipeError as e:
        err_console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
