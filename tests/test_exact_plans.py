"""Exact behaviour of the plans' option checks and refusals: every problem of a settings
object listed at once, word for word (these lines are what a user reads on exit 2), and the
boundaries of each check on both sides. Written from `make mutation`'s survivors
(docs/testing.md); the CLI tests check the same refusals end to end on fewer cases."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from esdtool.errors import OptionError
from esdtool.plan import layerwise, shape, targets
from esdtool.plan.ranks import AllocateSettings

# ------------------------------------------------------- AllocateSettings: every problem, once

REFUSED = [
    (dict(target="nope"), ["--target must be one of lora, pruning, lr, weight-decay, not 'nope'"]),
    (dict(sparsity=0.5, lr_map="linear", min_evals=3), [
        "--sparsity applies to --target pruning, not lora",
        "--lr-map applies to --target lr, not lora",
        "--min-evals applies to --target lr or weight-decay, not lora",
    ]),
    (dict(target="pruning", epsilon=0.2, lr_map="sqrt", min_rank=2), [
        "--lr-map applies to --target lr, not pruning",
        "--min-rank applies to --target lora, not pruning",
        "--target pruning needs --sparsity S (the model's share of weights to prune, e.g. 0.7)",
    ]),
    (dict(target="pruning", sparsity=1.0, epsilon=0.0, mapping="layer"), [
        "--sparsity must lie in (0, 1), not 1.0",
        "--epsilon must lie in (0, 1), not 0.0",
        "--mapping must be block or module, not 'layer'",
    ]),
    (dict(target="pruning", sparsity=float("nan"), epsilon=True), [
        "--sparsity must lie in (0, 1), not nan", "--epsilon must lie in (0, 1), not True",
    ]),
    (dict(target="lr", lr_map="cosine", min_factor=0.0, max_factor=float("inf")), [
        "--lr-map must be one of linear, sqrt, log2, step (the maps --target lr has), "
        "not 'cosine'",
        "--min-factor must be a finite number > 0, not 0.0",
        "--max-factor must be a finite number > 0, not inf",
    ]),
    (dict(target="weight-decay", wd_map="linear", min_factor=-1, max_factor="x"), [
        "--min-factor must be a finite number > 0, not -1",
        "--max-factor must be a finite number > 0, not 'x'",
    ]),
    # the other end of the range is the target's default (lr: 0.5-1.5)
    (dict(target="lr", min_factor=2.0), ["--min-factor 2 is above --max-factor 1.5"]),
    (dict(target="lr", max_factor=0.25), ["--min-factor 0.5 is above --max-factor 0.25"]),
    (dict(target="weight-decay", wd_map="log2", min_factor=0.5, normalise_within="shape"), [
        "--min-factor sets the linear and step maps' range; the log2 map has none",
        "--normalise-within shape applies to the linear map (min-max), not to log2",
    ]),
    (dict(target="weight-decay", wd_map="sigmoid", min_factor=1.0, max_factor=4.0), [
        "--min-factor and --max-factor set the linear and step maps' range; the sigmoid map "
        "has none",
    ]),
    (dict(target="lr", lr_map="sqrt", max_factor=2.0), [
        "--max-factor sets the linear and step maps' range; the sqrt map has none",
    ]),
    (dict(target="lr", lr_map="sqrt", normalise_within="kind", min_evals=0), [
        "--normalise-within kind applies to the linear map (min-max), not to sqrt",
        "--min-evals must be an integer >= 1, not 0",
    ]),
    (dict(target="lr", min_evals=True), ["--min-evals must be an integer >= 1, not True"]),
    (dict(target="lr", min_evals=1.5), ["--min-evals must be an integer >= 1, not 1.5"]),
]  # fmt: skip


@pytest.mark.parametrize(("options", "problems"), REFUSED)
def test_every_problem_of_the_target_options_is_listed_in_order(options, problems):
    with pytest.raises(OptionError) as info:
        AllocateSettings(**options)
    assert str(info.value) == "; ".join(problems)


ACCEPTED = [
    dict(target="pruning", sparsity=0.7),
    dict(target="pruning", sparsity=1e-9, epsilon=0.999999, mapping="module"),
    dict(target="lr", min_factor=1.5),  # equal ends: one factor for all
    dict(target="lr", min_factor=2.0, max_factor=3.0),
    dict(target="lr", min_factor=0.25, max_factor=1.0),  # factors at or below 1 are factors
    dict(target="lr", lr_map="step", min_factor=0.1, max_factor=0.2, min_evals=1),
    dict(target="lr", lr_map="linear", normalise_within="shape"),
    dict(target="weight-decay", wd_map="sqrt", min_evals=2),
]  # fmt: skip


@pytest.mark.parametrize("options", ACCEPTED)
def test_options_on_the_edge_of_each_check_are_accepted(options):
    settings = AllocateSettings(**options)
    assert all(getattr(settings, k) == v for k, v in options.items())


# ------------------------------------------------------- pruning ratios outside [0, 1): refused


def refusal(monkeypatch, sparsities: list[float], limit: float) -> str:
    """check_ratios' message on a plan with these per-module sparsities, the largest epsilon
    that fits set to ``limit`` (largest_epsilon has its own tests)."""
    monkeypatch.setattr(layerwise, "largest_epsilon", lambda *args: limit)
    plan = pd.DataFrame({"module": [f"m{i}" for i in range(len(sparsities))],
                         "sparsity": sparsities})  # fmt: skip
    n = len(sparsities)
    with pytest.raises(OptionError) as info:
        layerwise.check_ratios(plan, np.ones(n), np.ones(n), 0.8, 0.3, None)
    return str(info.value)


def test_ratios_of_one_or_more_are_named_with_the_epsilon_that_fits(monkeypatch):
    got = refusal(monkeypatch, [0.5, 1.0, 1.25, 0.2, 1.5, 1.01, 2.0], 0.123456789)
    assert got == (
        "--sparsity 0.8 with --epsilon 0.3 gives 5 module(s) a ratio of 1 or more (largest "
        "2.0000): 'm1', 'm2', 'm4' and 2 more; the largest epsilon that fits is just below "
        "0.123457 (e.g. 0.1234)"
    )


def test_three_or_four_bad_modules(monkeypatch):
    three = refusal(monkeypatch, [1.0, 1.0, 1.0, 0.0], 0.5)
    assert "): 'm0', 'm1', 'm2'; the largest epsilon that fits is just below 0.5 (e.g. 0.5)" in three
    four = refusal(monkeypatch, [1.0, 1.0, 1.0, 1.0], 0.5)
    assert "): 'm0', 'm1', 'm2' and 1 more; the largest" in four


def test_a_negative_ratio_is_refused_and_zero_is_not(monkeypatch):
    got = refusal(monkeypatch, [0.0, -0.01, 0.99], 0.4)
    assert "gives 1 module(s) a ratio of 1 or more (largest -0.0100): 'm1';" in got
    monkeypatch.setattr(layerwise, "largest_epsilon", lambda *args: 0.4)
    plan = pd.DataFrame({"module": ["a", "b"], "sparsity": [0.0, 0.999999]})
    assert layerwise.check_ratios(plan, np.ones(2), np.ones(2), 0.5, 0.3, None) is None


@pytest.mark.parametrize(("limit", "example"), [
    (0.98765, "0.9876"), (0.5, "0.5"), (0.00012, "0.0001"), (3.7e-7, "3e-07"),
    (9.9e-5, "9e-05"), (4.2e-12, "4e-12"), (4e-13, "0"),
])  # fmt: skip
def test_the_example_epsilon_is_rounded_down_to_its_first_digits(monkeypatch, limit, example):
    """Four decimals, or as many as the first nonzero digit needs (12 at most): the example
    is below the limit, so it fits."""
    got = refusal(monkeypatch, [1.5], limit)
    assert got.endswith(f"just below {limit:.6g} (e.g. {example})")
    assert float(example) <= limit


# ------------------------------------------------------------ the per-module maps, by formula


def test_minmax_on_integers_groups_ties_and_eps():
    """(v - min) / (max - min + eps) in floats whatever the input's dtype; a group of ties or
    of one member gets 0.5."""
    np.testing.assert_array_equal(layerwise.minmax([1, 2, 4]), [0.0, 1 / 3, 1.0])
    np.testing.assert_array_equal(layerwise.minmax([0.0, 1.0, 2.0], eps=0.5), [0, 1 / 2.5, 2 / 2.5])
    got = layerwise.minmax([5, 1, 3, 7, 7], within=np.array(["a", "a", "a", "b", "b"]))
    np.testing.assert_array_equal(got, [1.0, 0.0, 0.5, 0.5, 0.5])
    np.testing.assert_array_equal(layerwise.minmax([3.0, 3.0]), [0.5, 0.5])
    np.testing.assert_array_equal(layerwise.minmax([3.0]), [0.5])


def test_block_means_of_integer_alphas_are_not_truncated():
    got = layerwise.block_means([1, 2, 6], np.array(["b0", "b0", None], dtype=object))
    np.testing.assert_array_equal(got, [1.5, 1.5, 6.0])


def test_one_alpha_for_all_has_no_range_to_map():
    with pytest.raises(OptionError) as info:
        layerwise.pruning_ratios(np.array([2.5]), np.array([10]), 0.5, 0.3)
    assert str(info.value) == ("every candidate module has the same alpha (2.5): the pruning map "
                               "has no range to map it onto")  # fmt: skip
    with pytest.raises(OptionError) as info:
        layerwise.factors(np.array([3.0, 3.0]), "linear", 0.5, 1.5, "lr")
    assert str(info.value) == ("every candidate module has the same alpha (3): the linear map has "
                               "no range to map it onto")  # fmt: skip
    # within groups, ties are the middle of the range, not a refusal
    within = np.array(["q", "q", "k"])
    np.testing.assert_array_equal(
        layerwise.factors(np.array([3.0, 3.0, 2.0]), "linear", 0.5, 1.5, "lr", within), [1.0] * 3
    )


def test_linear_factors_are_min_max_within_each_group():
    alpha = np.array([2.0, 4.0, 3.0, 5.0])
    within = np.array(["a", "a", "b", "b"])
    got = layerwise.factors(alpha, "linear", 0.5, 1.5, "lr", within)
    np.testing.assert_array_equal(got, [0.5, 1.5, 0.5, 1.5])
    np.testing.assert_allclose(layerwise.factors(alpha, "linear", 0.5, 1.5, "lr"),
                               0.5 + (alpha - 2) / 3, rtol=1e-15)  # fmt: skip


def test_log2_needs_every_alpha_above_one():
    with pytest.raises(OptionError) as info:
        layerwise.factors(np.array([1.0, 2.0]), "log2", 0.5, 1.5, "lr")
    assert str(info.value) == ("the log2 map needs every alpha above 1 (log2 of the smallest, 1, "
                               "is not positive)")  # fmt: skip
    got = layerwise.factors(np.array([1.5, 4.0]), "log2", 0.5, 1.5, "weight-decay")
    logs = np.log2([1.5, 4.0])
    np.testing.assert_allclose(got, 2 * logs / (logs + 1e-8).sum(), rtol=1e-15)


def test_step_factors_break_ties_in_model_order():
    """The k-th smallest alpha, ties in the order given (a stable sort): on 40 modules with
    two values, numpy's default sort would not keep the order."""
    alpha = np.array([2.0, 1.0] * 20)
    got = layerwise.factors(alpha, "step", 0.0, 40.0, "lr")
    want = np.empty(40)
    want[1::2] = np.arange(20)  # the 1.0s first, in order
    want[0::2] = 20 + np.arange(20)
    np.testing.assert_array_equal(got, want)


