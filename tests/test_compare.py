"""esdtool compare (issue 18, first part): tables with known differences give those
differences, module by module; tables of other models are refused in one line."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest
from safetensors.torch import load_file, save_file

from esdtool import AnalyzeSettings, analyze, compare, load_metrics
from esdtool.errors import OptionError
from helpers import run_cli

SETTINGS = AnalyzeSettings(dtype="float64", device="cpu")


@pytest.fixture(scope="module")
def scaled(minilm_dir, tmp_path_factory):
    """MiniLM with every weight doubled: lambda x 4, norms x 2, alphas and spike counts equal
    (both are scale-free): the closed-form differences compare must report."""
    out = tmp_path_factory.mktemp("scaled")
    weights = load_file(str(minilm_dir / "model.safetensors"))
    save_file({k: v * 2 if v.is_floating_point() else v for k, v in weights.items()},
              str(out / "model.safetensors"))  # fmt: skip
    return analyze(out, out / "m.parquet", SETTINGS).output


def test_known_differences(minilm_metrics, scaled, tmp_path, capsys):
    code, stdout, err = run_cli(
        ["compare", minilm_metrics, scaled, "-o", tmp_path / "cmp", "--json"], capsys
    )
    assert code == 0, err
    summary = json.loads(stdout)
    assert summary["modules_compared"] == 39 and summary["unmatched"] == {"metrics": 0, "m": 0}
    table = pd.read_csv(tmp_path / "cmp" / "comparison.csv")
    base = load_metrics(minilm_metrics).set_index("module")
    for _, row in table.iterrows():
        a = base.loc[row.module]
        assert row["lambda_max@m"] == pytest.approx(4 * a.lambda_max, rel=1e-9)
        assert row["delta_frobenius_norm"] == pytest.approx(a.frobenius_norm, rel=1e-9)
        assert row["delta_alpha_ks"] == pytest.approx(0, abs=1e-9)
        assert row["delta_num_spikes"] == 0
    html = (tmp_path / "cmp" / "report.html").read_text()
    assert "data:image/svg+xml;base64," in html and "http" not in html.replace("http-equiv", "")


def test_three_tables_and_unmatched_rows(minilm_metrics, scaled, tmp_path):
    """A table missing some modules keeps them as blanks, listed as unmatched; three tables
    draw the trajectories."""
    partial = load_metrics(minilm_metrics)
    partial = partial[~partial.name.str.startswith("encoder.layer.5.")]
    result = compare([minilm_metrics, partial, scaled], tmp_path / "cmp",
                     labels=["base", "cut", "x2"])  # fmt: skip
    missing = result.table[~result.table.in_all]
    assert len(missing) == 6 and all(m.startswith("encoder.layer.5.") for m in missing.module)
    assert len(result.unmatched["base"]) == 6 and result.unmatched["cut"] == []
    assert missing["alpha_ks@cut"].isna().all() and missing["alpha_ks@base"].notna().all()
    assert (
        "table by table: base -&gt; cut -&gt; x2" in (tmp_path / "cmp" / "report.html").read_text()
    )


def test_other_models_are_refused(minilm_metrics, tiny_llama, tmp_path, capsys):
    other = analyze(tiny_llama, tmp_path / "llama.parquet", SETTINGS).output
    code, _, err = run_cli(["compare", minilm_metrics, other, "-o", tmp_path / "c"], capsys)
    assert code == 2 and "not one model family" in err and "Traceback" not in err
    reshaped = load_metrics(minilm_metrics)
    reshaped.loc[reshaped.name == "pooler.dense.weight", "cols"] = 7
    with pytest.raises(OptionError, match="not the same model"):
        compare([minilm_metrics, reshaped])
    with pytest.raises(OptionError, match="two tables or more"):
        compare([minilm_metrics])
    with pytest.raises(OptionError, match="1 labels for 2 tables"):
        compare([minilm_metrics, minilm_metrics], labels=["x"])
    assert compare([minilm_metrics, minilm_metrics], labels=["x", "x"]).labels == ["x#1", "x#2"]
    assert not math.isnan(compare([minilm_metrics, minilm_metrics]).summary()["delta"][
        "alpha_ks"]["max_abs"])  # fmt: skip
