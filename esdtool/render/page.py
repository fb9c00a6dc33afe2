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
import math
import os
import re
from dataclasses import asdict, dataclass, field
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
from esdtool.io.table import COLUMNS, check_frame, load_metrics
from esdtool.render import MAX_PLOTS, glance, plots, usage
from esdtool.spectral import ALPHA_COLUMNS
from esdtool.untrusted import printable
from esdtool.version import __version__

if TYPE_CHECKING:  # the plan is drawn, never computed here
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
) -> ReportResult:
    """The HTML report of a metrics table (a path or a loaded table), written to ``output``
    when given (in a notebook, the returned result displays inline).

    With ``plan`` (what :func:`esdtool.allocate` returns) or its ``allocation`` the report
    also shows the LoRA plan: ranks by depth, each module's
    score, rank and lora_alpha. ``alpha_column`` picks the fit drawn on each spectrum (default:
    the plan's, else alpha_median). At most ``max_plots`` spectra are drawn, the rest are
    counted, so a model with thousands of experts still gives a file a browser can open.
    """
    if plan is not None:  # what allocate returns, or its allocation
        allocation = getattr(plan, "allocation", plan)
        if not hasattr(allocation, "settings") or not hasattr(allocation, "table"):
            raise OptionError(f"plan must be what esdtool.allocate returns, not {type(plan)}")
    if alpha_column is None:
        alpha_column = allocation.settings.alpha_column if allocation else "alpha_median"
    check_options(alpha_column, max_plots)
    inputs = [] if isinstance(metrics, pd.DataFrame) else [Path(metrics)]
    path = check_output_file(output, inputs) if output is not None else None
    table = metrics if isinstance(metrics, pd.DataFrame) else load_metrics(metrics)
    check_frame(table)
    protect = [*inputs, *_model_files(table.attrs.get("esdtool"))]
    if output is not None:
        check_output_file(output, protect)  # nor the table, nor the model
    html, plotted, omitted = render(table, allocation, alpha_column, max_plots)
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
    return plots.esd_figure(np.asarray(record["eigenvalues"]), record, alpha_column, threshold)


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
    if alpha_column not in ALPHA_COLUMNS:
        problems.append(
            f"--alpha-column must be one of {', '.join(ALPHA_COLUMNS)}, not {alpha_column!r}"
        )
    if max_plots < 0:
        problems.append(f"--max-plots must be >= 0, not {max_plots}")
    if problems:
        raise OptionError("; ".join(problems))


def render(
    table: pd.DataFrame, allocation: Allocation | None, alpha_column: str, max_plots: int
) -> tuple[str, int, int]:
    """The report's HTML, with how many spectra were drawn and how many left out."""
    meta = table.attrs.get("esdtool", {})
    meta = meta if isinstance(meta, dict) else {}
    settings_meta = meta.get("settings") if isinstance(meta.get("settings"), dict) else {}
    threshold = _float(settings_meta.get("eig_threshold"), 0.0)

    table = _with_plan(table.reset_index(drop=True), allocation)
    ok = table[table.status == "ok"]

    lora = usage.section(table)
    gallery, plotted = _gallery(table, ok, alpha_column, threshold, max_plots)
    plotted_rows = {m["index"] for g in gallery for m in g["matrices"]}
    shown, hidden = _capped(table, plotted_rows, MAX_TABLE_ROWS)
    style, script = _asset("report.css"), _asset("report.js")
    context = {
        "meta": {key: _text(meta.get(key)) for key in _META_KEYS},
        "title": glance.title(meta),
        "glance": _glance(allocation),
        "skipped_rows": int((shown.status == "skipped").sum()),
        "version": __version__,
        "generated": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "totals": _totals(table),
        "settings": _settings(settings_meta, allocation),
        "plan": _plan(allocation, settings_meta.get("preset")),
        # An adapter's updates have no power-law fits: its overview is planned vs used rank.
        "overview": [] if lora else _overview(ok, allocation, alpha_column),
        "usage": lora,
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


def _gallery(
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
                    "name": printable(record["name"]) + _expert(record),
                    "svg": base64.b64encode(svg).decode("ascii"),
                    "size": _svg_size(svg),
                    "rank": int(rank) if _present(rank) else None,
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


def _overview(
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
                "depends on the matrix shape: compare module kinds along the depth, not to a band.",
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


def _svg_size(svg: bytes) -> tuple[int, int] | None:
    """The CSS pixel size matplotlib writes on the SVG root (in pt: 72 an inch, 96 px), so the
    page reserves each plot's box before it loads and links land where they point."""
    found = re.search(rb'<svg[^>]*\swidth="([\d.]+)pt" height="([\d.]+)pt"', svg[:2000])
    return (round(float(found[1]) * 4 / 3), round(float(found[2]) * 4 / 3)) if found else None


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
        record["name"] = f"{record['name']}{_expert(record)}"
        cells = []
        for col, _, kind, fmt in _TABLE:
            value = record.get(col)
            if not _present(value):
                cells.append({"text": "", "sort": None})
            elif kind == "number":
                number = float(value)
                text = format(int(number), "d") if fmt == "d" else format(number, fmt)
                cells.append({"text": text, "sort": repr(number)})
            else:
                cells.append({"text": _text(value), "sort": None})
        css = f"status-{record['status']}" + (" selected" if record.get("selected") else "")
        rows.append({"index": index, "cells": cells, "css": css, "plotted": index in plotted})
    return rows


def _totals(table: pd.DataFrame) -> dict[str, Any]:
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
        "dequantized": [(_text(k), n) for k, n in labels if not k.startswith("raw codes")],
        "raw_codes": [(_text(k), n) for k, n in labels if k.startswith("raw codes")],
        "undecoded": int(undecoded.sum()),
    }


def _settings(analysis: dict[str, Any], allocation: Allocation | None) -> list[tuple]:
    sections = [("analyze", [(str(k), _text(v)) for k, v in analysis.items()])]
    if allocation is not None:
        sections.append(
            ("allocate", [(k, _text(v)) for k, v in asdict(allocation.settings).items()])
        )
    return sections


def _plan(allocation: Allocation | None, analysis_preset: object) -> dict[str, Any] | None:
    if allocation is None:
        return None
    kept = allocation.kept
    s = allocation.settings
    rule = (
        f"{s.alpha_column} and {s.spikes_column} weighted {s.w_hill:g}/{s.w_mp_spikes:g}, the "
        f"{s.select} {s.top_n_percentile:g} of the candidates kept, ranks {s.min_rank}.."
        f"{s.max_rank} ({s.rank_scaling}), lora_alpha = {s.alpha_factor:g} r"
    )
    presets = f"analysis preset {_text(analysis_preset or 'none')}, allocation preset " + (
        _text(s.preset or "none")
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


def _expert(record: dict[str, Any]) -> str:
    """ " [expert N]" for a matrix of a 3-D tensor, else ""."""
    return f" [expert {int(record['slice'])}]" if _present(record.get("slice")) else ""


def _present(value: object) -> bool:
    if value is None or value is pd.NA:
        return False
    return not (isinstance(value, float) and math.isnan(value))


def _float(value: object, default: float) -> float:
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return default


def _text(value: object) -> str:
    """Any table or metadata value as printable text (the template HTML-escapes it)."""
    return "" if value is None else printable(value)