def test_sigmoid_z_scores_within_blocks_and_alone_outside():
    alpha = np.array([2.0, 4.0, 3.0, 9.0, 1.0])
    blocks = np.array(["b0", "b0", "b1", None, None], dtype=object)
    got = layerwise.factors(alpha, "sigmoid", 0.6666, 3.0, "weight-decay", blocks=blocks)
    z0 = np.array([-1.0, 1.0]) / (1.0 + 1e-8)  # mean 3, std 1
    want = 2 / (1 + np.exp(-4 * np.array([z0[0], z0[1], 0.0, 0.0, 0.0])))
    np.testing.assert_allclose(got, want, rtol=1e-15)
    alone = layerwise.factors(alpha, "sigmoid", 0.6666, 3.0, "weight-decay")  # no blocks
    np.testing.assert_array_equal(alone, np.ones(5))


def test_an_unknown_map_is_named():
    with pytest.raises(OptionError) as info:
        layerwise.factors(np.array([1.5, 2.0]), "cosine", 0.5, 1.5, "lr")
    assert str(info.value) == "unknown map 'cosine'"


# ----------------------------------------------------------------- candidates and rank rounding


def test_targets_pick_by_preset_regex_or_role():
    df = pd.DataFrame({
        "module": ["l.0.self_attn.q_proj", "l.0.mlp.up_proj", "l.0.mlp.gate", "embed", "l.0.norm"],
        "role": ["linear", "linear", "linear", "embedding", "norm"],
    })  # fmt: skip
    picked = lambda t: list(targets.pick_targets(df, t).module)  # noqa: E731
    assert picked(None) == picked("all-linear") == ["l.0.self_attn.q_proj", "l.0.mlp.up_proj",
                                                     "l.0.mlp.gate"]  # fmt: skip
    assert picked("attention") == ["l.0.self_attn.q_proj"]
    assert picked("mlp") == ["l.0.mlp.up_proj", "l.0.mlp.gate"]
    assert picked("embed|norm") == ["embed", "l.0.norm"]  # a regex: any role
    with pytest.raises(ValueError) as info:
        targets.pick_targets(df, r"(a)\1")
    assert str(info.value).startswith(r"--targets '(a)\\1' is not a regex esdtool accepts (")


