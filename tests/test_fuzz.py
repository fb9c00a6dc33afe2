"""Fuzzing analyze with mutated safetensors files: every outcome is a clean EsdtoolError or a
table whose rows are right for the bytes that were there; never another exception, a hang or
a crash of the interpreter. A file safetensors itself reads holds valid tensors: then no row
may be an ``error`` (a crash inside the math is not a clean outcome), and valid float matrices
of any shape, scale and content (zeros, rank-deficient, NaN/Inf) get ok, zero or nonfinite."""

from __future__ import annotations

import contextlib
import json
import struct
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from esdtool import analyze, load_metrics
from esdtool.errors import EsdtoolError


def valid_file() -> bytes:
    """Two float32 matrices, a vector and metadata, as safetensors bytes."""
    rng = np.random.default_rng(0)
    tensors = {
        "layers.0.a.weight": rng.standard_normal((12, 20)).astype("<f4"),
        "layers.0.b.weight": rng.standard_normal((16, 12)).astype("<f4"),
        "layers.0.norm.weight": np.ones(12, "<f4"),
    }
    header, data, offset = {"__metadata__": {"format": "pt"}}, b"", 0
    for name, array in tensors.items():
        raw = array.tobytes()
        header[name] = {
            "dtype": "F32",
            "shape": list(array.shape),
            "data_offsets": [offset, offset + len(raw)],
        }
        data += raw
        offset += len(raw)
    blob = json.dumps(header).encode()
    return struct.pack("<Q", len(blob)) + blob + data


VALID = valid_file()
HEADER_END = 8 + struct.unpack("<Q", VALID[:8])[0]

mutation = st.one_of(
    # flip bytes anywhere, in the header, or in the length prefix
    st.tuples(st.just("set"), st.integers(0, len(VALID) - 1), st.integers(0, 255)),
    st.tuples(st.just("set"), st.integers(0, HEADER_END - 1), st.integers(0, 255)),
    st.tuples(st.just("set"), st.integers(0, 7), st.integers(0, 255)),
    # cut the file, or grow it with random bytes
    st.tuples(st.just("cut"), st.integers(0, len(VALID)), st.just(0)),
    st.tuples(st.just("grow"), st.integers(1, 64), st.integers(0, 255)),
    # replace a slice of the header text with random printable text
    st.tuples(st.just("text"), st.integers(8, HEADER_END - 1), st.integers(0, 255)),
)


def mutate(blob: bytes, ops: list[tuple[str, int, int]]) -> bytes:
    data = bytearray(blob)
    for kind, where, value in ops:
        if kind == "set" and where < len(data):
            data[where] = value
        elif kind == "cut":
            del data[where:]
        elif kind == "grow":
            data += bytes([value]) * where
        elif kind == "text" and where < len(data):
            data[where : where + 3] = b'"}]'[: value % 3 + 1]
    return bytes(data)


MEASURED = {"ok", "zero", "nonfinite"}  # the statuses of a matrix that was read and computed


def check_rows(path: Path, out: Path, errors: list[str]) -> None:
    """Rows of a successful run are right: each analysed matrix's lambda_max equals the
    largest squared singular value of the matrix as stored in the (mutated) file. When
    safetensors reads the file, nothing may fail: no ``error`` row, no error line, and every
    float matrix with at least min_evals = 10 rows and columns was measured."""
    from safetensors.numpy import load_file

    table = load_metrics(out)
    assert set(table.status) <= {"ok", "skipped", "zero", "nonfinite", "error"}
    try:
        stored = load_file(str(path))
    except Exception:  # safetensors refuses the file: then esdtool must not claim any spectrum
        assert (table.status != "ok").all()
        return
    assert not errors, errors
    assert (table.status != "error").all(), table[table.status == "error"].reason.tolist()
    for row in table.itertuples():
        w = stored[row.name]
        if w.dtype.kind == "f" and w.ndim == 2 and min(w.shape) >= 10:
            assert row.status in MEASURED, (row.name, row.status, row.reason)
    for row in table[table.status == "ok"].itertuples():
        w = stored[row.name].astype(np.float64)
        assert np.isfinite(w).all()
        expected = np.linalg.svd(w, compute_uv=False)[0] ** 2
        assert row.lambda_max == pytest.approx(expected, rel=1e-9)
        assert len(row.eigenvalues) == min(w.shape)
    for row in table[table.status == "nonfinite"].itertuples():
        assert not np.isfinite(stored[row.name]).all()


