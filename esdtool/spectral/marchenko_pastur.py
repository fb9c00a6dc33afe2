"""Marchenko-Pastur bulk, Tracy-Widom edge and spike counts (method.md section 4).

A random M x N matrix with iid entries of variance sigma^2 has normalised eigenvalues
mu = lambda / N that fill the MP bulk [sigma^2 (1 - sqrt y)^2, sigma^2 (1 + sqrt y)^2],
y = M / N. Eigenvalues beyond the bulk edge ("spikes") are structure the weights learned.
At finite size the largest bulk eigenvalue fluctuates around the edge on the Tracy-Widom
scale, so a spike is counted only past the TW quantile (Johnstone 2001).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

DEFAULT_TW_QUANTILE = 0.99


@dataclass(frozen=True)
class SpikeCount:
    """The MP fit of one spectrum and the eigenvalues beyond it.

    sigma_mp:        fitted sigma (standard deviation of the entries, in weight units).
    bulk_max:        MP bulk edge on the lambda scale, N * sigma^2 (1 + sqrt y)^2.
    tw_threshold:    the spike threshold on the lambda scale: the Tracy-Widom-corrected edge, or
                     the edge of the spike rule in use.
    num_spikes:      eigenvalues above tw_threshold (None when the fit has no bulk to measure).
    num_spikes_bulk: eigenvalues above bulk_max (no finite-size correction; None likewise).
    mp_softrank:     bulk_max / lambda_max (near 1: no structure; near 0: dominated by spikes).
    """

    sigma_mp: float
    bulk_max: float
    tw_threshold: float
    num_spikes: int | None
    num_spikes_bulk: int | None
    mp_softrank: float


def mp_edges(y: float) -> tuple[float, float]:
    """The standard (sigma = 1) MP bulk [(1 - sqrt y)^2, (1 + sqrt y)^2] for ratio y = M / N."""
    return (1 - math.sqrt(y)) ** 2, (1 + math.sqrt(y)) ** 2


def mp_density(lam: np.ndarray, sigma: float, M: int, N: int) -> np.ndarray:
    """Marchenko-Pastur density on the lambda scale (lambda = N * sigma^2 * x), zero outside
    the bulk: what a random M x N matrix with entries of standard deviation sigma would show."""
    y = M / N
    scale = N * sigma**2
    x = np.asarray(lam, dtype=float) / scale
    a, b = mp_edges(y)
    inside = (x > a) & (x < b)
    dens = np.zeros_like(x)
    xi = x[inside]
    dens[inside] = np.sqrt((b - xi) * (xi - a)) / (2 * math.pi * y * xi)
    return dens / scale


@lru_cache(maxsize=8)
def _gauss_legendre(m: int = 96) -> tuple[np.ndarray, np.ndarray]:
    return np.polynomial.legendre.leggauss(m)


def _mp_cdf_theta(theta: float, y: float) -> float:
    """CDF of the standard MP law at x(theta) = a + (b - a)(1 - cos theta) / 2.

    In theta the density becomes ((b - a) / 2)^2 sin^2(t) / (2 pi y x(t)), smooth even at
    y = 1 where the density in x has a 1/sqrt(x) pole, so Gauss-Legendre is exact to ~1e-15.
    """
    a, b = mp_edges(y)
    u, w = _gauss_legendre()
    t = (u + 1) * theta / 2
    x = a + (b - a) * (1 - np.cos(t)) / 2
    f = ((b - a) / 2) ** 2 * np.sin(t) ** 2 / (2 * math.pi * y * x)
    return float(np.sum(w * f) * theta / 2)


@lru_cache(maxsize=4096)
def mp_median(y: float) -> float:
    """Median m(y) of the standard (sigma = 1) Marchenko-Pastur law with ratio y in (0, 1]."""
    if not 0 < y <= 1:
        raise ValueError(f"MP ratio y must lie in (0, 1], got {y}")
    lo, hi = 0.0, math.pi
    for _ in range(64):  # bisection on the monotone CDF; 64 halvings reach float precision
        mid = (lo + hi) / 2
        if _mp_cdf_theta(mid, y) < 0.5:
            lo = mid
        else:
            hi = mid
    theta = (lo + hi) / 2
    a, b = mp_edges(y)
    return a + (b - a) * (1 - math.cos(theta)) / 2


def _tw1_cdf(s: float, m: int = 60, length: float = 16.0) -> float:
    """Tracy-Widom (beta = 1) CDF as a Fredholm determinant, F1(s) = det(I - K) on (s, inf)
    with K(x, y) = Ai((x + y) / 2) / 2, discretised by Gauss-Legendre (Bornemann 2010)."""
    from scipy.special import airy

    u, w = _gauss_legendre(m)
    x = s + (u + 1) * length / 2
    w = w * length / 2
    kernel = 0.5 * airy((x[:, None] + x[None, :]) / 2)[0]
    sw = np.sqrt(w)
    return float(np.linalg.det(np.eye(m) - sw[:, None] * kernel * sw[None, :]))


# tw_quantile's own results for the usual levels, kept so that the common case needs no scipy
# import; tests/test_marchenko_pastur.py recomputes them.
_TW1_QUANTILES = {0.95: 0.9793160534695904, 0.99: 2.0234492813801586}


@lru_cache(maxsize=64)
def tw_quantile(q: float, *, cached: bool = True) -> float:
    """t_q with F1(t_q) = q: 0.95 -> 0.9793, 0.99 -> 2.0234 (Johnstone 2001, Table 1)."""
    if not 0 < q < 1:
        raise ValueError(f"Tracy-Widom quantile level must lie in (0, 1), got {q}")
    if cached and q in _TW1_QUANTILES:
        return _TW1_QUANTILES[q]
    lo, hi = -8.0, 8.0  # F1 is monotone: bisect to 1e-13
    while hi - lo > 1e-13:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _tw1_cdf(mid) < q else (lo, mid)
    return (lo + hi) / 2


def tw_edge(M: int, N: int, sigma2: float, t: float) -> float:
    """Johnstone's TW-corrected largest-eigenvalue threshold on the mu = lambda / N scale."""
    root_n, root_m = math.sqrt(N - 1), math.sqrt(M)
    center = (root_n + root_m) ** 2
    scale = (root_n + root_m) * (1 / root_n + 1 / root_m) ** (1 / 3)
    return sigma2 * (center + t * scale) / N


