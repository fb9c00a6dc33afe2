"""Exact behaviour of the spectral code on the branches the other fast tests reach only through
whole commands (a LoRA update's low-rank spectrum, the pooled and pruned KS searches, the
checks on eigenvalues): each record compared field by field with numpy in float64, or with the
value docs/method.md states. Written from `make mutation`'s survivors (docs/testing.md)."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pandas as pd
import pytest
import torch

import oracle as ref
from esdtool.spectral.marchenko_pastur import SpikeCount
from esdtool.spectral.metrics import spectrum_metrics
from esdtool.spectral.powerlaw import PowerLawFit
from esdtool.spectral.spectra import checked_eigenvalues
from helpers import torch_defaults

EPS64 = float(np.finfo(np.float64).eps)


def same(a: object, b: object) -> bool:
    """Equal, NaN equal to NaN, field by field through dataclasses; types must match too (a
    None where a NaN belongs is a different record)."""
    if dataclasses.is_dataclass(a) or dataclasses.is_dataclass(b):
        if type(a) is not type(b):
            return False
        return all(same(getattr(a, f.name), getattr(b, f.name)) for f in dataclasses.fields(a))
    if type(a) is not type(b):
        return False
    if isinstance(a, float) and math.isnan(a):
        return math.isnan(b)
    return a == b


# --------------------------------------------------------------- a low-rank update's spectrum


def low_rank_spectrum(N: int) -> tuple[np.ndarray, float]:
    """Eigenvalues (ascending, float64) of a rank-6 update in an 11-wide Gram: exact zeros, a
    rounding-noise value below lambda_max * N * eps, one exactly at it (not above: not
    counted), and nonzero ones on both sides of the default eig_threshold (1e-5): the low-rank
    rule counts by the relative tolerance alone. Returns them and that tolerance."""
    lambda_max = 10.0
    tol = lambda_max * N * EPS64
    evals = np.array([0.0, 0.0, 0.0, 1e-17, tol, 3e-9, 2e-7, 0.4, 2.5, 4.0, lambda_max])
    return np.sort(evals), tol


@pytest.mark.parametrize("N", [12, 40])
def test_a_low_rank_spectrum_gets_norms_and_no_fits(N):
    """spectrum_metrics(low_rank=True): no power-law fit, MP fit or spike count (NaN, None,
    status low_rank), and the norms, ranks and entropy over the eigenvalues above
    lambda_max * N * eps, each equal to numpy's."""
    ev, tol = low_rank_spectrum(N)
    got = spectrum_metrics(torch.tensor(ev), 11, N, low_rank=True)

    nonzero = ev[ev > tol]
    assert nonzero.size == 6  # 3e-9 and 2e-7 count; tol itself and the noise do not
    p = nonzero / nonzero.sum()
    total = float(ev.sum())
    held = np.cumsum(ev[::-1])
    nan = math.nan
    failed = PowerLawFit(nan, nan, nan, 0, "low_rank")
    want = dict(
        median=failed, fix_finger=failed, ks=failed, fit_status="low_rank",
        spikes=SpikeCount(nan, nan, nan, None, None, nan),
        lambda_max=10.0, spectral_norm=math.sqrt(10.0), log_spectral_norm=1.0,
        frobenius_norm=math.sqrt(total), log_norm=math.log10(total), stable_rank=total / 10.0,
        alpha_weighted=nan, log_alpha_norm=nan,
        entropy=float(-(p * np.log(p)).sum() / math.log(6)),
        matrix_rank=6, num_nonzero=6,
        effective_rank=int(np.argmax(held >= 0.9 * total)) + 1,
    )  # fmt: skip
    for field, value in want.items():
        have = getattr(got, field)
        if isinstance(value, float) and not math.isnan(value):
            assert have == pytest.approx(value, rel=1e-12), field
        else:
            assert same(have, value), (field, have, value)
    assert got.effective_rank == 3  # 10 + 4 + 2.5 of 16.9


