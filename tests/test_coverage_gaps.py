"""Paths the other tests did not reach, each checked against an independent computation:

- the mean MP fit and Tracy-Widom levels other than 0.99 on real MiniLM matrices, against
  tests/oracle.py (numpy SVD, scipy; the 0.90 quantile from the Painleve II ODE, the 0.95 one
  from the spec's table, Johnstone 2001);
- 3-D expert tensors through analyze's batched eigensolver, in float32 and float64, against
  the oracle on each expert's own matrix;
- 4-D conv kernels: the pooled, conv_norm-scaled spectrum against numpy SVDs of every kernel
  position, and its alpha_ks against the oracle on that spectrum;
- allocate's score weights, alpha column, alpha factor, parameter budget and PEFT flags
  through the real CLI, against a plain numpy reading of docs/method.md and PEFT's own loader.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from safetensors.numpy import load_file

import oracle as ref
from esdtool import AnalyzeSettings, analyze, load_metrics
from helpers import run_cli, write_tensors

# ---------------------------------------------------------------- MP fit and TW level on MiniLM

# The 36 block linears of MiniLM (384 x 384 and 384 x 1536): real trained matrices, without
# the 30522-row embedding, which would only make the test slower.
BLOCK_LINEARS = r"encoder\.layer\.\d+\..*\.weight$"


@pytest.fixture(scope="module")
def minilm_reference(minilm_dir):
    """Each block linear's oracle eigenvalues (float64 SVD of the stored weights) and sides."""
    weights = load_file(str(minilm_dir / "model.safetensors"))
    out = {}
    for name, w in weights.items():
        if w.ndim == 2 and name.startswith("encoder.layer.") and min(w.shape) >= 10:
            out[name] = (ref.evals(w), min(w.shape), max(w.shape))
    assert len(out) == 36
    return out


def _spikes_agree(ours: int, theirs: int, evals: np.ndarray, threshold: float) -> bool:
    """Exact, except for eigenvalues within 1e-6 relative of the threshold (rounding)."""
    near = int((np.abs(evals / threshold - 1) < 1e-6).sum())
    return abs(ours - theirs) <= near


@pytest.mark.parametrize(
    ("settings", "sigma_fit", "q"),
    [
        ({"sigma_fit": "mean"}, "mean", 0.99),
        ({"tw_quantile": 0.95}, "median", 0.95),
        ({"tw_quantile": 0.9}, "median", 0.9),
        ({"sigma_fit": "mean", "tw_quantile": 0.9}, "mean", 0.9),
    ],
    ids=["mean", "tw0.95", "tw0.90", "mean-tw0.90"],
)
def test_mean_fit_and_other_tw_levels_equal_the_oracle(
    minilm_dir, minilm_reference, tmp_path, settings, sigma_fit, q
):
    """sigma_mp, bulk_max, tw_threshold and both spike counts of every MiniLM block linear
    equal oracle.spikes with the same sigma fit and level (0.95: the spec's t = 0.9793; 0.90:
    t = 0.45014 from the Painleve II ODE). Both settings are stored in the table."""
    out = analyze(
        minilm_dir,
        tmp_path / "m.parquet",
        AnalyzeSettings(include=BLOCK_LINEARS, **settings),
    ).output
    table = load_metrics(out)
    stored = table.attrs["esdtool"]["settings"]
    assert stored["sigma_fit"] == sigma_fit and stored["tw_quantile"] == q
    table = table[table.status == "ok"].set_index("name")  # LayerNorm vectors are skipped
    assert set(table.index) == set(minilm_reference)
    default = ref.spikes(*next(iter(minilm_reference.values())))
    for name, (ev, M, N) in minilm_reference.items():
        row, expected = table.loc[name], ref.spikes(ev, M, N, q=q, sigma_fit=sigma_fit)
        for col in ("sigma_mp", "bulk_max", "tw_threshold"):
            assert row[col] == pytest.approx(expected[col], rel=1e-6), (name, col)
        assert _spikes_agree(row.num_spikes, expected["num_spikes"], ev, expected["tw_threshold"])
        assert row.num_spikes_bulk == expected["num_spikes_bulk"], name
    # The settings matter: the first matrix's threshold moved from the default's.
    first = table.loc[next(iter(minilm_reference))]
    assert first.tw_threshold != pytest.approx(default["tw_threshold"], rel=1e-3)


