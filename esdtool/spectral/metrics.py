"""Every per-matrix number of the metrics table, from one spectrum (method.md sections 2-5).

:func:`spectrum_metrics` takes the sorted eigenvalues of one matrix and returns a
:class:`SpectrumMetrics` record holding the three power-law fits and the spike count as the
records :mod:`~esdtool.spectral.powerlaw` and :mod:`~esdtool.spectral.marchenko_pastur` return.
The table flattens it into columns (:mod:`esdtool.io.table`). Pure: no I/O, no printing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from esdtool.spectral.marchenko_pastur import DEFAULT_TW_QUANTILE, SpikeCount, count_spikes
from esdtool.spectral.powerlaw import ALPHA_FITS, PowerLawFit


@dataclass(frozen=True)
class SpectrumMetrics:
    """The numbers of one spectrum.

    median, fix_finger, ks: the three power-law fits (see :mod:`esdtool.spectral.powerlaw`).
    fit_status:        "ok", or "method:reason" for each fit that failed (and "mp:median_zero"
                       when over half the spectrum is numerically 0); None for a zero matrix.
    spikes:            the MP fit and spike counts (counts None when the median is zero).
    lambda_max:        largest eigenvalue.
    spectral_norm:     sqrt(lambda_max).
    log_spectral_norm: log10(lambda_max) (WeightWatcher's convention).
    frobenius_norm:    sqrt(sum lambda).
    log_norm:          log10(sum lambda).
    stable_rank:       sum lambda / lambda_max.
    alpha_weighted:    alpha * log10(lambda_max), alpha from the ``weighted_alpha`` fit.
    log_alpha_norm:    log10(sum lambda^alpha), the same alpha.
    entropy:           entropy of lambda / sum lambda over the nonzero set, in [0, 1].
    matrix_rank:       eigenvalues above lambda_max * N * eps(dtype).
    num_nonzero:       eigenvalues above eig_threshold (the set the fits use).
    effective_rank:    the fewest largest eigenvalues whose sum is at least 90% of sum lambda
                       (of the squared Frobenius norm); 0 for a zero matrix.
    """

    median: PowerLawFit
    fix_finger: PowerLawFit
    ks: PowerLawFit
    fit_status: str | None
    spikes: SpikeCount
    lambda_max: float
    spectral_norm: float
    log_spectral_norm: float
    frobenius_norm: float
    log_norm: float
    stable_rank: float
    alpha_weighted: float
    log_alpha_norm: float
    entropy: float
    matrix_rank: int
    num_nonzero: int
    effective_rank: int = 0

    def fit(self, method: str) -> PowerLawFit:
        """The fit of ``method`` ("median", "fix_finger" or "ks")."""
        if method not in ALPHA_FITS:
            raise ValueError(f"unknown alpha method {method!r}")
        return getattr(self, method)


def _zero_metrics() -> SpectrumMetrics:
    """An all-zero matrix: norms are 0, nothing to fit, no spikes."""
    nan = math.nan
    none = PowerLawFit.failed("zero")
    spikes = SpikeCount(nan, nan, nan, 0, 0, nan)
    return SpectrumMetrics(
        median=none, fix_finger=none, ks=none, fit_status=None, spikes=spikes,
        lambda_max=0.0, spectral_norm=0.0, log_spectral_norm=nan, frobenius_norm=0.0,
        log_norm=nan, stable_rank=nan, alpha_weighted=nan, log_alpha_norm=nan, entropy=nan,
        matrix_rank=0, num_nonzero=0,
    )  # fmt: skip


def spectrum_metrics(
    evals: torch.Tensor,
    M: int,
    N: int,
    *,
    eig_threshold: float = 1e-5,
    sigma_fit: str = "median",
    tw_quantile: float = DEFAULT_TW_QUANTILE,
    weighted_alpha: str = "ks",
    spike_rule: str = "tw",
    mp_sides: tuple[int, int] | None = None,
    low_rank: bool = False,
) -> SpectrumMetrics:
    """All metrics of one spectrum: ``evals`` holds the eigenvalues lambda ascending (M of them,
    or several M-sized spectra pooled), for a matrix of min side M and max side N. The keyword
    arguments are the analysis settings of the same names (method.md sections 3-5); ``mp_sides``
    (M, N) replaces the matrix's sides in the MP fit (the lora-ar preset's conv rule).

    ``low_rank``: the spectrum is a low-rank update's (a LoRA adapter's s B A, at most r nonzero
    eigenvalues): it has no bulk and no tail for the heavy-tail quantities to describe, so the
    power-law fits, the MP fit and the spike counts are not computed (fit_status ``low_rank``;
    alphas, xmins, KS distances, alpha_weighted and log_alpha_norm NaN, spike counts null).
    The norms, ranks and entropy are computed as for any matrix."""
    evals64 = evals.to(torch.float64)
    total = float(evals64.sum())
    lambda_max = float(evals64[-1])
    if lambda_max <= 0:
        return _zero_metrics()

    nonzero = evals64[evals64 > eig_threshold]
    if nonzero.numel() == 0:  # all below the threshold: use every positive one (log 0 is no data)
        nonzero = evals64[evals64 > 0]
    eps = torch.finfo(evals.dtype).eps
    zero_tol = lambda_max * N * eps  # below it an eigenvalue is numerically 0 (matrix_rank)
    if low_rank:
        # The nonzero set by the numerical rank's relative tolerance, not the absolute
        # eig_threshold: a small update (lambda < 1e-5 is common) would otherwise count the
        # rounding noise of its unused directions, and its entropy would depend on lora_alpha.
        nonzero = evals64[evals64 > zero_tol]
        nan = math.nan
        none = PowerLawFit.failed("low_rank")
        return _common(
            evals64, nonzero, total, lambda_max, zero_tol,
            median=none, fix_finger=none, ks=none, fit_status="low_rank",
            spikes=SpikeCount(nan, nan, nan, None, None, nan),
            alpha_weighted=nan, log_alpha_norm=nan,
        )  # fmt: skip
    fits = {method: fit(nonzero) for method, fit in ALPHA_FITS.items()}
    failed = [f"{m}:{fit.status}" for m, fit in fits.items() if fit.status != "ok"]
    fit_M, fit_N = mp_sides or (M, N)
    spikes = count_spikes(
        evals64, fit_M, fit_N, sigma_fit=sigma_fit, tw_quantile_level=tw_quantile, rule=spike_rule
    )
    if float(evals64[evals64.numel() // 2]) <= zero_tol:
        # Over half the spectrum is numerically 0 (rank < M/2): the median fit has no bulk to
        # measure and every nonzero eigenvalue would count as a spike. Say so, count none.
        spikes = replace(spikes, num_spikes=None, num_spikes_bulk=None)
        failed.append("mp:median_zero")

    alpha = fits[weighted_alpha].alpha
    return _common(
        evals64, nonzero, total, lambda_max, zero_tol,
        **fits, fit_status=";".join(failed) if failed else "ok", spikes=spikes,
        alpha_weighted=alpha * math.log10(lambda_max),
        log_alpha_norm=_log10_sum_pow(nonzero, alpha),
    )  # fmt: skip


# Share of sum lambda the effective rank's eigenvalues hold.
EFFECTIVE_RANK_SHARE = 0.9


def effective_rank(evals: torch.Tensor) -> int:
    """The fewest largest eigenvalues (``evals`` ascending, float64) whose sum reaches
    EFFECTIVE_RANK_SHARE of the total; 0 when the total is 0. A relative slack of 1e-12 keeps
    k equal eigenvalues of which exactly 90% suffice from needing one more by rounding."""
    total = float(evals.sum())
    if total <= 0:
        return 0
    held = torch.cumsum(evals.flip(0), 0)
    need = EFFECTIVE_RANK_SHARE * total * (1 - 1e-12)
    k = int(torch.searchsorted(held, held.new_tensor([need]))[0]) + 1
    return min(k, evals.numel())


def _common(
    evals64: torch.Tensor,
    nonzero: torch.Tensor,
    total: float,
    lambda_max: float,
    zero_tol: float,
    **fitted: object,
) -> SpectrumMetrics:
    """The metrics every nonzero spectrum has, with ``fitted`` (the fits, their status, the
    spikes and the alpha-weighted norms)."""
    p = nonzero / float(nonzero.sum())
    R = nonzero.numel()
    return SpectrumMetrics(
        **fitted,  # type: ignore[arg-type]
        lambda_max=lambda_max,
        spectral_norm=math.sqrt(lambda_max),
        log_spectral_norm=math.log10(lambda_max),
        frobenius_norm=math.sqrt(total),
        log_norm=math.log10(total),
        stable_rank=total / lambda_max,
        entropy=float(-(p * torch.log(p)).sum()) / math.log(R) if R > 1 else 0.0,
        # Numerical rank of the Gram matrix the eigenvalues came from (numpy's matrix_rank rule
        # applied to lambda, the resolution a Gram eigensolver in this precision has).
        matrix_rank=int((evals64 > zero_tol).sum()),
        num_nonzero=int(nonzero.numel()),
        effective_rank=effective_rank(evals64),
    )


def _log10_sum_pow(x: torch.Tensor, alpha: float) -> float:
    """log10(sum x^alpha) without overflow (logsumexp), NaN when alpha is."""
    if not math.isfinite(alpha):
        return math.nan
    return float(torch.logsumexp(alpha * torch.log(x), 0)) / math.log(10)