def test_a_low_rank_spectrum_in_float32_uses_float32_eps():
    """The tolerance is lambda_max * N * eps of the eigenvalues' own dtype: in float32 the
    values between float64's and float32's tolerance are rounding noise."""
    ev = np.array([0.0, 1e-9, 1e-6, 0.5, 2.0, 8.0], dtype=np.float32)
    got = spectrum_metrics(torch.tensor(ev), 6, 30, low_rank=True)
    tol = 8.0 * 30 * float(np.finfo(np.float32).eps)  # 2.9e-5: 1e-9 and 1e-6 fall below
    assert tol > 1e-6
    assert (got.num_nonzero, got.matrix_rank) == (3, 3)


# ------------------------------------------------------------------------- effective rank


def effective_rank_np(ev: np.ndarray) -> int:
    """The fewest largest eigenvalues whose sum reaches 90% of the total (1e-12 relative slack),
    by a plain loop in float64."""
    total = float(ev.sum())
    if total <= 0:
        return 0
    held = 0.0
    for k, value in enumerate(np.sort(ev)[::-1], start=1):
        held += value
        if held >= 0.9 * total * (1 - 1e-12):
            return k
    return ev.size


@pytest.mark.parametrize("ev", [
    [0.0, 0.0], [0.1, 0.2, 0.3], [1.0] * 10, [0.5] * 20, [1e-3, 2e-3, 0.4, 0.5],
    [0.0, 0.0, 0.0, 7.0], list(np.linspace(0.01, 0.02, 50)),
])  # fmt: skip
def test_effective_rank_equals_a_plain_loop(ev):
    from esdtool.spectral.metrics import effective_rank

    ev = np.array(ev, dtype=np.float64)
    assert effective_rank(torch.tensor(ev)) == effective_rank_np(ev)


def test_effective_rank_compares_in_float64():
    """90% of the total lands a quarter of a float32 step above the top eigenvalue: in float64
    one eigenvalue is not enough, in float32 it would be."""
    from esdtool.spectral.metrics import effective_rank

    top = float(np.nextafter(np.float32(9.0), np.float32(0)))  # the float32 below 9
    ulp = 9.0 - top
    small = (top + ulp / 4) / (0.9 * (1 - 1e-12)) - top
    ev = np.array([small, top])
    assert 0.9 * ev.sum() * (1 - 1e-12) > top >= float(np.float32(0.9 * ev.sum() * (1 - 1e-12)))
    assert effective_rank(torch.tensor(ev)) == effective_rank_np(ev) == 2
    assert effective_rank(torch.tensor([1.0] * 10, dtype=torch.float64)) == 9  # exactly 90%


# ------------------------------------------------------------------ the KS search's lower bound


def ks_bound_np(x: np.ndarray, alphas: np.ndarray, i: int, step: int) -> float:
    """max over the points p = n - 1, n - 1 - step, ... down to 1 with p >= i of
    |1 - (x_p / x_i)^(1 - alpha_i) - (p - i) / (n - i)|, in float64."""
    n = x.size
    points = range(n - 1, 0, -step)
    return max(abs(1 - (x[p] / x[i]) ** (1 - alphas[i]) - (p - i) / (n - i))
               for p in points if p >= i)  # fmt: skip


@pytest.mark.parametrize(("n", "step"), [(50, 7), (49, 8), (30, 1), (64, 63), (10, 4)])
def test_ks_lower_bounds_equal_the_deviation_on_the_grid(n, step):
    """Each candidate's bound is its largest deviation on every step-th point of its tail,
    counted back from the last; float32 eigenvalues are taken in float64."""
    from esdtool.spectral import powerlaw

    rng = np.random.default_rng(n)
    x = np.sort(rng.pareto(1.5, n) + 1).astype(np.float32)
    x64 = x.astype(np.float64)
    alphas = powerlaw.hill_alphas(torch.tensor(x64))
    candidates = torch.arange(n - 1)
    got = powerlaw.ks_lower_bounds(torch.tensor(x), alphas, candidates, step)
    assert got.dtype == torch.float64
    want = [ks_bound_np(x64, alphas.numpy(), i, step) for i in range(n - 1)]
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-12, atol=1e-15)
    exact = powerlaw.ks_distances(torch.tensor(x64), alphas, candidates)
    assert bool((got <= exact * (1 + 1e-12)).all())  # a lower bound of D


