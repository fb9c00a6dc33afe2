"""The report's header facts: the rows by status (and quantized weights by format), every
setting of the analysis and the plan, and the plan in one sentence with its counts."""

from __future__ import annotations

from dataclasses import asdict
from typing import TYPE_CHECKING, Any

import pandas as pd

from esdtool.untrusted import printable

if TYPE_CHECKING:  # the plan is drawn, never computed here
    from esdtool.plan.ranks import Allocation


def totals(table: pd.DataFrame) -> dict[str, Any]:
    """Rows by status, and the quantized weights by how they were stored and decoded."""
    counts = table["status"].value_counts()
    other = [(str(s), int(n)) for s, n in counts.items() if s != "ok"]
    # Quantized weights, one per stored tensor (a 3-D tensor's experts count once), by label.
    quantized = table.dropna(subset=["quantization"]).drop_duplicates("name")
    labels = [(str(k), int(n)) for k, n in quantized["quantization"].value_counts().items()]
    undecoded = table["reason"].fillna("").str.contains("cannot dequantize", regex=False)
    undecoded &= table["status"] == "skipped"
    return {
        "rows": len(table),
        "ok": int(counts.get("ok", 0)),
        "other": other,
        "dequantized": [(text(k), n) for k, n in labels if not k.startswith("raw codes")],
        "raw_codes": [(text(k), n) for k, n in labels if k.startswith("raw codes")],
        "undecoded": int(undecoded.sum()),
    }


def settings(analysis: dict[str, Any], allocation: Allocation | None) -> list[tuple]:
    """Every analysis setting, and the plan's, as (section, [(name, value)]) for the table."""
    sections = [("analyze", [(str(k), text(v)) for k, v in analysis.items()])]
    if allocation is not None:
        sections.append(
            ("allocate", [(k, text(v)) for k, v in asdict(allocation.settings).items()])
        )
    return sections


def plan(allocation: Allocation | None, analysis_preset: object) -> dict[str, Any] | None:
    """The plan in the header: what made it, how many modules it adapts, at what cost."""
    if allocation is None:
        return None
    kept = allocation.kept
    s = allocation.settings
    rule = (
        f"{s.alpha_column} and {s.spikes_column} weighted {s.w_hill:g}/{s.w_mp_spikes:g}, the "
        f"{s.select} {s.top_n_percentile:g} of the candidates kept, ranks {s.min_rank}.."
        f"{s.max_rank} ({s.rank_scaling}), lora_alpha = {s.alpha_factor:g} r"
    )
    presets = f"analysis preset {text(analysis_preset or 'none')}, allocation preset " + (
        text(s.preset or "none")
    )
    return {
        "made_by": f"{rule}; {presets}",
        "candidates": len(allocation.table),
        "adapted": len(kept),
        "rank_min": int(kept["rank"].min()),
        "rank_max": int(kept["rank"].max()),
        "trainable_params": allocation.total_params,
        "equal_cost_rank": f"{allocation.equal_cost_rank:.1f}",
        "alpha_column": s.alpha_column,
        "spikes_column": s.spikes_column,
        "select": s.select,
    }


def text(value: object) -> str:
    """Any table or metadata value as printable text (the template HTML-escapes it)."""
    return "" if value is None else printable(value)
