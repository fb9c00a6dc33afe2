"""The metrics table: one parquet file, one row per matrix, a versioned schema.

``COLUMNS`` is the schema and its documentation at once (docs/metrics.md is checked against it);
:class:`MatrixRow` is a row as a record and :meth:`MatrixRow.columns` the one place it becomes
columns. File-level metadata (source, revision, esdtool version, settings, timestamp) is stored
as JSON under the parquet key ``esdtool``. Files are written atomically (:mod:`esdtool.io.atomic`);
:mod:`esdtool.io.table_read` reads them back, checked.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from esdtool.io.atomic import atomic_write
from esdtool.spectral import ALPHA_METHODS
from esdtool.spectral.farms import FarmsMetrics
from esdtool.spectral.metrics import SpectrumMetrics

if TYPE_CHECKING:
    import pandas as pd

SCHEMA_VERSION = 5
# Columns added after version 1, with the version that added them: an older table reads as if
# they were null.
ADDED_IN = {"quantization": 2, "adapter": 3, "lora_rank": 3, "lora_alpha": 3, "effective_rank": 3,
          "alpha_median_farms": 4, "alpha_fix_finger_farms": 4, "alpha_ks_farms": 4,
          "spikes_farms": 4, "farms_windows": 4, "alpha_peak": 5}  # fmt: skip
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
    (
        "quantization",
        _str,
        "how a quantized weight was stored and dequantized before analysis (e.g. 'fp8_e4m3 "
        "block 128x128', 'gptq int4 g128', 'mxfp4'); null for plain weights",
    ),
    (
        "adapter",
        _str,
        "rows of a PEFT adapter: 'lora' or 'dora' (with ' rslora') for a module's update "
        "scaling * B A, 'modules_to_save' or 'trainable_tokens' for a weight saved in full, "
        "'lora_B', 'dora_magnitude' or 'lora_bias' for parts; of a model analysed with "
        "--adapter, 'merged lora' (or 'merged dora', ..., 'merged modules_to_save') for a "
        "weight the adapter changed; null for a model's other weights",
    ),
    ("lora_rank", _i64, "r of the module's LoRA update (its planned rank); null otherwise"),
    ("lora_alpha", _f64, "lora_alpha resolved for the module (alpha_pattern or the default)"),
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
    (
        "tw_threshold",
        _f64,
        "spike threshold on the lambda scale: the Tracy-Widom edge, or lora-ar's (--spike-rule)",
    ),
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
        "alpha * log10(lambda_max); the alpha is --weighted-alpha's (default `ks`, as "
        "WeightWatcher)",
    ),
    ("log_alpha_norm", _f64, "log10(sum lambda^alpha), the same alpha"),
    (
        "entropy",
        _f64,
        "entropy of lambda / sum lambda over nonzero eigenvalues, in [0, 1]",
    ),
    ("matrix_rank", _i64, "numerical rank: lambda > lambda_max * N * eps(dtype)"),
    (
        "effective_rank",
        _i64,
        "fewest largest eigenvalues holding 90% of sum lambda (the squared Frobenius norm); of "
        "a LoRA update, the part of its rank it uses",
    ),
    (
        "alpha_median_farms",
        _f64,
        "FARMS: alpha_median of the pooled spectrum of equally shaped windows (--estimator "
        "farms; null otherwise)",
    ),
    ("alpha_fix_finger_farms", _f64, "FARMS: alpha_fix_finger of the pooled window spectrum"),
    ("alpha_ks_farms", _f64, "FARMS: alpha_ks of the pooled window spectrum"),
    (
        "spikes_farms",
        _f64,
        "FARMS: pooled eigenvalues above the Tracy-Widom edge of one window's shape, per window",
    ),
    ("farms_windows", _i64, "FARMS: windows pooled (window settings in the table's metadata)"),
    (
        "alpha_peak",
        _f64,
        "AlphaPruning's alpha: xmin searched near the peak of the log10 histogram, float32, "
        "as its code computes it (--preset alphapruning; null otherwise)",
    ),
    ("seconds", _f64, "wall time spent on this row"),
    ("device", _str, "device the spectrum was computed on"),
)
SCHEMA = pa.schema([pa.field(name, dtype) for name, dtype, _ in COLUMNS])
COLUMN_NAMES = tuple(name for name, _, _ in COLUMNS)


@dataclass(frozen=True)
class MatrixRow:
    """One row of the metrics table: one matrix (one expert of a 3-D tensor), as a record.

    Header facts (what the checkpoint's header says) and, when the matrix was analysed, its
    eigenvalues and :class:`~esdtool.spectral.metrics.SpectrumMetrics`. Rows stay records from
    the analysis to this module; :meth:`columns` is the one place they become table columns.

    name, module, slice, role, layer, shard, dtype, rows, cols, status, reason, seconds,
    device, quantization, adapter, lora_rank, lora_alpha: the columns of the same names (see
    ``COLUMNS``).
    eigenvalues: float32 eigenvalues ascending, None when no spectrum was computed.
    metrics:     the spectrum's numbers, None when no spectrum was computed or it was not finite.
    farms:       the FARMS numbers (``--estimator farms``), None otherwise.
    alpha_peak:  AlphaPruning's alpha (``--preset alphapruning``), None otherwise.
    """

    name: str
    module: str
    role: str
    layer: int | None
    shard: str
    dtype: str
    rows: int | None
    cols: int | None
    status: str
    reason: str | None = None
    slice: int | None = None
    eigenvalues: np.ndarray | None = None
    metrics: SpectrumMetrics | None = None
    seconds: float = math.nan
    device: str | None = None
    quantization: str | None = None
    adapter: str | None = None
    lora_rank: int | None = None
    lora_alpha: float | None = None
    farms: FarmsMetrics | None = None
    alpha_peak: float | None = None

    @property
    def M(self) -> int | None:
        """The matrix's smaller side (its number of eigenvalues); None for a vector."""
        return None if self.rows is None or self.cols is None else min(self.rows, self.cols)

    @property
    def N(self) -> int | None:
        """The matrix's larger side; None for a vector."""
        return None if self.rows is None or self.cols is None else max(self.rows, self.cols)

    def columns(self) -> dict[str, Any]:
        """The row as {column: value}, keys in ``COLUMN_NAMES`` order (a test holds them equal)."""
        M, N = self.M, self.N
        m = self.metrics
        fits: dict[str, Any] = {}
        for method in ALPHA_METHODS:
            fit = m.fit(method) if m is not None else None
            fits[f"alpha_{method}"] = fit.alpha if fit else math.nan
            fits[f"xmin_{method}"] = fit.xmin if fit else math.nan
            fits[f"D_{method}"] = fit.D if fit else math.nan
        spikes = m.spikes if m is not None else None
        nan = math.nan
        return {
            "name": self.name,
            "module": self.module,
            "slice": self.slice,
            "role": self.role,
            "layer": self.layer,
            "status": self.status,
            "reason": self.reason,
            "shard": self.shard,
            "dtype": self.dtype,
            "quantization": self.quantization,
            "adapter": self.adapter,
            "lora_rank": self.lora_rank,
            "lora_alpha": self.lora_alpha,
            "rows": self.rows,
            "cols": self.cols,
            "M": M,
            "N": N,
            "Q": (N / M) if M else None,
            "num_evals": 0 if self.eigenvalues is None else int(self.eigenvalues.size),
            "num_nonzero": m.num_nonzero if m else None,
            "eigenvalues": [] if self.eigenvalues is None else self.eigenvalues,
            **fits,
            "fit_status": m.fit_status if m else None,
            "num_spikes": spikes.num_spikes if spikes else None,
            "num_spikes_bulk": spikes.num_spikes_bulk if spikes else None,
            "sigma_mp": spikes.sigma_mp if spikes else nan,
            "bulk_max": spikes.bulk_max if spikes else nan,
            "tw_threshold": spikes.tw_threshold if spikes else nan,
            "mp_softrank": spikes.mp_softrank if spikes else nan,
            "lambda_max": m.lambda_max if m else nan,
            "spectral_norm": m.spectral_norm if m else nan,
            "log_spectral_norm": m.log_spectral_norm if m else nan,
            "frobenius_norm": m.frobenius_norm if m else nan,
            "log_norm": m.log_norm if m else nan,
            "stable_rank": m.stable_rank if m else nan,
            "alpha_weighted": m.alpha_weighted if m else nan,
            "log_alpha_norm": m.log_alpha_norm if m else nan,
            "entropy": m.entropy if m else nan,
            "matrix_rank": m.matrix_rank if m else None,
            "effective_rank": m.effective_rank if m else None,
            **_farms_columns(self.farms),
            "alpha_peak": math.nan if self.alpha_peak is None else self.alpha_peak,
            "seconds": self.seconds,
            "device": self.device,
        }


def _farms_columns(farms: FarmsMetrics | None) -> dict[str, Any]:
    m = farms.metrics if farms is not None else None
    return {
        **{f"alpha_{k}_farms": m.fit(k).alpha if m else math.nan for k in ALPHA_METHODS},
        "spikes_farms": farms.spikes_per_window if farms else math.nan,
        "farms_windows": farms.windows.count if farms else None,
    }


def _arrow(rows: Sequence[MatrixRow], metadata: dict[str, Any]) -> pa.Table:
    flat = [row.columns() for row in rows]
    arrays = [_column([row[f.name] for row in flat], f.type) for f in SCHEMA]
    table = pa.Table.from_arrays(arrays, schema=SCHEMA)
    meta = {"schema_version": SCHEMA_VERSION, **metadata}
    return table.replace_schema_metadata({METADATA_KEY: json.dumps(meta).encode()})


def write_metrics(rows: Sequence[MatrixRow], path: Path, metadata: dict[str, Any]) -> Path:
    """Write ``rows`` and ``metadata`` to ``path`` atomically."""
    table = _arrow(rows, metadata)
    atomic_write(path, lambda tmp: pq.write_table(table, tmp, compression="zstd"))
    return path


def metrics_frame(rows: Sequence[MatrixRow], metadata: dict[str, Any]) -> pd.DataFrame:
    """``rows`` as the DataFrame :func:`load_metrics` would give for the file
    :func:`write_metrics` writes: the same columns, dtypes and ``attrs["esdtool"]``."""
    table = _arrow(rows, metadata)
    frame = pandas_frame(table)
    frame.attrs["esdtool"] = json.loads(table.schema.metadata[METADATA_KEY])
    return frame


def pandas_frame(table: pa.Table) -> pd.DataFrame:
    import pandas as pd

    # Nullable integers, so that counts stay integers where skipped rows have none.
    return table.to_pandas(types_mapper={pa.int64(): pd.Int64Dtype()}.get)


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
