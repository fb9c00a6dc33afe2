"""A training trajectory: the metrics tables of one adapter measured at several training steps,
in one parquet file (``spectra_trajectory.parquet``, written by ``esdtool.SpectralCallback``).

Its columns are ``step`` (int64) and then the metrics table's (:mod:`esdtool.io.table`), in the
schema's order and types; each step's rows are that step's table. The ``esdtool`` metadata is
the first table's, with ``trajectory: {"steps": [...]}`` (the steps, ascending) added: the key
that tells a trajectory from a metrics table. Files are written atomically and read back
validated like any table: everything in them is untrusted.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from numbers import Integral
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from esdtool.errors import MetricsSchemaError, OptionError, listed
from esdtool.io.atomic import atomic_write
from esdtool.io.table import METADATA_KEY, SCHEMA, SCHEMA_VERSION
from esdtool.io.table_read import check_columns, check_frame, check_values, read_rows, read_schema
from esdtool.untrusted import printable

if TYPE_CHECKING:
    import pandas as pd

TRAJECTORY_NAME = "spectra_trajectory.parquet"
TRAJECTORY_SCHEMA = pa.schema([pa.field("step", pa.int64()), *SCHEMA])
# Rows that hold a measured matrix: one per (module, expert) in each step.
MEASURED = ("ok", "zero")
_HINT = "esdtool.SpectralCallback writes one (spectra_trajectory.parquet) at the end of training"


def write_trajectory(
    steps: Sequence[tuple[int, pd.DataFrame]],
    path: str | os.PathLike[str],
    metadata: dict[str, Any],
) -> Path:
    """Write the metrics tables of ``steps`` ((step, table) pairs, each table as
    ``AnalyzeResult.table`` or :func:`~esdtool.io.table_read.load_metrics` gives it) to
    ``path`` as one parquet file, atomically: ``step`` first, then the schema's columns with
    the schema's types (a float's missing value is NaN, as in a metrics table). The file's
    metadata is ``metadata`` with ``schema_version`` and ``trajectory: {"steps": [...]}`` set.
    Steps are integers >= 0, each given once, written in ascending order; a step whose table
    measures one module (and expert) twice is refused, as :func:`load_trajectory` would refuse
    the file."""
    path = Path(path)
    if not steps:
        raise OptionError(f"{path}: no steps to write (measure the adapter at least once)")
    numbers = []
    for step, frame in steps:
        if isinstance(step, bool) or not isinstance(step, Integral) or step < 0:
            raise OptionError(f"{path}: step {step!r} is not an integer >= 0")
        check_frame(frame)
        numbers.append(int(step))
    twice = sorted({s for s in numbers if numbers.count(s) > 1})
    if twice:
        raise OptionError(f"{path}: step {twice[0]} is given twice")
    import pandas as pd

    order = sorted(range(len(steps)), key=numbers.__getitem__)
    frames = [steps[i][1].assign(step=numbers[i]) for i in order]
    rows = pd.concat(frames, ignore_index=True)
    _check_once(path, rows)
    meta = {**metadata, "schema_version": SCHEMA_VERSION,
            "trajectory": {"steps": sorted(numbers)}}  # fmt: skip
    try:
        encoded = json.dumps(meta).encode()
    except (TypeError, ValueError) as exc:
        raise OptionError(f"{path}: the metadata is not JSON ({exc})") from exc
    arrays = [_array(path, rows, field) for field in TRAJECTORY_SCHEMA]
    table = pa.Table.from_arrays(arrays, schema=TRAJECTORY_SCHEMA)
    table = table.replace_schema_metadata({METADATA_KEY: encoded})
    atomic_write(path, lambda tmp: pq.write_table(table, tmp, compression="zstd"))
    return path


def load_trajectory(path: str | os.PathLike[str]) -> pd.DataFrame:
    """Read a training trajectory into pandas, validated: ``step`` (int64) and the metrics
    table's columns (nullable integers, as :func:`~esdtool.io.table_read.load_metrics` gives them),
    rows in ascending step order, the metadata in ``df.attrs["esdtool"]`` (the steps in its
    ``trajectory``). ``df[df.step == s].drop(columns="step")`` is the table of step ``s``.

    Refused in one line naming the file: not a trajectory (a metrics table, any other file),
    a column missing or of another type, steps that are null, negative or not those the
    metadata lists, a module (and expert) measured twice in one step, and every value a metrics
    table cannot hold.
    """
    path = Path(path)
    schema, meta = read_schema(path, "training trajectory", _HINT)
    listed_steps = _steps(path, meta)
    if "step" not in schema.names:
        raise MetricsSchemaError(f"{path}: missing columns step")
    if schema.field("step").type != pa.int64():
        raise MetricsSchemaError(f"{path}: step is {schema.field('step').type}, not int64")
    check_columns(path, schema, meta["schema_version"])
    df = read_rows(path, meta["schema_version"])
    step = df.pop("step")
    if step.isna().any():
        raise MetricsSchemaError(f"{path}: step has nulls")
    if (step < 0).any():
        raise MetricsSchemaError(f"{path}: step holds negative values ({int(step.min())})")
    df.insert(0, "step", step.astype("int64"))
    found = sorted(int(s) for s in df["step"].unique())
    if found != listed_steps:
        raise MetricsSchemaError(
            f"{path}: the rows hold steps {listed(list(map(str, found)), 5)}, the metadata "
            f"lists {listed(list(map(str, listed_steps)), 5)}"
        )
    check_values(path, df, _HINT)
    _check_once(path, df)
    df = df.sort_values("step", kind="stable").reset_index(drop=True)
    df.attrs["esdtool"] = meta
    return df


def is_trajectory(source: str | os.PathLike[str] | pd.DataFrame) -> bool:
    """Whether ``source`` is a training trajectory: a DataFrame with a ``step`` column, or a file
    whose esdtool metadata says it is one (only its footer is read; a file that is no esdtool
    parquet at all is not one, and its reader says what it is)."""
    if hasattr(source, "columns"):
        return "step" in source.columns  # type: ignore[union-attr]
    try:
        raw = (pq.read_schema(Path(source)).metadata or {}).get(METADATA_KEY)
        meta = json.loads(raw) if raw is not None else None
    except (pa.ArrowException, OSError, ValueError, RecursionError):
        return False
    return isinstance(meta, dict) and "trajectory" in meta


def step_tables(trajectory: pd.DataFrame) -> list[tuple[int, pd.DataFrame]]:
    """The (step, table) pairs of a trajectory, ascending: each table without ``step``, with the
    trajectory's metadata in its attrs."""
    meta = trajectory.attrs.get("esdtool", {})
    pairs = []
    for step, rows in trajectory.groupby("step", sort=True):
        table = rows.drop(columns="step").reset_index(drop=True)
        table.attrs["esdtool"] = meta
        pairs.append((int(step), table))  # type: ignore[call-overload]
    return pairs