def test_oracle_tw1_quantiles_reproduce_the_published_table():
    """The oracle's Painleve II quantiles against Johnstone (2001), Table 1, as method.md
    quotes it (0.95: 0.9793, 0.99: 2.0234): what lets the oracle stand in for other levels."""
    assert ref.tw1_quantile(0.95) == pytest.approx(0.9793, abs=5e-5)
    assert ref.tw1_quantile(0.99) == pytest.approx(2.0234, abs=5e-5)
    assert ref.tw1_quantile(0.90) == pytest.approx(0.4501, abs=5e-5)


# ------------------------------------------------------------------- 3-D experts, both paths


def planted_experts(E: int = 5, rows: int = 48, cols: int = 96) -> np.ndarray:
    """E experts, each a power law of singular values s_k = 10 (1 + e) k^-(0.8 + 0.3 e) in
    random directions plus noise of 1e-4: every expert has its own spectrum and alphas, and
    lambda_min / lambda_max falls from 2e-3 (e = 0) to 2e-7 (e = 4), where a float32 Gram
    matrix would lose the small eigenvalues (its error is about 1e-7 lambda_max)."""
    rng = np.random.default_rng(2024)
    experts = []
    for e in range(E):
        U, _ = np.linalg.qr(rng.standard_normal((rows, rows)))
        V, _ = np.linalg.qr(rng.standard_normal((cols, rows)))
        s = 10 * (1 + e) * np.arange(1, rows + 1, dtype=float) ** -(0.8 + 0.3 * e)
        experts.append(U @ np.diag(s) @ V.T + 1e-4 * rng.standard_normal((rows, cols)))
    return np.stack(experts).astype(np.float32)


@pytest.mark.parametrize(("dtype", "rel", "ev_rel"), [("float64", 1e-6, 1e-6),
                                                      ("float32", 2e-5, 2e-3)])  # fmt: skip
def test_expert_batches_equal_the_oracle_per_expert(tmp_path, monkeypatch, dtype, rel, ev_rel):
    """A [5, 48, 96] F32 tensor analysed in batches of 2 experts (the batch size shrunk so
    that 3 batches run): each row (slice e) equals oracle.row on expert e's float64 matrix.

    Tolerances: float64, alphas and eigenvalues within 1e-6. float32 (squared float32
    singular values): alphas within 2e-5 (measured: 5e-7 at worst; method.md promises 1e-3)
    and each eigenvalue within 2e-3 relative (error 2e-7 sqrt(lambda_max / lambda), 4.5e-4
    at the smallest). A float32 Gram matrix instead moves alpha_ks of experts 3 and 4 by
    4-5e-4 and their smallest eigenvalues by tens of percent: this test tells the two apart."""
    import esdtool.analysis.rows as rows

    monkeypatch.setattr(rows, "_EXPERT_BATCH_ELEMENTS", 2 * 48 * 48)
    W = planted_experts()
    path = write_tensors(tmp_path / "moe.safetensors", {"model.layers.0.mlp.experts.w1": W})
    out = analyze(path, tmp_path / "moe.parquet", AnalyzeSettings(dtype=dtype)).output
    table = load_metrics(out)
    assert table.attrs["esdtool"]["settings"]["dtype"] == dtype
    assert list(table.slice) == [0, 1, 2, 3, 4]
    assert (table.status == "ok").all() and (table.role == "expert").all()
    assert (table.rows == 48).all() and (table.cols == 96).all()
    alphas = set()
    for row in table.itertuples():
        expected = ref.row(W[row.slice].astype(np.float64))
        for col in ("alpha_median", "alpha_fix_finger", "alpha_ks"):
            assert getattr(row, col) == pytest.approx(expected[col], rel=rel), (row.slice, col)
        assert row.lambda_max == pytest.approx(expected["lambda_max"], rel=1e-6)
        np.testing.assert_allclose(row.eigenvalues, expected["evals"], rtol=ev_rel)
        alphas.add(round(row.alpha_ks, 3))
    assert len(alphas) == 5  # five different spectra: rows were not mixed up or repeated


# ---------------------------------------------------------------------------- 4-D conv kernels


