"""Exact behaviour of AlphaPruning's ``alpha_peak`` (esdtool.spectral.peak) and of FARMS
(esdtool.spectral.farms) on inputs built so that one step decides the number: eigenvalues
exactly at the candidate window's bounds, a best candidate that only their quirky lower bound
admits, float64 input and another default dtype, the ``bins`` setting; FARMS' window batches,
devices, float32 path, fit settings and an overflowing eigenvalue. Expected values come from
tests/origin_alphapruning.py (their net_esd_estimator re-derived in numpy float32) or numpy,
never from esdtool. Written from `make mutation`'s survivors (docs/testing.md)."""

from __future__ import annotations

import contextlib
import math

import numpy as np
import origin_alphapruning as ap
import pytest
import torch
from test_exact_spectral import peak_spectra

from esdtool.spectral import farms
from esdtool.spectral.farms import farms_metrics, farms_spectrum
from esdtool.spectral.peak import alpha_peak
from helpers import torch_defaults

f32 = np.float32
log10_32, pow_32 = ap._rounded32(np.log10), ap._rounded32(np.power)


def power_law(x0: float, alpha: float, n: int) -> np.ndarray:
    """n quantiles of the power law of exponent alpha from x0: an exact sample, whose KS
    distance from the law is smallest when the whole of it is fitted."""
    return x0 * (1 - np.arange(n) / n) ** (-1 / (alpha - 1))


def their_xmin2(ev: np.ndarray) -> np.float32:
    """Their xmin2 = 10 ** (left edge of the fullest bin) of float32 ``ev``, in float32."""
    return pow_32(f32(10), ap._histc_peak_edge(log10_32(ev), f32)[1])


def their_fit(ev: np.ndarray) -> tuple[float, float, int]:
    return ap.alpha_peak_fit(ev.astype(float), "float32")


# ------------------------------------------------------------------- AlphaPruning's alpha_peak


@pytest.mark.parametrize("case", ["peak at the top", "power law from 1 under a cluster at 10"])
def test_alpha_peak_of_float64_eigenvalues_is_computed_in_float32(case):
    """float64 eigenvalues are rounded to float32 and every step runs in float32, as theirs:
    the same alpha as theirs on the rounded values, where float64 arithmetic would be 1e-4
    away."""
    ev = peak_spectra()[case]
    theirs = ap.alpha_peak(ev.astype(f32).astype(float), "float32")
    assert abs(ap.alpha_peak(ev, "float64") - theirs) > 3e-5 * theirs
    assert alpha_peak(torch.tensor(ev, dtype=torch.float64)) == pytest.approx(theirs, rel=3e-7)


def test_alpha_peak_histogram_has_the_bins_asked_for(monkeypatch):
    """bins=37: the histogram and its edges have 37 bins, and the alpha is theirs with 37 bins
    (5.07 on this Marchenko-Pastur spectrum, against 3.25 with their 100)."""
    ev = peak_spectra()["marchenko-pastur"].astype(f32)
    with_100 = ap.alpha_peak(ev.astype(float), "float32")
    monkeypatch.setattr(ap, "BINS", 37)
    theirs = ap.alpha_peak(ev.astype(float), "float32")
    assert abs(theirs - with_100) > 1
    assert alpha_peak(torch.tensor(ev), bins=37) == pytest.approx(theirs, rel=3e-7)


def test_alpha_peak_lower_bound_is_log10_of_095_xmin2():
    """A power law from 0.3 clipped at 2 (its top values piled up): the clip's bin is the
    fullest, xmin2 is about 2, and the best candidate is the law's start, 0.3, which their
    bound log10(0.95 xmin2) = 0.27 admits and log10(1.95 xmin2) = 0.58 would not."""
    ev = np.minimum(power_law(0.3, 2.5, 200), 2.0).astype(f32)
    xmin2 = float(their_xmin2(ev))
    alpha, _, chosen = their_fit(ev)
    assert 1.9 < xmin2 <= 2.0 and chosen == 0
    assert math.log10(0.95 * xmin2) <= ev[0] < math.log10(1.95 * xmin2)
    assert alpha_peak(torch.tensor(ev)) == pytest.approx(alpha, rel=3e-7)


def foreign(dtype: torch.dtype | None):
    """torch's own defaults (None), or ``dtype`` and a meta device as a session may have set."""
    return contextlib.nullcontext() if dtype is None else torch_defaults(dtype)


DEFAULTS = pytest.mark.parametrize("defaults", [None, torch.float16, torch.float64])


