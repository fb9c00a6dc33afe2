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
from esdtool.plan import layerwise, ranks, shape, targets
from esdtool.plan.ranks import (
    EPS,
    AllocateSettings,
    allocate_ranks,
    candidates,
    scores,
)

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
    assert (
        "): 'm0', 'm1', 'm2'; the largest epsilon that fits is just below 0.5 (e.g. 0.5)" in three
    )
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
    assert layerwise.minmax([]).shape == (0,)  # no values, no group


def test_block_means_of_integer_alphas_are_not_truncated():
    got = layerwise.block_means([1, 2, 6], np.array(["b0", "b0", None], dtype=object))
    np.testing.assert_array_equal(got, [1.5, 1.5, 6.0])


def test_pruning_ratios_of_float32_element_counts_are_float64():
    """float32 element counts (Llama-7B's up, q and down shapes) are summed in float64: the
    ratios and the largest epsilon agree with the float64 formulas to rounding, not to float32's
    1e-8 (as AlphaPruning's own sparsity * sum(numel) is)."""
    alpha = np.array([2.5, 4.0, 3.25])
    numel = np.array([4096 * 11008, 4096 * 4096, 11008 * 4096], dtype=np.float32)
    n, u = numel.astype(float), (alpha - 2.5) / 1.5
    raw = 0.7 + 0.6 * u  # 1 - e + 2 e u, e = 0.3
    want = raw * 0.7 * n.sum() / (n * raw).sum()
    np.testing.assert_allclose(layerwise.pruning_ratios(alpha, numel, 0.7, 0.3), want, rtol=1e-14)
    T, B = n.sum(), (n * (2 * u - 1)).sum()
    assert layerwise.largest_epsilon(alpha, numel, 0.7) == pytest.approx(
        T * 0.3 / (0.7 * T - B), rel=1e-14
    )


def test_largest_epsilon_depends_on_the_shares_of_elements_not_their_unit():
    """u = 0 and 1, T = 10, B = -1 + 9 = 8: e = T (1 - S) / (S T - B) = 0.5 / 1.5 at S = 0.95
    (the ratios (1 -+ e) 9.5 / (10 + 8 e) reach 1 there), for counts and for shares."""
    for numel in ([1.0, 9.0], [0.1, 0.9]):
        got = layerwise.largest_epsilon(np.array([1.0, 2.0]), np.array(numel), 0.95)
        assert got == pytest.approx(1 / 3, rel=1e-12)


def test_largest_epsilon_is_one_when_every_group_ties():
    """Each module a group of its own: every u is 0.5 and every ratio the sparsity, whatever
    epsilon (slope 0), so none reaches 1; found without dividing by zero."""
    with np.errstate(all="raise"):
        got = layerwise.largest_epsilon(
            np.array([2.0, 3.0]), np.array([4.0, 6.0]), 0.5, np.array(["a", "b"])
        )
    assert got == 1.0


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


def test_sqrt_factors_of_float32_alphas_are_float64():
    alpha = np.array([2.5, 4.0, 3.25], dtype=np.float32)
    root = np.sqrt(alpha.astype(float))
    got = layerwise.factors(alpha, "sqrt", 0.5, 1.5, "lr")
    np.testing.assert_allclose(got, 3 * root / root.sum(), rtol=1e-14)


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
        "8 x 32",
        2 / 3,
        0.5,
        2,
    )
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
    nullable = shape.shape_influence(
        influence_table(
            shapes,
            [0.2, 0.4, 0.9],
            [True, False, True],
            {"rows": "Int64", "cols": "Int64", "score": "Float64", "selected": "boolean"},
        )
    )
    assert nullable == plain


def test_shape_influence_on_0_1_selections_and_float32_scores():
    """selected as 0/1 integers is a mask, not row positions; float32 scores are summed in
    float64."""
    shapes = [(8, 32), (32, 8), (16, 16), (16, 16)]
    scores = np.array([0.1, 0.2, 0.7, 0.4], dtype=np.float32)
    got = shape.shape_influence(influence_table(shapes, scores, [1, 1, 1, 0]))
    assert (got.top_shape, got.kept_share, got.candidate_share) == ("8 x 32", 2 / 3, 0.5)
    labels = ["8 x 32", "8 x 32", "16 x 16", "16 x 16"]
    assert got.variance_explained == pytest.approx(eta_squared_loop(scores, labels), rel=1e-12)


