"""Shape-fair plans (issue 26): scores normalised within shape or module kind, and how much of a
plan is shape, each checked against an independent computation (pandas groupby, scipy's
one-way ANOVA) on MiniLM's real table."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from esdtool.plan.ranks import AllocateSettings, allocate_ranks
from esdtool.plan.shape import eta_squared, shape_influence, shape_of
from helpers import run_cli

scipy_stats = pytest.importorskip("scipy.stats")


def _candidates(table: pd.DataFrame) -> pd.DataFrame:
    return table[(table.status == "ok") & (table.role == "linear")]


@pytest.mark.parametrize("within", ["shape", "kind"])
def test_scores_are_min_max_within_each_group(minilm_table, within):
    """Each candidate's score is w_hill (alpha - group min) / (group range) + w_spikes (1 -
    (spikes - group min) / (group range)), groups by shape (either orientation) or by the name
    after the block index, computed here with pandas' groupby."""
    settings = AllocateSettings(normalise_within=within)
    plan = allocate_ranks(minilm_table, settings).table.set_index("module")
    rows = _candidates(minilm_table).set_index("module")
    if within == "shape":
        key = [f"{min(r, c)} x {max(r, c)}" for r, c in zip(rows.rows, rows.cols, strict=True)]
    else:
        key = [m.split(".", 3)[-1] for m in rows.index]  # encoder.layer.N.<kind>
    frame = pd.DataFrame(
        {"a": rows.alpha_median.astype(float), "s": rows.num_spikes.astype(float), "g": key},
        index=rows.index,
    )
    g = frame.groupby("g")
    a = (frame.a - g.a.transform("min")) / (g.a.transform("max") - g.a.transform("min") + 1e-8)
    s = 1 - (frame.s - g.s.transform("min")) / (g.s.transform("max") - g.s.transform("min") + 1e-8)
    expected = 0.7 * a + 0.3 * s
    assert frame.g.nunique() == (2 if within == "shape" else 6)
    np.testing.assert_allclose(plan.loc[frame.index, "score"], expected, rtol=1e-12)


def test_permuting_inside_one_shape_moves_ranks_only_inside_it(minilm_table):
    """Within-shape scores: exchanging the spectral measurements (alpha and spike count) of
    modules of one shape leaves every other module's score, selection and rank as they were,
    and the group's ranks as a multiset; the default (global) normalisation has no such
    guarantee to test, but within-shape must."""
    settings = AllocateSettings(normalise_within="shape")
    table = minilm_table.copy()
    before = allocate_ranks(table, settings).table.set_index("module")
    ffn = _candidates(table)
    group = ffn[(ffn.rows == 1536) | (ffn.cols == 1536)].index.to_numpy()
    shuffled = np.random.default_rng(3).permutation(group)
    for column in ("alpha_median", "num_spikes"):
        table.loc[group, column] = table.loc[shuffled, column].to_numpy()
    after = allocate_ranks(table, settings).table.set_index("module")
    inside = set(table.loc[group, "module"])
    outside = [m for m in before.index if m not in inside]
    pd.testing.assert_frame_equal(before.loc[outside], after.loc[outside])
    assert sorted(before.loc[list(inside), "rank"]) == sorted(after.loc[list(inside), "rank"])
    assert (before.loc[list(inside), "rank"] != after.loc[list(inside), "rank"]).any()


def test_a_table_of_one_shape_gives_the_default_plan(minilm_table):
    """With one shape among the candidates, normalising within shape is normalising over all."""
    square = minilm_table[(minilm_table.rows == 384) & (minilm_table.cols == 384)]
    default = allocate_ranks(square, AllocateSettings()).table
    within = allocate_ranks(square, AllocateSettings(normalise_within="shape")).table
    pd.testing.assert_frame_equal(default, within)


