"""The metrics table: schema, validation on load, atomic writes."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from esdtool.errors import MetricsSchemaError, OutputError
from esdtool.io.table import (
    COLUMN_NAMES,
    METADATA_KEY,
    SCHEMA_VERSION,
    MatrixRow,
    write_metrics,
)
from esdtool.io.table_read import load_metrics


def _row(name: str = "a.weight", **fields) -> MatrixRow:
    base = dict(name=name, module=name, role="linear", layer=0, shard="s.safetensors",
                dtype="F32", rows=2, cols=3, status="skipped")  # fmt: skip
    return MatrixRow(**{**base, **fields})


def test_round_trip_keeps_rows_types_and_metadata(tmp_path):
    import numpy as np
    import torch

    from esdtool.spectral.metrics import spectrum_metrics

    evals = torch.tensor([0.5, 2.0], dtype=torch.float64)
    metrics = spectrum_metrics(evals, 2, 3)
    row = _row(status="ok", eigenvalues=np.array([0.5, 2.0], np.float32), metrics=metrics)
    path = write_metrics([row], tmp_path / "t.parquet", {"source": "x"})
    df = load_metrics(path)
    assert list(df.columns) == list(COLUMN_NAMES)
    assert df.num_spikes.item() == metrics.spikes.num_spikes
    assert df.alpha_ks.item() == metrics.ks.alpha and df.lambda_max.item() == 2.0
    assert df.M.item() == 2 and df.N.item() == 3 and df.Q.item() == 1.5 and df.num_evals.item() == 2
    assert list(df.eigenvalues.item()) == [0.5, 2.0]
    assert pq.read_schema(path).field("eigenvalues").type == pa.list_(pa.float32())
    assert df.attrs["esdtool"] == {"schema_version": SCHEMA_VERSION, "source": "x"}
    assert [p.name for p in tmp_path.iterdir()] == ["t.parquet"]  # no temp file left


def test_a_row_flattens_to_exactly_the_schema_columns_in_order():
    """MatrixRow.columns is the one place a record becomes columns: its keys are the schema's
    names in the schema's order, with and without metrics (a misspelt key fails here)."""
    import numpy as np
    import torch

    from esdtool.spectral.metrics import spectrum_metrics

    metrics = spectrum_metrics(torch.linspace(0.1, 4.0, 20, dtype=torch.float64), 20, 40)
    measured = _row(status="ok", eigenvalues=np.ones(20, np.float32), metrics=metrics)
    for row in (_row(), measured):
        assert list(row.columns()) == list(COLUMN_NAMES)


def test_rejects_files_that_are_not_esdtool_tables(tmp_path):
    (tmp_path / "text.parquet").write_text("nope")
    with pytest.raises(MetricsSchemaError, match="not a parquet file"):
        load_metrics(tmp_path / "text.parquet")
    pq.write_table(pa.table({"a": [1]}), tmp_path / "plain.parquet")
    with pytest.raises(MetricsSchemaError, match="not an esdtool metrics table"):
        load_metrics(tmp_path / "plain.parquet")
    future = pa.table({"a": [1]}).replace_schema_metadata(
        {METADATA_KEY: json.dumps({"schema_version": 99}).encode()}
    )
    pq.write_table(future, tmp_path / "future.parquet")
    with pytest.raises(MetricsSchemaError, match="schema version 99"):
        load_metrics(tmp_path / "future.parquet")
    with pytest.raises(MetricsSchemaError, match="no such file"):
        load_metrics(tmp_path / "absent.parquet")


def test_failed_write_keeps_the_previous_file(tmp_path, monkeypatch):
    path = write_metrics([_row("old")], tmp_path / "t.parquet", {})

    def broken(table, where, **kwargs):
        Path(where).write_bytes(b"half a file")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pq, "write_table", broken)
    with pytest.raises(OutputError, match="No space left on device"):
        write_metrics([_row("new")], path, {})
    assert load_metrics(path).name.item() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["t.parquet"]


def test_docs_describe_every_column():
    """docs/metrics.md lists each column with the type and meaning the schema holds."""
    from esdtool.io.table import COLUMNS, SCHEMA_VERSION

    doc = (Path(__file__).parents[1] / "docs" / "metrics.md").read_text()
    assert f"schema version {SCHEMA_VERSION}" in doc
    for name, dtype, meaning in COLUMNS:
        assert f"| `{name}` | {dtype} | {meaning} |" in doc, name