def test_eta_squared_edges():
    assert math.isnan(shape.eta_squared(np.array([]), np.array([])))
    with np.errstate(all="raise"):  # equal values: undefined, and not by dividing 0 by 0
        assert math.isnan(shape.eta_squared(np.array([0.5, 0.5]), np.array(["a", "b"])))
    assert math.isnan(shape.eta_squared(np.array([0.1, 0.2]), np.array(["a", "a"])))
    small = np.array([0.01, 0.02, 0.04])  # total sum of squares far below 1
    assert shape.eta_squared(small, np.array(["a", "a", "b"])) == pytest.approx(
        eta_squared_loop(small, ["a", "a", "b"])
    )


def test_shape_influence_sentences_and_json():
    nothing = shape.ShapeInfluence(None, math.nan, math.nan, 2, 0.5, 0.1, 0.2)
    assert nothing.sentence() == "no module kept"
    one = shape.ShapeInfluence("8 x 8", 1.0, 1.0, 1, math.nan, math.nan, math.nan)
    assert one.sentence() == ("100% of the kept modules are 8 x 8 (against 100% of the "
                              "candidates); one shape among the candidates, so shape cannot "
                              "drive the scores")  # fmt: skip
    flat = shape.ShapeInfluence("8 x 8", 0.5, 0.25, 3, math.nan, math.nan, math.nan)
    assert flat.sentence() == (
        "50% of the kept modules are 8 x 8 (against 25% of the "
        "candidates); the scores do not vary, so shape cannot drive them"
    )
    assert flat.to_dict() == {"top_shape": "8 x 8", "kept_share": 0.5, "candidate_share": 0.25,
                              "shapes": 3, "variance_explained": None, "chance": None,
                              "p_value": None}  # fmt: skip


def test_groups_by_kind_keep_modules_outside_blocks_apart():
    modules = pd.Series(["model.layers.0.q", "model.layers.1.q", "lm_head", "embed_out"])
    got = shape.groups(modules, pd.Series([4] * 4), pd.Series([8] * 4), "kind")
    assert got[0] == got[1] != got[2] != got[3]
    assert list(got[2:]) == ["lm_head", "embed_out"]


def test_groups_by_shape_refuse_sides_of_unequal_lengths():
    with pytest.raises(ValueError, match="shorter"):  # not a silently shorter list of groups
        shape.groups(pd.Series(["a", "b"]), pd.Series([4, 8]), pd.Series([8]), "shape")


# ------------------------------------------------------------------ presets and LoRA options


def test_preset_refusals_word_for_word():
    cases = {
        ("nope", None): "--preset must be one of lora-ar, alphapruning, not 'nope'",
        ("alphapruning", "lr"): "--preset alphapruning plans --target pruning, not lr",
        ("lora-ar", "pruning"): "--preset lora-ar plans --target lora, not pruning",
    }
    for (preset, target), message in cases.items():
        with pytest.raises(OptionError) as info:
            AllocateSettings.from_preset(preset, **({"target": target} if target else {}))
        assert str(info.value) == message
    # the preset's own target, named or not, is accepted
    assert AllocateSettings.from_preset("lora-ar", target="lora").preset == "lora-ar"
    assert AllocateSettings.from_preset("alphapruning", target="pruning",
                                        sparsity=0.5).target == "pruning"  # fmt: skip


