"""MP median, Tracy-Widom quantiles and spike counts: reference values and ground truth."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import oracle as ref
from esdtool.spectral.marchenko_pastur import count_spikes, mp_median, tw_quantile
from esdtool.spectral.spectra import eigenvalues


@pytest.mark.parametrize("y", [1.0, 0.75, 0.25, 1 / 3.5, 0.01])
def test_mp_median_equals_quadrature_of_the_density(y):
    """Gauss-Legendre in the angle variable vs scipy.quad on the density in x."""
    assert mp_median(y) == pytest.approx(ref.mp_median(y), rel=1e-9)


@pytest.mark.parametrize(("q", "t"), [(0.95, 0.9793), (0.99, 2.0234)])
def test_tw_quantiles_match_the_spec_table(q, t):
    """Fredholm-determinant TW1 quantiles vs the spec's (Johnstone's) four-digit values; the
    cached constants equal a fresh computation."""
    computed = tw_quantile(q, cached=False)
    assert computed == pytest.approx(t, abs=1e-4)
    assert tw_quantile(q) == pytest.approx(computed, abs=1e-10)


def test_iid_gaussian_has_no_spikes_in_98_of_100_draws():
    gen = torch.Generator().manual_seed(1234)
    spiky = 0
    for draw in range(100):
        rows, cols = (200, 500) if draw % 2 else (300, 300)
        W = torch.randn(rows, cols, generator=gen, dtype=torch.float64) * 0.02
        count = count_spikes(eigenvalues(W), min(rows, cols), max(rows, cols))
        spiky += count.num_spikes > 0
    assert spiky <= 2


@pytest.mark.parametrize("k", [1, 3, 6])
def test_planted_spikes_are_counted_exactly(k):
    """W = G + sum theta_i u_i v_i^T with theta_i at 2-4x the BBP threshold (M N)^(1/4)."""
    gen = torch.Generator().manual_seed(k)
    M, N = 256, 640
    G = torch.randn(M, N, generator=gen, dtype=torch.float64)
    U, _ = torch.linalg.qr(torch.randn(M, k, generator=gen, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(N, k, generator=gen, dtype=torch.float64))
    theta = (M * N) ** 0.25 * torch.linspace(2.0, 4.0, k, dtype=torch.float64)
    W = G + U @ torch.diag(theta) @ V.T
    count = count_spikes(eigenvalues(W), M, N)
    assert count.num_spikes == k
    assert count.sigma_mp == pytest.approx(1.0, rel=0.05)  # the median fit ignores spikes


def test_spike_count_matches_reference_on_tall_matrix():
    rng = np.random.default_rng(5)
    W = (
        rng.standard_normal((700, 150))
        + 8 * np.outer(rng.standard_normal(700), rng.standard_normal(150)) / 10
    )
    ours = count_spikes(eigenvalues(torch.from_numpy(W)), 150, 700)
    theirs = ref.spikes(ref.evals(W), 150, 700)
    assert ours.num_spikes == theirs["num_spikes"]
    assert ours.num_spikes_bulk == theirs["num_spikes_bulk"]
    assert ours.tw_threshold == pytest.approx(theirs["tw_threshold"], rel=1e-6)
    assert ours.bulk_max == pytest.approx(theirs["bulk_max"], rel=1e-9)
