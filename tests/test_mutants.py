"""Exact behaviour of the spectral math and the rank allocation, function by function: the
tests that kill the mutants `make mutation` (docs/testing.md) showed to survive the other
fast tests. Each compares with tests/oracle.py, numpy, or a value the spec (docs/method.md)
states, on small matrices or hand-made spectra that hit the boundaries the spec names
("at most", "above", ties, one eigenvalue, all zero)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

import oracle as ref
from esdtool.errors import OptionError
from esdtool.plan import ranks
from esdtool.plan.ranks import AllocateSettings, allocate_ranks
from esdtool.spectral import marchenko_pastur as mp
from esdtool.spectral import powerlaw, spectra
from esdtool.spectral.metrics import spectrum_metrics
from esdtool.spectral.powerlaw import PowerLawFit, fit_fix_finger, fit_median

EPS64 = float(np.finfo(np.float64).eps)

# --------------------------------------------------------------------- spectrum_metrics, whole


def planted(rows: int, cols: int, seed: int, spikes: int = 4) -> np.ndarray:
    """Gaussian noise with ``spikes`` rank-one signals well above the BBP threshold."""
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((rows, cols))
    for k in range(spikes):
        W += (
            (3 + k)
            * (rows * cols) ** 0.25
            * np.outer(
                rng.standard_normal(rows) / math.sqrt(rows),
                rng.standard_normal(cols) / math.sqrt(cols),
            )
        )
    return 0.05 * W


MATRICES = {
    "square": (60, 60, 0),
    "tall": (150, 40, 1),
    "wide": (36, 100, 2),
    "odd": (41, 90, 5),
}  # fmt: skip  (odd M: the median is one eigenvalue)


@pytest.mark.parametrize("case", MATRICES)
def test_every_field_of_spectrum_metrics_equals_the_oracle(case):
    """All numbers of one spectrum against oracle.row (SVD, loops, scipy): the fits with their
    xmin, D and tail size, the MP fit and both counts, the norms and the logs, entropy, ranks."""
    rows, cols, seed = MATRICES[case]
    W = planted(rows, cols, seed)
    M, N = min(W.shape), max(W.shape)
    expected = ref.row(W)
    ev = spectra.eigenvalues(torch.from_numpy(W))
    got = spectrum_metrics(ev, M, N)
    assert got.fit_status == "ok"
    x = ref.nonzero(expected["evals"])
    for method in ("median", "fix_finger", "ks"):
        fit = got.fit(method)
        assert fit.status == "ok"
        assert fit.alpha == pytest.approx(expected[f"alpha_{method}"], rel=1e-9)
        assert fit.xmin == pytest.approx(expected[f"xmin_{method}"], rel=1e-9)
        assert math.isclose(fit.D, expected[f"D_{method}"], rel_tol=1e-7)
        i = int(np.argmin(np.abs(x - expected[f"xmin_{method}"])))
        assert fit.num_tail == len(x) - i
    s = got.spikes
    exact = ref.spikes(expected["evals"], M, N, exact_tw=True)  # t_q to 1e-9, not 4 digits
    for name in ("sigma_mp", "bulk_max", "tw_threshold"):
        assert getattr(s, name) == pytest.approx(exact[name], rel=1e-9), name
    assert s.num_spikes == expected["num_spikes"]
    assert s.num_spikes_bulk == expected["num_spikes_bulk"]
    assert s.mp_softrank == pytest.approx(expected["mp_softrank"], rel=1e-9)
    for name in ("lambda_max", "spectral_norm", "log_spectral_norm", "frobenius_norm", "log_norm",
                 "stable_rank", "alpha_weighted", "log_alpha_norm", "entropy"):  # fmt: skip
        assert getattr(got, name) == pytest.approx(expected[name], rel=1e-9), name
    assert got.matrix_rank == expected["matrix_rank"] == M
    assert got.num_nonzero == expected["num_nonzero"] == M
    assert 0 < got.entropy < 1


def test_float32_eigenvalues_are_summed_in_float64():
    """spectrum_metrics upcasts: a float32 spectrum gives the float64 sums of its values."""
    W = planted(40, 70, 9)
    ev32 = spectra.eigenvalues(torch.from_numpy(W), torch.float32)
    got = spectrum_metrics(ev32, 40, 70)
    x = ev32.double().numpy()
    assert got.frobenius_norm == pytest.approx(math.sqrt(math.fsum(x)), rel=1e-14)
    assert got.stable_rank == pytest.approx(math.fsum(x) / x[-1], rel=1e-14)
    p = x / math.fsum(x)
    assert got.entropy == pytest.approx(-np.sum(p * np.log(p)) / math.log(40), rel=1e-12)


@pytest.mark.parametrize("method", ["median", "fix_finger", "ks"])
def test_weighted_alpha_takes_the_named_fit(method):
    """alpha_weighted = alpha log10(lambda_max) and log_alpha_norm = log10(sum x^alpha), with
    alpha from the ``weighted_alpha`` fit."""
    W = planted(50, 80, 3)
    ev = spectra.eigenvalues(torch.from_numpy(W))
    got = spectrum_metrics(ev, 50, 80, weighted_alpha=method)
    alpha = got.fit(method).alpha
    x = ref.nonzero(ref.evals(W))
    assert got.alpha_weighted == pytest.approx(alpha * math.log10(x[-1]), rel=1e-12)
    assert got.log_alpha_norm == pytest.approx(math.log10(np.sum(x**alpha)), rel=1e-12)
    with pytest.raises(ValueError, match="unknown alpha method 'hill'"):
        got.fit("hill")


@pytest.mark.parametrize(("sigma_fit", "q"), [("mean", 0.99), ("median", 0.95), ("mean", 0.95)])
def test_mp_settings_reach_the_spike_count(sigma_fit, q):
    W = planted(40, 90, 4)
    got = spectrum_metrics(spectra.eigenvalues(torch.from_numpy(W)), 40, 90,
                           sigma_fit=sigma_fit, tw_quantile=q).spikes  # fmt: skip
    expected = ref.spikes(ref.evals(W), 40, 90, q=q, sigma_fit=sigma_fit, exact_tw=True)
    for name in ("sigma_mp", "bulk_max", "tw_threshold"):
        assert getattr(got, name) == pytest.approx(expected[name], rel=1e-9), name
    assert got.num_spikes == expected["num_spikes"]


# ---------------------------------------------------------- spectrum_metrics, hand-made spectra


def spectrum(*values: float) -> torch.Tensor:
    return torch.tensor(sorted(values), dtype=torch.float64)


def test_all_zero_spectrum_is_the_zero_record():
    """lambda_max = 0: norms 0, logs NaN, nothing fitted ("zero"), no spikes, ranks 0."""
    got = spectrum_metrics(torch.zeros(12, dtype=torch.float64), 12, 20)
    for method in ("median", "fix_finger", "ks"):
        fit = got.fit(method)
        assert fit.status == "zero" and fit.num_tail == 0
        assert math.isnan(fit.alpha) and math.isnan(fit.xmin) and math.isnan(fit.D)
    assert got.fit_status is None
    s = got.spikes
    assert math.isnan(s.sigma_mp) and math.isnan(s.bulk_max) and math.isnan(s.tw_threshold)
    assert s.num_spikes == 0 and s.num_spikes_bulk == 0 and math.isnan(s.mp_softrank)
    assert got.lambda_max == 0.0 and got.spectral_norm == 0.0 and got.frobenius_norm == 0.0
    for name in ("log_spectral_norm", "log_norm", "stable_rank", "alpha_weighted",
                 "log_alpha_norm", "entropy"):  # fmt: skip
        assert math.isnan(getattr(got, name)), name
    assert got.matrix_rank == 0 and got.num_nonzero == 0
    for value in (got.lambda_max, got.spectral_norm, got.frobenius_norm):
        assert type(value) is float
    assert type(got.matrix_rank) is int and type(got.num_nonzero) is int


def test_a_spectrum_below_one_is_measured_not_zero():
    """lambda_max = 0.5 (any positive value) is a measured spectrum, not the zero record."""
    ev = spectrum(*np.linspace(0.01, 0.5, 20))
    got = spectrum_metrics(ev, 20, 30)
    assert got.fit_status == "ok" and got.lambda_max == 0.5
    assert got.stable_rank == pytest.approx(float(ev.sum()) / 0.5, rel=1e-14)
    assert got.frobenius_norm == pytest.approx(math.sqrt(float(ev.sum())), rel=1e-14)


def test_nonzero_set_is_strictly_above_the_threshold():
    """Eigenvalues equal to eig_threshold are left out ("above eig_threshold")."""
    ev = spectrum(0.25, 0.5, 0.5, 1, 2, 3, 4, 5, 7, 9, 12, 20)
    got = spectrum_metrics(ev, 12, 20, eig_threshold=0.5)
    assert got.num_nonzero == 9
    assert got.median.xmin == 5.0  # x = [1, 2, ..., 20], i = 9 // 2 = 4


def test_one_eigenvalue_above_the_threshold_is_the_whole_nonzero_set():
    """One eigenvalue above eig_threshold: the nonzero set is that one (no fit possible; its
    entropy is 0), not every positive eigenvalue."""
    ev = spectrum(*([1e-7] * 11), 3.0)
    got = spectrum_metrics(ev, 12, 20)
    assert got.num_nonzero == 1 and got.entropy == 0.0
    assert got.fit_status == "median:too_few;fix_finger:too_few;ks:too_few"


def test_all_below_the_threshold_uses_every_positive_eigenvalue():
    """No eigenvalue above eig_threshold: the fits use the positive ones, zeros excluded."""
    values = [0.0, 0.0, 0.0] + [float(v) for v in np.geomspace(1e-9, 1e-6, 9)]
    got = spectrum_metrics(spectrum(*values), 12, 20)
    x = np.array(sorted(values[3:]))
    assert got.num_nonzero == 9
    assert got.median.alpha == pytest.approx(ref.alpha_median(x)[0], rel=1e-12)
    assert got.entropy == pytest.approx(
        -np.sum(x / x.sum() * np.log(x / x.sum())) / math.log(9), rel=1e-12
    )


def test_two_nonzero_eigenvalues_have_an_entropy():
    got = spectrum_metrics(spectrum(*([0.0] * 10), 1.0, 3.0), 12, 20)
    p = np.array([0.25, 0.75])
    assert got.entropy == pytest.approx(-np.sum(p * np.log(p)) / math.log(2), rel=1e-14)


def test_failed_fits_are_named_in_fit_status():
    """Equal eigenvalues: no alpha > 1 exists for any rule; fit_status lists each, ';'."""
    got = spectrum_metrics(torch.full((12,), 2.0, dtype=torch.float64), 12, 20)
    assert got.fit_status == "median:no_candidate;fix_finger:no_candidate;ks:no_candidate"


def test_median_zero_is_flagged_at_the_numerical_zero_boundary():
    """method.md: the middle eigenvalue at most lambda_max N eps (numerically zero) leaves both
    spike counts empty with fit_status "mp:median_zero"; just above it counts spikes."""
    M, N, top = 12, 20, 4.0
    tol = top * N * EPS64
    low = [0.0] * 6 + [tol] * 2 + list(np.linspace(1.0, 3.0, 3))  # middle (index 6): tol
    at = spectrum_metrics(spectrum(*low, top), M, N)
    assert at.spikes.num_spikes is None and at.spikes.num_spikes_bulk is None
    assert at.fit_status == "mp:median_zero"
    assert at.matrix_rank == 4  # lambda > tol only: the three in [1, 3] and the top one
    above = [0.0] * 6 + [2 * tol] * 2 + list(np.linspace(1.0, 3.0, 3))
    got = spectrum_metrics(spectrum(*above, top), M, N)
    assert got.fit_status == "ok" and got.spikes.num_spikes is not None
    assert got.matrix_rank == 6


def test_a_third_of_zeros_is_not_median_zero():
    """Zeros below the middle (5 of 12) do not make the median zero."""
    values = [0.0] * 5 + list(np.geomspace(0.1, 5, 7))
    got = spectrum_metrics(spectrum(*values), 12, 20)
    assert "mp:median_zero" not in got.fit_status and got.spikes.num_spikes is not None


def test_matrix_rank_counts_above_lambda_max_n_eps():
    """matrix_rank = #{lambda > lambda_max N eps}: an eigenvalue between lambda_max eps / N and
    lambda_max N eps is not counted."""
    top, N = 1.0, 1000
    values = [top * EPS64] * 3 + list(np.linspace(0.1, 0.9, 8)) + [top]
    got = spectrum_metrics(spectrum(*values), 12, N)
    assert got.matrix_rank == 9


# ----------------------------------------------------------------------------- power-law fits


def test_failed_fit_record():
    fit = PowerLawFit.failed("why")
    assert math.isnan(fit.alpha) and math.isnan(fit.xmin) and math.isnan(fit.D)
    assert fit.num_tail == 0 and fit.status == "why"


def test_median_fit_needs_three_eigenvalues():
    """n = 3 fits (i = 1, tail of 2); n = 2 is "too_few"."""
    fit = fit_median(spectrum(1.0, 2.0, 5.0))
    alpha, xmin, D = ref.alpha_median(np.array([1.0, 2.0, 5.0]))
    assert fit.status == "ok" and fit.num_tail == 2 and fit.xmin == xmin == 2.0
    assert math.isclose(fit.alpha, alpha, rel_tol=1e-14) and math.isclose(fit.D, D, rel_tol=1e-14)
    short = fit_median(spectrum(1.0, 2.0))
    assert short.status == "too_few" and math.isnan(short.alpha)
    assert fit_fix_finger(spectrum(1.0)).status == "too_few"


def test_fits_with_an_infinite_top_are_no_candidate():
    """An infinite eigenvalue makes every Hill sum infinite, alpha exactly 1: not > 1, no fit."""
    for fit in (
        fit_median(spectrum(1.0, 2.0, math.inf)),
        powerlaw.fit_ks(spectrum(1.0, 2.0, math.inf)),
    ):
        assert fit.status == "no_candidate" and math.isnan(fit.alpha)


def test_hill_alphas_of_float32_eigenvalues_are_float64():
    x = np.sort(np.random.default_rng(14).chisquare(3, 120)).astype(np.float32)
    got = powerlaw.hill_alphas(torch.from_numpy(x))
    assert got.dtype == torch.float64
    expected = [ref.hill(x.astype(np.float64), i)[0] for i in range(len(x) - 1)]
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12)


def test_ks_distances_of_float32_eigenvalues_are_float64():
    """D is computed in float64 whatever the eigenvalues' precision."""
    x = np.sort(np.random.default_rng(12).chisquare(3, 200)).astype(np.float32)
    x64 = torch.from_numpy(x.astype(np.float64))
    alphas = powerlaw.hill_alphas(x64)
    candidates = torch.arange(0, 199, 7)
    got = powerlaw.ks_distances(torch.from_numpy(x), alphas, candidates)
    assert got.dtype == torch.float64
    np.testing.assert_allclose(got.numpy(), powerlaw.ks_distances(x64, alphas, candidates).numpy(),
                               rtol=1e-13)  # fmt: skip
    expected = [ref.hill(x.astype(np.float64), int(i))[1] for i in candidates]
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-10)