LORA_REFUSED = [
    (dict(normalise_within="x", candidates="y", preset="z"), [
        "--normalise-within must be one of none, shape, kind, not 'x'",
        "candidates must be role or model, not 'y'",
        "--preset must be one of lora-ar, alphapruning, not 'z'",
    ]),
    (dict(candidates="model", targets="q_proj"), [
        "--targets picks candidates by name, and --preset lora-ar takes every Linear of the "
        "model: drop one of them",
    ]),
    (dict(rank_multiple=1025, max_rank=4096), ["--rank-multiple must be an integer in 1..1024, "
                                               "not 1025"]),
    (dict(rank_multiple=True), ["--rank-multiple must be an integer in 1..1024, not True"]),
    (dict(rank_multiple=2.0), ["--rank-multiple must be an integer in 1..1024, not 2.0"]),
    (dict(budget_percent=100.5), ["--budget-percent must lie in (0, 100], not 100.5"]),
]  # fmt: skip


@pytest.mark.parametrize(("options", "problems"), REFUSED + LORA_REFUSED)
def test_every_problem_of_the_options_is_listed_in_order_word_for_word(options, problems):
    with pytest.raises(OptionError) as info:
        AllocateSettings(**options)
    assert str(info.value) == "; ".join(problems)


LORA_ACCEPTED = [
    dict(budget_percent=100),
    dict(rank_multiple=1024, max_rank=2048),
    dict(candidates="model"),
    dict(candidates="role", targets="q_proj"),
]


@pytest.mark.parametrize("options", ACCEPTED + LORA_ACCEPTED)
def test_options_on_the_edge_of_each_check_are_accepted(options):
    settings = AllocateSettings(**options)
    assert all(getattr(settings, k) == v for k, v in options.items())


def test_scores_within_groups_on_integer_counts():
    """Min-max inside each group, spikes flipped (fewer is better), a group of ties at 0.5 on
    both; integer inputs (spike counts are integers) are not truncated."""
    alpha = np.array([2, 4, 3, 3, 5])
    spikes = np.array([1, 3, 7, 7, 0])
    within = np.array(["a", "a", "b", "b", "c"])
    got = scores(alpha, spikes, 0.7, 0.3, within)
    a = np.array([0, 2 / (2 + EPS), 0.5, 0.5, 0.5])
    s = np.array([1 - 0, 1 - 2 / (2 + EPS), 0.5, 0.5, 0.5])
    np.testing.assert_allclose(got, 0.7 * a + 0.3 * s, rtol=1e-15)
    fractional = scores(np.array([1.0, 2.0]), np.array([0.2, 0.5]), 0.0, 1.0, np.array(["g", "g"]))
    np.testing.assert_allclose(fractional, [1.0, 1 - 0.3 / (0.3 + EPS)], rtol=1e-15)


# ------------------------------------------------- candidates: the model's modules, refusals


def metrics_rows(*rows: dict) -> pd.DataFrame:
    """A metrics table's columns that candidates() reads, one dict per tensor (defaults: an
    analysed 2-D linear with finite alphas and a spike count)."""
    base = dict(
        status="ok",
        slice=pd.NA,
        role="linear",
        M=8,
        N=16,
        rows=8,
        cols=16,
        reason=None,
        fit_status="ok",
        alpha_median=2.0,
        alpha_ks=2.5,
        num_spikes=1,
    )
    table = pd.DataFrame([{**base, **row} for row in rows])
    for column in ("M", "N", "rows", "cols", "num_spikes"):
        table[column] = table[column].astype("Int64")
    return table


def lora_ar() -> AllocateSettings:
    return AllocateSettings.from_preset("lora-ar")


def refused(table: pd.DataFrame, settings: AllocateSettings, modules=None) -> OptionError:
    with pytest.raises(OptionError) as info:
        candidates(table, settings, modules)
    return info.value


def test_model_candidates_are_the_models_modules_in_its_order():
    table = metrics_rows(
        dict(name="embed.weight", module="embed", role="embedding", alpha_ks=3.0),
        dict(name="l.0.q.weight", module="l.0.q", alpha_ks=2.0),
        dict(name="l.0.k.weight", module="l.0.k", alpha_ks=4.0),
    )
    modules = [
        ("l.0.k", "l.0.k.weight"),
        ("l.0.q", "l.0.q.weight"),
        ("lm_head", "embed.weight"),
    ]  # tied: read from the embedding's tensor
    rows, dropped = candidates(table, lora_ar(), modules)
    assert list(rows.module) == ["l.0.k", "l.0.q", "lm_head"]
    assert list(rows.name) == ["l.0.k.weight", "l.0.q.weight", "embed.weight"]
    assert list(rows.alpha_ks) == [4.0, 2.0, 3.0] and dropped == []


