"""Per-module changes between metrics tables of one model family: rows matched by module (and
expert), every alpha, the spike count, stable rank and norms side by side, and their change from
the first table to the last; a CSV and a self-contained page with the changes by depth.

A training trajectory (spectra_trajectory.parquet) compares on its own: its steps are the
tables, labelled "step N"."""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from esdtool.analysis.roles import module_kind
from esdtool.errors import MetricsSchemaError, OptionError
from esdtool.io.atomic import atomic_dir, check_output_dir
from esdtool.io.table_read import check_frame, load_metrics
from esdtool.io.trajectory import is_trajectory, load_trajectory, step_tables
from esdtool.render import plots
from esdtool.untrusted import printable, spreadsheet_frame
from esdtool.version import __version__

METRICS = ("alpha_median", "alpha_fix_finger", "alpha_ks", "num_spikes", "stable_rank",
           "effective_rank", "lambda_max", "spectral_norm", "frobenius_norm")  # fmt: skip
CSV_NAME, REPORT_NAME, RECORD_NAME = "comparison.csv", "report.html", "esdtool_compare.json"
FILES = (CSV_NAME, REPORT_NAME, RECORD_NAME)
# Fewer modules in common than this share of the smaller table: not one model family.
MIN_SHARED = 0.5


@dataclass(frozen=True)
class CompareResult:
    """The comparison: one row per module (and expert) found in any table.

    table:     module, slice, layer, kind, rows, cols, then ``<metric>@<label>`` per table and
               ``delta_<metric>`` (last table minus first), ``in_all`` (False: missing from a
               table, or not analysed there; its values are blank where it is absent).
    labels:    one label per table, in order ("step N" for the steps of a trajectory).
    unmatched: per label, the modules analysed in that table but missing from another.
    output:    the directory written, or None.
    """

    table: pd.DataFrame = field(repr=False)
    labels: list[str]
    unmatched: dict[str, list[str]]
    output: Path | None = None

    def summary(self) -> dict[str, Any]:
        both = self.table[self.table.in_all]
        change = {
            m: {
                "median": _float(both[f"delta_{m}"].median()),
                "max_abs": _float(both[f"delta_{m}"].abs().max()),
            }
            for m in METRICS
        }
        return {
            "output": None if self.output is None else str(self.output),
            "tables": self.labels,
            "modules_compared": len(both),
            "unmatched": {k: len(v) for k, v in self.unmatched.items()},
            "delta": change,
        }


def compare(
    tables: Sequence[str | os.PathLike[str] | pd.DataFrame],
    outdir: str | os.PathLike[str] | None = None,
    *,
    labels: Sequence[str] | None = None,
) -> CompareResult:
    """Compare two or more metrics tables of one model family (paths or DataFrames), module by
    module; with ``outdir``, write comparison.csv, report.html and esdtool_compare.json there.

    Rows are matched by (module, expert); a matrix counts where it was measured (``ok``, or
    ``zero``: an all-zero matrix such as an untrained LoRA update, whose norms and effective
    rank are 0). A module measured in some tables only is kept with blanks and ``in_all``
    False, and listed in ``unmatched``. Tables of different models are refused: a module whose
    matrix shape differs between tables, or fewer than half of the smaller table's modules in
    common.

    One training trajectory (a spectra_trajectory.parquet path, or what
    :func:`~esdtool.io.trajectory.load_trajectory` gives) is compared on its own: its steps are
    the tables, in step order, labelled "step N". A trajectory given with other tables is
    refused (compare its steps, or tables, not both).
    """
    paths = [Path(t) for t in tables if not isinstance(t, pd.DataFrame)]
    if outdir is not None:
        check_output_dir(outdir, paths)
    frames, defaults, steps = _tables(tables)
    for frame in frames:
        check_frame(frame)
    _check_same_kind(frames, defaults)
    names = list(labels) if labels is not None else defaults
    if len(names) != len(frames):
        raise OptionError(f"{len(names)} labels for {len(frames)} tables: give one per table")
    if not all(names):
        raise OptionError(f"labels must not be empty ({', '.join(map(repr, names))})")
    if len(set(names)) != len(names):  # two tables of one name: number them
        names = [f"{n}#{i + 1}" for i, n in enumerate(names)]
    merged = _join(frames, names)
    unmatched = {
        # lambda_max: every analysed row has one (a LoRA update's row has no alpha)
        label: sorted(merged.module[~merged.in_all & merged[f"lambda_max@{label}"].notna()])
        for label in names
    }
    result = CompareResult(merged, names, unmatched)
    if outdir is None:
        return result
    out = Path(outdir)
    html = _page(result, frames, steps).encode("utf-8")
    record = {"tables": [str(p.resolve()) for p in paths], "labels": names,
              "steps": steps, "esdtool_version": __version__}  # fmt: skip

    def build(directory: Path) -> None:
        spreadsheet_frame(merged).to_csv(directory / CSV_NAME, index=False)
        (directory / REPORT_NAME).write_bytes(html)
        (directory / RECORD_NAME).write_text(json.dumps(record, indent=2) + "\n")

    atomic_dir(out, build, FILES, marker=RECORD_NAME)
    return CompareResult(merged, names, unmatched, out)


