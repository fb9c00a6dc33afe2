"""Reading a metrics table back: the file's schema version, its columns and its values checked,
so a file esdtool did not write (or one from a newer esdtool, or a DataFrame that is not quite a
table) is one line naming it, never a raw pyarrow or pandas error. Older schema versions read
with the columns they lack as null (:data:`~esdtool.io.table.ADDED_IN`)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from esdtool.errors import MetricsSchemaError, listed
from esdtool.io.table import (
    ADDED_IN,
    COLUMN_NAMES,
    COLUMNS,
    METADATA_KEY,
    SCHEMA_VERSION,
    pandas_frame,
)
from esdtool.spectral import ALPHA_COLUMNS, FARMS_ALPHA_COLUMNS

if TYPE_CHECKING:
    import pandas as pd


def read_schema(
    path: Path, kind: str = "metrics table", hint: str | None = None
) -> tuple[pa.Schema, dict[str, Any]]:
    """The parquet schema and ``esdtool`` metadata of a file esdtool wrote (no rows are read),
    after the checks every such file passes: a file, parquet, with esdtool metadata of a schema
    version this esdtool reads. Messages name the file and what it should be (``kind``);
    ``hint`` says how such a file is made (default: by esdtool analyze)."""
    path = Path(path)
    analyse_first = hint or f"run esdtool analyze first: esdtool analyze {path} -o metrics.parquet"
    if path.is_dir():
        what = (
            "a model directory"
            if (path / "config.json").is_file() or any(path.glob("*.safetensors"))
            else "a directory"
        )
        raise MetricsSchemaError(f"{path}: is {what}, not a {kind}", hint=analyse_first)
    if not path.is_file():
        raise MetricsSchemaError(f"{path}: no such file")
    try:
        schema = pq.read_schema(path)
    except (pa.ArrowException, OSError) as exc:
        if path.suffix == ".safetensors":
            raise MetricsSchemaError(f"{path}: is a safetensors checkpoint, not a {kind}",
                                     hint=analyse_first) from exc  # fmt: skip
        raise MetricsSchemaError(
            f"{path}: not a {kind} (not a parquet file)",
            hint=hint or "esdtool analyze writes one: esdtool analyze SOURCE -o metrics.parquet",
        ) from exc
    raw = (schema.metadata or {}).get(METADATA_KEY)
    if raw is None:
        raise MetricsSchemaError(
            f"{path}: not an esdtool {kind} (no esdtool metadata)",
            hint=hint or "make one with: esdtool analyze SOURCE -o metrics.parquet",
        )
    try:
        meta = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise MetricsSchemaError(f"{path}: esdtool metadata is not valid JSON") from exc
    version = meta.get("schema_version") if isinstance(meta, dict) else None
    if type(version) is not int or not 1 <= version <= SCHEMA_VERSION:
        raise MetricsSchemaError(
            f"{path}: schema version {version!r}, this esdtool reads versions 1 to "
            f"{SCHEMA_VERSION}",
            hint="re-run esdtool analyze with this version",
        )
    return schema, meta


def check_columns(path: Path, schema: pa.Schema, version: int) -> None:
    """Every column of the schema (but those added after ``version``) is in ``schema``, with
    the schema's type."""
    missing = [name for name in COLUMN_NAMES
               if name not in schema.names and ADDED_IN.get(name, 1) <= version]  # fmt: skip
    if missing:
        raise MetricsSchemaError(f"{path}: missing columns {', '.join(missing)}")
    wrong = [
        f"{name} is {schema.field(name).type}, not {dtype}"
        for name, dtype, _ in COLUMNS
        if name in schema.names and schema.field(name).type != dtype
    ]
    if wrong:
        raise MetricsSchemaError(f"{path}: column types differ from the schema: {'; '.join(wrong)}")


def read_metadata(path: Path) -> dict[str, Any]:
    """The ``esdtool`` metadata of a metrics table, validated (no rows are read). A training
    trajectory (spectra_trajectory.parquet, one table per step) is refused: its rows would
    hold every module once per step."""
    path = Path(path)
    schema, meta = read_schema(path)
    if "trajectory" in meta:
        raise MetricsSchemaError(
            f"{path}: is a training trajectory (one table per step), not a metrics table",
            hint=f"read it with esdtool.load_trajectory, compare its steps with: esdtool "
            f"compare {path} -o compare, or draw it with: esdtool report ADAPTER_TABLE "
            f"--trajectory {path}",
        )
    check_columns(path, schema, meta["schema_version"])
    return meta


STATUSES = ("ok", "skipped", "zero", "nonfinite", "error")
# Values a table written by esdtool cannot hold (a fitted alpha is > 1; counts and sizes are
# >= 0): a hand-edited or crafted table is refused rather than planned on.
_ALPHA_RANGE = (1.0, 1e100)
_MAX_SIDE = 1 << 31  # ranks * (rows + cols) must stay far inside int64