def test_model_candidates_need_the_modules():
    error = refused(metrics_rows(dict(name="a.weight", module="a")), lora_ar())
    assert str(error) == "candidates from the model need the model's Linear/Conv2d modules"


def test_a_module_whose_tensor_is_not_in_the_table():
    table = metrics_rows(dict(name="a.weight", module="a"))
    one = refused(table, lora_ar(), [("a", "a.weight"), ("b", "model.b.weight")])
    assert str(one) == "module 'b': the table has no tensor 'model.b.weight'"
    assert one.hint == (
        "the model's parameter names differ from the checkpoint's tensor names (transformers "
        "renames some architectures' modules on loading); the preset cannot pair them. "
        "Analysed with --include/--exclude? Analyse every tensor."
    )
    two = refused(table, lora_ar(), [("b", "b.weight"), ("c", "c.weight")])
    assert str(two) == "module 'b': the table has no tensor 'b.weight'; 1 more like it"
    three = refused(table, lora_ar(), [("b", "b.weight"), ("c", "c.weight"), ("d", "d.weight")])
    assert str(three) == "module 'b': the table has no tensor 'b.weight'; 2 more like it"


@pytest.mark.parametrize(("row", "message", "hint"), [
    (dict(M=1, N=64, rows=1, cols=64, reason="one eigenvalue"),
     "module 'x' has one eigenvalue (a 1 x 64 weight): Adaptive Rank LoRA's code crashes on "
     "such a module (argmin of an empty KS search), so there is no plan of its to reproduce",
     "plan without --preset (pick the modules with --targets)"),
    (dict(M=pd.NA, N=pd.NA, reason="not a matrix"),
     "module 'x': its weight 'x.weight' has no spectrum (not a matrix)", None),
    (dict(M=5, N=9, reason="non-finite entries"),
     "module 'x': its weight 'x.weight' has no spectrum (non-finite entries)", None),
    (dict(M=1, N=pd.NA, reason="odd"), "module 'x': its weight 'x.weight' has no spectrum (odd)",
     None),
])  # fmt: skip
def test_a_module_whose_tensor_has_no_spectrum(row, message, hint):
    table = metrics_rows(dict(name="ok.weight", module="ok"),
                         dict(name="x.weight", module="x", status="skipped", **row))  # fmt: skip
    error = refused(table, lora_ar(), [("ok", "ok.weight"), ("x", "x.weight")])
    assert (str(error), error.hint) == (message, hint)


def test_a_model_module_without_alpha_or_spikes_is_refused():
    table = metrics_rows(dict(name="a.weight", module="a"),
                         dict(name="b.weight", module="b", alpha_ks=np.nan, fit_status="ks:flat"),
                         dict(name="c.weight", module="c", num_spikes=pd.NA))  # fmt: skip
    for absent in ("b", "c"):
        modules = [("a", "a.weight"), (absent, f"{absent}.weight")]
        error = refused(table, lora_ar(), modules)
        status = "ks:flat" if absent == "b" else "ok"
        assert str(error) == (
            f"module '{absent}' has no alpha_ks or num_spikes (fit status {status}; e.g. all its "
            "eigenvalues are equal, as for an identity or orthogonal matrix): the preset's scores "
            "need every Linear"
        )