def test_variance_explained_is_scipys_anova_and_the_permutation_test_sees_planted_shape():
    """eta squared equals F df_b / (F df_b + df_w) from scipy.stats.f_oneway; scores that are
    their shape's constant plus small noise give p at its floor 1 / (P + 1), scores
    independent of shape a large p; the concentration counts are the kept set's."""
    rng = np.random.default_rng(0)
    shapes = np.array([(384, 384)] * 24 + [(384, 1536)] * 6 + [(1536, 384)] * 6)
    noise = rng.normal(0, 0.05, len(shapes))
    planted = np.where(shapes[:, 0] == shapes[:, 1], 0.2, 0.8) + noise
    labels = np.array([shape_of(r, c) for r, c in shapes])
    F = scipy_stats.f_oneway(*(planted[labels == g] for g in np.unique(labels))).statistic
    df_b, df_w = 1, len(labels) - 2
    assert eta_squared(planted, labels) == pytest.approx(F * df_b / (F * df_b + df_w), rel=1e-12)

    def table(score: np.ndarray) -> pd.DataFrame:
        kept = score >= np.sort(score)[-12]
        return pd.DataFrame({"rows": shapes[:, 0], "cols": shapes[:, 1], "score": score,
                             "selected": kept})  # fmt: skip

    driven = shape_influence(table(planted))
    assert driven.top_shape == "384 x 1536" and driven.kept_share == 1.0
    assert driven.candidate_share == pytest.approx(12 / 36)
    assert driven.p_value == pytest.approx(1 / 2001) and driven.variance_explained > 0.9
    free = shape_influence(table(rng.normal(0, 1, len(shapes))))
    assert free.p_value > 0.05 and free.chance == pytest.approx(1 / 35, abs=0.01)


def test_the_plan_records_and_prints_how_much_is_shape(minilm_metrics, tmp_path, capsys):
    """esdtool_plan.json, --json and the summary carry the measure; a bad --normalise-within
    is one line, exit 2."""
    out = tmp_path / "plan"
    code, stdout, stderr = run_cli(["allocate", minilm_metrics, "-o", out, "--json"], capsys)
    assert code == 0, stderr
    shown = json.loads(stdout)["shape"]
    recorded = json.loads((out / "esdtool_plan.json").read_text())["shape"]
    assert shown == recorded and recorded["top_shape"] == "384 x 1536"
    assert recorded["kept_share"] == pytest.approx(12 / 18)
    assert recorded["variance_explained"] > 0.5 and recorded["p_value"] < 0.01
    html = (out / "report.html").read_text()
    assert 'id="shape"' in html and "scores&#39; variance" in html
    code, _, stderr = run_cli(["allocate", minilm_metrics, "-o", tmp_path / "x",
                               "--normalise-within", "layer"], capsys)  # fmt: skip
    assert code == 2 and "--normalise-within must be one of none, shape, kind" in stderr
    assert len(stderr.strip().splitlines()) == 1


def test_shape_fair_arms_are_their_plans_at_the_budget(minilm_metrics, minilm_dir):
    """ablate's esd-farms, esd-within-shape and esd-within-kind arms keep exactly the modules
    allocate keeps with those settings, each within 1% of the budget; esd-farms on a table
    analysed without FARMS is refused naming the arm."""
    from esdtool import AnalyzeSettings, analyze, load_metrics
    from esdtool.ablation.arms import build_arms
    from esdtool.errors import OptionError

    plain = load_metrics(minilm_metrics)
    farms = analyze(minilm_dir, None, AnalyzeSettings(estimator="farms", farms_grid=3)).table
    budget = 8 * int((_candidates(plain).rows + _candidates(plain).cols).sum())
    names = ["esd-farms", "esd-within-shape", "esd-within-kind"]
    arms = {a.name: a for a in build_arms(farms, names, AllocateSettings(), budget, 0)}
    for name, change in (
        ("esd-farms", {"alpha_column": "alpha_median_farms", "spikes_column": "spikes_farms"}),
        ("esd-within-shape", {"normalise_within": "shape"}),
        ("esd-within-kind", {"normalise_within": "kind"}),
    ):
        own = allocate_ranks(farms, AllocateSettings(**change))
        assert set(arms[name].ranks) == set(own.kept.module), name
        assert abs(arms[name].params / budget - 1) <= 0.01, name
    with pytest.raises(OptionError, match=r"arm esd-farms: .*no FARMS columns"):
        build_arms(plain, ["esd-farms"], AllocateSettings(), budget, 0)


def test_undefined_shape_numbers_are_null_in_json_and_said_in_words(minilm_table):
    """Candidates of one shape (--targets query): no variance between shapes to explain. The
    plan's record says null, not NaN (JSON has no NaN), and the sentence says why; three
    shapes whose scores do not vary get their own reason."""
    from esdtool.plan.shape import ShapeInfluence

    plan = allocate_ranks(minilm_table, AllocateSettings(targets="query"))
    record = json.loads(json.dumps(plan.shape.to_dict(), allow_nan=False))
    assert record["variance_explained"] is None and record["p_value"] is None
    assert "one shape among the candidates" in plan.shape.sentence()
    flat = ShapeInfluence("1 x 2", 1.0, 0.3, 3, float("nan"), float("nan"), float("nan"))
    assert "the scores do not vary" in flat.sentence()
