"""Power-law fits against tests/oracle.py (a plain loop over candidates) and ground truth."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import oracle as ref
from esdtool.spectral import powerlaw
from esdtool.spectral.powerlaw import fit_fix_finger, fit_ks, fit_median, hill_alphas


def pareto_sample(n: int, alpha: float, seed: int) -> np.ndarray:
    """n iid draws of a Pareto law with density ~ x^-alpha above 1, sorted."""
    rng = np.random.default_rng(seed)
    return np.sort((1 - rng.random(n)) ** (-1 / (alpha - 1)))


@pytest.mark.parametrize("seed", range(5))
def test_fits_equal_reference_loop(seed):
    """Every rule's alpha, xmin and D equal the reference's straight-from-formula loop."""
    rng = np.random.default_rng(seed)
    x = np.sort(np.concatenate([rng.chisquare(3, 300), pareto_sample(100, 2.5, seed) * 5]))
    t = torch.from_numpy(x)
    for ours, theirs in (
        (fit_median(t), ref.alpha_median(x)),
        (fit_ks(t), ref.alpha_ks(x)),
        (fit_fix_finger(t), ref.alpha_fix_finger(x)),
    ):
        assert ours.status == "ok"
        np.testing.assert_allclose([ours.alpha, ours.xmin, ours.D], theirs, rtol=1e-10, atol=1e-12)


def test_hill_alphas_match_per_candidate_formula():
    x = pareto_sample(50, 3.0, 1)
    alphas = hill_alphas(torch.from_numpy(x)).numpy()
    expected = [ref.hill(x, i)[0] for i in range(len(x) - 1)]
    np.testing.assert_allclose(alphas, expected, rtol=1e-12)


def test_blocked_ks_search_equals_one_block(monkeypatch):
    """Forcing many small blocks gives the same KS fit as one big block."""
    x = torch.from_numpy(pareto_sample(700, 2.2, 3))
    whole = fit_ks(x)
    monkeypatch.setattr(powerlaw, "_KS_BLOCK_ELEMENTS", 700 * 7)  # 7 candidates per block
    assert fit_ks(x) == whole


@pytest.mark.parametrize("alpha", [2.0, 3.0, 4.5])
def test_pareto_tail_recovers_known_exponent(alpha):
    """Hill's MLE on a pure Pareto sample is consistent: the KS fit finds alpha within 5%
    (its standard error (alpha-1)/sqrt(n) is ~2% at n = 4000)."""
    fit = fit_ks(torch.from_numpy(pareto_sample(4000, alpha, 7)))
    assert fit.alpha == pytest.approx(alpha, rel=0.05)


def test_no_candidate_gives_nan_not_zero():
    """Equal eigenvalues have no spread: no alpha > 1 exists, so NaN with a status."""
    flat = torch.ones(20, dtype=torch.float64)
    for fit in (fit_median(flat), fit_ks(flat), fit_fix_finger(flat)):
        assert math.isnan(fit.alpha)
        assert fit.status == "no_candidate"
    assert fit_ks(torch.ones(1)).status == "too_few"


def _heavy(n: int, seed: int, tail: float, rounded: bool = False) -> np.ndarray:
    rng = np.random.default_rng(seed)
    bulk = (rng.normal(1.0, 0.3, int(n * 0.95))) ** 2
    x = np.sort(np.concatenate([bulk, 2 * rng.random(n - bulk.size) ** (-1 / tail)]))
    return np.round(x, 2) + 1e-3 if rounded else x  # rounding: ties among eigenvalues


@pytest.mark.parametrize("seed", range(6))
def test_pruned_ks_search_is_the_exhaustive_one(monkeypatch, seed):
    """The KS fit over many candidates prunes by a lower bound (a sqrt(n) grid of each tail)
    and computes D exactly only near the minimum. Forced on for small spectra, it must pick
    what the oracle's plain loop over every candidate picks: alpha, xmin and D, the smallest
    xmin among ties (rounded spectra have runs of equal eigenvalues)."""
    monkeypatch.setattr(powerlaw, "_EXHAUSTIVE", 0)  # every search pruned
    monkeypatch.setattr(powerlaw, "_PRUNED_BATCH", 3)  # many rounds of the stopping rule
    x = _heavy(400 + 97 * seed, seed, tail=1.5 + seed / 2, rounded=seed % 2 == 1)
    x = x[x > 0]
    fit = fit_ks(torch.tensor(x))
    alpha, xmin, D = ref.alpha_ks(x)
    assert (fit.alpha, fit.xmin, fit.D) == pytest.approx((alpha, xmin, D), rel=1e-12)


def test_pruned_ks_search_on_a_pooled_size_spectrum():
    """At 12,000 eigenvalues (a FARMS pool; above the exhaustive limit) the pruned search
    equals every candidate's D computed and the first minimum taken."""
    x = torch.tensor(_heavy(12_000, 7, tail=2.5))
    fit = fit_ks(x)
    alphas = hill_alphas(x)
    candidates = torch.arange(x.numel() - 1)
    candidates = candidates[torch.isfinite(alphas[candidates]) & (alphas[candidates] > 1)]
    D = powerlaw.ks_distances(x, alphas, candidates)
    best = int(torch.argmin(D))
    assert (fit.D, fit.xmin) == (float(D[best]), float(x[candidates[best]]))
    assert fit.alpha == float(alphas[candidates[best]])