def test_farms_and_peak_columns_missing_from_the_table():
    table = metrics_rows(dict(name="a.weight", module="a"), dict(name="b.weight", module="b"))
    for options, flag, column in (({"alpha_column": "alpha_median_farms"}, "--alpha-column",
                                   "alpha_median_farms"),
                                  ({"spikes_column": "spikes_farms"}, "--spikes-column",
                                   "spikes_farms")):  # fmt: skip
        error = refused(table, AllocateSettings(**options))
        assert str(error) == (f"{flag} {column}: the table has no FARMS columns (it was analysed "
                              "without --estimator farms)")  # fmt: skip
        assert error.hint == "esdtool analyze MODEL --estimator farms -o metrics.parquet"
    for peaks in (None, [np.nan, np.nan]):
        with_peak = table if peaks is None else table.assign(alpha_peak=peaks)
        error = refused(with_peak, AllocateSettings(alpha_column="alpha_peak"))
        assert str(error) == ("--alpha-column alpha_peak: the table has no alpha_peak "
                              "(AlphaPruning's alpha; it was analysed without --preset "
                              "alphapruning)")  # fmt: skip
        assert error.hint == "esdtool analyze MODEL --preset alphapruning -o metrics.parquet"


# ----------------------------------------------------------------- allocate_ranks on small tables


def ten_linears(**columns) -> pd.DataFrame:
    """Ten analysed linears in nullable columns (as a table read back from parquet holds them):
    sides 48 x 96 (modules 0-4) and 8 x 16, alphas 2.0-6.5, spike counts 9-0 (the score
    rises with the index)."""
    rows = [dict(name=f"l.{i}.weight", module=f"l.{i}", rows=48 if i < 5 else 8,
                 cols=96 if i < 5 else 16, M=48 if i < 5 else 8, N=96 if i < 5 else 16,
                 alpha_median=2.0 + 0.5 * i, alpha_ks=2.0 + 0.5 * i, num_spikes=9 - i)
            for i in range(10)]  # fmt: skip
    table = metrics_rows(*rows)
    table["alpha_median"] = table["alpha_median"].astype("Float64")
    return table.assign(**columns)


def test_the_allocation_table_has_plain_dtypes_from_nullable_columns():
    table = allocate_ranks(ten_linears()).table
    assert {c: table[c].dtype.kind for c in ("rows", "cols", "alpha", "spikes", "score",
                                             "rank", "params")} == {
        "rows": "i", "cols": "i", "alpha": "f", "spikes": "i", "score": "f", "rank": "i",
        "params": "i"}  # fmt: skip
    np.testing.assert_array_equal(table.alpha, 2.0 + 0.5 * np.arange(10))


def test_the_allocation_is_float64_and_int64_from_float_and_float32_columns():
    """Sides stored as floats and alphas and spike counts as float32 (numbers, as a table
    built by hand may hold them): integer sides and parameters, scores by the float64
    formula (alphas 2 + 0.5 i, spikes 9 - i)."""
    table = ten_linears().astype({"rows": float, "cols": float, "alpha_median": "float32",
                                  "num_spikes": "float32"})  # fmt: skip
    got = allocate_ranks(table).table
    assert [str(got[c].dtype) for c in ("rows", "cols", "params", "alpha", "score")] == [
        "int64", "int64", "int64", "float64", "float64"]  # fmt: skip
    i = np.arange(10)
    want = 0.7 * (0.5 * i) / (4.5 + EPS) + 0.3 * (1 - (9 - i) / (9 + EPS))
    np.testing.assert_allclose(got.score, want, rtol=1e-15)


def test_the_budget_fit_takes_the_lower_of_two_totals_as_close():
    """One module of rank 6 and size 2: the totals are even. Budget 13 lies 1 from 12 (rank
    6, unscaled) and from 14 (rank 7): 12; budget 11 lies 1 from 10 (rank 5) and from 12: 10;
    15 lies 1 from 14 and 3 from 12: 14."""
    fit = lambda budget: ranks.fit_budget(np.array([6]), np.array([2]), budget, 4, 64)  # noqa: E731
    assert [fit(13).tolist(), fit(11).tolist(), fit(15).tolist()] == [[6], [5], [7]]


