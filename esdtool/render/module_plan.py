"""The report's section for a pruning / lr / weight-decay plan: the plan's number per layer with
the alpha it came from, in a figure and a table (the page escapes every name)."""

from __future__ import annotations

import base64
from typing import TYPE_CHECKING, Any

import pandas as pd

from esdtool.analysis.roles import module_kind
from esdtool.render import plots
from esdtool.untrusted import printable

if TYPE_CHECKING:  # the plan is drawn, never computed here
    from esdtool.plan.layerwise import ModulePlan

_WHAT = {
    "pruning": ("Pruning plan", "sparsity", "share of the module's weights to prune"),
    "lr": ("Learning-rate plan", "lr factor", "factor of the base learning rate"),
    "weight-decay": ("Weight-decay plan", "weight-decay factor", "factor of the base weight "
                     "decay"),
}  # fmt: skip
MAX_ROWS = 5000  # as the metrics table: a page a browser can open


def section(plan: ModulePlan | None, alpha_column: str) -> dict[str, Any] | None:
    """What the template draws for ``plan`` (None: no such plan)."""
    if plan is None:
        return None
    title, label, meaning = _WHAT[plan.target]
    table = plan.table.assign(kind=[module_kind(str(m)) or str(m) for m in plan.table.module])
    block = plan.mapping == "block"
    alpha_label = f"{alpha_column}, block mean" if block else alpha_column
    figure = plots.module_values(table, plan.column, label, alpha_label)
    values = table[plan.column]
    summary = (f"{len(table)} modules, {label} {values.min():.4g} to {values.max():.4g} "
               f"({meaning}), from {alpha_column}")  # fmt: skip
    if plan.target == "pruning":
        summary += f"; parameter-weighted mean sparsity {plan.mean_sparsity:.4g}"
        if block:
            summary += " (each block's modules share their block's mean alpha)"
    rows = [
        {"module": printable(str(r.module)), "layer": "" if pd.isna(r.layer) else int(r.layer),
         "alpha": f"{r.alpha:.4f}", "mapped": f"{r.mapped_alpha:.4f}",
         "value": f"{getattr(r, plan.column):.6g}"}
        for r in table.head(MAX_ROWS).itertuples()
    ]  # fmt: skip
    return {
        "title": title,
        "label": label,
        "summary": summary,
        "order": "model order" if plan.model_order else "the table's order",
        "notes": [printable(n) for n in plan.notes],
        "figure": base64.b64encode(figure).decode("ascii"),
        "rows": rows,
        "hidden": max(0, len(table) - MAX_ROWS),
        "alpha_column": alpha_column,
    }