def count_spikes(
    evals: torch.Tensor,
    M: int,
    N: int,
    *,
    sigma_fit: str = "median",
    tw_quantile_level: float = DEFAULT_TW_QUANTILE,
    rule: str = "tw",
) -> SpikeCount:
    """Fit the MP bulk to ``evals`` (all eigenvalues lambda, ascending) and count spikes.

    sigma_fit "median": sigma^2 = median(mu) / m(y), robust to half the spectrum lying outside
    the bulk; "mean": sigma^2 = mean(mu) (the seed's choice, kept for comparison).
    ``evals`` may hold several spectra of the same M x N shape pooled (conv kernels).

    rule "tw": spikes lie above the Tracy-Widom quantile edge (Johnstone's centring and scale).
    rule "lora-ar": the Adaptive Rank LoRA code's edge, bulk_max + sqrt(Q^(-1/2) bulk_max^(2/3)
    M^(-2/3)) on the lambda scale (its adaptive_rank_assignment.py lines 129-147). That edge is
    not a TW quantile and is not scale-invariant: scaling the weights by c moves bulk_max by c^2
    but the correction by c^(2/3).
    """
    if N < 2:
        raise ValueError("MP fit needs N >= 2")
    mu = evals.to(torch.float64) / N
    n = mu.numel()
    if sigma_fit == "median":
        med = float((mu[(n - 1) // 2] + mu[n // 2]) / 2)  # sorted: the usual two-middle median
        sigma2 = med / mp_median(M / N)
    elif sigma_fit == "mean":
        sigma2 = float(mu.mean())
    else:
        raise ValueError(f"unknown sigma fit {sigma_fit!r} (median or mean)")
    mu_plus = sigma2 * mp_edges(M / N)[1]
    if rule == "tw":
        mu_tw = tw_edge(M, N, sigma2, tw_quantile(tw_quantile_level))
    elif rule == "lora-ar":
        edge = mu_plus * N  # the origin works on the lambda scale
        mu_tw = (edge + math.sqrt((N / M) ** -0.5 * edge ** (2 / 3) * M ** (-2 / 3))) / N
    else:
        raise ValueError(f"unknown spike rule {rule!r} (tw or lora-ar)")
    lambda_max = float(evals[-1])
    bulk_max = mu_plus * N
    return SpikeCount(
        sigma_mp=math.sqrt(sigma2),
        bulk_max=bulk_max,
        tw_threshold=mu_tw * N,
        num_spikes=int((mu > mu_tw).sum()),
        num_spikes_bulk=int((mu > mu_plus).sum()),
        mp_softrank=bulk_max / lambda_max if lambda_max > 0 else math.nan,
    )
