"""The HTML report: one self-contained file a person can open and read (the CLI's twin).

The page is rendered with Jinja2 from ``templates/report.html.j2`` with autoescape on, so every
string from a checkpoint or a table (tensor names, metadata) is escaped text. Plots are SVGs
inlined as data URIs, the style sheet and script are inlined too, and a Content-Security-Policy
allows nothing to be fetched and only that script (by its hash) to run. Nothing read from the
table ever becomes a file path: the only file written is ``output``.
"""

from __future__ import annotations

import base64
import hashlib
import os
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jinja2
import markupsafe
import numpy as np
import pandas as pd

from esdtool.analysis.roles import module_kind
from esdtool.errors import OptionError
from esdtool.io.atomic import atomic_write, check_output_file
from esdtool.io.table import COLUMNS
from esdtool.io.table_read import check_frame, load_metrics
from esdtool.io.trajectory import load_trajectory
from esdtool.render import MAX_PLOTS, glance, header, module_plan, plots, sections, usage
from esdtool.render.trajectory import check as check_trajectory
from esdtool.render.trajectory import section as trajectory_section
from esdtool.spectral import FARMS_ALPHA_COLUMNS, TABLE_ALPHA_COLUMNS
from esdtool.version import __version__

if TYPE_CHECKING:  # the plan is drawn, never computed here
    from esdtool.plan.layerwise import ModulePlan
    from esdtool.plan.ranks import Allocation

# Table columns shown in the report: (column, label, kind, format).
_TABLE = (
    ("name", "name", "text", None),
    ("status", "status", "text", None),
    ("rank", "rank", "number", "d"),
    ("score", "score", "number", ".3f"),
    ("role", "role", "text", None),
    ("layer", "layer", "number", "d"),
    ("shape", "shape", "text", None),
    ("alpha_median", "α median", "number", ".3f"),
    ("alpha_fix_finger", "α fix-finger", "number", ".3f"),
    ("alpha_ks", "α KS", "number", ".3f"),
    ("D_ks", "KS D", "number", ".3f"),
    ("num_spikes", "spikes", "number", "d"),
    ("mp_softrank", "MP soft rank", "number", ".3f"),
    ("stable_rank", "stable rank", "number", ".1f"),
    ("lambda_max", "λ max", "number", ".4g"),
    ("alpha_weighted", "α weighted", "number", ".3f"),
    ("entropy", "entropy", "number", ".3f"),
    ("lora_alpha", "lora_alpha", "number", "g"),
    ("reason", "note", "text", None),
)
# Most rows the page's table lists (the rest are counted): a 100k-row table made a 79 MB page.
MAX_TABLE_ROWS = 5000

# Columns the report adds to the table's own (COLUMN_NAMES): the shape, and the plan's.
_PLAN_COLUMNS = ("shape", "score", "rank", "lora_alpha")
_DOCS = {
    "shape": "rows x cols of the matrix (out x in features)",
    "score": "allocation score (higher: a larger rank)",
    "rank": "LoRA rank planned for the module (blank: no adapter)",
    "lora_alpha": "lora_alpha planned for the module",
}
_COLUMN_DOCS = {name: doc for name, _, doc in COLUMNS}