@DEFAULTS
def test_alpha_peak_candidate_exactly_at_the_lower_bound_is_tried(defaults):
    """An eigenvalue equal to xmin_min = log10(0.95 xmin2) (in float32) is a candidate, and here
    the best: the start of an exact power law, above one smaller value that fixes the histogram's
    range and below a clip at 2 that is its fullest bin."""
    lo_hi = np.array([0.1] + [2.0] * 5, dtype=f32)  # the range and the fullest bin, as below
    xmin_min = log10_32(f32(0.95) * their_xmin2(lo_hi))
    ev = np.sort(np.concatenate([[0.1], np.minimum(power_law(float(xmin_min), 2.0, 200), 2.0)]))
    ev = ev.astype(f32)
    alpha, _, chosen = their_fit(ev)
    assert their_xmin2(ev) == their_xmin2(lo_hi) and ev[1] == xmin_min and chosen == 1
    ev = torch.tensor(ev)
    with foreign(defaults):
        assert alpha_peak(ev) == pytest.approx(alpha, rel=3e-7)


@DEFAULTS
def test_alpha_peak_candidate_exactly_at_the_upper_bound_is_tried(defaults):
    """An eigenvalue equal to xmin_max = 1.5 xmin2 (in float32) is a candidate, and here the
    best: the start of an exact power law above a pile of 30 eigenvalues at 10 (the fullest
    bin, the 31st of 100 between the smallest eigenvalue 0.5 and the largest 1e4, so xmin2 is
    10 ** the 31st of 101 edges; with 102 edges it would be lower and exclude this one)."""
    ends = np.array([0.5] + [10.0] * 30 + [1e4], dtype=f32)
    ih, _ = ap._histc_peak_edge(log10_32(ends), f32)
    xmin_max = f32(1.5) * their_xmin2(ends)
    ev = np.sort(np.concatenate([ends, power_law(float(xmin_max), 2.0, 200)]).astype(f32))
    alpha, _, chosen = their_fit(ev)
    assert ih == 30 and their_xmin2(ev) == their_xmin2(ends)
    assert ev[chosen] == xmin_max and chosen == 31
    ev = torch.tensor(ev)
    with foreign(defaults):
        assert alpha_peak(ev) == pytest.approx(alpha, rel=3e-7)


def test_alpha_peak_buffers_stay_float32_under_another_default_dtype():
    """Their alphas, KS distances and rank sequence are float32 whatever torch's default dtype:
    with the default set to float16 a Pareto(1.5) spectrum gets their float32 alpha (float16
    buffers round alpha to 3 digits, or move the distances enough to pick another candidate)."""
    ev = np.sort(np.random.default_rng(21).pareto(1.5, 300) + 1).astype(f32)
    theirs = ap.alpha_peak(ev.astype(float), "float32")
    with torch_defaults(torch.float16, device=None):
        ours = alpha_peak(torch.tensor(ev))
    assert ours == pytest.approx(theirs, rel=3e-7)


# --------------------------------------------------------------------------------------- FARMS


def test_farms_builds_its_indices_on_the_weights_device(monkeypatch):
    """The window starts and offsets live on W's device (on a GPU a CPU index raises). Run on
    the meta device, where mixing in a CPU tensor raises too; the eigensolver, which reads
    values, is replaced by one that returns zeros of the right shape on the windows' device."""
    gathered = []

    def eigensolver(windows, dtype=torch.float64):  # checked_eigenvalues' signature
        gathered.append((tuple(windows.shape), windows.device.type))
        B, n, c = windows.shape
        return windows.new_zeros(B, min(n, c), dtype=dtype), torch.ones(B, dtype=torch.bool)

    monkeypatch.setattr(farms, "checked_eigenvalues", eigensolver)
    W = torch.empty(12, 24, device="meta")
    spectrum, finite, _ = farms_spectrum(W, 4, 2.0, 3)  # 3 x 3 windows of 4 x 8
    assert gathered == [((9, 4, 8), "meta")]
    assert spectrum.device.type == "meta" and tuple(spectrum.shape) == (36,) and bool(finite)


