"""Rich tables that show what was built: experts, block pairs, connector shapes, parameter counts."""
from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table

if TYPE_CHECKING:
    from soe.stitch.stitcher import Stitcher


def fmt_count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.3f}{unit}" if unit == "B" else f"{n / size:.2f}{unit}"
    return str(n)


def num_params(module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def experts_table(experts, details: bool = False) -> Table:
    """Name, modality, presets and model source of each expert: classes, or rows of ``soe.plugin.listing``
    (read without importing the plugins). ``details`` (classes only): also depth, width and tokens
    per second of its first real-size preset, from the family's stand-in or else built on the meta
    device (this imports the plugins and torch, so ``soe experts`` leaves it to ``--details``)."""
    from soe.plugin.listing import ExpertListing

    t = Table(title="registered experts")
    detail_cols = ("blocks", "hidden", "tokens/s") if details else ()
    for col in ("name", "modality", *detail_cols, "presets", "source", "plugin"):
        t.add_column(col, no_wrap=col != "presets")
    for e in experts:
        row = e if isinstance(e, ExpertListing) else ExpertListing.of_class(e)
        cells = []
        if details:
            import torch

            preset = next((p for p in e.presets if p != "tiny"), "tiny")
            built = e.stand_in(dict(e.presets[preset]))  # equal in all three (soe/plugin/stand_in.py), no model library imported
            if built is None:
                with torch.device("meta"):
                    built = e.from_preset(preset, device="meta")
            cells = [str(built.num_blocks), str(built.hidden_size), f"{built.token_rate:.2f}"]
        t.add_row(row.name, row.modality, *cells, ", ".join(row.presets), row.source, row.plugin)
    return t


def stitch_tables(st: Stitcher, lora: dict[str, int] | None = None) -> list[Table]:
    """The experts (with parameter counts), connectors and block pairs of ``st``. ``lora``: LoRA
    parameters per side counted rather than injected (``soe.train.build.count_training_setup``); they add
    to that expert's parameters and trainable parameters exactly as injected ones would."""
    lora = lora or {}
    experts = Table(title="experts")
    for col in ("side", "name", "modality", "blocks", "hidden", "parameters", "trainable"):
        experts.add_column(col, justify="right" if col in ("blocks", "hidden", "parameters", "trainable") else "left", no_wrap=True)
    for side in ("a", "b"):
        e, extra = getattr(st, side), lora.get(side, 0)
        experts.add_row(side, e.name, e.modality, str(e.num_blocks), str(e.hidden_size), fmt_count(num_params(e) + extra),
                        fmt_count(num_params(e, trainable_only=True) + extra))
    experts.add_row("", "connectors", "", "", "", fmt_count(num_params(st.connectors)),
                    fmt_count(num_params(st.connectors, trainable_only=True)))
    fusion = getattr(st, "fusion", None)
    if fusion is not None:  # inserted blocks (depth expansion) and new k/v projections (attention_kv)
        for title, mod in (("inserted blocks", fusion.inserted), ("k/v projections", fusion.kv)):
            if len(mod):
                experts.add_row("", title, "", str(sum(len(m) for m in mod.values())), "", fmt_count(num_params(mod)),
                                fmt_count(num_params(mod, trainable_only=True)))

    pairs = Table(title=f"block pairs ({len(st.pairs)}, direction {st.direction}, engine {st.engine}, "
                        f"detach_source={st.detach_source})")
    for col in ("#", f"a:{st.a.name}", f"b:{st.b.name}", "a -> b connector", "b -> a connector", "parameters"):
        pairs.add_column(col, no_wrap=True)
    stacks = fusion.stacks if fusion is not None else {}
    mark = {s: (lambda k, s=s: f"{k}+" if stacks.get(s) is not None and stacks[s].is_inserted(k) else str(k)) for s in "ab"}
    for n, (i, j) in enumerate(st.pairs):
        shapes, count = [], 0
        for direction, host in (("a_to_b", j), ("b_to_a", i)):
            if direction in st.connectors:
                c = st.connector_for(direction, host)
                how = fusion.inject[direction] if fusion is not None else None
                into = f" kv:{'+'.join(t.attention for t in how.targets)}" if how is not None and how.targets else ""
                shapes.append(f"{c.in_width} -> {c.mlp.fc2.in_features} -> {c.dst_dim}{into}")
                count += num_params(c)
            else:
                shapes.append("-")
        pairs.add_row(str(n), mark["a"](i), mark["b"](j), *shapes, fmt_count(count))
    return [experts, pairs]


def block_ranges(blocks) -> str:
    """``[0, 1, 2, 5]`` -> ``"0-2, 5"``."""
    out, run = [], []
    for k in sorted(set(blocks)):
        if run and k != run[-1] + 1:
            out.append(run)
            run = []
        run.append(k)
    if run:
        out.append(run)
    return ", ".join(str(r[0]) if len(r) == 1 else f"{r[0]}-{r[-1]}" for r in out)


def hooks_table(st: Stitcher) -> Table:
    """What the stitch put on the experts (``st.hooks``), one row per name with the block index as ``*``."""
    from soe.stitch.named_hooks import KINDS

    groups: dict[str, list] = {}
    for h in st.hooks:
        parts = h.name.split(".")
        groups.setdefault(".".join([*parts[:3], "*", *parts[4:]]), []).append(h)
    t = Table(title=f"hooks on the experts ({len(st.hooks)}; unstitch() removes them)")
    for col in ("name", "blocks", "on", "kind", "does"):
        t.add_column(col, no_wrap=col != "does")
    for pattern, hooks in groups.items():
        h = hooks[0]
        on = f"{h.side}:{getattr(st, h.side).name} block" + (f" / {h.target}" if h.target else "")
        t.add_row(pattern, block_ranges(x.block for x in hooks), on, KINDS[h.kind], h.does)
    if not groups:
        t.add_row("(none)", "", "", "", f"the {st.engine} engine exchanges between the blocks it runs: nothing sits on the experts")
    return t


def recipe_tables(cfg, stand_ins: bool = True, pairs=None) -> list[Table]:
    """What ``soe inspect`` shows for a recipe: validated, then built on the meta device (shapes, no
    weights or memory), LoRA parameters counted from the targeted modules' shapes; ``pairs``: what ``pairs: auto``
    chose (soe/data/auto_pairs.py). ``stand_ins``: each
    expert whose family offers a shape-only stand-in (``Expert.stand_in``, soe/plugin/stand_in.py) is built as
    one, without importing its model library; the tables are the same (tests/test_stand_in.py)."""
    import torch

    from soe.plugin.stand_in import shapes_only
    from soe.recipe.builders import build_stand_in, build_stitcher
    from soe.recipe.validate import validate_recipe
    from soe.train.build import count_training_setup

    given = {side: build_stand_in(cfg, side) for side in ("a", "b")} if stand_ins else {}
    experts = validate_recipe(cfg, check_paths=False, experts=given)  # the experts it built on meta: not built twice
    with torch.device("meta"), shapes_only() if stand_ins else contextlib.nullcontext():
        st = build_stitcher(cfg, device="meta", load_weights=False, experts=experts,
                            auto_pairs=(lambda a, b: pairs) if pairs is not None else None)
        lora = count_training_setup(st, cfg)
    return [*stitch_tables(st, lora), hooks_table(st)]


def print_tables(tables, console: Console | None = None) -> None:
    from soe.console import make_console

    console = console or make_console()
    for t in tables:
        console.print(t)


def similarity_table(record: dict) -> Table:
    """``pairs: auto``: the linear CKA of every block pair, the chosen pairs starred."""
    sim, chosen = record["similarity"], set(record["pairs"])
    a, b = record.get("names", ("a", "b"))
    t = Table(title=f"pairs: auto: linear CKA of block outputs (rows a:{a}, columns b:{b}; * chosen, total "
                    f"{sum(float(sim[i, j]) for i, j in chosen):.3f})")
    t.add_column("a \\ b", justify="right")
    for j in range(sim.shape[1]):
        t.add_column(str(j), justify="right", no_wrap=True)
    for i in range(sim.shape[0]):
        t.add_row(str(i), *(f"{float(sim[i, j]):.2f}" + ("*" if (i, j) in chosen else "") for j in range(sim.shape[1])))
    return t