def _steps(path: Path, meta: dict[str, Any]) -> list[int]:
    """The steps the metadata lists, checked: integers >= 0, ascending, each once."""
    if "trajectory" not in meta:
        raise MetricsSchemaError(
            f"{path}: is a metrics table, not a training trajectory",
            hint=f"read it with esdtool.load_metrics; {_HINT}",
        )
    record = meta["trajectory"]
    steps = record.get("steps") if isinstance(record, dict) else None
    if (
        not isinstance(steps, list)
        or not steps
        or any(type(s) is not int or s < 0 for s in steps)
        or steps != sorted(set(steps))
    ):
        shown = printable(json.dumps(steps))[:80]
        raise MetricsSchemaError(
            f"{path}: trajectory steps {shown} are not integers >= 0 in ascending order"
        )
    return steps


def _check_once(path: Path, rows: pd.DataFrame) -> None:
    """No step measures one module (and expert) twice: its values would be ambiguous."""
    measured = rows[rows["status"].isin(MEASURED)]
    keys = measured[["step", "module"]].assign(slice=measured["slice"].fillna(-1))
    twice = keys[keys.duplicated()]
    if len(twice):
        step, module, expert = twice.iloc[0]
        which = "" if expert == -1 else f" (expert {expert})"
        raise MetricsSchemaError(
            f"{path}: step {step} measures module {printable(module)!r}{which} twice",
            hint="each step holds one adapter table: one row per module",
        )


def _array(path: Path, rows: pd.DataFrame, field: pa.Field) -> pa.Array:
    """One column of ``rows`` with the schema's type (a column of an older table: null)."""
    n, kind = len(rows), field.type
    if field.name not in rows.columns:
        return pa.nulls(n, kind)
    column = rows[field.name]
    try:
        if kind == pa.float64():
            return pa.array(column.to_numpy(dtype=np.float64, na_value=np.nan), kind)
        if kind == pa.int64():
            return pa.array(column.astype("Int64"), kind)
        if pa.types.is_string(kind):
            return pa.array([None if _missing(v) else str(v) for v in column], kind)
        parts = [np.asarray([] if _missing(v) else v, dtype=np.float32).ravel() for v in column]
    except (TypeError, ValueError) as exc:
        raise MetricsSchemaError(
            f"{path}: column {field.name} cannot be written as {kind} ({exc})"
        ) from exc
    offsets = np.zeros(n + 1, dtype=np.int32)
    np.cumsum([p.size for p in parts], out=offsets[1:])
    flat = np.concatenate(parts) if parts else np.empty(0, dtype=np.float32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat), type=kind)


def _missing(value: object) -> bool:
    """A scalar pandas or Python missing value (never an array of eigenvalues)."""
    if value is None:
        return True
    if isinstance(value, float):
        return math.isnan(value)
    import pandas as pd

    return value is pd.NA or value is pd.NaT