@pytest.mark.parametrize("n", [1, 2, 50])
def test_ks_lower_bounds_of_no_candidate_are_none(n):
    """No candidate, no bound (n = 1 has none to give: a tail needs two eigenvalues)."""
    from esdtool.spectral import powerlaw

    x = torch.arange(1.0, n + 1, dtype=torch.float64)
    got = powerlaw.ks_lower_bounds(x, powerlaw.hill_alphas(x), torch.arange(0), 3)
    assert got.dtype == torch.float64 and got.shape == (0,)


def test_ks_lower_bounds_in_blocks(monkeypatch):
    """Candidates split into blocks give every candidate's bound, as one block does."""
    from esdtool.spectral import powerlaw

    x = torch.tensor(np.sort(np.random.default_rng(2).pareto(2.0, 300) + 1))
    alphas = powerlaw.hill_alphas(x)
    candidates = torch.arange(1, 299, 2)
    whole = powerlaw.ks_lower_bounds(x, alphas, candidates, 17)
    monkeypatch.setattr(powerlaw, "_KS_BLOCK_ELEMENTS", 19 * 7)  # blocks of 7 candidates
    blocked = powerlaw.ks_lower_bounds(x, alphas, candidates, 17)
    assert torch.equal(whole, blocked)


# ------------------------------------------------------------------ a LoRA update's spectrum


@pytest.mark.parametrize(("out", "inp", "r"), [(40, 24, 4), (24, 40, 4), (6, 9, 8), (5, 5, 5)])
def test_lowrank_eigenvalues_equal_the_formed_products(out, inp, r):
    """The eigenvalues of (s B A)(s B A)^T on the smaller side, ascending, M of them: numpy's
    eigvalsh of the formed product to rounding, the rest exact zeros."""
    from esdtool.spectral.lowrank import lowrank_eigenvalues

    rng = np.random.default_rng(out * inp + r)
    B, A = rng.standard_normal((out, r)), rng.standard_normal((r, inp))
    M = min(out, inp)
    got = lowrank_eigenvalues(torch.tensor(B, dtype=torch.float32),
                              torch.tensor(A, dtype=torch.float32), 0.75, M)  # fmt: skip
    W = 0.75 * B.astype(np.float32).astype(np.float64) @ A.astype(np.float32).astype(np.float64)
    G = W @ W.T if out <= inp else W.T @ W
    want = np.linalg.eigvalsh(G)
    assert got.dtype == torch.float64 and got.shape == (M,)
    k = min(r, M)
    np.testing.assert_allclose(got.numpy()[M - k :], want[M - k :], rtol=1e-10)
    assert bool((got[: M - k] == 0).all())
    assert bool((got[1:] >= got[:-1]).all())


def test_lowrank_eigenvalues_that_overflow_are_infinite():
    from esdtool.spectral.lowrank import lowrank_eigenvalues

    B = torch.full((8, 2), 1e200, dtype=torch.float64)
    got = lowrank_eigenvalues(B, B.mT.contiguous(), 1.0, 8)
    assert got.dtype == torch.float64 and got.shape == (8,) and bool(torch.isinf(got).all())


def test_small_factors_are_factorised_on_one_thread(monkeypatch):
    """LAPACK's threads cost more than a small QR: one thread inside, the caller's count
    restored after; large factors keep the caller's threads."""
    from esdtool.spectral import lowrank

    seen = []
    real_qr = torch.linalg.qr
    monkeypatch.setattr(torch.linalg, "qr", lambda m: (seen.append(torch.get_num_threads()),
                                                       real_qr(m))[1])  # fmt: skip
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        lowrank.lowrank_eigenvalues(torch.ones(16, 2), torch.ones(2, 8), 1.0, 8)
        assert seen == [1, 1] and torch.get_num_threads() == 2
        seen.clear()
        monkeypatch.setattr(lowrank, "ONE_THREAD_ELEMENTS", 40)
        lowrank.lowrank_eigenvalues(torch.ones(16, 2), torch.ones(2, 40), 1.0, 16)  # 32 + 80
        assert seen == [2, 2]
    finally:
        torch.set_num_threads(before)