def test_conv_kernel_pools_scaled_kernel_position_spectra(tmp_path):
    """A [24, 16, 3, 3] kernel: eigenvalues = conv_norm (0.5) * the sorted squared singular
    values of all nine W[:, :, i, j] (numpy SVD), alpha_ks = the oracle's on them."""
    rng = np.random.default_rng(7)
    W = rng.standard_normal((24, 16, 3, 3)).astype(np.float32)
    W[:, :, 1, 1] *= 4  # the centre tap dominates, as in trained convs
    path = write_tensors(tmp_path / "conv.safetensors", {"features.3.conv.weight": W})
    out = analyze(path, tmp_path / "conv.parquet").output
    (row,) = load_metrics(out).itertuples()
    assert row.role == "conv" and row.status == "ok"
    assert (row.rows, row.cols, row.M, row.N) == (24, 16, 16, 24)
    pooled = np.sort(
        np.concatenate([
            np.linalg.svd(W[:, :, i, j].astype(np.float64), compute_uv=False) ** 2
            for i in range(3)
            for j in range(3)
        ])
    )  # fmt: skip
    expected = 0.5 * pooled
    assert len(row.eigenvalues) == 9 * 16
    np.testing.assert_allclose(row.eigenvalues, expected, rtol=1e-6)
    alpha, xmin, D = ref.alpha_ks(ref.nonzero(expected))
    assert row.alpha_ks == pytest.approx(alpha, rel=1e-9)
    assert row.xmin_ks == pytest.approx(xmin, rel=1e-9) and row.D_ks == pytest.approx(D, rel=1e-9)
    assert row.lambda_max == pytest.approx(expected[-1], rel=1e-12)


# ------------------------------------------------------------------------- allocate's options


def expected_allocation(
    metrics: pd.DataFrame,
    alpha_column: str = "alpha_median",
    w_hill: float = 0.7,
    w_spikes: float = 0.3,
    p: float = 0.5,
    rmin: int = 4,
    rmax: int = 64,
) -> pd.DataFrame:
    """method.md's "From metrics to ranks" with plain numpy: scores of every role-linear row,
    the top floor(p n) (at least 1, ties to the first listed) kept, linear ranks rounded half
    to even. One row per candidate: module, score, selected, rank."""
    rows = metrics[(metrics.status == "ok") & (metrics.role == "linear")]
    alpha = rows[alpha_column].to_numpy(float)
    spikes = rows["num_spikes"].to_numpy(float)
    a = (alpha - alpha.min()) / (alpha.max() - alpha.min() + 1e-8)
    b = 1 - (spikes - spikes.min()) / (spikes.max() - spikes.min() + 1e-8)
    score = w_hill * a + w_spikes * b
    k = max(1, math.floor(p * len(score)))
    order = sorted(range(len(score)), key=lambda i: (-score[i], i))
    selected = np.zeros(len(score), bool)
    selected[order[:k]] = True
    kept = score[selected]
    rank = np.zeros(len(score), int)
    raw = rmin + (rmax - rmin) * (kept - kept.min()) / (kept.max() - kept.min() + 1e-8)
    rank[selected] = np.clip(np.round(raw), rmin, rmax)  # np.round: half to even
    return pd.DataFrame({"module": rows.module.to_numpy(), "score": score,
                         "selected": selected, "rank": rank})  # fmt: skip


def _allocate(metrics, out, capsys, *args) -> pd.DataFrame:
    code, _, stderr = run_cli(["allocate", metrics, "-o", out, "--no-report", "-q", *args], capsys)
    assert code == 0, stderr
    return pd.read_csv(out / "allocation.csv")


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--w-hill", "0.2", "--w-mp-spikes", "0.8"], {"w_hill": 0.2, "w_spikes": 0.8}),
        (["--w-hill", "1", "--w-mp-spikes", "0"], {"w_hill": 1.0, "w_spikes": 0.0}),
        (["--alpha-column", "alpha_ks"], {"alpha_column": "alpha_ks"}),
        (["--alpha-column", "alpha_fix_finger", "--w-hill", "0.5", "--w-mp-spikes", "0.5"],
         {"alpha_column": "alpha_fix_finger", "w_hill": 0.5, "w_spikes": 0.5}),
    ],
    ids=["w0.2-0.8", "alpha-only", "alpha_ks", "fix_finger-0.5-0.5"],
)  # fmt: skip
def test_score_weights_and_alpha_column(minilm_table, minilm_metrics, tmp_path, capsys, args,
                                        expected):  # fmt: skip
    """allocation.csv's scores, kept set and ranks equal the numpy reading of the spec for the
    given weights and alpha column, and the plan differs from the default plan."""
    got = _allocate(minilm_metrics, tmp_path / "plan", capsys, *args)
    want = expected_allocation(minilm_table, **expected)
    assert list(got.module) == list(want.module)
    np.testing.assert_allclose(got.score, want.score, rtol=1e-12, atol=1e-12)
    assert list(got.selected) == list(want.selected)
    assert list(got["rank"]) == list(want["rank"])
    alpha_column = expected.get("alpha_column", "alpha_median")
    table = minilm_table.set_index("module")
    np.testing.assert_array_equal(got.alpha, table.loc[got.module, alpha_column].to_numpy())
    default = expected_allocation(minilm_table)
    assert not (default[["selected", "rank"]].to_numpy() == want[["selected", "rank"]].to_numpy()
                ).all()  # fmt: skip