@pytest.mark.parametrize("edge", [0.95, 1.5])
def test_fix_finger_window_includes_both_ends(monkeypatch, edge):
    """Candidates are x_i in [0.95 peak, 1.5 peak], both ends included: with the peak at 1 and
    one eigenvalue exactly at an end, it is the fit's xmin."""
    monkeypatch.setattr(powerlaw, "fix_finger_peak", lambda x: 1.0)
    x = np.array([0.1, edge, 3.0, 5.0, 9.0, 20.0])
    fit = fit_fix_finger(torch.from_numpy(x))
    assert fit.status == "ok" and fit.xmin == edge and fit.num_tail == 5
    assert fit.alpha == pytest.approx(ref.hill(x, 1)[0], rel=1e-14)


def test_fix_finger_fits_two_eigenvalues():
    """n = 2 is enough: the peak is the smaller one (first fullest bin), the tail both."""
    x = np.array([1.0, 3.0])
    fit = fit_fix_finger(torch.from_numpy(x))
    alpha, xmin, D = ref.alpha_fix_finger(x)
    assert fit.status == "ok" and fit.num_tail == 2 and fit.xmin == xmin == 1.0
    assert math.isclose(fit.alpha, alpha, rel_tol=1e-14) and math.isclose(fit.D, D, rel_tol=1e-14)