# ------------------------------------------------------------------- AlphaPruning's alpha_peak


def peak_spectra() -> dict[str, np.ndarray]:
    """Spectra whose chosen candidate is not the first, with alphas below 2 among them."""
    rng = np.random.default_rng
    W = rng(1).standard_normal((100, 200))
    law = rng(6).pareto(1.0, 600) + 1
    return {
        "alpha 1.5 at the 2nd candidate": np.sort(rng(1).pareto(0.5, 300) + 1),
        "alpha 1.7 at the 53rd": np.sort(rng(0).pareto(0.8, 300) + 1),
        "alpha 1.99 at the 37th": np.sort(rng(2).pareto(0.9, 300) + 1),
        "pareto 2.5": np.sort(rng(3).pareto(2.5, 400) + 1) * 3,
        "two": np.array([1.0, 3.0]),
        "three": np.array([1.0, 2.0, 3.5]),
        "marchenko-pastur": np.linalg.eigvalsh(W @ W.T / 200),
        "peak at the top": np.sort(
            np.concatenate([rng(4).uniform(1, 2, 30), 9 + rng(4).random(200)])
        ),
        "small values": np.sort(rng(5).pareto(1.2, 250) + 1) * 1e-4,
        "power law from 1 under a cluster at 10": np.sort(
            np.concatenate([law[law < 9], 10 + rng(6).normal(0, 0.02, 150)])
        ),
    }


@pytest.mark.parametrize("case", list(peak_spectra()))
def test_alpha_peak_is_their_float32_computation(case):
    """Against tests/origin_alphapruning.py run in float32 (their net_esd_estimator, line by
    line): the same candidate, so the same alpha to a float32 rounding."""
    import origin_alphapruning as ap

    from esdtool.spectral.peak import alpha_peak

    evals = peak_spectra()[case].astype(np.float32)
    theirs = ap.alpha_peak(evals.astype(float), "float32")
    ours = alpha_peak(torch.tensor(evals))
    assert theirs > 1 and ours == pytest.approx(theirs, rel=3e-7)


# ------------------------------------------------------------------------------ FARMS windows


def test_farms_windows_refusals_word_for_word():
    from esdtool.spectral.farms import windows

    needs = "FARMS needs window rows >= 2, Q > 0 and a grid >= 1 (got "
    for args, message in (
        ((64, 64, 1, 1.0, 3), needs + "1, 1.0, 3)"),
        ((64, 64, 8, 0.0, 3), needs + "8, 0.0, 3)"),
        ((64, 64, 8, math.inf, 3), needs + "8, inf, 3)"),
        ((64, 64, 8, 1.0, 0), needs + "8, 1.0, 0)"),
        ((4, 10, 8, 4.0, 2), "a 4 x 16 window does not fit a 4 x 10 matrix"),
        ((10, 10, 4, 0.2, 2), "a 4 x 0 window does not fit a 10 x 10 matrix"),
    ):  # fmt: skip
        with pytest.raises(ValueError) as info:
            windows(*args)
        assert str(info.value) == message


def test_farms_windows_of_one_column_and_their_starts():
    from esdtool.spectral.farms import windows

    one = windows(10, 10, 2, 0.5, 1)  # n q = 1 exactly: one column, allowed
    assert (one.n, one.c, one.row_starts, one.col_starts) == (2, 1, (0,), (0,))
    placed = windows(20, 50, 8, 2.0, 4)  # 8 x 16 windows, 4 starts a side, the last at the edge
    assert (placed.n, placed.c) == (8, 16)
    assert placed.row_starts == (0, 4, 8, 12) and placed.col_starts == (0, 11, 22, 33)
    assert windows(8, 16, 8, 2.0, 5).row_starts == (0,)  # the window is the matrix