@pytest.mark.parametrize(("ranks", "multiple", "lo", "hi", "want", "stuck"), [
    ([4, 5, 6, 7, 9], 2, 4, [64] * 5, [4, 4, 6, 8, 8], 0),  # ties to even multiples
    ([5, 13, 30], 4, 5, [64, 64, 30], [8, 12, 28], 0),  # inward: lo 5 -> 8, hi 30 -> 28
    ([7], 4, 1, [6], [4], 0),  # 8 is above the module's 6
    ([3, 9], 8, 1, [6, 64], [6, 8], 1),  # no multiple of 8 in [1, 6]: its largest rank
    ([3, 9], 1, 1, [6, 64], [3, 9], 0),
])  # fmt: skip
def test_round_to_multiple(ranks, multiple, lo, hi, want, stuck):
    got, n = targets.round_to_multiple(np.array(ranks), multiple, lo, np.array(hi))
    assert got.dtype.kind == "i"
    assert (got.tolist(), n) == (want, stuck)


# --------------------------------------------------------------------- shape in the plan


def influence_table(shapes, scores, selected, dtypes=None):
    table = pd.DataFrame({"rows": [r for r, _ in shapes], "cols": [c for _, c in shapes],
                          "score": scores, "selected": selected})  # fmt: skip
    return table.astype(dtypes) if dtypes else table