def test_fix_finger_window_is_applied_in_float64(monkeypatch):
    """float32 eigenvalues are compared with the window in float64: float32(0.95) =
    0.94999999 lies below 0.95 peak, so with the peak at 1 nothing is a candidate."""
    monkeypatch.setattr(powerlaw, "fix_finger_peak", lambda x: 1.0)
    x = torch.tensor([0.1, 0.95, 3.0, 5.0, 9.0, 20.0], dtype=torch.float32)
    assert fit_fix_finger(x).status == "no_candidate"
    assert fit_fix_finger(x.double()).status == "no_candidate"  # same values, same answer


def test_fix_finger_never_takes_the_top_eigenvalue_alone(monkeypatch):
    """The last eigenvalue is no candidate (a tail of one has no spread)."""
    monkeypatch.setattr(powerlaw, "fix_finger_peak", lambda x: 20.0)
    fit = fit_fix_finger(spectrum(0.1, 3.0, 5.0, 9.0, 20.0))
    assert fit.status == "no_candidate"


def _numpy_peak(x: np.ndarray) -> float:
    counts, edges = np.histogram(np.log10(x), bins=100)
    return float(10 ** edges[np.argmax(counts)])


@pytest.mark.parametrize("seed", range(6))
def test_fix_finger_peak_equals_numpy_histogram(seed):
    rng = np.random.default_rng(seed)
    x = np.sort(np.concatenate([rng.chisquare(2 + seed, 200), rng.pareto(2, 30) + 1]) * 10**seed)
    assert powerlaw.fix_finger_peak(torch.from_numpy(x)) == _numpy_peak(x)


def test_fix_finger_peak_on_bin_edges_and_in_the_last_bin():
    """Values exactly on the bin edges (log10 x = 0, 1, ..., 100) fall in the bin they open;
    the maximum falls in the last bin, which is then the fullest (99 and 100)."""
    x = torch.tensor([10.0**k for k in range(101)], dtype=torch.float64)
    assert powerlaw.fix_finger_peak(x) == pytest.approx(1e99, rel=1e-14)
    assert _numpy_peak(x.numpy()) == pytest.approx(1e99, rel=1e-14)
    y = torch.tensor([3.0, 3.0, 7.0] * 4, dtype=torch.float64).sort().values
    assert powerlaw.fix_finger_peak(y) == pytest.approx(_numpy_peak(y.numpy()), rel=1e-15)


