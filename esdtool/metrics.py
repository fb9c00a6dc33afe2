"""Every per-matrix number of the metrics table, from one spectrum (method.md sections 2-5).

:func:`spectrum_metrics` takes the sorted eigenvalues of one matrix and returns a flat dict
whose keys are the table's metric columns. Pure: no I/O, no printing.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from esdtool.marchenko_pastur import count_spikes
from esdtool.powerlaw import PowerLawFit, fit_fix_finger, fit_ks, fit_median
from esdtool.settings import AnalyzeSettings

ALPHA_FITS = {"median": fit_median, "fix_finger": fit_fix_finger, "ks": fit_ks}

METRIC_COLUMNS: tuple[str, ...] = (
    *(f"{col}_{m}" for m in ALPHA_FITS for col in ("alpha", "xmin", "D")),
    "fit_status",
    "num_spikes",
    "num_spikes_bulk",
    "sigma_mp",
    "bulk_max",
    "tw_threshold",
    "mp_softrank",
    "lambda_max",
    "spectral_norm",
    "log_spectral_norm",
    "frobenius_norm",
    "log_norm",
    "stable_rank",
    "alpha_weighted",
    "log_alpha_norm",
    "entropy",
    "matrix_rank",
    "num_nonzero",
)


def empty_metrics() -> dict[str, Any]:
    """The metric columns of a row with no spectrum (skipped, non-finite)."""
    row: dict[str, Any] = dict.fromkeys(METRIC_COLUMNS, math.nan)
    for col in ("num_spikes", "num_spikes_bulk", "matrix_rank", "num_nonzero"):
        row[col] = None
    row["fit_status"] = None
    return row


def spectrum_metrics(
    evals: torch.Tensor, M: int, N: int, settings: AnalyzeSettings
) -> dict[str, Any]:
    """All metrics of one spectrum: ``evals`` holds the eigenvalues lambda ascending (M of them,
    or several M-sized spectra pooled), for a matrix of min side M and max side N."""
    evals64 = evals.to(torch.float64)
    total = float(evals64.sum())
    lambda_max = float(evals64[-1])
    row = empty_metrics()
    if lambda_max <= 0:  # all-zero matrix: norms are 0, nothing to fit
        row.update(lambda_max=0.0, spectral_norm=0.0, frobenius_norm=0.0, stable_rank=math.nan)
        row.update(matrix_rank=0, num_nonzero=0, num_spikes=0, num_spikes_bulk=0)
        return row

    nonzero = evals64[evals64 > settings.eig_threshold]
    if nonzero.numel() == 0:  # all below the threshold: use every positive one (log 0 is no data)
        nonzero = evals64[evals64 > 0]
    fits: dict[str, PowerLawFit] = {m: fit(nonzero) for m, fit in ALPHA_FITS.items()}
    for m, fit in fits.items():
        row[f"alpha_{m}"], row[f"xmin_{m}"], row[f"D_{m}"] = fit.alpha, fit.xmin, fit.D
    failed = [f"{m}:{fit.status}" for m, fit in fits.items() if fit.status != "ok"]
    row["fit_status"] = ";".join(failed) if failed else "ok"

    spikes = count_spikes(
        evals64, M, N, sigma_fit=settings.sigma_fit, tw_quantile_level=settings.tw_quantile
    )
    row.update(
        num_spikes=spikes.num_spikes,
        num_spikes_bulk=spikes.num_spikes_bulk,
        sigma_mp=spikes.sigma_mp,
        bulk_max=spikes.bulk_max,
        tw_threshold=spikes.tw_threshold,
        mp_softrank=spikes.mp_softrank,
    )
    eps = torch.finfo(evals.dtype).eps
    zero_tol = lambda_max * N * eps  # below it an eigenvalue is numerically 0 (matrix_rank)
    if float(evals64[evals64.numel() // 2]) <= zero_tol:
        # Over half the spectrum is numerically 0 (rank < M/2): the median fit has no bulk to
        # measure and every nonzero eigenvalue would count as a spike. Say so, count none.
        row.update(num_spikes=None, num_spikes_bulk=None)
        row["fit_status"] = ";".join([*failed, "mp:median_zero"])

    alpha = fits[settings.weighted_alpha].alpha
    p = nonzero / float(nonzero.sum())
    R = nonzero.numel()
    entropy = float(-(p * torch.log(p)).sum()) / math.log(R) if R > 1 else 0.0
    row.update(
        lambda_max=lambda_max,
        spectral_norm=math.sqrt(lambda_max),
        log_spectral_norm=math.log10(lambda_max),
        frobenius_norm=math.sqrt(total),
        log_norm=math.log10(total),
        stable_rank=total / lambda_max,
        alpha_weighted=alpha * math.log10(lambda_max),
        log_alpha_norm=_log10_sum_pow(nonzero, alpha),
        entropy=entropy,
        # Numerical rank of the Gram matrix the eigenvalues came from (numpy's matrix_rank rule
        # applied to lambda, the resolution a Gram eigensolver in this precision has).
        matrix_rank=int((evals64 > zero_tol).sum()),
        num_nonzero=int(nonzero.numel()),
    )
    return row


def _log10_sum_pow(x: torch.Tensor, alpha: float) -> float:
    """log10(sum x^alpha) without overflow (logsumexp), NaN when alpha is."""
    if not math.isfinite(alpha):
        return math.nan
    return float(torch.logsumexp(alpha * torch.log(x), 0)) / math.log(10)