@pytest.mark.parametrize(
    ("batch_elements", "gram_elements", "sizes"),
    [
        (1 << 25, 31, [1] * 9),  # one window's product (4 x 8 = 32) is over the block: 1 at least
        (1 << 25, 100, [3, 3, 3]),  # the block holds 3 windows' products (96)
        (100, 1 << 22, [2, 2, 2, 2, 1]),  # memory for 2 windows and their Grams (2 x (32 + 16))
    ],
)
def test_farms_batches_windows_within_both_bounds(monkeypatch, batch_elements, gram_elements,
                                                  sizes):  # fmt: skip
    """9 windows of 4 x 8 go to the eigensolver in batches of the most windows B with
    B (n c + M^2) <= _BATCH_ELEMENTS and B M N <= _GRAM_BLOCK_ELEMENTS, at least one; the
    pooled spectrum is every window's squared singular values (numpy SVD, float64)."""
    monkeypatch.setattr(farms, "_BATCH_ELEMENTS", batch_elements)
    monkeypatch.setattr(farms, "_GRAM_BLOCK_ELEMENTS", gram_elements)
    solver, seen = farms.checked_eigenvalues, []

    def eigensolver(windows, dtype=torch.float64):
        seen.append(windows.shape[0])
        return solver(windows, dtype)

    monkeypatch.setattr(farms, "checked_eigenvalues", eigensolver)
    W = np.random.default_rng(8).standard_normal((12, 24))
    pooled, _, _ = farms_spectrum(torch.tensor(W), 4, 2.0, 3)
    assert seen == sizes
    want = [np.linalg.svd(W[r : r + 4, k : k + 8], compute_uv=False) ** 2
            for r in (0, 4, 8) for k in (0, 8, 16)]  # fmt: skip
    np.testing.assert_allclose(pooled.numpy(), np.sort(np.concatenate(want)), rtol=1e-10)


def low_rank_window() -> tuple[torch.Tensor, np.ndarray]:
    """A 3 x 6 matrix with singular values 1, 0.5 and 1e-5 (one window of Q 2 and grid 1: the
    matrix itself), and its eigenvalues."""
    rng = np.random.default_rng(3)
    U = np.linalg.qr(rng.standard_normal((3, 3)))[0]
    V = np.linalg.qr(rng.standard_normal((6, 3)))[0]
    return torch.tensor(U @ np.diag([1.0, 0.5, 1e-5]) @ V.T), np.array([1e-10, 0.25, 1.0])


def test_farms_float32_path_keeps_float32_eigenvalues():
    """dtype float32: the pooled spectrum is the window's float32 singular values squared, and
    the metrics count rank at float32's resolution: lambda = 1e-10 is below 1 x 6 x eps32
    (7e-7), rank 2, and above float64's 1.3e-15, rank 3."""
    W, lam = low_rank_window()
    pooled, _, _ = farms_spectrum(W, 3, 2.0, 1, torch.float32)
    want = np.sort(np.linalg.svd(W.numpy().astype(f32), compute_uv=False) ** 2)
    assert pooled.dtype == torch.float32
    np.testing.assert_allclose(pooled.numpy(), want, rtol=1e-5, atol=1e-12)
    for dtype, eps in ((torch.float32, np.finfo(f32).eps), (torch.float64, np.finfo(float).eps)):
        got = farms_metrics(W, 3, 2.0, 1, dtype)
        assert got.metrics.matrix_rank == int((lam > lam.max() * 6 * eps).sum()), dtype
    assert farms_metrics(W, 3, 2.0, 1, torch.float32).metrics.matrix_rank == 2


@pytest.mark.parametrize("threshold", [1e-5, 0.3])
def test_farms_metrics_applies_the_fit_settings(threshold):
    """farms_metrics' keyword settings reach spectrum_metrics: eig_threshold decides which
    eigenvalues count as nonzero (2 of 1e-10, 0.25, 1 above 1e-5; 1 above 0.3)."""
    W, lam = low_rank_window()
    got = farms_metrics(W, 3, 2.0, 1, eig_threshold=threshold)
    assert got.metrics.num_nonzero == int((lam > threshold).sum())


def test_farms_metrics_is_none_when_the_top_eigenvalue_overflows():
    """A finite float64 window whose largest eigenvalue float64 cannot hold (an entry of 1e160:
    lambda = 1e320 > 1.8e308) has no FARMS numbers, though its other eigenvalues (1, 4) are
    finite and every entry is."""
    W = torch.zeros(3, 6, dtype=torch.float64)
    W[0, 0], W[1, 1], W[2, 2] = 1e160, 1.0, 2.0
    pooled, finite, _ = farms_spectrum(W, 3, 2.0, 1)
    assert bool(finite) and pooled[:2].tolist() == pytest.approx([1.0, 4.0], rel=1e-12)
    assert pooled[2] == math.inf
    assert farms_metrics(W, 3, 2.0, 1) is None