def test_fix_finger_peak_of_equal_values_is_that_value():
    assert powerlaw.fix_finger_peak(torch.full((7,), 2.5, dtype=torch.float64)) == pytest.approx(
        2.5, rel=1e-15
    )


def test_fix_finger_peak_is_float64_whatever_the_input():
    """float32 eigenvalues are binned in float64 (the same bins as the float64 values)."""
    rng = np.random.default_rng(11)
    x = np.sort(rng.chisquare(3, 300)).astype(np.float32)
    assert powerlaw.fix_finger_peak(torch.from_numpy(x)) == _numpy_peak(x.astype(np.float64))


# ----------------------------------------------------------------- Marchenko-Pastur and spectra


@pytest.mark.parametrize(("M", "N", "sigma"), [(50, 50, 1.0), (30, 120, 0.1), (10, 1000, 3.0)])
def test_mp_density_is_the_spec_density_on_the_lambda_scale(M, N, sigma):
    """p(lambda) = p_std(x) / (N sigma^2), x = lambda / (N sigma^2), zero outside [a, b];
    it integrates to one."""
    from scipy import integrate

    y = M / N
    a, b = (1 - math.sqrt(y)) ** 2, (1 + math.sqrt(y)) ** 2
    scale = N * sigma**2
    lam = np.linspace(0, 1.2 * b * scale, 500)
    x = lam / scale
    inside = (x > a) & (x < b)
    expected = np.zeros_like(x)
    expected[inside] = np.sqrt((b - x[inside]) * (x[inside] - a)) / (2 * math.pi * y * x[inside])
    expected /= scale
    np.testing.assert_allclose(mp.mp_density(lam, sigma, M, N), expected, rtol=1e-12, atol=0)
    total = integrate.quad(lambda v: mp.mp_density(np.array([v]), sigma, M, N)[0],
                           a * scale, b * scale, limit=200)[0]  # fmt: skip
    assert total == pytest.approx(1.0, abs=1e-6)
    outside = np.array([0.0, 0.5 * a * scale, 1.01 * b * scale, 3 * b * scale])
    assert mp.mp_density(outside, sigma, M, N).tolist() == [0.0] * 4


def test_mp_density_computes_in_float64():
    lam32 = np.linspace(0.1, 3.0, 50, dtype=np.float32)
    got = mp.mp_density(lam32, 0.05, 30, 120)
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, mp.mp_density(lam32.astype(np.float64), 0.05, 30, 120),
                               rtol=1e-15)  # fmt: skip


def test_count_spikes_on_the_smallest_matrix_and_its_refusals():
    """N = 2 is enough for the MP fit (a 2 x 2 matrix); N = 1 and an unknown fit are refused
    with their messages."""
    W = np.array([[2.0, 0.5], [0.3, 1.0]])
    got = mp.count_spikes(torch.from_numpy(ref.evals(W)), 2, 2)
    expected = ref.spikes(ref.evals(W), 2, 2, exact_tw=True)
    assert got.sigma_mp == pytest.approx(expected["sigma_mp"], rel=1e-9)
    assert got.tw_threshold == pytest.approx(expected["tw_threshold"], rel=1e-9)
    with pytest.raises(ValueError, match=r"^MP fit needs N >= 2$"):
        mp.count_spikes(torch.tensor([1.0], dtype=torch.float64), 1, 1)
    with pytest.raises(ValueError, match=r"^unknown sigma fit 'mode' \(median or mean\)$"):
        mp.count_spikes(torch.from_numpy(ref.evals(W)), 2, 2, sigma_fit="mode")


@pytest.mark.parametrize("sigma_fit", ["median", "mean"])
def test_count_spikes_upcasts_float32_eigenvalues(sigma_fit):
    ev32 = spectra.eigenvalues(torch.from_numpy(planted(41, 90, 6)), torch.float32)
    got = mp.count_spikes(ev32, 41, 90, sigma_fit=sigma_fit)
    expected = mp.count_spikes(ev32.double(), 41, 90, sigma_fit=sigma_fit)
    assert got.sigma_mp == pytest.approx(expected.sigma_mp, rel=1e-14)
    x = ev32.double().numpy() / 90
    sigma2 = np.median(x) / ref.mp_median(41 / 90) if sigma_fit == "median" else math.fsum(x) / 41
    assert got.sigma_mp == pytest.approx(math.sqrt(sigma2), rel=1e-12)


def _spectrum_with_top_at(threshold: str) -> tuple[torch.Tensor, float]:
    """A spectrum whose largest eigenvalue lambda satisfies lambda / N == the named threshold
    (mu_tw or mu_plus) exactly; the rest (and so the median) fixed."""
    M, N = 20, 40
    base = np.linspace(1.0, 2.0, M)
    first = mp.count_spikes(torch.from_numpy(base), M, N)
    value = first.tw_threshold if threshold == "tw" else first.bulk_max
    target = value / N
    for candidate in (value, *np.nextafter(value, [0.0, np.inf])):
        for nudge in range(-4, 5):
            v = float(candidate) + nudge * np.spacing(candidate)
            if v / N == target:
                return torch.from_numpy(np.append(base[:-1], v)), v
    pytest.skip("no float lands exactly on the threshold")


@pytest.mark.parametrize("threshold", ["tw", "bulk"])
def test_an_eigenvalue_on_a_threshold_is_not_a_spike(threshold):
    """num_spikes counts mu > mu_tw and num_spikes_bulk mu > mu_plus: strictly above."""
    ev, v = _spectrum_with_top_at(threshold)
    got = mp.count_spikes(ev, 20, 40)
    edge = got.tw_threshold if threshold == "tw" else got.bulk_max
    assert v / 40 == edge / 40
    counted = got.num_spikes if threshold == "tw" else got.num_spikes_bulk
    assert counted == int((ev.numpy()[:-1] > edge).sum())


def test_mp_softrank_of_a_zero_and_of_a_small_spectrum():
    """bulk_max / lambda_max, NaN when lambda_max is 0 (not a division by zero)."""
    zero = mp.count_spikes(torch.zeros(10, dtype=torch.float64), 10, 20)
    assert math.isnan(zero.mp_softrank) and zero.num_spikes == 0
    small = mp.count_spikes(torch.linspace(0.05, 0.5, 10, dtype=torch.float64), 10, 20)
    assert small.mp_softrank == pytest.approx(small.bulk_max / 0.5, rel=1e-14)


