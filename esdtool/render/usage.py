"""Planned vs used rank, the report's section for a trained LoRA adapter's table.

Each LoRA row holds its planned rank (``lora_rank``, the r it was trained with) and the rank its
update uses (``effective_rank``: the fewest singular directions holding 90% of the update's
squared Frobenius norm). Their ratio (over min(r, M): no update of an M-sided matrix has more
than M directions) says which planned ranks were wasted (low) or saturated (1: the update may
have wanted more).
"""

from __future__ import annotations

import base64
from typing import Any

import numpy as np
import pandas as pd

from esdtool.render import plots
from esdtool.untrusted import printable

# A module using at most this share of its planned rank is called underused; one using all of
# it, saturated.
UNDERUSED = 0.25


def lora_rows(table: pd.DataFrame) -> pd.DataFrame:
    """The analysed LoRA update rows of a table (empty for a model's table)."""
    if "lora_rank" not in table.columns:
        return table.iloc[0:0]
    rows = table[table["lora_rank"].notna() & table["status"].isin(["ok", "zero"])].copy()
    # The rank an update can use: r, or the matrix's smaller side when r exceeds it.
    rows["usable_rank"] = np.minimum(rows["lora_rank"].astype(float), rows["M"].astype(float))
    rows["rank_used"] = rows["effective_rank"].astype(float).fillna(0) / rows["usable_rank"]
    return rows


def rank_use(table: pd.DataFrame) -> dict[str, Any]:
    """Share of the planned rank used, over all LoRA modules: sum effective_rank / sum
    min(lora_rank, M), with the counts of underused and saturated modules (a JSON-ready
    record)."""
    rows = lora_rows(table)
    planned = int(rows["usable_rank"].sum()) if len(rows) else 0
    used = int(rows["effective_rank"].fillna(0).sum()) if len(rows) else 0
    return {
        "modules": len(rows),
        "planned_rank": planned,
        "used_rank": used,
        "share": used / planned if planned else None,
        "underused": int((rows["rank_used"] <= UNDERUSED).sum()),
        "saturated": int((rows["rank_used"] >= 1).sum()),
        "untrained": int((rows["status"] == "zero").sum()),
    }


def section(table: pd.DataFrame) -> dict[str, Any] | None:
    """The report's "planned vs used rank" section, or None when the table holds no LoRA
    update: a heatmap of effective_rank / lora_rank (layer x module kind), the summary, and
    every module sorted by the share it used, least first."""
    rows = lora_rows(table)
    if rows.empty:
        return None
    figure = None
    blocks = rows.dropna(subset=["layer", "kind"])
    if not blocks.empty:
        svg = plots.heatmap(blocks, "rank_used", "effective_rank / lora_rank: layer x module kind",
                            "RdYlGn", scale=(0.0, 1.0))  # fmt: skip
        figure = base64.b64encode(svg).decode("ascii")
    ordered = rows.sort_values(["rank_used", "module"], kind="stable")
    listing = [
        {
            "module": printable(r["module"]),
            "lora_rank": int(r["lora_rank"]),
            "effective_rank": int(r["effective_rank"]) if pd.notna(r["effective_rank"]) else 0,
            "share": f"{r['rank_used']:.2f}",
            "stable_rank": "" if pd.isna(r["stable_rank"]) else f"{r['stable_rank']:.2f}",
            "norm": "" if pd.isna(r["frobenius_norm"]) else f"{r['frobenius_norm']:.3g}",
            "status": r["status"],
        }
        for r in ordered.to_dict("records")
    ]
    summary = rank_use(table)
    share = summary["share"]
    return {
        **summary,
        "share_text": "n/a" if share is None else f"{100 * share:.0f}%",
        "figure": figure,
        "listing": listing,
        "underused_at": f"{UNDERUSED:g}",
        "median": f"{float(np.median(rows['rank_used'])):.2f}",
    }