def closest_total_by_enumeration(r, sizes, budget, lo, hi, multiple):
    """Every total one factor c can give (c = 1, and c just either side of each point where a
    rounded rank r_i c steps), and of them the closest to the budget, the lower on a tie."""
    steps = {1.0} | {(k + 0.5) / ri * f for ri in r for k in range(2 * hi + 2)
                     for f in (1 - 1e-9, 1 + 1e-9)}  # fmt: skip
    totals = set()
    for c in steps:
        got = np.clip(np.rint(r * c), lo, hi).astype(int)
        got = ranks.round_to_multiple(got, multiple, lo, np.full(r.size, hi))[0]
        totals.add(int((got * sizes).sum()))
    return min(totals, key=lambda t: (abs(t - budget), t))


@pytest.mark.parametrize("seed", range(40))
def test_the_budget_fit_is_the_closest_total_any_factor_gives(seed):
    """Random plans and budgets, many of them between two totals exactly as far: the bisection
    ends on the total an enumeration of every factor's total picks."""
    rng = np.random.default_rng(seed)
    n, multiple = int(rng.integers(1, 6)), int(rng.choice([1, 1, 2, 4]))
    r = rng.integers(1, 33, n)
    sizes = rng.choice([2, 4, 6], n)
    budget = int(rng.integers(1, int(64 * sizes.sum())))
    got = ranks.fit_budget(r, sizes, budget, multiple, 64, multiple)
    want = closest_total_by_enumeration(r, sizes, budget, multiple, 64, multiple)
    assert int((got * sizes).sum()) == want


def test_farms_spike_shares_stay_fractional():
    shares = np.linspace(0.05, 0.5, 10)
    table = ten_linears(spikes_farms=shares, alpha_median_farms=np.linspace(2, 6, 10))
    settings = AllocateSettings(alpha_column="alpha_median_farms", spikes_column="spikes_farms")
    np.testing.assert_array_equal(allocate_ranks(table, settings).table.spikes, shares)


def test_without_the_cap_a_rank_can_exceed_the_smaller_side():
    settings = AllocateSettings(rank_cap=False, select="lowest", top_n_percentile=1.0)
    capped = allocate_ranks(ten_linears(), AllocateSettings(select="lowest", top_n_percentile=1.0))
    free = allocate_ranks(ten_linears(), settings)
    assert free.table["rank"].iloc[9] == 64  # an 8 x 16
    assert capped.table["rank"].iloc[9] == 8
    assert capped.notes == ["5 module(s) capped at min(rows, cols), the most rank a LoRA update "
                            "of that matrix can have (e.g. l.5)"]  # fmt: skip
    assert free.notes == []


def test_a_model_without_linears_has_no_candidates():
    with pytest.raises(OptionError) as info:
        allocate_ranks(ten_linears(), AllocateSettings.from_preset("lora-ar"), modules=[])
    assert str(info.value) == "no candidate modules: the model has no nn.Linear or nn.Conv2d"


def test_a_tiny_budget_percent_is_one_parameter(monkeypatch):
    monkeypatch.setattr(ranks, "model_params", lambda metrics: 1000)
    plan = ranks.allocate_ranks(ten_linears(), AllocateSettings(budget_percent=0.01))
    assert plan.budget == 1  # 0.1 parameters, rounded, but never 0 (no budget at all)


def test_a_missed_budget_on_multiples_and_stuck_modules_are_noted():
    settings = AllocateSettings(budget_params=10, rank_multiple=2, min_rank=4, max_rank=8,
                                top_n_percentile=1.0)  # fmt: skip
    plan = allocate_ranks(ten_linears(), settings)
    total = int(plan.table.params.sum())
    assert plan.notes[-1] == (
        f"budget 10 missed: the plan has {total:,} ({total / 10 - 1:+.0%}) because ranks stay "
        "within 4..8 on multiples of 2; widen --min-rank / --max-rank or keep more modules "
        "(--top-n-percentile)"
    )
    stuck = allocate_ranks(ten_linears(), AllocateSettings(rank_multiple=16, max_rank=32,
                                                           top_n_percentile=1.0))  # fmt: skip
    assert stuck.notes[0] == (
        "5 module(s) cannot take a rank that is a multiple of 16 within "
        "4..min(rows, cols, 32): they keep the largest rank they can"
    )
