"""What ``soe eval`` shows: one rich table, a row per metric (mean, std, n clips), then the set metrics,
then the skipped metrics with the reason."""
from __future__ import annotations

import math

from rich.table import Table

from soe.evaluate.run import summary


def _fmt(x: float) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4f}"


def eval_table(result: dict, title: str = "soe eval") -> Table:
    table = Table(title=title)
    for col, justify in (("metric", "left"), ("mean", "right"), ("std", "right"), ("n", "right")):
        table.add_column(col, justify=justify)
    for name, mean, std, n in summary(result):
        table.add_row(name if name in result["mean"] else f"{name} (set)", _fmt(mean), _fmt(std), str(n))
    for name, why in result["skipped"].items():
        table.add_row(f"[dim]{name}[/]", "[dim]skipped[/]", "", f"[dim]{why}[/]")
    return table
