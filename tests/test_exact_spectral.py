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