def test_alpha_factor_sets_lora_alpha(minilm_metrics, tmp_path, capsys):
    """--alpha-factor 1.5: lora_alpha = 1.5 r for every kept module, in the CSV and in
    adapter_config.json's alpha_pattern, and for the default r."""
    plan = _allocate(minilm_metrics, tmp_path / "plan", capsys, "--alpha-factor", "1.5")
    kept = plan[plan.selected]
    np.testing.assert_array_equal(kept.lora_alpha, 1.5 * kept["rank"])
    config = json.loads((tmp_path / "plan" / "adapter_config.json").read_text())
    ranks = {k[1:].replace("\\", ""): v for k, v in config["rank_pattern"].items()}
    alphas = {k[1:].replace("\\", ""): v for k, v in config["alpha_pattern"].items()}
    assert ranks == dict(zip(kept.module, kept["rank"], strict=True))
    assert alphas == {m: 1.5 * r for m, r in ranks.items()}
    assert config["lora_alpha"] == 1.5 * config["r"]
    assert any(a != 2 * r for m, r in ranks.items() for a in [alphas[m]])


def test_budget_params_lands_within_one_percent(minilm_metrics, tmp_path, capsys):
    """--budget-params B, B halfway between all-kept-at-rmin and all-at-rmax (reachable):
    sum rank (rows + cols) within 1% of B, the same modules kept, ranks in [4, 64] and in the
    order of the scores; no "missed" note."""
    free = _allocate(minilm_metrics, tmp_path / "free", capsys)
    kept = free[free.selected]
    sizes = (kept.rows + kept.cols).to_numpy()
    budget = int((4 * sizes.sum() + 64 * sizes.sum()) / 2)
    assert budget != pytest.approx(int((kept["rank"] * sizes).sum()), rel=0.05)  # must move
    code, stdout, stderr = run_cli(
        ["allocate", minilm_metrics, "-o", tmp_path / "b", "--no-report", "--json",
         "--budget-params", budget], capsys,
    )  # fmt: skip
    assert code == 0, stderr
    plan = pd.read_csv(tmp_path / "b" / "allocation.csv")
    kept_b = plan[plan.selected]
    total = int((kept_b["rank"] * (kept_b.rows + kept_b.cols)).sum())
    assert total == pytest.approx(budget, rel=0.01)
    assert total == plan.params.sum() == json.loads(stdout)["trainable_params"]
    assert list(kept_b.module) == list(kept.module)
    assert kept_b["rank"].between(4, 64).all()
    by_score = kept_b.sort_values("score", kind="stable")["rank"].to_numpy()
    assert (np.diff(by_score) >= 0).all()
    assert not json.loads(stdout)["notes"]


def test_peft_flags_reach_the_config_and_peft_loads_it(minilm_metrics, tmp_path, capsys):
    """--task-type, --lora-dropout, --use-rslora and --use-dora land in adapter_config.json
    and peft.LoraConfig.from_pretrained reads them back with those values."""
    peft = pytest.importorskip("peft")
    out = tmp_path / "plan"
    _allocate(minilm_metrics, out, capsys, "--task-type", "FEATURE_EXTRACTION",
              "--lora-dropout", "0.125", "--use-rslora", "--use-dora")  # fmt: skip
    raw = json.loads((out / "adapter_config.json").read_text())
    assert raw["task_type"] == "FEATURE_EXTRACTION" and raw["lora_dropout"] == 0.125
    assert raw["use_rslora"] is True and raw["use_dora"] is True
    config = peft.LoraConfig.from_pretrained(str(out))
    assert config.task_type == "FEATURE_EXTRACTION"
    assert config.lora_dropout == 0.125 and config.use_rslora and config.use_dora
    assert config.rank_pattern == raw["rank_pattern"]
    # and the defaults, for contrast: CAUSAL_LM, 0.05, neither rsLoRA nor DoRA
    _allocate(minilm_metrics, tmp_path / "d", capsys)
    default = peft.LoraConfig.from_pretrained(str(tmp_path / "d"))
    assert default.task_type == "CAUSAL_LM" and default.lora_dropout == 0.05
    assert not default.use_rslora and not default.use_dora