def _tables(
    tables: Sequence[str | os.PathLike[str] | pd.DataFrame],
) -> tuple[list[pd.DataFrame], list[str], list[int] | None]:
    """The tables to compare, their default labels and, for a trajectory, their steps: a
    trajectory's steps ("step N"), or each table (a path's stem, "tableN" for a DataFrame)."""
    trajectories = [t for t in tables if is_trajectory(t)]
    if trajectories and len(tables) > 1:
        raise OptionError(
            f"{len(trajectories)} of the {len(tables)} inputs are training trajectories: compare "
            "takes one trajectory on its own (its steps are the tables), or metrics tables",
            hint="esdtool compare spectra_trajectory.parquet -o compare",
        )
    if trajectories:
        source = tables[0]
        trajectory = source if isinstance(source, pd.DataFrame) else load_trajectory(source)
        pairs = step_tables(trajectory)
        if len(pairs) < 2:
            steps = ", ".join(str(s) for s, _ in pairs) or "none"
            where = "" if isinstance(source, pd.DataFrame) else f"{source}: "
            raise OptionError(
                f"{where}the trajectory holds one step ({steps}): compare needs two tables or more"
            )
        return [t for _, t in pairs], [f"step {s}" for s, _ in pairs], [s for s, _ in pairs]
    if len(tables) < 2:
        raise OptionError("compare needs two tables or more")
    frames = [t if isinstance(t, pd.DataFrame) else load_metrics(t) for t in tables]
    names = [Path(t).stem if not isinstance(t, pd.DataFrame) else f"table{i + 1}"
             for i, t in enumerate(tables)]  # fmt: skip
    if len(set(names)) != len(names):  # run-a/adapter.parquet, run-b/adapter.parquet: folders
        folders = [f"{Path(t).parent.name}/{Path(t).stem}" if not isinstance(t, pd.DataFrame)
                   else n for t, n in zip(tables, names, strict=True)]  # fmt: skip
        names = folders if len(set(folders)) == len(folders) else names
    return frames, names, None


def _is_adapter(frame: pd.DataFrame) -> bool:
    """A trained adapter's table (its rows are weight changes, not weights)."""
    meta = frame.attrs.get("esdtool") or {}
    return bool(meta.get("adapter")) or (
        "lora_rank" in frame and bool(frame["lora_rank"].notna().any())
    )


def _check_same_kind(frames: list[pd.DataFrame], labels: list[str]) -> None:
    """A model's table against an adapter's compares W with delta W: refused, saying how to
    compare a base model with its fine-tuned version."""
    kinds = [_is_adapter(f) for f in frames]
    if any(kinds) and not all(kinds):
        model = labels[kinds.index(False)]
        adapter = labels[kinds.index(True)]
        raise OptionError(
            f"{printable(adapter)} is a trained adapter's table (its weight changes, delta W) and "
            f"{printable(model)} a model's (its weights W): they measure different things",
            hint="compare adapters with adapters; to compare a base model with its fine-tuned "
            "version, analyse the fine-tuned model (esdtool analyze BASE --adapter ADAPTER, or "
            "esdtool.analyze(peft_model, weights='merged')) and compare that table with the "
            "base's",
        )


def _join(frames: list[pd.DataFrame], labels: list[str]) -> pd.DataFrame:
    """One row per (module, expert) of any table, the tables' values side by side."""
    keyed = []
    for frame, label in zip(frames, labels, strict=True):
        ok = frame[frame.status.isin(["ok", "zero"])].copy()
        ok["slice"] = ok["slice"].fillna(-1).astype(int)
        twice = ok[ok.duplicated(["module", "slice"], keep=False)]
        if len(twice):  # e.g. tensors "x.weight" and "x": one module, two matrices
            module = str(twice.module.iloc[0])
            names = ", ".join(repr(printable(n)) for n in twice[twice.module == module].name)
            raise OptionError(
                f"{printable(label)}: module {printable(module)!r} comes from two tensors "
                f"({names}): which one to compare is not clear",
                hint="analyse one of them (--include / --exclude), as allocate asks too",
            )
        keyed.append(ok.set_index(["module", "slice"]))
    shared = set(keyed[0].index)
    for k in keyed[1:]:
        shared &= set(k.index)
    smallest = min(len(k) for k in keyed)
    if smallest == 0:  # e.g. a trajectory's steps after training diverged: every row nonfinite
        empty = next(label for k, label in zip(keyed, labels, strict=True) if not len(k))
        raise MetricsSchemaError(
            f"{printable(empty)}: no measured row (status ok or zero) to compare",
            hint="compare tables (or steps) whose matrices were analysed",
        )
    if len(shared) < MIN_SHARED * smallest:
        raise OptionError(
            f"the tables share {len(shared)} of {smallest} analysed modules: not one model "
            "family (compare checkpoints of the same architecture)"
        )
    for k, label in zip(keyed[1:], labels[1:], strict=True):
        common = sorted(shared)
        a, b = keyed[0].loc[common, ["rows", "cols"]], k.loc[common, ["rows", "cols"]]
        differ = (a.to_numpy() != b.to_numpy()).any(axis=1)
        if differ.any():
            module = common[int(differ.argmax())][0]
            raise OptionError(
                f"module {printable(module)!r} is {a.iloc[int(differ.argmax())].tolist()} in "
                f"{labels[0]} and {b.iloc[int(differ.argmax())].tolist()} in {label}: not the "
                "same model"
            )
    index = sorted(set().union(*(set(k.index) for k in keyed)))
    out = pd.DataFrame(index=pd.MultiIndex.from_tuples(index, names=["module", "slice"]))
    first = keyed[0].reindex(out.index)
    for k in keyed[1:]:
        first = first.combine_first(k.reindex(out.index)[["layer", "rows", "cols"]])
    out["layer"] = first["layer"]
    out["rows"], out["cols"] = first["rows"], first["cols"]
    for k, label in zip(keyed, labels, strict=True):
        values = k.reindex(out.index)
        for metric in METRICS:  # a DataFrame of an older table may lack effective_rank
            column = values[metric] if metric in values else pd.Series(np.nan, index=out.index)
            out[f"{metric}@{label}"] = column.astype(float)
    for metric in METRICS:
        out[f"delta_{metric}"] = out[f"{metric}@{labels[-1]}"] - out[f"{metric}@{labels[0]}"]
    out["in_all"] = out.index.isin(list(shared))
    out = out.reset_index()
    out["slice"] = out["slice"].where(out["slice"] >= 0)
    out.insert(3, "kind", [module_kind(str(m)) for m in out.module])
    return out