def test_mp_cdf_reaches_one_at_the_right_edge():
    for y in (1.0, 0.5, 0.1):
        assert mp._mp_cdf_theta(math.pi, y) == pytest.approx(1.0, abs=1e-12)
        if y < 1:  # at y = 1 the density's pole sits at theta = 0
            assert mp._mp_cdf_theta(0.0, y) == 0.0


def test_tw1_cdf_values():
    """F1 at its published quantiles (Johnstone 2001: 0.95 -> 0.9793, 0.99 -> 2.0234) and the
    oracle's Painleve II F1 elsewhere."""
    assert mp._tw1_cdf(0.9793) == pytest.approx(0.95, abs=2e-5)
    assert mp._tw1_cdf(2.0234) == pytest.approx(0.99, abs=2e-5)
    for s in (-3.0, -1.0, 0.45):
        assert mp._tw1_cdf(s) == pytest.approx(ref.tw1_cdf(s), abs=1e-9)


@pytest.mark.parametrize(
    ("shape", "view"),
    [
        ((7, 11), spectra.MatrixView(7, 11, 1, False)),
        ((3, 7, 11), spectra.MatrixView(7, 11, 3, False)),
        ((13, 7, 3, 5), spectra.MatrixView(13, 7, 15, True)),
        ((7,), None),
        ((), None),
        ((2, 3, 5, 7, 11), None),
    ],
)
def test_matrix_view_of_each_shape(shape, view):
    assert spectra.matrix_view(shape) == view


def test_matrices_of_a_5d_tensor_is_refused():
    with pytest.raises(ValueError, match="no matrix view for a 5-D tensor"):
        spectra.matrices_of(torch.zeros(2, 2, 2, 2, 2))


def test_spectrum_of_a_matrix_is_its_float64_eigenvalues_unscaled():
    """spectrum() of one 2-D matrix: float64 squared singular values, no conv_norm."""
    W = np.random.default_rng(5).standard_normal((20, 33))
    for got in (spectra.spectrum(torch.from_numpy(W)),
                spectra.checked_spectrum(torch.from_numpy(W))[0]):  # fmt: skip
        assert got.dtype == torch.float64
        np.testing.assert_allclose(got.numpy(), ref.evals(W), rtol=1e-12)


def test_spectrum_of_float32_weights_is_float64_by_default():
    """The default precision is float64 (Gram route) whatever the weights' dtype; asking for
    float32 gives float32 eigenvalues."""
    W = np.random.default_rng(8).standard_normal((20, 33)).astype(np.float32)
    expected = ref.evals(W.astype(np.float64))
    for got in (spectra.spectrum(torch.from_numpy(W)),
                spectra.checked_spectrum(torch.from_numpy(W))[0]):  # fmt: skip
        assert got.dtype == torch.float64
        np.testing.assert_allclose(got.numpy(), expected, rtol=1e-10)
    low, finite = spectra.checked_spectrum(torch.from_numpy(W).double(), torch.float32)
    assert low.dtype == torch.float32 and finite is True
    np.testing.assert_allclose(low.double().numpy(), expected, rtol=1e-4)


def test_float32_path_squares_singular_values_not_a_gram_matrix():
    """float32: squared float32 singular values, relative error about 2e-7 sqrt(lambda_max /
    lambda): within 2e-3 down to lambda = 1e-7 lambda_max. A float32 Gram matrix (absolute
    error about 1e-7 lambda_max) would miss the smallest by 100%; float64 is exact."""
    rng = np.random.default_rng(19)
    U, _ = np.linalg.qr(rng.standard_normal((20, 20)))
    V, _ = np.linalg.qr(rng.standard_normal((48, 20)))
    W = U @ np.diag(np.logspace(0, -3.5, 20)) @ V.T
    expected = ref.evals(W)
    for dtype, rtol in ((torch.float32, 2e-3), (torch.float64, 1e-9)):
        got, finite = spectra.checked_eigenvalues(torch.from_numpy(W).to(dtype), dtype)
        assert got.dtype == dtype and bool(finite)
        np.testing.assert_allclose(got.double().numpy(), expected, rtol=rtol)


def test_spectrum_of_a_conv_batch_uses_the_given_conv_norm():
    conv = torch.from_numpy(np.random.default_rng(6).standard_normal((12, 10, 2, 2)))
    (batch,) = spectra.matrices_of(conv)
    pooled = np.sort(np.concatenate([ref.evals(conv[:, :, i, j].numpy())
                                     for i in range(2) for j in range(2)]))  # fmt: skip
    for conv_norm in (0.25, 1.0):
        got = spectra.spectrum(batch, conv_norm=conv_norm)
        assert got.dtype == torch.float64
        np.testing.assert_allclose(got.numpy(), conv_norm * pooled, rtol=1e-12)
        got, finite = spectra.checked_spectrum(batch, torch.float64, conv_norm)
        np.testing.assert_allclose(got.numpy(), conv_norm * pooled, rtol=1e-12)
        assert finite is True


def test_float64_weights_outside_the_safe_range_keep_exact_eigenvalues():
    """float64 weights whose squares leave float64's safe range (entries 2^400, 2^450, 2^-500)
    are computed on W 2^-e and scaled back by 2^2e: the eigenvalues of the matrix as stored,
    the oracle's times the exact power of two. An all-zero matrix in the same batch stays
    zero; all are finite. An Inf entry flags its own matrix only."""
    rng = np.random.default_rng(13)
    G = rng.standard_normal((5, 12, 20))
    scales = [1.0, 2.0**400, 0.0, 2.0**-500, 2.0**450]
    W = torch.from_numpy(G * np.array(scales)[:, None, None])
    evals, finite = spectra.checked_eigenvalues(W)
    assert finite.tolist() == [True] * 5 and evals.dtype == torch.float64
    for k, scale in enumerate(scales):
        expected = ref.evals(G[k]) * scale**2
        np.testing.assert_allclose(evals[k].numpy(), expected, rtol=1e-10, atol=0)
    assert evals[2].tolist() == [0.0] * 12
    inf = W.clone()
    inf[3, 0, 0] = math.inf
    evals, finite = spectra.checked_eigenvalues(inf)
    assert finite.tolist() == [True, True, True, False, True]
    assert evals[3].tolist() == [0.0] * 12
    np.testing.assert_allclose(evals[4].numpy(), ref.evals(G[4]) * 2.0**900, rtol=1e-10)