@dataclass(frozen=True)
class ReportResult:
    """The report: its HTML, where it went (None when nothing was written) and what it holds.
    In a notebook the result shows the page inline (``_repr_html_``); ``save`` writes it."""

    output: Path | None
    plotted: int
    omitted: int
    size_bytes: int
    html: str = field(default="", repr=False, compare=False)
    protect: tuple[Path, ...] = field(default=(), repr=False, compare=False)

    def _repr_html_(self) -> str:
        """The same self-contained page, in a frame sized for a notebook cell."""
        return (
            f'<iframe srcdoc="{markupsafe.escape(self.html)}" title="esdtool report" '
            'style="width: 100%; height: 720px; border: 1px solid #dde3e8"></iframe>'
        )

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the page to ``path`` (atomically; never over its table or its model's files)."""
        target = check_output_file(path, list(self.protect))
        data = self.html.encode("utf-8")
        atomic_write(target, lambda tmp: Path(tmp).write_bytes(data))
        return target


def report(
    metrics: str | os.PathLike[str] | pd.DataFrame,
    output: str | os.PathLike[str] | None = None,
    *,
    plan: Any = None,
    allocation: Allocation | None = None,
    alpha_column: str | None = None,
    max_plots: int = MAX_PLOTS,
    trajectory: str | os.PathLike[str] | pd.DataFrame | None = None,
) -> ReportResult:
    """The HTML report of a metrics table (a path or a loaded table), written to ``output``
    when given (in a notebook, the returned result displays inline).

    With ``plan`` (what :func:`esdtool.allocate` returns) or its ``allocation`` the report
    also shows the LoRA plan: ranks by depth, each module's
    score, rank and lora_alpha. ``alpha_column`` picks the fit drawn on each spectrum (default:
    the plan's, else alpha_median). At most ``max_plots`` spectra are drawn, the rest are
    counted, so a model with thousands of experts still gives a file a browser can open.

    With ``trajectory`` (spectra_trajectory.parquet's path, or what
    :func:`esdtool.load_trajectory` gives), the report of a trained adapter's table adds a
    "Training trajectory" section: the share of planned rank used per layer at every step
    (sum of effective_rank over sum of min(lora_rank, M) of the layer's modules), and the
    modules still climbing: those whose effective_rank at the last measured step is greater
    than at the step measured just before it (:mod:`esdtool.render.trajectory`).
    """
    if plan is not None:  # what allocate returns, or its allocation
        allocation = getattr(plan, "allocation", plan)
        if not hasattr(allocation, "settings") or not hasattr(allocation, "table"):
            raise OptionError(f"plan must be what esdtool.allocate returns, not {type(plan)}")
    if alpha_column is None:
        alpha_column = allocation.settings.alpha_column if allocation else "alpha_median"
    check_options(alpha_column, max_plots)
    inputs = [Path(t) for t in (metrics, trajectory) if t is not None
              and not isinstance(t, pd.DataFrame)]  # fmt: skip
    path = check_output_file(output, inputs) if output is not None else None
    table = metrics if isinstance(metrics, pd.DataFrame) else load_metrics(metrics)
    check_frame(table)
    if alpha_column in FARMS_ALPHA_COLUMNS and (
        alpha_column not in table.columns or not table[alpha_column].notna().any()
    ):
        raise OptionError(
            f"--alpha-column {alpha_column}: the table has no FARMS alphas (it was analysed "
            "without --estimator farms)",
            hint="esdtool analyze MODEL --estimator farms -o metrics.parquet",
        )
    steps = None
    if trajectory is not None:
        steps = trajectory
        if not isinstance(steps, pd.DataFrame):
            steps = load_trajectory(steps)
        check_frame(steps)
        check_trajectory(steps, table)
    protect = [*inputs, *_model_files(table.attrs.get("esdtool"))]
    if output is not None:
        check_output_file(output, protect)  # nor the table, nor the model
    html, plotted, omitted = render(table, allocation, alpha_column, max_plots, trajectory=steps)
    data = html.encode("utf-8")
    if path is not None:
        atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))
    return ReportResult(path, plotted, omitted, len(data), html, tuple(protect))


