"""The real all-MiniLM-L6-v2 checkpoint against the independent float64 oracle (tests/oracle.py)."""

from __future__ import annotations

import numpy as np
import pytest
from safetensors.numpy import load_file

import oracle as ref
from esdtool import AnalyzeSettings, analyze, load_metrics


@pytest.fixture(scope="module")
def minilm_weights(minilm_dir):
    return load_file(str(minilm_dir / "model.safetensors"))


def test_every_2d_weight_matrix_gets_a_row(minilm_table, minilm_weights):
    ok = minilm_table[minilm_table.status == "ok"]
    matrices = {n for n, w in minilm_weights.items() if w.ndim == 2 and w.dtype.kind == "f"}
    matrices = {n for n in matrices if min(minilm_weights[n].shape) >= 10}
    assert len(ok) == 39
    assert set(ok.name) == matrices
    assert (ok.role == "linear").sum() == 36
    skipped = minilm_table.set_index("name").loc[
        ["embeddings.position_ids", "embeddings.token_type_embeddings.weight"], "reason"
    ]
    assert "integer" in skipped.iloc[0] and "min_evals" in skipped.iloc[1]
    assert len(minilm_table) == len(minilm_weights)  # nothing silently dropped


def _spikes_agree(ours: int, expected: dict, evals: np.ndarray) -> bool:
    """Exact, except where an eigenvalue lies within 1e-6 relative of the threshold."""
    if ours == expected["num_spikes"]:
        return True
    near = np.abs(evals / expected["tw_threshold"] - 1) < 1e-6
    return abs(ours - expected["num_spikes"]) <= near.sum()


def test_metrics_equal_float64_reference(minilm_table, minilm_weights):
    rows = minilm_table[minilm_table.status == "ok"].set_index("name")
    for name, row in rows.iterrows():
        expected = ref.row(minilm_weights[name])
        for col in ("alpha_median", "alpha_fix_finger", "alpha_ks", "stable_rank"):
            assert row[col] == pytest.approx(expected[col], rel=1e-4), (name, col)
        for col in ("xmin_ks", "D_ks", "lambda_max", "sigma_mp", "bulk_max", "tw_threshold",
                    "mp_softrank", "spectral_norm", "log_spectral_norm", "frobenius_norm",
                    "log_norm", "alpha_weighted", "log_alpha_norm", "entropy"):  # fmt: skip
            assert row[col] == pytest.approx(expected[col], rel=1e-6), (name, col)
        assert row["matrix_rank"] == expected["matrix_rank"], name
        assert row["effective_rank"] == expected["effective_rank"], name
        assert row["num_nonzero"] == expected["num_nonzero"], name
        assert _spikes_agree(row["num_spikes"], expected, expected["evals"]), name
        assert row["num_spikes_bulk"] == expected["num_spikes_bulk"], name
        np.testing.assert_allclose(row["eigenvalues"], expected["evals"], rtol=1e-5, atol=1e-6)


def test_float32_path_keeps_every_alpha_within_1e_3(minilm_dir, minilm_table, tmp_path):
    """The float32 path (squared float32 singular values) against the float64 table: all three
    alphas within 1e-3 relative (measured: 2.4e-5 at worst), spike counts within one. A
    float32 Gram matrix would fail this: its fix-finger alpha moved by 23% on layer 4's query."""
    out = analyze(minilm_dir, tmp_path / "m32.parquet", AnalyzeSettings(dtype="float32")).output
    f32 = load_metrics(out).set_index("name")
    f64 = minilm_table.set_index("name")
    assert f32.attrs["esdtool"]["settings"]["dtype"] == "float32"
    ok = f64.index[f64.status == "ok"]
    assert len(ok) == 39
    for col in ("alpha_median", "alpha_fix_finger", "alpha_ks"):
        np.testing.assert_allclose(f32.loc[ok, col], f64.loc[ok, col], rtol=1e-3, err_msg=col)
    assert (f32.loc[ok, "num_spikes"] - f64.loc[ok, "num_spikes"]).abs().max() <= 1


def test_table_metadata_records_how_it_was_made(minilm_table, minilm_dir):
    meta = minilm_table.attrs["esdtool"]
    from esdtool.io.table import SCHEMA_VERSION

    assert meta["schema_version"] == SCHEMA_VERSION == 5
    assert meta["source"] == str(minilm_dir)
    assert meta["settings"]["dtype"] == "float64"  # "auto" resolved: float64 on a CPU
    assert meta["model_type"] == "bert"
    assert meta["esdtool_version"]
    assert meta["created"].endswith("+00:00")