def test_float64_weights_whose_squares_overflow_are_finite_with_infinite_eigenvalues():
    """Entries of 2^515 are finite but their squares are not: the matrix is finite (read from
    the data), its eigenvalues +inf where float64 cannot hold them, behind an all-zero matrix
    in the same batch (each odd matrix is redone, not only the first)."""
    rng = np.random.default_rng(15)
    W = torch.from_numpy(np.stack([np.zeros((12, 20)), rng.standard_normal((12, 20)) * 2.0**515]))
    evals, finite = spectra.checked_eigenvalues(W)
    assert finite.tolist() == [True, True]
    assert evals[0].tolist() == [0.0] * 12
    assert math.isinf(float(evals[1, -1]))


@pytest.mark.parametrize(
    ("peak", "dtype"),
    [(2.0**60, torch.float32), (2.0**-60, torch.float32),
     (2.0**61, torch.float64), (2.0**-61, torch.float64)],
)  # fmt: skip
def test_float32_is_used_only_where_its_squares_fit(peak, dtype):
    """float64 weights on the float32 path: max |w| within [2^-60, 2^60] (both ends included)
    stays float32; beyond, the float64 route takes over (its squares would leave float32)."""
    G = np.random.default_rng(16).standard_normal((12, 20))
    W = G / np.abs(G).max() * peak
    evals, finite = spectra.checked_eigenvalues(torch.from_numpy(W), torch.float32)
    assert evals.dtype == dtype and bool(finite)
    np.testing.assert_allclose(evals.double().numpy(), ref.evals(W), rtol=1e-4)


def test_eigenvalues_whose_every_product_underflows_are_recovered():
    """Entries of +-2^-538: each product w_ik w_jk (2^-1076) rounds to 0 in float64, so a
    plain Gram matrix is 0, yet the eigenvalues (about 1000 2^-1076, subnormal) exist: the
    rescaled route finds them, for that matrix of the batch alone."""
    rng = np.random.default_rng(18)
    normal = rng.standard_normal((12, 1000))
    signs = rng.choice([-1.0, 1.0], size=(12, 1000))
    W = torch.from_numpy(np.stack([normal, signs * 2.0**-538]))
    evals, finite = spectra.checked_eigenvalues(W)
    assert finite.tolist() == [True, True]
    np.testing.assert_allclose(evals[0].numpy(), ref.evals(normal), rtol=1e-10)
    np.testing.assert_allclose(evals[1].numpy(), np.ldexp(ref.evals(signs), -1076), rtol=1e-2)
    assert float(evals[1, 0]) > 0


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_nonfinite_matrices_get_zero_eigenvalues(dtype):
    """On either path (float32 weights on the float32 one, which they reach unchanged)."""
    W = torch.randn(3, 12, 20, dtype=dtype)
    W[1, 2, 3] = math.nan
    evals, finite = spectra.checked_eigenvalues(W, dtype)
    assert finite.tolist() == [True, False, True]
    assert evals[1].tolist() == [0.0] * 12


@pytest.mark.parametrize("shape", [(3, 20, 50), (3, 50, 20)])
def test_blocked_gram_of_a_batch_equals_the_oracle(monkeypatch, shape):
    """A batch of wide or tall matrices summed in blocks of a few columns (rows) each."""
    monkeypatch.setattr(spectra, "_GRAM_BLOCK_ELEMENTS", 20 * 3 * 7)
    W = np.random.default_rng(17).standard_normal(shape)
    got = spectra.eigenvalues(torch.from_numpy(W))
    for k in range(3):
        np.testing.assert_allclose(got[k].numpy(), ref.evals(W[k]), rtol=1e-10)


def test_tall_bfloat16_is_upcast_block_by_block():
    W = torch.randn(96, 64).to(torch.bfloat16)
    expected = ref.evals(W.double().numpy())
    np.testing.assert_allclose(spectra.eigenvalues(W).numpy(), expected, rtol=1e-10)


def test_auto_dtype_asks_about_the_given_device(monkeypatch):
    """Two GPUs of different kinds: each device's own capability decides."""
    capability = {1: (9, 0), 0: (8, 6)}
    monkeypatch.setattr(torch.cuda, "get_device_capability",
                        lambda d: capability[torch.device(d).index or 0])  # fmt: skip
    assert spectra.auto_dtype(torch.device("cuda:1")) == torch.float64
    assert spectra.auto_dtype(torch.device("cuda:0")) == torch.float32


# --------------------------------------------------------------------------- rank allocation


@pytest.fixture(scope="module")
def small_table(tmp_path_factory):
    """A real metrics table of a small checkpoint: ten block linears (q_proj / up_proj of five
    layers, 72 x 120 and 120 x 72: both sides above the largest rank, each with its own planted
    spectrum), one norm vector and one 3-D expert tensor, analysed by esdtool in float64."""
    from esdtool import analyze, load_metrics
    from helpers import write_tensors

    rng = np.random.default_rng(3)
    tensors = {}
    for layer in range(5):
        for proj, shape in (("self_attn.q_proj", (72, 120)), ("mlp.up_proj", (120, 72))):
            w = rng.standard_normal(shape)
            w += (2 + layer) * np.outer(
                rng.standard_normal(shape[0]), rng.standard_normal(shape[1])
            )
            w[:, : 1 + layer] *= 1 + 3 * layer
            tensors[f"model.layers.{layer}.{proj}.weight"] = (0.02 * w).astype("f4")
    tensors["model.layers.0.input_layernorm.weight"] = np.ones(72, "f4")
    tensors["model.layers.0.mlp.experts.down"] = rng.standard_normal((2, 24, 40)).astype("f4")
    work = tmp_path_factory.mktemp("small")
    path = write_tensors(work / "small.safetensors", tensors)
    return load_metrics(analyze(path, work / "m.parquet").output)


def _spec_scores(table, alpha_column="alpha_median", spikes_column="num_spikes", w=(0.7, 0.3)):
    alpha = table[alpha_column].to_numpy(float)
    spikes = table[spikes_column].to_numpy(float)
    a = (alpha - alpha.min()) / (alpha.max() - alpha.min() + 1e-8)
    b = 1 - (spikes - spikes.min()) / (spikes.max() - spikes.min() + 1e-8)
    return w[0] * a + w[1] * b


