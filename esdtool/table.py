"""The metrics table: one parquet file, one row per tensor, a versioned schema.

``COLUMNS`` is the schema and its documentation at once (docs/metrics.md is written from it).
File-level metadata (source, revision, esdtool version, settings, timestamp) is stored as JSON
under the parquet key ``esdtool``. Files are written atomically: a temporary file in the same
directory, flushed to disk, then renamed over the target.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from esdtool.errors import MetricsSchemaError, OutputError

if TYPE_CHECKING:
    import pandas as pd

SCHEMA_VERSION = 1
METADATA_KEY = b"esdtool"

_f64, _i64, _str = pa.float64(), pa.int64(), pa.string()

# (name, type, unit or meaning) in table order.
COLUMNS: tuple[tuple[str, pa.DataType, str], ...] = (
    ("name", _str, "tensor name as stored in the checkpoint (untrusted text)"),
    ("module", _str, "module name: the tensor name without '.weight' (PEFT's key)"),
    ("slice", _i64, "expert index of a 3-D tensor's matrix; null for other tensors"),
    ("role", _str, "linear, embedding, lm_head, expert, conv or other"),
    ("layer", _i64, "transformer block index parsed from the name; null outside blocks"),
    ("status", _str, "ok, skipped, zero, nonfinite or error"),
    ("reason", _str, "why a row has no metrics (skipped / error); null when ok"),
    ("shard", _str, "file name of the shard holding the tensor"),
    ("dtype", _str, "stored dtype (safetensors name: F32, BF16, ...)"),
    ("rows", _i64, "size of the matrix's first dimension (out features)"),
    ("cols", _i64, "size of the matrix's second dimension (in features)"),
    ("M", _i64, "min(rows, cols): number of eigenvalues per matrix"),
    ("N", _i64, "max(rows, cols)"),
    ("Q", _f64, "N / M >= 1"),
    ("num_evals", _i64, "eigenvalues stored (M, or M * kh * kw for pooled conv kernels)"),
    ("num_nonzero", _i64, "eigenvalues above eig_threshold: the set the power-law fits use"),
    ("eigenvalues", pa.list_(pa.float32()), "all eigenvalues lambda = sigma^2, ascending"),
    ("alpha_median", _f64, "Hill power-law exponent with xmin at the median eigenvalue"),
    ("xmin_median", _f64, "xmin of that fit (lambda units)"),
    ("D_median", _f64, "KS distance of that fit"),
    ("alpha_fix_finger", _f64, "Hill exponent, xmin near the log-histogram peak (best KS)"),
    ("xmin_fix_finger", _f64, "xmin of that fit (lambda units)"),
    ("D_fix_finger", _f64, "KS distance of that fit"),
    ("alpha_ks", _f64, "Hill exponent, xmin minimising the KS distance (WeightWatcher's alpha)"),
    ("xmin_ks", _f64, "xmin of that fit (lambda units)"),
    ("D_ks", _f64, "KS distance of that fit"),
    ("fit_status", _str, "ok, or 'method:reason' for each fit that found no xmin"),
    ("num_spikes", _i64, "eigenvalues above the Tracy-Widom-corrected MP edge"),
    ("num_spikes_bulk", _i64, "eigenvalues above the MP bulk edge (no TW correction)"),
    (
        "sigma_mp",
        _f64,
        "fitted MP sigma: the standard deviation of the entries of a random matrix with this bulk",
    ),
    ("bulk_max", _f64, "MP bulk edge on the lambda scale"),
    ("tw_threshold", _f64, "Tracy-Widom spike threshold on the lambda scale"),
    ("mp_softrank", _f64, "bulk_max / lambda_max"),
    ("lambda_max", _f64, "largest eigenvalue"),
    ("spectral_norm", _f64, "largest singular value, sqrt(lambda_max)"),
    (
        "log_spectral_norm",
        _f64,
        "log10(lambda_max) = 2 log10(spectral_norm) (WeightWatcher's convention)",
    ),
    ("frobenius_norm", _f64, "sqrt(sum lambda)"),
    ("log_norm", _f64, "log10(sum lambda)"),
    ("stable_rank", _f64, "sum lambda / lambda_max"),
    (
        "alpha_weighted",
        _f64,
        "alpha * log10(lambda_max); the alpha is `AnalyzeSettings.weighted_alpha` (Python only; "
        "default `ks`, as WeightWatcher)",
    ),
    ("log_alpha_norm", _f64, "log10(sum lambda^alpha), the same alpha"),
    (
        "entropy",
        _f64,
        "entropy of lambda / sum lambda over nonzero eigenvalues, in [0, 1]",
    ),
    ("matrix_rank", _i64, "numerical rank: lambda > lambda_max * N * eps(dtype)"),
    ("seconds", _f64, "wall time spent on this row"),
    ("device", _str, "device the spectrum was computed on"),
)
SCHEMA = pa.schema([pa.field(name, dtype) for name, dtype, _ in COLUMNS])
COLUMN_NAMES = tuple(name for name, _, _ in COLUMNS)


def write_metrics(rows: list[dict[str, Any]], path: Path, metadata: dict[str, Any]) -> Path:
    """Write ``rows`` (dicts keyed by column name) and ``metadata`` to ``path`` atomically."""
    arrays = [_column([row.get(f.name) for row in rows], f.type) for f in SCHEMA]
    table = pa.Table.from_arrays(arrays, schema=SCHEMA)
    meta = {"schema_version": SCHEMA_VERSION, **metadata}
    table = table.replace_schema_metadata({METADATA_KEY: json.dumps(meta).encode()})
    atomic_write(path, lambda tmp: pq.write_table(table, tmp, compression="zstd"))
    return path


_NUMPY = {pa.float64(): np.float64, pa.float32(): np.float32, pa.int64(): np.int64}


def _column(values: list[Any], type_: pa.DataType) -> pa.Array:
    """One column from Python values (None = null, NaN stays NaN), built from raw buffers.

    ``pa.array`` would import pandas (half a second of every ``esdtool analyze``) to look for
    pandas types; the tables are simple enough to lay out directly.
    """
    n = len(values)
    valid = np.fromiter((v is not None for v in values), dtype=bool, count=n)
    nulls = n - int(valid.sum())
    bitmap = pa.py_buffer(np.packbits(valid, bitorder="little")) if nulls else None
    if type_ in _NUMPY:
        data = np.array([0 if v is None else v for v in values], dtype=_NUMPY[type_])
        return pa.Array.from_buffers(type_, n, [bitmap, pa.py_buffer(data)], nulls)
    if pa.types.is_string(type_):
        encoded = [b"" if v is None else str(v).encode("utf-8") for v in values]
        offsets = np.zeros(n + 1, dtype=np.int32)
        np.cumsum([len(b) for b in encoded], out=offsets[1:])
        buffers = [bitmap, pa.py_buffer(offsets), pa.py_buffer(b"".join(encoded))]
        return pa.Array.from_buffers(type_, n, buffers, nulls)
    if pa.types.is_list(type_) and type_.value_type in _NUMPY:
        dtype = _NUMPY[type_.value_type]
        parts = [np.asarray([] if v is None else v, dtype=dtype).ravel() for v in values]
        offsets = np.zeros(n + 1, dtype=np.int32)
        np.cumsum([p.size for p in parts], out=offsets[1:])
        flat = np.concatenate(parts) if parts else np.empty(0, dtype=dtype)
        child = pa.Array.from_buffers(type_.value_type, flat.size, [None, pa.py_buffer(flat)])
        return pa.Array.from_buffers(
            type_, n, [bitmap, pa.py_buffer(offsets)], nulls, children=[child]
        )
    raise TypeError(f"no column builder for {type_}")


def atomic_write(path: Path, write: Any) -> None:
    """Call ``write(tmp_path)``, fsync the result, then rename it over ``path``.

    A crash at any point leaves either the old file or the new one, never half of one; two
    writers racing leave one complete file.
    """
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{path}: is a directory; give a file name")
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        raise OutputError(f"{path}: cannot write ({exc.strerror or exc})") from exc
    finally:
        with contextlib.suppress(OSError):  # nothing left to clean, or nowhere to clean it
            tmp.unlink()


def read_metadata(path: Path) -> dict[str, Any]:
    """The ``esdtool`` metadata of a metrics table, validated (no rows are read)."""
    path = Path(path)
    if not path.is_file():
        raise MetricsSchemaError(f"{path}: no such file")
    try:
        schema = pq.read_schema(path)
    except (pa.ArrowException, OSError) as exc:
        raise MetricsSchemaError(f"{path}: not a parquet file ({exc})") from exc
    raw = (schema.metadata or {}).get(METADATA_KEY)
    if raw is None:
        raise MetricsSchemaError(
            f"{path}: not an esdtool metrics table (no esdtool metadata)",
            hint="make one with: esdtool analyze SOURCE -o metrics.parquet",
        )
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise MetricsSchemaError(f"{path}: esdtool metadata is not valid JSON") from exc
    version = meta.get("schema_version") if isinstance(meta, dict) else None
    if version != SCHEMA_VERSION:
        raise MetricsSchemaError(
            f"{path}: schema version {version!r}, this esdtool reads version {SCHEMA_VERSION}",
            hint="re-run esdtool analyze with this version",
        )
    missing = [name for name in COLUMN_NAMES if name not in schema.names]
    if missing:
        raise MetricsSchemaError(f"{path}: missing columns {', '.join(missing)}")
    return meta


def load_metrics(path: str | os.PathLike[str]) -> pd.DataFrame:
    """Read a metrics table into pandas, checking that it is one this esdtool understands.

    The file-level metadata (source, revision, settings, ...) is in ``df.attrs["esdtool"]``.
    """
    path = Path(path)
    meta = read_metadata(path)
    import pandas as pd

    try:
        # Nullable integers, so that counts stay integers where skipped rows have none.
        df = pq.read_table(path).to_pandas(types_mapper={pa.int64(): pd.Int64Dtype()}.get)
    except (pa.ArrowException, OSError) as exc:
        raise MetricsSchemaError(f"{path}: unreadable parquet data ({exc})") from exc
    df.attrs["esdtool"] = meta
    return df