def plot_esd(
    table: pd.DataFrame, name: str, alpha_column: str = "alpha_median", expert: int | None = None
) -> Any:
    """The spectrum plot of tensor ``name`` (expert ``expert`` of a 3-D tensor) as a
    matplotlib Figure: the report's plot, to show or save in a notebook."""
    check_options(alpha_column, 0)
    check_frame(table)
    rows = table[(table["name"] == name) & (table["status"] == "ok")]
    if expert is not None:
        rows = rows[rows["slice"] == expert]
    if rows.empty:
        raise OptionError(f"no analysed row named {name!r}" + (
            f" (expert {expert})" if expert is not None else ""))  # fmt: skip
    record = rows.iloc[0].to_dict()
    meta = table.attrs.get("esdtool", {})
    settings = meta.get("settings", {}) if isinstance(meta, dict) else {}
    threshold = _float(settings.get("eig_threshold") if isinstance(settings, dict) else None, 0.0)
    fig = plots.esd_figure(np.asarray(record["eigenvalues"]), record, alpha_column, threshold)
    # Alone in a notebook the figure has no caption: the matrix it shows is named in its title.
    ax = fig.axes[0]
    which = name if expert is None else f"{name} [expert {expert}]"
    ax.set_title(f"{plots.title_text(which)}\n{ax.get_title(loc='left')}", fontsize=10, loc="left")
    fig.subplots_adjust(top=0.86)
    return fig


def _model_files(meta: object) -> list[Path]:
    """The checkpoint files a table says it was made from (local sources only)."""
    if not isinstance(meta, dict) or not isinstance(meta.get("source_path"), str):
        return []
    source = Path(meta["source_path"])
    if meta.get("source_kind") == "file":
        return [source]
    files = meta.get("files") if isinstance(meta.get("files"), list) else []
    return [source / name for name in files if isinstance(name, str) and Path(name).name == name]


def check_options(alpha_column: str, max_plots: int) -> None:
    """Refuse report options that cannot be drawn, listing every problem (before any work)."""
    problems = []
    if alpha_column not in TABLE_ALPHA_COLUMNS:
        problems.append(
            f"--alpha-column must be one of {', '.join(TABLE_ALPHA_COLUMNS)}, not {alpha_column!r}"
        )
    if max_plots < 0:
        problems.append(f"--max-plots must be >= 0, not {max_plots}")
    if problems:
        raise OptionError("; ".join(problems))


def render(
    table: pd.DataFrame,
    allocation: Allocation | None,
    alpha_column: str,
    max_plots: int,
    *,
    trajectory: pd.DataFrame | None = None,
    modules: ModulePlan | None = None,
) -> tuple[str, int, int]:
    """The report's HTML, with how many spectra were drawn and how many left out
    (``trajectory``: a checked training trajectory of the table's adapter, or None;
    ``modules``: a pruning / lr / weight-decay plan to draw instead of a LoRA plan)."""
    meta = table.attrs.get("esdtool", {})
    meta = meta if isinstance(meta, dict) else {}
    settings_meta = meta.get("settings") if isinstance(meta.get("settings"), dict) else {}
    threshold = _float(settings_meta.get("eig_threshold"), 0.0)

    table = _with_plan(table.reset_index(drop=True), allocation)
    ok = table[table.status == "ok"]

    lora = usage.section(table)
    gallery, plotted = sections.gallery(table, ok, alpha_column, threshold, max_plots)
    plotted_rows = {m["index"] for g in gallery for m in g["matrices"]}
    shown, hidden = _capped(table, plotted_rows, MAX_TABLE_ROWS)
    style, script = _asset("report.css"), _asset("report.js")
    context = {
        "meta": {key: header.text(meta.get(key)) for key in _META_KEYS},
        "title": glance.title(meta),
        "glance": _glance(allocation),
        "skipped_rows": int((shown.status == "skipped").sum()),
        "version": __version__,
        "generated": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "totals": header.totals(table),
        "settings": header.settings(settings_meta, allocation),
        "plan": header.plan(allocation, settings_meta.get("preset")),
        # An adapter's updates have no power-law fits: its overview is planned vs used rank.
        "overview": [] if lora else sections.overview(ok, allocation, alpha_column),
        "usage": lora,
        "modules": module_plan.section(modules, alpha_column),
        "trajectory": None if trajectory is None else trajectory_section(trajectory),
        "gallery": gallery,
        "gallery_count": plotted,
        "omitted": len(ok) - plotted,
        "threshold": f"{threshold:g}",
        "columns": [
            {"label": label, "type": kind, "doc": _DOCS.get(col, _COLUMN_DOCS.get(col, ""))}
            for col, label, kind, _ in _TABLE
        ],
        "rows": _rows(shown, plotted_rows),
        "hidden_rows": hidden,
        "wbr": markupsafe.Markup(".<wbr>"),  # line breaks allowed after the dots of long names
        "style": style,
        "script": script,
        "style_hash": _csp_hash(style),
        "script_hash": _csp_hash(script),
    }
    return _template().render(context), plotted, len(ok) - plotted