def eta_squared_loop(scores, labels) -> float:
    """Between-group over total sum of squares, by group means (the textbook form)."""
    scores, labels = np.asarray(scores, float), np.asarray(labels)
    mean = scores.mean()
    total = ((scores - mean) ** 2).sum()
    between = sum((labels == g).sum() * (scores[labels == g].mean() - mean) ** 2
                  for g in set(labels.tolist()))  # fmt: skip
    return between / total


def test_shape_influence_against_a_plain_permutation_test():
    """Four modules, two shapes split by score: a third of relabellings give the same grouping,
    so ties with the observed eta squared are many and must count (>=, within rounding)."""
    shapes = [(8, 32), (32, 8), (16, 16), (16, 16)]
    scores = [0.1, 0.1, 0.9, 0.9]
    got = shape.shape_influence(influence_table(shapes, scores, [True, True, True, False]))
    labels = np.array(["8 x 32", "8 x 32", "16 x 16", "16 x 16"])
    observed = eta_squared_loop(scores, labels)
    rng = np.random.default_rng(0)
    codes = np.unique(labels, return_inverse=True)[1]
    null = np.array([eta_squared_loop(scores, rng.permutation(codes))
                     for _ in range(shape.PERMUTATIONS)])  # fmt: skip
    assert got.variance_explained == pytest.approx(observed) == 1.0
    assert got.chance == pytest.approx(null.mean())
    assert got.p_value == pytest.approx((1 + np.sum(null >= observed - 1e-9)) / 2001)
    assert got.p_value > 0.25  # the ties counted
    assert (got.top_shape, got.kept_share, got.candidate_share, got.shapes) == (
        "8 x 32", 2 / 3, 0.5, 2)
    assert got == shape.shape_influence(influence_table(shapes, scores, [True, True, True, False]),
                                        seed=0)  # fmt: skip
    assert got.sentence() == (
        "67% of the kept modules are 8 x 32 (against 50% of the candidates); shape explains "
        f"100% of the scores' variance across 2 shapes (chance {got.chance:.0%}, permutation "
        f"p = {got.p_value:.3g})"
    )


