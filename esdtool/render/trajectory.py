"""Training trajectory, the report's section for an adapter measured while it trained
(spectra_trajectory.parquet, :mod:`esdtool.io.trajectory`).

Two readings of the steps: how much of its planned rank each layer uses as training goes on
(:func:`rank_share_by_layer`), and which modules were still gaining rank when the last step
was measured (:func:`still_climbing`). Both count a module's LoRA update rows as
:mod:`esdtool.render.usage` does: usable rank min(lora_rank, M), an untrained (all-zero)
update using none of it.
"""

from __future__ import annotations

import base64
from typing import Any

import numpy as np
import pandas as pd

from esdtool.errors import OptionError
from esdtool.render import plots
from esdtool.render.usage import lora_rows
from esdtool.untrusted import printable

# Most modules the "still climbing" table lists (the rest are counted).
MAX_CLIMBING = 30
CLIMBING_RULE = (
    "A module is still climbing when its effective_rank at the last measured step is greater "
    "than at the step measured just before it; a module missing from either of those two steps "
    "is not listed, and an untrained (all-zero) update counts as effective rank 0."
)


def updates(trajectory: pd.DataFrame) -> pd.DataFrame:
    """The LoRA update rows of every step, with ``usable_rank`` = min(lora_rank, M) and
    ``used_rank`` = effective_rank (0 for an all-zero update)."""
    rows = lora_rows(trajectory)
    rows["used_rank"] = rows["effective_rank"].astype(float).fillna(0.0)
    return rows


def rank_share_by_layer(trajectory: pd.DataFrame) -> pd.DataFrame:
    """Share of the planned rank used, per layer and step: the sum of effective_rank over the
    sum of min(lora_rank, M) of the layer's LoRA modules.

    One row per (step, layer), ascending: ``step``, ``layer`` (Int64; null for the modules
    outside the transformer blocks, counted together), ``used_rank``, ``usable_rank`` and
    ``share`` (float64; NaN where the usable rank is 0).
    """
    rows = updates(trajectory)
    layer = rows["layer"].astype("Int64").fillna(-1)
    sums = (
        rows.assign(layer=layer)
        .groupby(["step", "layer"], sort=True)[["used_rank", "usable_rank"]]
        .sum()
        .reset_index()
    )
    sums["layer"] = sums["layer"].astype("Int64").where(sums["layer"] >= 0)
    usable = sums["usable_rank"].to_numpy(dtype=float)
    used = sums["used_rank"].to_numpy(dtype=float)
    sums["share"] = np.divide(used, usable, out=np.full_like(used, np.nan), where=usable > 0)
    sums["step"] = sums["step"].astype("int64")
    return sums[["step", "layer", "used_rank", "usable_rank", "share"]]


def still_climbing(trajectory: pd.DataFrame) -> pd.DataFrame:
    """The modules still gaining rank at the end. A module is still climbing when its
    effective_rank at the trajectory's last measured step is greater than at the step measured
    just before it (the two largest steps of the trajectory); a module missing from either of
    them is not listed, and an untrained (all-zero) update counts as effective rank 0.

    One row per such module (and expert), the largest rise first, then by module: ``module``,
    ``slice``, ``layer``, ``lora_rank``, ``usable_rank``, ``before`` and ``last`` (its
    effective ranks at the two steps) and ``rise`` (last - before). Empty with one step.
    """
    rows = updates(trajectory)
    columns = ["module", "slice", "layer", "lora_rank", "usable_rank", "before", "last", "rise"]
    steps = sorted(trajectory["step"].unique())
    if len(steps) < 2:
        return pd.DataFrame(columns=columns)
    key = ["module", "_slice"]
    rows = rows.assign(_slice=rows["slice"].fillna(-1))
    before = rows[rows["step"] == steps[-2]].set_index(key)
    last = rows[rows["step"] == steps[-1]].set_index(key)
    both = last.join(before[["used_rank"]].rename(columns={"used_rank": "before"}), how="inner")
    both = both.rename(columns={"used_rank": "last"})
    both["rise"] = both["last"] - both["before"]
    climbing = both[both["last"] > both["before"]].reset_index()
    climbing = climbing.sort_values(["rise", "module"], ascending=[False, True], kind="stable")
    return climbing[columns].reset_index(drop=True)