def test_allocation_table_columns_and_types(small_table):
    """Allocation.table: the documented columns in order, one row per 2-D block linear, with
    integer sizes, spike counts, ranks and parameters; the spec's scores."""
    allocation = allocate_ranks(small_table)
    table = allocation.table
    assert list(table.columns) == ["module", "rows", "cols", "alpha", "spikes", "score",
                                   "selected", "rank", "lora_alpha", "params"]  # fmt: skip
    linears = small_table[(small_table.role == "linear") & (small_table.status == "ok")]
    assert list(table.module) == list(linears.module) and len(table) == 10
    for column in ("rows", "cols", "spikes", "rank", "params"):
        assert table[column].dtype.kind == "i", column
    assert table.score.dtype == np.float64 and table.selected.dtype == bool
    np.testing.assert_array_equal(table.alpha, linears.alpha_median.to_numpy(float))
    np.testing.assert_array_equal(table.spikes, linears.num_spikes.to_numpy(int))
    np.testing.assert_allclose(table.score, _spec_scores(linears), rtol=1e-14, atol=1e-15)
    kept = table[table.selected]
    assert len(kept) == 5 and kept["rank"].min() == 4 and kept["rank"].max() == 64
    np.testing.assert_array_equal(table.params, table["rank"] * (table.rows + table.cols))
    np.testing.assert_array_equal(table.lora_alpha, 2.0 * table["rank"])
    assert allocation.budget is None and allocation.notes == []


def test_scores_on_narrow_ranges_keep_the_spec_epsilon():
    """The 1e-8 in each denominator is added (not subtracted), and spikes are shifted by
    their minimum: visible when the ranges are small."""
    alpha = np.array([1.0, 1.0 + 1e-6, 1.0 + 2e-6])
    spikes = np.array([3.0, 4.0, 5.0])
    got = ranks.scores(alpha, spikes, 0.7, 0.3)
    a = (alpha - alpha[0]) / (alpha[2] - alpha[0] + 1e-8)  # range 2e-6: 1e-8 is 0.5% of it
    b = 1 - (spikes - 3.0) / (2.0 + 1e-8)
    np.testing.assert_allclose(got, 0.7 * a + 0.3 * b, rtol=1e-12)


def test_interpolated_ranks_are_integers_between_the_bounds():
    settings = AllocateSettings(min_rank=4, max_rank=64)
    got = ranks.interpolate_ranks(np.array([0.1, 0.35, 0.6]), settings)
    assert got.dtype.kind == "i" and got.tolist() == [4, 34, 64]
    # Kept scores closer than 1e-8: the epsilon dominates the range and damps the spread.
    close = ranks.interpolate_ranks(np.array([0.5, 0.5 + 5e-9]), settings)
    assert close.tolist() == [4, 4 + round(60 * 5e-9 / (5e-9 + 1e-8))]
    assert ranks.interpolate_ranks(np.array([0.3, 0.3]), settings).tolist() == [4, 4]


def test_fit_budget_reaches_the_top_rank_from_rank_one():
    """Ranks of 1 can be scaled all the way to rmax (the bisection's upper end is rmax / 1)."""
    got = ranks.fit_budget(np.array([1, 1]), np.array([10, 10]), 64 * 20, 1, 64)
    assert got.dtype.kind == "i" and got.tolist() == [64, 64]


def test_fit_budget_never_goes_below_the_minimum_rank():
    got = ranks.fit_budget(np.array([8, 16]), np.array([10, 10]), 1, 4, 64)
    assert got.dtype.kind == "i" and got.tolist() == [4, 4]


@pytest.mark.parametrize(("budget", "expected"), [(61, 20), (62, 21)])
def test_fit_budget_picks_the_closest_total(budget, expected):
    """One module of size 3: totals step by 3 (60, 63); the closer one to the budget wins."""
    assert ranks.fit_budget(np.array([10]), np.array([3]), budget, 1, 64).tolist() == [expected]


def test_budget_settings_reach_the_plan(small_table):
    """--budget-params and --match-rank set Allocation.budget (match-rank: r0 sum(rows + cols)
    over all candidates) and the plan's total lands within 1%."""
    sizes = int((allocate_ranks(small_table).table[["rows", "cols"]].sum(axis=1)).sum())
    for settings, budget in ((AllocateSettings(budget_params=20000), 20000),
                             (AllocateSettings(match_rank=4), 4 * sizes)):  # fmt: skip
        allocation = allocate_ranks(small_table, settings)
        assert allocation.budget == budget
        assert allocation.total_params == pytest.approx(budget, rel=0.01)
        assert not allocation.notes
    tiny = allocate_ranks(small_table, AllocateSettings(budget_params=1))
    assert tiny.kept["rank"].tolist() == [4] * 5


def test_a_missed_budget_note_says_by_how_much(small_table):
    allocation = allocate_ranks(small_table, AllocateSettings(match_rank=64, max_rank=32))
    budget = 64 * int((allocation.table.rows + allocation.table.cols).sum())
    total = allocation.total_params
    assert total == 32 * int((allocation.kept.rows + allocation.kept.cols).sum())
    share = round(100 * (total / budget - 1))
    assert allocation.notes == [
        f"budget {budget:,} missed: the plan has {total:,} ({share:+d}%) because ranks stay "
        "within 4..32; widen --min-rank / --max-rank or keep more modules (--top-n-percentile)"
    ]


def test_at_least_one_module_is_kept(small_table):
    allocation = allocate_ranks(small_table, AllocateSettings(top_n_percentile=0.05))
    assert allocation.table.selected.sum() == 1
    assert allocation.kept["rank"].tolist() == [4]  # one kept score: rmin


def test_ties_go_to_the_module_listed_first():
    """40 candidates with equal alphas and spike counts: the first 20 listed are kept."""
    n = 40
    table = pd.DataFrame({
        "name": [f"model.layers.{i}.q_proj.weight" for i in range(n)],
        "module": [f"model.layers.{i}.q_proj" for i in range(n)],
        "slice": pd.array([None] * n, dtype="Int64"), "role": ["linear"] * n, "status": ["ok"] * n,
        "rows": [16] * n, "cols": [16] * n, "alpha_median": [2.0] * n,
        "num_spikes": pd.array([3] * n, dtype="Int64"),
    })  # fmt: skip
    table.loc[[5, 17, 33], "alpha_median"] = 2.5  # three clear winners, then ties
    kept = allocate_ranks(table).kept
    first_ties = [i for i in range(n) if i not in (5, 17, 33)][:17]
    assert list(kept.index) == sorted([5, 17, 33, *first_ties])