def test_shape_influence_top_shape_is_the_most_common_kept():
    shapes = [(4, 4), (8, 8), (8, 8), (2, 2)]
    got = shape.shape_influence(influence_table(shapes, [0.3, 0.2, 0.5, 0.9], [True] * 4))
    assert (got.top_shape, got.kept_share) == ("8 x 8", 0.5)
    # a singleton group's share of the between-group sum counts
    labels = ["4 x 4", "8 x 8", "8 x 8", "2 x 2"]
    assert got.variance_explained == pytest.approx(eta_squared_loop([0.3, 0.2, 0.5, 0.9], labels))


def test_shape_influence_on_nullable_columns():
    """A table read back from parquet may hold pandas' nullable dtypes."""
    shapes = [(8, 32), (16, 16), (16, 16)]
    plain = shape.shape_influence(influence_table(shapes, [0.2, 0.4, 0.9], [True, False, True]))
    nullable = shape.shape_influence(influence_table(
        shapes, [0.2, 0.4, 0.9], [True, False, True],
        {"rows": "Int64", "cols": "Int64", "score": "Float64", "selected": "boolean"}))
    assert nullable == plain


def test_eta_squared_edges():
    assert math.isnan(shape.eta_squared(np.array([]), np.array([])))
    assert math.isnan(shape.eta_squared(np.array([0.5, 0.5]), np.array(["a", "b"])))
    assert math.isnan(shape.eta_squared(np.array([0.1, 0.2]), np.array(["a", "a"])))
    small = np.array([0.01, 0.02, 0.04])  # total sum of squares far below 1
    assert shape.eta_squared(small, np.array(["a", "a", "b"])) == pytest.approx(
        eta_squared_loop(small, ["a", "a", "b"]))


def test_shape_influence_sentences_and_json():
    nothing = shape.ShapeInfluence(None, math.nan, math.nan, 2, 0.5, 0.1, 0.2)
    assert nothing.sentence() == "no module kept"
    one = shape.ShapeInfluence("8 x 8", 1.0, 1.0, 1, math.nan, math.nan, math.nan)
    assert one.sentence() == ("100% of the kept modules are 8 x 8 (against 100% of the "
                              "candidates); one shape among the candidates, so shape cannot "
                              "drive the scores")  # fmt: skip
    flat = shape.ShapeInfluence("8 x 8", 0.5, 0.25, 3, math.nan, math.nan, math.nan)
    assert flat.sentence() == ("50% of the kept modules are 8 x 8 (against 25% of the "
                               "candidates); the scores do not vary, so shape cannot drive them")
    assert flat.to_dict() == {"top_shape": "8 x 8", "kept_share": 0.5, "candidate_share": 0.25,
                              "shapes": 3, "variance_explained": None, "chance": None,
                              "p_value": None}  # fmt: skip


def test_groups_by_kind_keep_modules_outside_blocks_apart():
    modules = pd.Series(["model.layers.0.q", "model.layers.1.q", "lm_head", "embed_out"])
    got = shape.groups(modules, pd.Series([4] * 4), pd.Series([8] * 4), "kind")
    assert got[0] == got[1] != got[2] != got[3]
    assert list(got[2:]) == ["lm_head", "embed_out"]
