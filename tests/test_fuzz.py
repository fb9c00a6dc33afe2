"""Fuzzing analyze with mutated safetensors files: every outcome is a clean EsdtoolError or a
table whose rows are right for the bytes that were there; never another exception, a hang or
a crash of the interpreter."""

from __future__ import annotations

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


def check_rows(path: Path, out: Path) -> None:
    """Rows of a successful run are right: each analysed matrix's lambda_max equals the
    largest squared singular value of the matrix as stored in the (mutated) file."""
    from safetensors.numpy import load_file

    table = load_metrics(out)
    assert set(table.status) <= {"ok", "skipped", "zero", "nonfinite", "error"}
    try:
        stored = load_file(str(path))
    except Exception:  # safetensors refuses the file: then esdtool must not claim any spectrum
        assert (table.status != "ok").all()
        return
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
        analyze(path, out)
    except EsdtoolError as exc:
        message = str(exc)
        assert "\n" not in message and message
        return
    check_rows(path, out)
