"""analyze() on files the tests write: ground truth, sharding, statuses, hub cache."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import save_file as save_torch

from esdtool import AnalyzeSettings, analyze, load_metrics
from helpers import make_hf_cache, run_subprocess, write_tensors


def power_law_matrix(M: int, N: int, alpha: float, seed: int) -> np.ndarray:
    """W = U diag(s) V^T with Haar-random U, V and s_i^2 the Pareto(alpha) quantiles
    (1 - u_i)^(-1/(alpha-1)), u_i = (i + 1/2) / M: by construction the eigenvalues of W^T W are
    exactly a power law with exponent alpha above xmin = 1."""
    rng = np.random.default_rng(seed)
    u = (np.arange(M) + 0.5) / M
    s = np.sqrt((1 - u) ** (-1 / (alpha - 1)))
    U, _ = np.linalg.qr(rng.standard_normal((M, M)))
    V, _ = np.linalg.qr(rng.standard_normal((N, M)))
    return (U * s) @ V.T


def test_power_law_spectrum_gives_its_exponent(tmp_path):
    path = write_tensors(
        tmp_path / "pl.safetensors",
        {
            f"layers.{i}.w.weight": power_law_matrix(800, 1200, a, i).astype(np.float32)
            for i, a in enumerate((2.5, 3.5, 5.0))
        },
    )
    df = load_metrics(analyze(path, tmp_path / "m.parquet").output)
    for a, (_, row) in zip((2.5, 3.5, 5.0), df.iterrows(), strict=True):
        assert row["alpha_ks"] == pytest.approx(a, rel=0.05)
        assert row["alpha_median"] == pytest.approx(a, rel=0.05)


def test_statuses_for_zero_nonfinite_small_integer_and_experts(tmp_path):
    nan = np.random.default_rng(0).standard_normal((32, 48)).astype(np.float32)
    nan[3, 4] = np.nan
    path = write_tensors(
        tmp_path / "odd.safetensors",
        {
            "layers.0.zero.weight": np.zeros((32, 48), np.float32),
            "layers.0.nan.weight": nan,
            "layers.0.small.weight": np.ones((4, 48), np.float32),
            "layers.0.int.weight": np.ones((32, 48), np.int8),
            "layers.0.norm.weight": np.ones(48, np.float32),
            "layers.0.experts.weight": np.random.default_rng(1).standard_normal((3, 24, 40)),
        },
    )
    result = analyze(path, tmp_path / "m.parquet")
    df = load_metrics(result.output)
    by_name = df.groupby("name").status.apply(list).to_dict()
    assert by_name["layers.0.zero.weight"] == ["zero"]
    assert by_name["layers.0.nan.weight"] == ["nonfinite"]
    assert by_name["layers.0.small.weight"] == ["skipped"]
    assert by_name["layers.0.int.weight"] == ["skipped"]
    assert by_name["layers.0.norm.weight"] == ["skipped"]
    assert by_name["layers.0.experts.weight"] == ["ok"] * 3
    experts = df[df.name == "layers.0.experts.weight"]
    assert list(experts.slice) == [0, 1, 2] and set(experts.role) == {"expert"}
    assert result.warnings and "layers.0.nan.weight" in result.warnings[0]
    assert not result.errors
    assert all(math.isnan(a) for a in df[df.status != "ok"].alpha_ks)


@pytest.mark.parametrize(("dtype", "name"), [(torch.bfloat16, "BF16"), (torch.float16, "F16")])
def test_half_checkpoints_match_their_float32_upcast(tmp_path, dtype, name):
    W = torch.randn(48, 80).to(dtype)
    save_torch({"layers.0.a.weight": W}, str(tmp_path / "bf.safetensors"))
    save_torch({"layers.0.a.weight": W.float()}, str(tmp_path / "f32.safetensors"))
    a = load_metrics(analyze(tmp_path / "bf.safetensors", tmp_path / "a.parquet").output)
    b = load_metrics(analyze(tmp_path / "f32.safetensors", tmp_path / "b.parquet").output)
    cols = ["alpha_median", "alpha_ks", "num_spikes", "stable_rank"]
    pd.testing.assert_frame_equal(a[cols], b[cols])
    assert a.dtype.item() == name


@pytest.mark.parametrize("fp8", ["float8_e4m3fn", "float8_e5m2"])
def test_float8_is_upcast_and_analysed(tmp_path, fp8):
    if not hasattr(torch, fp8):
        pytest.skip(f"this torch has no {fp8}")
    W = (torch.randn(40, 64) * 4).to(getattr(torch, fp8))
    save_torch({"layers.0.a.weight": W}, str(tmp_path / "f8.safetensors"))
    result = analyze(tmp_path / "f8.safetensors", tmp_path / "m.parquet")
    assert not result.errors
    row = load_metrics(result.output).iloc[0]
    assert row.status == "ok"
    expected = np.sort(np.linalg.svd(W.double().numpy(), compute_uv=False) ** 2)
    np.testing.assert_allclose(row.eigenvalues, expected, rtol=1e-5)


def test_include_exclude_select_tensors(minilm_dir, tmp_path):
    settings = AnalyzeSettings(include=r"layer\.0\.", exclude=r"attention")
    df = load_metrics(analyze(minilm_dir, tmp_path / "m.parquet", settings).output)
    assert sorted(df[df.status == "ok"].name) == [
        "encoder.layer.0.intermediate.dense.weight",
        "encoder.layer.0.output.dense.weight",
    ]


COMPARED = [
    "name",
    "status",
    "alpha_median",
    "alpha_fix_finger",
    "alpha_ks",
    "num_spikes",
    "stable_rank",
    "rows",
    "cols",
    "role",
    "layer",
]


def test_sharded_checkpoint_equals_unsharded_twin(tiny_llama, tiny_llama_sharded, tmp_path):
    assert (tiny_llama_sharded / "model.safetensors.index.json").is_file()
    shards = list(tiny_llama_sharded.glob("model-*.safetensors"))
    assert len(shards) > 1
    one = load_metrics(analyze(tiny_llama, tmp_path / "one.parquet").output)
    many = load_metrics(analyze(tiny_llama_sharded, tmp_path / "many.parquet").output)
    pd.testing.assert_frame_equal(one[COMPARED], many[COMPARED])
    assert many.shard.nunique() > 1
    roles = one.set_index("name").role
    assert roles["model.embed_tokens.weight"] == "embedding"
    assert roles["lm_head.weight"] == "lm_head"
    assert roles["model.layers.1.self_attn.q_proj.weight"] == "linear"
    assert (one.role == "linear").sum() == 2 * 7


def test_hub_id_resolves_from_local_cache_offline(tiny_llama_sharded, tmp_path):
    make_hf_cache(tmp_path / "hf", "tiny-org/tiny-llama", tiny_llama_sharded)
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    proc = run_subprocess(
        ["analyze", "tiny-org/tiny-llama", "-o", tmp_path / "hub.parquet", "--json"], env=env
    )
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["revision"] == "a" * 40
    hub = load_metrics(tmp_path / "hub.parquet")
    local = load_metrics(analyze(tiny_llama_sharded, tmp_path / "local.parquet").output)
    pd.testing.assert_frame_equal(hub[COMPARED], local[COMPARED])
    assert hub.attrs["esdtool"]["source_kind"] == "hub"

    missing = run_subprocess(["analyze", "tiny-org/absent", "-o", tmp_path / "x.parquet"], env=env)
    assert missing.returncode == 2
    assert missing.stderr.count("\n") == 1 and "Traceback" not in missing.stderr
    assert "tiny-org/absent" in missing.stderr and "HF_HUB_OFFLINE" in missing.stderr


def test_rank_two_matrix_gets_nan_alphas_not_a_crash(tmp_path):
    """Only 2 eigenvalues above eig_threshold: the median rule needs a tail of 2 past
    floor(n/2) and reports too_few; KS still fits the one candidate it has."""
    rng = np.random.default_rng(0)
    W = rng.standard_normal((32, 2)) @ rng.standard_normal((2, 48))
    path = write_tensors(tmp_path / "r2.safetensors", {"layers.0.a.weight": W})
    result = analyze(path, tmp_path / "m.parquet")
    row = load_metrics(result.output).iloc[0]
    assert row.status == "ok" and row.num_nonzero == 2
    assert math.isnan(row.alpha_median) and "median:too_few" in row.fit_status
    assert 0 <= row.entropy <= 1


def test_mostly_zero_spectrum_reports_no_mp_fit(tmp_path):
    """Rank 3 of M = 32: the median eigenvalue is numerically 0, so there is no MP bulk to
    fit; the row says so (fit_status) and has no spike count rather than 3 'spikes'."""
    rng = np.random.default_rng(1)
    W = rng.standard_normal((32, 3)) @ rng.standard_normal((3, 48))
    path = write_tensors(tmp_path / "r3.safetensors", {"layers.0.a.weight": W})
    row = load_metrics(analyze(path, tmp_path / "m.parquet").output).iloc[0]
    assert row.matrix_rank == 3 and pd.isna(row.num_spikes)
    assert "mp:median_zero" in row.fit_status


def test_tensors_over_the_memory_budget_are_skipped_with_the_reason(tmp_path, capsys):
    from esdtool.analysis.resources import memory_needed
    from esdtool.io.checkpoint import open_checkpoint
    from helpers import run_cli

    rng = np.random.default_rng(5)
    path = write_tensors(
        tmp_path / "m.safetensors",
        {
            "layers.0.big.weight": rng.standard_normal((400, 800)).astype(np.float32),
            "layers.0.small.weight": rng.standard_normal((40, 80)).astype(np.float32),
        },
    )
    with open_checkpoint([path]) as ckpt:
        big = memory_needed(ckpt.info("layers.0.big.weight"), "float64")
        small = memory_needed(ckpt.info("layers.0.small.weight"), "float64")
    assert big > 3 * 400 * 400 * 8 and small < big
    budget_gb = (small + big) / 2 / 1e9
    out = tmp_path / "m.parquet"
    args = ["analyze", path, "-o", out, "--max-tensor-gb", str(budget_gb)]
    code, _, stderr = run_cli(args, capsys)
    assert code == 0, stderr
    df = load_metrics(out).set_index("name")
    assert df.loc["layers.0.small.weight", "status"] == "ok"
    assert df.loc["layers.0.big.weight", "status"] == "skipped"
    assert "--max-tensor-gb" in df.loc["layers.0.big.weight", "reason"]
    code, _, stderr = run_cli(["analyze", path, "-o", out, "--max-tensor-gb", "0"], capsys)
    assert code == 2 and "--max-tensor-gb must be a finite number of GB > 0" in stderr