# ----------------------------------------------------- the float32 path hands over to float64


@pytest.mark.parametrize("where", ["one huge entry", "all subnormal squares"])
def test_float32_weights_whose_top_square_leaves_float32_take_float64(where):
    """float32 weights on the float32 path whose largest eigenvalue float32 cannot hold (an
    entry of 1e20 squares to 1e40; entries of 1e-23 to subnormals): computed in float64 on the
    same weights instead, the batch's other matrices too. The second-largest eigenvalue is
    in range, so only the largest tells."""
    rng = np.random.default_rng(21)
    W = rng.standard_normal((2, 10, 16)).astype(np.float32)
    if where == "one huge entry":
        W[1, 3, 4] = 1e20
    else:
        W[1] *= np.float32(1e-23)
    evals, finite = checked_eigenvalues(torch.from_numpy(W), torch.float32)
    assert evals.dtype == torch.float64 and finite.tolist() == [True, True]
    for k in range(2):
        want = np.linalg.eigvalsh(W[k].astype(np.float64) @ W[k].astype(np.float64).T)
        np.testing.assert_allclose(evals[k].numpy(), np.clip(want, 0, None), rtol=1e-9,
                                   atol=1e-12 * want.max())  # fmt: skip
    assert math.isfinite(float(evals[1, -1])) and float(evals[1, -1]) > 0


# Spectra of few distinct eigenvalues (as rounded or quantized weights give) on which two
# candidates share the smallest D exactly: the deviation peaks inside a run of equal values,
# at t / (n - i), the same fraction for both. Found by a search over such spectra.
TIED_D = {
    "the smaller index bounds higher": [1, 1, 1, 1, 2, 2, 2, 2, 4],
    "equal bounds": [1, 1, 1, 1, 1, 4, 4, 8],
    "the smaller index bounds lower": [1] * 10 + [2] * 6 + [3] * 3 + [4] * 7 + [8] * 4,
}


@pytest.mark.parametrize("batch", [1, 64])
@pytest.mark.parametrize("case", list(TIED_D))
def test_the_pruned_search_takes_the_smallest_xmin_among_tied_distances(case, batch, monkeypatch):
    """One candidate per round (or all in one), in the order of their bounds: the plain loop's
    first minimum (the smallest xmin) wins a tie, whichever of the two comes first."""
    from esdtool.spectral import powerlaw

    monkeypatch.setattr(powerlaw, "_EXHAUSTIVE", 0)
    monkeypatch.setattr(powerlaw, "_PRUNED_BATCH", batch)
    x = np.array(TIED_D[case], dtype=np.float64)
    fit = powerlaw.fit_ks(torch.from_numpy(x))
    with np.errstate(divide="ignore"):  # the last run's alpha is inf: not a candidate
        expected = ref.alpha_ks(x)
    assert (fit.alpha, fit.xmin, fit.D) == pytest.approx(expected, rel=1e-14)
    D = [ref.hill(x, i)[1] for i in range(x.size - 1) if x[i] < x[-1]]  # alpha finite, > 1
    assert sum(d == min(D) for d in D) >= 2  # still a tie: the case tests what it says


@pytest.mark.parametrize("n_candidates", [1, 40, 64, 65, 130])
def test_the_pruned_search_over_a_few_candidates(n_candidates):
    """Fewer candidates than a round, exactly one round, and a round and a bit: the candidate of
    smallest D among them, as the plain loop finds it."""
    from esdtool.spectral import powerlaw

    x = np.sort(np.random.default_rng(n_candidates).pareto(1.8, 400) + 1.0)
    candidates = np.arange(3, 3 + 2 * n_candidates, 2)
    i, d = powerlaw._pruned_min(torch.from_numpy(x), powerlaw.hill_alphas(torch.from_numpy(x)),
                                torch.from_numpy(candidates))  # fmt: skip
    D = [ref.hill(x, c)[1] for c in candidates]
    assert (i, d) == (int(candidates[int(np.argmin(D))]), pytest.approx(min(D), rel=1e-12))