@settings(
    max_examples=1500,
    deadline=5000,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(ops=st.lists(mutation, min_size=1, max_size=4))
def test_mutated_files_give_clean_errors_or_right_rows(tmp_path, ops):
    path = tmp_path / "fuzz.safetensors"
    path.write_bytes(mutate(VALID, ops))
    out = tmp_path / "fuzz.parquet"
    out.unlink(missing_ok=True)
    try:
        result = analyze(path, out)
    except EsdtoolError as exc:
        message = str(exc)
        assert "\n" not in message and message
        return
    check_rows(path, out, result.errors)


@st.composite
def float_matrices(draw, limit: int):
    """A valid float matrix: any shape with M >= 10 (both orientations), float16/32/64, entries
    of scale 10^e, |e| <= limit (3 for float16), and an optional pathology: all zeros, rank one,
    a zero half, one NaN or Inf, or constant entries."""
    dtype = draw(st.sampled_from(["<f2", "<f4", "<f8"]))
    rows, cols = draw(st.integers(10, 40)), draw(st.integers(10, 40))
    seed = draw(st.integers(0, 2**32 - 1))
    exponent = draw(st.integers(-limit, limit) if dtype != "<f2" else st.integers(-3, 3))
    kind = draw(st.sampled_from(["gauss", "zero", "rank1", "half", "nan", "inf", "const"]))
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((rows, cols))
    if kind == "rank1":
        w = np.outer(w[:, 0], w[0])
    w *= 10.0**exponent
    if kind == "zero":
        w[:] = 0
    elif kind == "half":
        w[: rows // 2 + 1] = 0
    elif kind == "const":
        w[:] = 10.0**exponent
    w = w.astype(dtype)
    if kind == "nan":
        w[rng.integers(rows), rng.integers(cols)] = np.nan
    elif kind == "inf":
        w[rng.integers(rows), rng.integers(cols)] = -np.inf
    return kind, w


@settings(
    max_examples=60,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    case_dtype=st.one_of(
        st.tuples(float_matrices(limit=30), st.just("float64")),
        st.tuples(float_matrices(limit=15), st.just("float32")),
    )
)
def test_valid_float_matrices_are_measured_never_errors(tmp_path, case_dtype):
    """Valid matrices must never become ``error`` rows: a crash inside the math (a fit, the MP
    fit, a norm) would be turned into one by analyze's per-tensor boundary and pass silently.

    The float32 path squares float32 singular values, so its lambda only exists for singular
    values in float32's square-root range (about 1e-19..1e19): entries of scale 1e15 at most
    are tested there; float64 takes 1e-30..1e30."""
    from esdtool import AnalyzeSettings
    from helpers import write_tensors

    (kind, w), dtype = case_dtype
    path = write_tensors(tmp_path / "m.safetensors", {"layers.0.w.weight": w})
    out = tmp_path / "m.parquet"
    out.unlink(missing_ok=True)
    result = analyze(path, out, AnalyzeSettings(dtype=dtype), resume=False)
    assert not result.errors, result.errors
    (row,) = load_metrics(out).itertuples()
    w64 = w.astype(np.float64)
    if not np.isfinite(w64).all():
        assert row.status == "nonfinite"
    elif not w64.any():
        assert row.status == "zero" and row.lambda_max == 0
    else:
        assert row.status == "ok", (kind, row.status, row.reason)
        expected = np.linalg.svd(w64, compute_uv=False)[0] ** 2
        assert row.lambda_max == pytest.approx(expected, rel=1e-5 if dtype == "float32" else 1e-9)


# -- the API's in-memory inputs -------------------------------------------------------------

DTYPES = [getattr(__import__("torch"), n) for n in (
    "float64", "float32", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8",
    "bool", "complex64", "float8_e4m3fn", "float8_e5m2")]  # fmt: skip


@st.composite
def odd_tensor(draw):
    import torch

    dtype = draw(st.sampled_from(DTYPES))
    shape = tuple(draw(st.lists(st.integers(0, 9), min_size=0, max_size=4)))
    kind = draw(st.sampled_from(["dense", "sparse", "transposed", "meta", "special"]))
    base = torch.randn(shape) * draw(st.sampled_from([0.0, 1e-30, 1.0, 1e30]))
    if kind == "special" and base.numel():
        base.view(-1)[0] = draw(st.sampled_from([float("nan"), float("inf"), 0.0]))
    tensor = base.to(dtype) if not dtype.is_complex else torch.complex(base, base).to(dtype)
    if kind == "sparse" and tensor.ndim >= 1 and dtype not in DTYPES[-2:]:
        tensor = tensor.to_sparse()
    elif kind == "transposed" and tensor.ndim == 2:
        tensor = tensor.T  # a non-contiguous view
    elif kind == "meta":
        tensor = torch.empty(shape, dtype=dtype, device="meta")
    return tensor


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(["a.weight", "layers.0.q.weight", "b", "layers.1.k.weight",
                                        "x.weight_scale_inv", "y.qweight", "y.scales"]),
                       odd_tensor(), min_size=1, max_size=5))  # fmt: skip
def test_state_dicts_of_any_dtype_and_shape_end_cleanly(state):
    """analyze(state_dict) of tensors of every dtype, shape (0-sized, vectors, 4-D), layout
    (sparse, transposed, meta) and content (NaN, inf, 1e30, zeros): a table whose every row
    has a known status (an ``error`` row only with its exception named), or one EsdtoolError;
    never another exception."""
    from esdtool import AnalyzeSettings

    try:
        table = analyze(state, settings=AnalyzeSettings(min_evals=2)).table
    except EsdtoolError:
        return
    assert set(table.status) <= {"ok", "zero", "nonfinite", "skipped", "error"}
    assert table.reason[table.status.isin(["skipped", "error"])].notna().all()


COLUMNS = ["alpha_median", "alpha_ks", "num_spikes", "rows", "layer", "status", "module",
           "eigenvalues", "lambda_max"]  # fmt: skip
VALUES = ["text", None, float("nan"), -1, 1e300, [1, 2], b"x", True]
SLOW = [HealthCheck.too_slow, HealthCheck.function_scoped_fixture]


@settings(max_examples=40, deadline=None, suppress_health_check=SLOW)
@given(column=st.sampled_from(COLUMNS), value=st.sampled_from(VALUES))
def test_tables_with_a_retyped_column_end_cleanly(minilm_table, column, value):
    """allocate, report and plot_esd on MiniLM's table with one column retyped (text, None,
    NaN, negative, huge, lists, bytes, booleans): a plan and a page, or one EsdtoolError."""
    import pandas as pd

    from esdtool import allocate, plot_esd, report

    table = minilm_table.copy()
    table.attrs = minilm_table.attrs
    table[column] = pd.Series([value] * len(table), dtype=object)
    for call in (lambda: allocate(table, report=False), lambda: report(table),
                 lambda: plot_esd(table, str(minilm_table.name.iloc[5]))):  # fmt: skip
        with contextlib.suppress(EsdtoolError):
            call()