def check(trajectory: pd.DataFrame, table: pd.DataFrame) -> None:
    """The trajectory can be drawn in ``table``'s report: both hold LoRA updates, and some
    module of one is in the other (the same adapter, measured while training). An update
    counts whatever its status: the trajectory of a run that diverged (its updates nonfinite
    at the end) is the one most worth drawing."""
    if "step" not in trajectory.columns:
        raise OptionError(
            "trajectory must be a training trajectory (what esdtool.load_trajectory gives, or "
            "the path of spectra_trajectory.parquet): this DataFrame has no step column"
        )
    ours, theirs = _update_modules(table), _update_modules(trajectory)
    if not ours:
        raise OptionError(
            "the training trajectory is drawn in a trained adapter's report, and this table "
            "holds no LoRA update",
            hint="analyze the trained adapter and report that table: esdtool analyze "
            "ADAPTER_DIR -o adapter.parquet",
        )
    if not theirs:
        raise OptionError("the training trajectory holds no LoRA update to draw")
    if not ours & theirs:
        raise OptionError(
            "the training trajectory shares no LoRA module with the table: not this adapter's "
            "training"
        )


def _update_modules(table: pd.DataFrame) -> set[str]:
    """The modules of a table's LoRA update rows (a planned rank), analysed or not."""
    if "lora_rank" not in table.columns:
        return set()
    return set(table.loc[table["lora_rank"].notna(), "module"])


def section(trajectory: pd.DataFrame) -> dict[str, Any]:
    """The report's "Training trajectory" section: the share of planned rank used per layer
    over the steps (a figure), the share over all modules at the first and last step, and the
    modules still climbing (:data:`CLIMBING_RULE`), at most :data:`MAX_CLIMBING` of them."""
    shares = rank_share_by_layer(trajectory)
    rows = updates(trajectory)
    steps = sorted(int(s) for s in trajectory["step"].unique())
    totals = rows.groupby("step")[["used_rank", "usable_rank"]].sum()
    overall = (totals["used_rank"] / totals["usable_rank"]).to_dict()
    svg = plots.share_over_steps(shares, "share of planned rank used, per layer")
    climbing = still_climbing(trajectory)
    meta = trajectory.attrs.get("esdtool")
    every = meta.get("trajectory_every") if isinstance(meta, dict) else None
    listing = [
        {
            "module": printable(r["module"]) + _expert(r["slice"]),
            "layer": "" if pd.isna(r["layer"]) else str(int(r["layer"])),
            "lora_rank": int(r["lora_rank"]),
            "usable_rank": int(r["usable_rank"]),
            "before": int(r["before"]),
            "last": int(r["last"]),
        }
        for r in climbing.head(MAX_CLIMBING).to_dict("records")
    ]
    return {
        "steps": len(steps),
        "first": steps[0],
        "last": steps[-1],
        "before": steps[-2] if len(steps) > 1 else None,
        "every": every if type(every) is int else None,
        "share_first": _percent(overall.get(steps[0])),
        "share_last": _percent(overall.get(steps[-1])),
        "figure": base64.b64encode(svg).decode("ascii"),
        "rule": CLIMBING_RULE,
        "climbing": len(climbing),
        "listing": listing,
        "more": max(len(climbing) - MAX_CLIMBING, 0),
    }


def _percent(value: float | None) -> str:
    return "n/a" if value is None or not np.isfinite(value) else f"{100 * value:.0f}%"


def _expert(value: object) -> str:
    return "" if value is None or pd.isna(value) else f" [expert {int(value)}]"  # type: ignore[call-overload]
