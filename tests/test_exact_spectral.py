"""Exact behaviour of the spectral code on the branches the other fast tests reach only through
whole commands (a LoRA update's low-rank spectrum, the pooled and pruned KS searches, the
checks on eigenvalues): each record compared field by field with numpy in float64, or with the
value docs/method.md states. Written from `make mutation`'s survivors (docs/testing.md)."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from esdtool.spectral.marchenko_pastur import SpikeCount
from esdtool.spectral.metrics import spectrum_metrics
from esdtool.spectral.powerlaw import PowerLawFit
from esdtool.spectral.spectra import checked_eigenvalues

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
    """max over the tail points p in {0, step, 2 step, ..., n - 1} with p >= i of
    |1 - (x_p / x_i)^(1 - alpha_i) - (p - i) / (n - i)|, in float64."""
    n = x.size
    points = sorted(set(range(0, n, step)) | {n - 1})
    return max(abs(1 - (x[p] / x[i]) ** (1 - alphas[i]) - (p - i) / (n - i))
               for p in points if p >= i)  # fmt: skip


@pytest.mark.parametrize(("n", "step"), [(50, 7), (49, 8), (30, 1), (64, 63)])
def test_ks_lower_bounds_equal_the_deviation_on_the_grid(n, step):
    """Each candidate's bound is its largest deviation on every step-th point of its tail and
    the last one; float32 eigenvalues are taken in float64."""
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