_META_KEYS = ("source", "source_kind", "revision", "created", "device", "esdtool_version")


def _template() -> jinja2.Template:
    env = jinja2.Environment(
        autoescape=True, undefined=jinja2.StrictUndefined, keep_trailing_newline=True
    )
    return env.from_string(_asset("report.html.j2"))


def _asset(name: str) -> str:
    return resources.files("esdtool.templates").joinpath(name).read_text(encoding="utf-8")


def _csp_hash(text: str) -> str:
    return "sha256-" + base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode()


def _with_plan(table: pd.DataFrame, allocation: Allocation | None) -> pd.DataFrame:
    """The table with score / rank / lora_alpha / selected joined on module (blank when no
    plan or not a candidate) and the module kind used to group by depth."""
    table = table.copy()
    # By module, not tensor name: a quantized weight's codes tensor (q_proj.qweight) and a LoRA
    # update's lora_A belong to their module's kind.
    table["kind"] = [module_kind(str(n)) for n in table["module"]]
    for col in ("score", "rank", "lora_alpha"):
        table[col] = np.nan
    table["selected"] = False
    if allocation is not None:
        plan = allocation.table.set_index("module")
        whole = table["slice"].isna()  # experts of a 3-D tensor are never PEFT modules
        modules = table.loc[whole, "module"]
        selected = modules.map(plan["selected"]).fillna(False).astype(bool)
        table.loc[whole, "selected"] = selected
        table.loc[whole, "score"] = modules.map(plan["score"])
        for col in ("rank", "lora_alpha"):
            table.loc[whole, col] = modules.map(plan[col]).where(selected)
    return table


def _glance(allocation: Allocation | None) -> dict[str, Any] | None:
    content = glance.glance(allocation)
    if content is not None and content["figure"] is not None:
        content["figure"] = base64.b64encode(content["figure"]).decode("ascii")
    return content


def _capped(table: pd.DataFrame, plotted: set[int], limit: int) -> tuple[pd.DataFrame, str]:
    """At most ``limit`` rows for the page's table, in table order: the plotted ones first, then
    the other analysed ones, then the skipped; and what was left out, in words ("" if none)."""
    if len(table) <= limit:
        return table, ""
    rank = pd.Series(2, index=table.index)
    rank[table.status != "skipped"] = 1
    rank[table.index.isin(list(plotted))] = 0
    order = rank.sort_values(kind="stable").index[:limit]
    shown = table.loc[sorted(order)]
    left = table.drop(index=order)
    counts = left.status.value_counts()
    detail = ", ".join(f"{int(n):,} {status}" for status, n in counts.items())
    return shown, f"{len(left):,} more rows ({detail})"


def _rows(table: pd.DataFrame, plotted: set[int]) -> list[dict[str, Any]]:
    rows = []
    for index, record in zip(table.index, table.to_dict("records"), strict=True):
        record["shape"] = glance.shape_text(record["rows"], record["cols"])
        record["name"] = f"{record['name']}{sections.expert(record)}"
        cells = []
        for col, _, kind, fmt in _TABLE:
            value = record.get(col)
            if not sections.present(value):
                cells.append({"text": "", "sort": None})
            elif kind == "number":
                number = float(value)
                text = format(int(number), "d") if fmt == "d" else format(number, fmt)
                cells.append({"text": text, "sort": repr(number)})
            else:
                cells.append({"text": header.text(value), "sort": None})
        css = f"status-{record['status']}" + (" selected" if record.get("selected") else "")
        rows.append({"index": index, "cells": cells, "css": css, "plotted": index in plotted})
    return rows


def _float(value: object, default: float) -> float:
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return default
