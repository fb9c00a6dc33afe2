"""An independent, plain float64 numpy/scipy implementation of method.md sections 2-5.

Written from the spec alone, deliberately unlike the package: singular values from an SVD of
W (not eigenvalues of a Gram matrix), a Python loop over xmin candidates (not cumulative sums
and blocks), numpy.histogram, scipy's quad + brentq on the MP density in x, and the spec's
four-digit Tracy-Widom constants. Tests compare esdtool against it.

For a Tracy-Widom level that table lacks, :func:`tw1_quantile` integrates the Painleve II
representation of F1 (Tracy & Widom 1996) as an ODE: a different method from esdtool's
Fredholm determinant (Bornemann 2010), checked against the spec's constants in the tests.
"""

from __future__ import annotations

import functools
import math

import numpy as np
from scipy import integrate, optimize, special

TW = {0.99: 2.0234, 0.95: 0.9793}  # method.md section 4


def evals(W: np.ndarray) -> np.ndarray:
    s = np.linalg.svd(np.asarray(W, dtype=np.float64), compute_uv=False)
    return np.sort(s**2)


def nonzero(ev: np.ndarray, thresh: float = 1e-5) -> np.ndarray:
    nz = ev[ev > thresh]
    return nz if nz.size else ev


def hill(x: np.ndarray, i: int) -> tuple[float, float]:
    """(alpha, D) at candidate index i, straight from the formulas."""
    k = len(x) - i
    alpha = 1 + k / np.sum(np.log(x[i:] / x[i]))
    t = np.arange(k)
    D = np.max(np.abs(1 - (x[i:] / x[i]) ** (1 - alpha) - t / k))
    return float(alpha), float(D)


def best(x: np.ndarray, candidates) -> tuple[float, float, float]:
    """(alpha, xmin, D) with the smallest D among candidates with alpha > 1."""
    found = None
    for i in candidates:
        alpha, D = hill(x, i)
        if np.isfinite(alpha) and alpha > 1 and (found is None or found[2] > D):
            found = (alpha, x[i], D)
    return found if found else (math.nan, math.nan, math.nan)


def alpha_median(x):
    i = len(x) // 2
    alpha, D = hill(x, i)
    return alpha, x[i], D


def alpha_ks(x):
    return best(x, range(len(x) - 1))


def alpha_fix_finger(x):
    counts, edges = np.histogram(np.log10(x), bins=100)
    peak = 10 ** edges[np.argmax(counts)]
    cands = [i for i in range(len(x) - 1) if 0.95 * peak <= x[i] <= 1.5 * peak]
    return best(x, cands)


def mp_median(y: float) -> float:
    a, b = (1 - math.sqrt(y)) ** 2, (1 + math.sqrt(y)) ** 2

    def density(x):
        return math.sqrt(max((b - x) * (x - a), 0.0)) / (2 * math.pi * y * x)

    def cdf(m):
        return integrate.quad(density, a, m, limit=200, epsabs=1e-13, epsrel=1e-12)[0]

    return optimize.brentq(lambda m: cdf(m) - 0.5, a + 1e-12, b, xtol=1e-14)


@functools.lru_cache(maxsize=1)
def _painleve_ii(x0: float = 8.0, lo: float = -4.0):
    """The Hastie-McLeod solution q of q'' = x q + 2 q^3, q(x) ~ Ai(x) as x -> inf, integrated
    from x0 down to lo (DOP853), with A(s) = int_s^inf q^2, B(s) = int_s^inf x q^2 and
    C(s) = int_s^inf q carried along (their parts beyond x0 from Ai by quadrature)."""

    def ai(x):
        return special.airy(x)[0]

    tails = [
        integrate.quad(f, x0, np.inf, epsabs=1e-16, epsrel=1e-13)[0]
        for f in (lambda x: ai(x) ** 2, lambda x: x * ai(x) ** 2, ai)
    ]
    start = [special.airy(x0)[0], special.airy(x0)[1], *tails]

    def rhs(x, y):
        q, dq = y[0], y[1]
        return [dq, x * q + 2 * q**3, -q * q, -x * q * q, -q]

    return integrate.solve_ivp(
        rhs, (x0, lo), start, method="DOP853", rtol=1e-13, atol=1e-16, dense_output=True
    ).sol