@pytest.mark.parametrize(("n", "candidates", "pruned"), [
    (2048, 2047, False), (2049, 2048, True), (4096, 1024, False), (4097, 1024, True),
])  # fmt: skip
def test_the_ks_search_is_pruned_above_2_to_22_distances(n, candidates, pruned, monkeypatch):
    """All D are computed while candidates x n <= 2^22 (4096 x 1024 exactly: still all);
    above, the pruned search (O(n^1.5)) runs: a FARMS pool of 10^6 eigenvalues must not take
    O(n^2)."""
    from esdtool.spectral import powerlaw

    calls = []
    real = powerlaw._pruned_min
    monkeypatch.setattr(powerlaw, "_pruned_min", lambda *a: calls.append(1) or real(*a))
    x = torch.from_numpy(np.sort(np.random.default_rng(0).pareto(1.8, n) + 1.0))
    powerlaw._best_of(x, powerlaw.hill_alphas(x), torch.arange(candidates))
    assert bool(calls) is pruned


def test_an_unknown_spike_rule_is_refused_by_name():
    from esdtool.spectral.marchenko_pastur import count_spikes

    with pytest.raises(ValueError) as err:
        count_spikes(torch.linspace(0.1, 2.0, 30, dtype=torch.float64), 30, 60, rule="bbp")
    assert str(err.value) == "unknown spike rule 'bbp' (tw or lora-ar)"


# ------------------------------------------------------- the default device and dtype are not ours


def spectral_calls() -> dict[str, object]:
    """One call per road through the spectral code, on CPU float64 inputs (float32 where the
    road is float32's)."""
    from esdtool.spectral import farms, lowrank, marchenko_pastur, metrics, peak, powerlaw, spectra

    rng = np.random.default_rng(7)
    x = torch.from_numpy(np.sort(rng.pareto(2.0, 300) + 1.0))
    big = torch.from_numpy(np.sort(rng.pareto(1.5, 2100) + 1.0))  # the pruned KS search
    W = torch.from_numpy(rng.standard_normal((3, 20, 30)))
    huge = torch.from_numpy(rng.standard_normal((12, 9)) * 1e300)  # the rescaled route
    bad = W[0].clone()
    bad[2, 3] = math.nan
    B = torch.from_numpy(rng.standard_normal((24, 3)))
    A = torch.from_numpy(rng.standard_normal((3, 16)))
    evals = torch.from_numpy(np.sort(rng.chisquare(3, 40)))
    alphas = powerlaw.hill_alphas(x)
    every7, every = torch.arange(0, 299, 7), torch.arange(299)
    return {
        "hill_alphas": lambda: powerlaw.hill_alphas(x),
        "ks_distances": lambda: powerlaw.ks_distances(x, alphas, every7),
        "ks_lower_bounds": lambda: powerlaw.ks_lower_bounds(x, alphas, every, 17),
        "fit_median": lambda: powerlaw.fit_median(x.float()),
        "fit_fix_finger": lambda: powerlaw.fit_fix_finger(x.float()),
        "fit_ks": lambda: powerlaw.fit_ks(x.float()),
        "fit_ks pruned": lambda: powerlaw.fit_ks(big),
        "eigenvalues": lambda: spectra.checked_eigenvalues(W),
        "eigenvalues float32": lambda: spectra.checked_eigenvalues(W.float(), torch.float32),
        "eigenvalues rescaled": lambda: spectra.checked_eigenvalues(huge),
        "eigenvalues non-finite": lambda: spectra.checked_eigenvalues(bad),
        "lowrank": lambda: lowrank.lowrank_eigenvalues(B, A, 0.5, 24),
        "lowrank overflow": lambda: lowrank.lowrank_eigenvalues(B * 1e200, A * 1e200, 1.0, 24),
        "spectrum_metrics": lambda: metrics.spectrum_metrics(evals, 40, 90),
        "spectrum_metrics low rank": lambda: metrics.spectrum_metrics(evals, 40, 90, low_rank=True),
        "count_spikes": lambda: marchenko_pastur.count_spikes(evals, 40, 90),
        "alpha_peak": lambda: peak.alpha_peak(x),
        "farms": lambda: farms.farms_spectrum(W[0], 6, 1.5, 2),
        "farms float32": lambda: farms.farms_spectrum(W[0].float(), 6, 1.5, 2, torch.float32),
    }


