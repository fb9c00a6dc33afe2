"""The metrics table: schema, validation on load, atomic writes."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from esdtool.errors import MetricsSchemaError
from esdtool.table import COLUMN_NAMES, METADATA_KEY, load_metrics, write_metrics


def test_round_trip_keeps_rows_types_and_metadata(tmp_path):
    rows = [
        {
            "name": "a.weight",
            "status": "ok",
            "eigenvalues": [0.5, 2.0],
            "num_spikes": 3,
            "alpha_ks": 2.5,
        }
    ]
    path = write_metrics(rows, tmp_path / "t.parquet", {"source": "x"})
    df = load_metrics(path)
    assert list(df.columns) == list(COLUMN_NAMES)
    assert df.num_spikes.item() == 3 and df.alpha_ks.item() == 2.5
    assert list(df.eigenvalues.item()) == [0.5, 2.0]
    assert pq.read_schema(path).field("eigenvalues").type == pa.list_(pa.float32())
    assert df.attrs["esdtool"] == {"schema_version": 1, "source": "x"}
    assert [p.name for p in tmp_path.iterdir()] == ["t.parquet"]  # no temp file left


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


def test_failed_write_keeps_the_previous_file(tmp_path):
    path = write_metrics([{"name": "old"}], tmp_path / "t.parquet", {})
    with pytest.raises(ValueError):  # pyarrow.ArrowInvalid is a ValueError too
        write_metrics([{"name": "new", "num_spikes": "not a number"}], path, {})
    assert load_metrics(path).name.item() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["t.parquet"]


def test_docs_describe_every_column():
    """docs/metrics.md lists each column with the type and meaning the schema holds."""
    from pathlib import Path

    from esdtool.table import COLUMNS, SCHEMA_VERSION

    doc = (Path(__file__).parents[1] / "docs" / "metrics.md").read_text()
    assert f"schema version {SCHEMA_VERSION}" in doc
    for name, dtype, meaning in COLUMNS:
        assert f"| `{name}` | {dtype} | {meaning} |" in doc, name