def test_candidates_are_analysed_unsliced_block_linears(small_table):
    """Only status ok, 2-D (no expert slice), role linear; with --targets, the regex picks
    by module name (a regex, not a literal) among the unsliced rows."""
    table = small_table.copy()
    table.loc[table.module == "model.layers.1.mlp.up_proj", "status"] = "error"
    allocation = allocate_ranks(table)
    assert "model.layers.1.mlp.up_proj" not in set(allocation.table.module)
    assert allocation.notes == [] and len(allocation.table) == 9
    experts = allocate_ranks(small_table, AllocateSettings(targets=r"experts|layers\.[01]\.mlp"))
    assert list(experts.table.module) == ["model.layers.0.mlp.up_proj",
                                          "model.layers.1.mlp.up_proj"]  # fmt: skip


def test_rows_without_alpha_or_spikes_are_noted_not_scored(small_table):
    table = small_table.copy()
    table.loc[table.module == "model.layers.2.mlp.up_proj", "alpha_median"] = np.nan
    table.loc[table.module == "model.layers.3.self_attn.q_proj", "num_spikes"] = pd.NA
    allocation = allocate_ranks(table)
    assert len(allocation.table) == 8 and np.isfinite(allocation.table.score).all()
    assert allocation.notes == [
        "model.layers.2.mlp.up_proj: no alpha_median or num_spikes; not a candidate",
        "model.layers.3.self_attn.q_proj: no alpha_median or num_spikes; not a candidate",
    ]


def test_two_tensors_of_one_module_name_both(small_table):
    table = pd.concat([small_table, small_table[small_table.module == "model.layers.4.mlp.up_proj"]
                      .assign(name="model.layers.4.mlp.up_proj")])  # fmt: skip
    with pytest.raises(OptionError) as info:
        allocate_ranks(table)
    assert str(info.value) == (
        "module 'model.layers.4.mlp.up_proj' comes from two tensors "
        "('model.layers.4.mlp.up_proj.weight', 'model.layers.4.mlp.up_proj'); "
        "pick one with --targets"
    )


@pytest.mark.parametrize(
    ("settings", "message"),
    [({}, "no candidate modules: no analysed matrix matches role 'linear'"),
     ({"targets": "nothing_here"},
      "no candidate modules: no analysed matrix matches --targets 'nothing_here'")],
)  # fmt: skip
def test_no_candidates_message(small_table, settings, message):
    table = small_table.assign(role="other") if not settings else small_table
    with pytest.raises(OptionError) as info:
        allocate_ranks(table, AllocateSettings(**settings))
    assert str(info.value) == message


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"top_n_percentile": 0}, "--top-n-percentile must lie in (0, 1], not 0"),
        ({"top_n_percentile": 1.01}, "--top-n-percentile must lie in (0, 1], not 1.01"),
        ({"min_rank": 0}, "--min-rank must be at least 1, not 0"),
        ({"min_rank": 9, "max_rank": 8}, "--min-rank 9 is larger than --max-rank 8"),
        ({"rank_scaling": "cube"}, "--rank-scaling must be one of linear, log, sqrt"),
        ({"select": "middle"}, "--select must be highest or lowest, not 'middle'"),
        ({"budget_params": 0}, "--budget-params must be at least 1, not 0"),
        ({"match_rank": 0}, "--match-rank must be at least 1, not 0"),
        ({"alpha_factor": 0}, "--alpha-factor must be"),
        ({"budget_params": 10, "match_rank": 2},
         "--budget-params and --match-rank are exclusive: give one"),
        ({"alpha_column": "alpha"},
         "--alpha-column must be one of alpha_median, alpha_fix_finger, alpha_ks, "
         "alpha_median_farms, alpha_fix_finger_farms, alpha_ks_farms, alpha_peak, not 'alpha'"),
        ({"spikes_column": "spikes"},
         "--spikes-column must be one of num_spikes, num_spikes_bulk, spikes_farms, not 'spikes'"),
        ({"targets": "(a"}, "--targets '(a' is not a"),
        ({"min_rank": 0, "select": "x"},
         "--min-rank must be at least 1, not 0; --select must be highest or lowest, not 'x'"),
    ],
)  # fmt: skip
def test_bad_settings_say_exactly_what_is_wrong(kwargs, message):
    with pytest.raises(OptionError) as info:
        AllocateSettings(**kwargs)
    assert str(info.value).startswith(message), str(info.value)
    if not message.endswith(("must be", "is not a")):
        assert str(info.value) == message


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"w_hill": -0.5}, "--w-hill must be a finite number >= 0, not -0.5"),
        ({"w_mp_spikes": math.inf}, "--w-mp-spikes must be a finite number >= 0, not inf"),
        ({"w_hill": math.nan}, "--w-hill must be a finite number >= 0, not nan"),
        ({"w_hill": 0, "w_mp_spikes": 0},
         "--w-hill and --w-mp-spikes are both 0: every score would tie"),
    ],
)  # fmt: skip
def test_bad_score_weights_are_named(kwargs, message):
    with pytest.raises(OptionError) as info:
        AllocateSettings(**kwargs)
    assert str(info.value) == message


@pytest.mark.parametrize("select", ["highest", "lowest"])
def test_rank_is_capped_at_the_smaller_side(small_table, select):
    """--max-rank 100 on matrices of 72 x 120: the top-scored kept module gets r = 72 =
    min(rows, cols), not 100, and a note says how many were capped, naming the first capped
    one (with --select lowest that is not the first candidate)."""
    allocation = allocate_ranks(small_table, AllocateSettings(max_rank=100, select=select))
    kept = allocation.kept
    top = kept.loc[kept.score.idxmax()]
    assert top["rank"] == 72 and kept["rank"].max() == 72
    capped = kept[kept["rank"] == 72]
    assert allocation.notes == [
        f"{len(capped)} module(s) capped at min(rows, cols), the most rank a LoRA update of "
        f"that matrix can have (e.g. {capped.module.iloc[0]})"
    ]
    assert not allocate_ranks(small_table).notes  # at 64 < 72 nothing is capped


def test_boundary_settings_are_accepted():
    AllocateSettings(w_hill=0, w_mp_spikes=1)
    AllocateSettings(w_hill=1, w_mp_spikes=1)
    AllocateSettings(top_n_percentile=1.0, min_rank=1, max_rank=1, alpha_factor=1e-9,
                     budget_params=1)  # fmt: skip
    AllocateSettings(match_rank=1, min_rank=5, max_rank=5, alpha_factor=0.5)