def same_result(a: object, b: object) -> bool:
    """`same`, with tensors equal in device, dtype and every value (NaN equal to NaN)."""
    if isinstance(a, tuple) and isinstance(b, tuple):
        return len(a) == len(b) and all(same_result(u, v) for u, v in zip(a, b, strict=True))
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return (a.device == b.device and a.dtype == b.dtype
                and bool(torch.allclose(a, b, rtol=0, atol=0, equal_nan=True)))  # fmt: skip
    return same(a, b)


@pytest.mark.parametrize("road", list(spectral_calls()))
def test_results_do_not_depend_on_the_default_device_or_dtype(road):
    call = spectral_calls()[road]  # its inputs made on the CPU, under torch's own defaults
    expected = call()
    with torch_defaults(torch.float16):
        assert same_result(call(), expected)


def test_a_whole_analysis_does_not_depend_on_the_default_device_or_dtype(tmp_path):
    """A file analysed in a session that set torch's default device and dtype (a notebook's
    set_default_device("cuda")) gives the table it gives in a fresh one, empty tensor too."""
    from safetensors.torch import save_file

    from esdtool import analyze, load_metrics

    rng = np.random.default_rng(3)
    save_file({"a.weight": torch.from_numpy(rng.standard_normal((30, 20))).float(),
               "b.weight": torch.from_numpy(rng.standard_normal((12, 40))).to(torch.bfloat16),
               "c.weight": torch.zeros(0, 5)}, tmp_path / "model.safetensors")  # fmt: skip
    analyze(tmp_path / "model.safetensors", tmp_path / "plain.parquet")
    with torch_defaults(torch.float16):
        analyze(tmp_path / "model.safetensors", tmp_path / "foreign.parquet")
    plain, foreign = (load_metrics(tmp_path / f"{n}.parquet").drop(columns="seconds")
                      for n in ("plain", "foreign"))  # fmt: skip
    assert (plain.status == "ok").sum() == 2
    pd.testing.assert_frame_equal(foreign, plain)


@pytest.mark.parametrize("peak", [2.0**61, 2.0**-61])
def test_float64_weights_beyond_float32s_range_are_not_cast_to_it(peak):
    """float64 weights asked for on the float32 path with an entry past 2^+-60 (squares past
    float32's range): computed in float64, as the float64 path computes them."""
    rng = np.random.default_rng(5)
    W = np.clip(rng.standard_normal((9, 14)), -1, 1) * (peak / 8 if peak < 1 else 1.0)
    W[2, 5] = peak
    evals, finite = checked_eigenvalues(torch.from_numpy(W), torch.float32)
    want, _ = checked_eigenvalues(torch.from_numpy(W), torch.float64)
    assert evals.dtype == torch.float64 and bool(finite) and torch.equal(evals, want)
    np.testing.assert_allclose(evals.numpy(), np.clip(np.linalg.eigvalsh(W @ W.T), 0, None),
                               rtol=1e-9, atol=1e-12 * float(evals[-1]))  # fmt: skip


def test_float32_weights_whose_top_square_is_the_smallest_normal_stay_float32():
    """2^-63 squares to 2^-126, float32's smallest normal number: still in range."""
    W = torch.zeros(4, 6)
    W[1, 2] = 2.0**-63
    evals, finite = checked_eigenvalues(W, torch.float32)
    assert evals.dtype == torch.float32 and bool(finite)
    assert evals.tolist() == [0.0, 0.0, 0.0, 2.0**-126]
