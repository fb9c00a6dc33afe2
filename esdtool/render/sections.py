"""The report's figure sections: the overview by depth (a model's alphas and spikes, and the
plan's ranks) and the spectra gallery (one plot per matrix, grouped by block), each as the
records the template draws; and two readers of a row's values the page's table uses too."""

from __future__ import annotations

import base64
import math
import re
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from esdtool.render import plots
from esdtool.untrusted import printable

if TYPE_CHECKING:  # the plan is drawn, never computed here
    from esdtool.plan.ranks import Allocation


def gallery(
    table: pd.DataFrame, ok: pd.DataFrame, alpha_column: str, threshold: float, max_plots: int
) -> tuple[list[dict[str, Any]], int]:
    """ESD plots grouped by block (one collapsible group per layer, one for the rest)."""
    groups: list[dict[str, Any]] = []
    drawn = 0
    order = ok.assign(_layer=ok["layer"].fillna(-1)).sort_values("_layer", kind="stable")
    for layer, rows in order.groupby("_layer", sort=True):
        matrices = []
        for index, row in rows.iterrows():
            if drawn >= max_plots:
                break
            record = row.to_dict()
            svg = plots.esd(np.asarray(record["eigenvalues"]), record, alpha_column, threshold)
            rank = record.get("rank")
            matrices.append(
                {
                    "index": index,
                    "name": printable(record["name"]) + expert(record),
                    "svg": base64.b64encode(svg).decode("ascii"),
                    "size": svg_size(svg),
                    "rank": int(rank) if present(rank) else None,
                }
            )
            drawn += 1
        if not matrices:
            continue
        alphas = rows[alpha_column].dropna()
        summary = f"{alpha_column} median {alphas.median():.2f}" if len(alphas) else ""
        title = "outside the blocks" if layer < 0 else f"layer {layer:g}"
        groups.append({"title": title, "summary": summary, "matrices": matrices})
    return groups, drawn


def overview(
    ok: pd.DataFrame, allocation: Allocation | None, alpha_column: str
) -> list[dict[str, str]]:
    blocks = ok.dropna(subset=["layer", "kind"])
    if blocks.empty:
        return []
    # HTSR's 2-6 band was read off WeightWatcher's alpha, which is alpha_ks: the band goes on
    # that plot only. The plan's own alpha (default alpha_median) sits on another scale.
    figures = [
        (
            plots.by_depth(blocks, "alpha_ks", "alpha_ks by depth", "alpha", plots.WELL_TRAINED),
            "alpha_ks by layer",
            "Power-law exponent (KS xmin, WeightWatcher's alpha) per module kind. The shaded "
            "band (2-6) is where HTSR puts well-trained layers; above 6 is close to random.",
        )
    ]
    if alpha_column != "alpha_ks":
        figures.append(
            (
                plots.by_depth(blocks, alpha_column, f"{alpha_column} by depth", "alpha", None),
                f"{alpha_column} by layer",
                f"The exponent the plan scores ({alpha_column}). It is not on HTSR's 2-6 scale and "
                + (_FARMS_NOTE if alpha_column.endswith("_farms") else _SHAPE_NOTE),
            )
        )
    figures += [
        (
            plots.by_depth(blocks, "num_spikes", "spikes by depth", "spikes", None),
            "spikes by layer",
            "Eigenvalues beyond the Tracy-Widom-corrected Marchenko-Pastur edge.",
        ),
        (
            plots.heatmap(blocks, alpha_column, f"{alpha_column}: layer x module kind", "viridis"),
            "alpha heatmap",
            f"{alpha_column} for each module kind (rows) at each depth (columns).",
        ),
    ]
    if allocation is not None and blocks["rank"].notna().any():
        title = "LoRA rank: layer x module kind"
        figures.append(
            (
                plots.heatmap(blocks, "rank", title, "magma_r", integer=True),
                "rank allocation",
                "Planned rank of each adapted module; blank cells get no adapter.",
            )
        )
    return [
        {"svg": base64.b64encode(svg).decode("ascii"), "title": title, "caption": caption}
        for svg, title, caption in figures
    ]


def svg_size(svg: bytes) -> tuple[int, int] | None:
    """The CSS pixel size matplotlib writes on the SVG root (in pt: 72 an inch, 96 px), so the
    page reserves each plot's box before it loads and links land where they point."""
    found = re.search(rb'<svg[^>]*\swidth="([\d.]+)pt" height="([\d.]+)pt"', svg[:2000])
    return (round(float(found[1]) * 4 / 3), round(float(found[2]) * 4 / 3)) if found else None


def expert(record: dict[str, Any]) -> str:
    """ " [expert N]" for a matrix of a 3-D tensor, else ""."""
    return f" [expert {int(record['slice'])}]" if present(record.get("slice")) else ""


def present(value: object) -> bool:
    if value is None or value is pd.NA:
        return False
    return not (isinstance(value, float) and math.isnan(value))


_FARMS_NOTE = (
    "is fitted to windows of one shape in every matrix (FARMS), so module kinds compare with "
    "each other; compare them along the depth, not to a band."
)
_SHAPE_NOTE = "depends on the matrix shape: compare module kinds along the depth, not to a band."