def _float(value: object) -> float | None:
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return None if number != number else number


def _lead(frames: list[pd.DataFrame]) -> str:
    """The metric the page follows: alpha_ks, or for LoRA adapters' tables (their updates have
    no power-law fits) effective_rank."""
    adapters = any("lora_rank" in f and f["lora_rank"].notna().any() for f in frames)
    return "effective_rank" if adapters else "alpha_ks"


def _page(result: CompareResult, frames: list[pd.DataFrame], steps: list[int] | None) -> str:
    import jinja2

    table = result.table[result.table.in_all].dropna(subset=["layer", "kind"])
    lead = _lead(frames)
    figures = []
    for metric in ("alpha_ks", "alpha_median", "num_spikes", "stable_rank", "spectral_norm",
                   "effective_rank"):  # fmt: skip
        if table.empty or table[f"delta_{metric}"].isna().all():
            continue  # nothing to draw (a LoRA update has no alphas)
        svg = plots.by_depth(table, f"delta_{metric}", f"change of {metric} by depth",
                             f"{metric} change", None)  # fmt: skip
        figures.append({"svg": base64.b64encode(svg).decode(), "title": metric,
                        "caption": f"{metric}, {result.labels[-1]} minus {result.labels[0]}, "
                                   "median per module kind"})  # fmt: skip
    if len(result.labels) >= 3 and not table.empty:
        # x: the training step of a trajectory's tables, else each table's place in the order
        where = steps if steps is not None else range(len(result.labels))
        long = pd.concat([
            pd.DataFrame({"layer": x, "kind": table.kind, lead: table[f"{lead}@{lab}"]})
            for x, lab in zip(where, result.labels, strict=True)
        ])  # fmt: skip
        xlabel = "training step" if steps is not None else "table (in the order given)"
        svg = plots.by_depth(long, lead, f"{lead} over the tables", lead, None, xlabel=xlabel)
        figures.append({"svg": base64.b64encode(svg).decode(), "title": "trajectories",
                        "caption": f"median {lead} per module kind, table by table: "
                                   + " -> ".join(result.labels)})  # fmt: skip
    top = result.table[result.table.in_all].copy()
    top = top.reindex(top[f"delta_{lead}"].abs().sort_values(ascending=False).index).head(30)
    # At most the first two and the last two tables side by side: a trajectory has many.
    shown = result.labels if len(result.labels) <= 4 else [*result.labels[:2],
                                                            *result.labels[-2:]]  # fmt: skip
    # beside it: spikes for a model's matrices, the update's size for an adapter's (no spikes)
    other = "delta_num_spikes" if lead == "alpha_ks" else "delta_frobenius_norm"
    columns = ["module", *[f"{lead}@{lab}" for lab in shown], f"delta_{lead}", other,
               "delta_stable_rank"]  # fmt: skip
    rows = [[printable(v) if isinstance(v, str) else f"{v:.4g}" for v in r]
            for r in top[columns].itertuples(index=False)]  # fmt: skip
    metas = [f.attrs.get("esdtool") or {} for f in frames]
    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
    page = resources.files("esdtool.templates").joinpath("compare.html.j2").read_text("utf-8")
    return env.from_string(page).render(
        labels=result.labels, version=__version__, figures=figures, columns=columns, rows=rows,
        lead=lead,
        compared=int(result.table.in_all.sum()),
        unmatched=[(k, v) for k, v in result.unmatched.items() if v],
        tables=[{"label": lab, "source": printable(m.get("source", "?"))}
                for lab, m in zip(result.labels, metas, strict=True)],
    )  # fmt: skip