def check_values(path: Path, df: pd.DataFrame, hint: str | None = None) -> None:
    """Values no table esdtool writes can hold (null names, unknown statuses, alphas outside
    (1, 1e100], negative counts, matrix sides out of range) are refused, all at once."""
    problems = []
    for name in ("name", "module", "status"):
        if df[name].isna().any():
            problems.append(f"{name} has nulls")
    bad = sorted(set(df.status.dropna()) - set(STATUSES))
    if bad:
        problems.append(f"status {bad[0]!r} is none of {', '.join(STATUSES)}")
    for column in (*ALPHA_COLUMNS, *FARMS_ALPHA_COLUMNS):
        values = df[column].to_numpy(dtype=float)
        outside = ~np.isnan(values) & ~((values > _ALPHA_RANGE[0]) & (values <= _ALPHA_RANGE[1]))
        if outside.any():
            problems.append(
                f"{column} holds {values[outside][0]!r} (a fitted alpha is in (1, 1e100])"
            )
    if "alpha_peak" in df.columns:  # AlphaPruning's: 0 where no candidate fitted (their quirk)
        values = df["alpha_peak"].to_numpy(dtype=float)
        outside = ~np.isnan(values) & ~((values >= 0) & (values <= _ALPHA_RANGE[1]))
        if outside.any():
            problems.append(f"alpha_peak holds {values[outside][0]!r} (it is in [0, 1e100])")
    for column in ("num_spikes", "num_spikes_bulk", "rows", "cols", "M", "N", "num_evals",
                   "spikes_farms", "farms_windows"):  # fmt: skip
        if (df[column].dropna() < 0).any():
            problems.append(f"{column} holds negative values")
    analysed = df[df.status == "ok"]
    for column in ("rows", "cols"):  # a matrix side: at least 1, and far below int64 overflow
        sides = analysed[column]
        if sides.isna().any() or ((sides < 1) | (sides > _MAX_SIDE)).any():
            problems.append(f"{column} of an analysed row is not in 1..{_MAX_SIDE:,}")
    if problems:
        raise MetricsSchemaError(
            f"{path}: not a table esdtool wrote: {'; '.join(problems)}",
            hint=hint or "make one with: esdtool analyze SOURCE -o metrics.parquet",
        )


def check_frame(df: pd.DataFrame) -> None:
    """A DataFrame handed to allocate, report or plot_esd is an esdtool metrics table: every
    column of the schema (but those added in later versions) is there, numbers are numbers,
    text is text and each spectrum a sequence of numbers (a table read back from CSV holds text
    there), and its values pass the checks a file's do (:func:`check_values`)."""
    missing = [c for c in COLUMN_NAMES if c not in df.columns and c not in ADDED_IN]
    hint = "pass what esdtool.analyze(...).table or esdtool.load_metrics(path) gives"
    if missing:
        shown = listed(missing, 5)
        raise MetricsSchemaError(
            f"not an esdtool metrics table: columns {shown} are missing", hint=hint
        )
    from pandas.api.types import is_numeric_dtype

    numeric = [name for name, dtype, _ in COLUMNS if dtype in (pa.float64(), pa.int64())]
    text = [c for c in numeric if c in df.columns and not is_numeric_dtype(df[c].dtype)
            and df[c].notna().any()]  # fmt: skip
    texts = ("name", "module", "status", "role", "reason", "shard", "dtype")
    words = [c for c in texts if c in df.columns
             and not all(isinstance(v, str) for v in df[c].dropna())]  # fmt: skip
    if words:
        raise MetricsSchemaError(
            f"not an esdtool metrics table: columns {listed(words, 5)} hold something other "
            "than text",
            hint=hint,
        )
    spectra = df["eigenvalues"].dropna()
    if len(spectra) and not all(isinstance(v, np.ndarray | list | tuple) for v in spectra):
        text.append("eigenvalues")
    if text:
        raise MetricsSchemaError(
            f"not an esdtool metrics table: columns {listed(text, 5)} hold text, not numbers "
            "(a table read back from CSV?)",
            hint=hint + " (the parquet table, not a CSV export)",
        )
    check_values(Path("<table>"), df, hint)  # the values a file's check refuses, refused here too


def load_metrics(path: str | os.PathLike[str]) -> pd.DataFrame:
    """Read a metrics table into pandas, checking that it is one this esdtool understands.

    The file-level metadata (source, revision, settings, ...) is in ``df.attrs["esdtool"]``.
    """
    path = Path(path)
    meta = read_metadata(path)
    df = read_rows(path, meta["schema_version"])
    check_values(path, df)
    df.attrs["esdtool"] = meta
    return df


def read_rows(path: Path, version: int) -> pd.DataFrame:
    """The rows of a file whose columns :func:`check_columns` passed, as pandas with nullable
    integers; a column added after schema ``version`` is there, null, in its place."""
    import pandas as pd

    try:
        df = pandas_frame(pq.read_table(path))
    except (pa.ArrowException, OSError) as exc:
        raise MetricsSchemaError(f"{path}: unreadable parquet data ({exc})") from exc
    types = {name: dtype for name, dtype, _ in COLUMNS}
    for name in ADDED_IN:  # an older table: the column as null, after the one it follows
        if name not in df.columns:
            dtype = {pa.int64(): "Int64", pa.float64(): "float64"}.get(types[name], "object")
            where = df.columns.get_loc(COLUMN_NAMES[COLUMN_NAMES.index(name) - 1]) + 1
            df.insert(where, name, pd.Series([None] * len(df), dtype=dtype))
    return df