def tw1_cdf(s: float) -> float:
    """F1(s) = exp(-C(s) / 2) F2(s)^(1/2), F2(s) = exp(-int_s^inf (x - s) q(x)^2 dx)."""
    _, _, A, B, C = _painleve_ii()(s)
    return math.exp(-0.5 * C) * math.exp(-0.5 * (B - s * A))


def tw1_quantile(q: float) -> float:
    """t with F1(t) = q (Painleve II, brentq); for -3 < t < 5, i.e. levels 0.02..0.9999."""
    return optimize.brentq(lambda t: tw1_cdf(t) - q, -3.0, 5.0, xtol=1e-12)


def spikes(
    ev: np.ndarray, M: int, N: int, q: float = 0.99, sigma_fit: str = "median", exact_tw=False
) -> dict:
    """MP fit and spike counts; sigma_fit "median": sigma^2 = median(lambda / N) / m(y);
    "mean": sigma^2 = mean(lambda / N). The TW1 quantile is the spec's four-digit constant
    where it has one (0.95, 0.99) unless ``exact_tw``, else :func:`tw1_quantile`."""
    mu = ev / N
    y = M / N
    if sigma_fit == "median":
        sigma2 = np.median(mu) / mp_median(y)
    elif sigma_fit == "mean":
        sigma2 = float(np.mean(mu))
    else:
        raise ValueError(sigma_fit)
    mu_plus = sigma2 * (1 + math.sqrt(y)) ** 2
    center = (math.sqrt(N - 1) + math.sqrt(M)) ** 2
    scale = (math.sqrt(N - 1) + math.sqrt(M)) * (1 / math.sqrt(N - 1) + 1 / math.sqrt(M)) ** (1 / 3)
    t_q = TW[q] if q in TW and not exact_tw else tw1_quantile(q)
    mu_tw = sigma2 * (center + t_q * scale) / N
    return {
        "num_spikes": int(np.sum(mu > mu_tw)),
        "num_spikes_bulk": int(np.sum(mu > mu_plus)),
        "tw_threshold": mu_tw * N,
        "bulk_max": mu_plus * N,
        "sigma_mp": math.sqrt(sigma2),
    }


def row(W: np.ndarray) -> dict:
    """The metrics esdtool's table holds for matrix W, per the spec."""
    ev = evals(W)
    M, N = min(W.shape), max(W.shape)
    x = nonzero(ev)
    out = {"lambda_max": ev[-1], "stable_rank": ev.sum() / ev[-1], "M": M, "N": N}
    for name, fit in (("median", alpha_median), ("fix_finger", alpha_fix_finger), ("ks", alpha_ks)):
        out[f"alpha_{name}"], out[f"xmin_{name}"], out[f"D_{name}"] = fit(x)
    out.update(spikes(ev, M, N))
    alpha = out["alpha_ks"]  # AnalyzeSettings.weighted_alpha's default
    p = x / x.sum()
    out.update(
        spectral_norm=math.sqrt(ev[-1]),
        log_spectral_norm=math.log10(ev[-1]),
        frobenius_norm=math.sqrt(ev.sum()),
        log_norm=math.log10(ev.sum()),
        alpha_weighted=alpha * math.log10(ev[-1]),
        log_alpha_norm=math.log10(np.sum(x**alpha)),
        entropy=float(-np.sum(p * np.log(p)) / math.log(len(x))),
        mp_softrank=out["bulk_max"] / ev[-1],
        matrix_rank=int(np.sum(ev > ev[-1] * N * np.finfo(np.float64).eps)),
        # fewest top eigenvalues holding 90% of the sum, by a plain loop over them
        effective_rank=next(
            k for k in range(1, ev.size + 1) if ev[::-1][:k].sum() >= 0.9 * ev.sum() * (1 - 1e-12)
        ),
        num_nonzero=len(x),
    )
    out["evals"] = ev
    return out
