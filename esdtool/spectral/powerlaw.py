"""Power-law exponent of an eigenvalue tail: the Hill (continuous MLE) estimator.

For sorted eigenvalues x_0 <= ... <= x_{n-1} and a candidate xmin = x_i, with tail size
k = n - i (method.md section 3):

    alpha(i) = 1 + k / sum_{j>=i} ln(x_j / x_i)
    D(i)     = max_{t<k} | 1 - (x_{i+t} / x_i)^(1 - alpha(i)) - t / k |

Three rules pick i: ``median`` (i = n // 2), ``fix_finger`` (the peak of the log-histogram)
and ``ks`` (the smallest KS distance over every candidate, as Clauset et al. and WeightWatcher).
All functions are pure: torch tensors in, :class:`PowerLawFit` records out, on any device.
Fits always run in float64 whatever precision the eigenvalues were computed in.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from esdtool.spectral import ALPHA_METHODS

# Elements of one block of the KS distance matrix (candidates x eigenvalues): 4M float64 = 32 MB.
_KS_BLOCK_ELEMENTS = 1 << 22
# Up to this many (candidate, eigenvalue) pairs every D is computed (a plain spectrum of up to
# about 2000 eigenvalues); above, the exact minimum is found by pruning.
_EXHAUSTIVE = 1 << 22
_PRUNED_BATCH = 64
FIX_FINGER_BINS = 100
FIX_FINGER_WINDOW = (0.95, 1.5)


@dataclass(frozen=True)
class PowerLawFit:
    """One power-law fit of an eigenvalue tail.

    alpha:    the exponent of p(x) ~ x^-alpha above xmin (NaN when no fit).
    xmin:     the smallest eigenvalue of the fitted tail (NaN when no fit).
    D:        Kolmogorov-Smirnov distance between the tail and the fitted law (NaN when no fit).
    num_tail: how many eigenvalues the tail holds (k = n - i; 0 when no fit).
    status:   "ok", or why there is no fit ("too_few", "no_candidate").
    """

    alpha: float
    xmin: float
    D: float
    num_tail: int
    status: str

    @classmethod
    def failed(cls, status: str) -> PowerLawFit:
        return cls(math.nan, math.nan, math.nan, 0, status)


def hill_alphas(x: torch.Tensor) -> torch.Tensor:
    """alpha(i) for every candidate i = 0..n-2 at once (cumulative sums, no loop).

    ``x`` must be sorted ascending and strictly positive. Entries whose tail has no spread
    (all equal) come out as +inf.
    """
    x = x.to(torch.float64)
    n = x.numel()
    logs = torch.log(x)
    suffix = torch.flip(torch.cumsum(torch.flip(logs, [0]), 0), [0])  # sum_{j>=i} ln x_j
    k = torch.arange(n, 0, -1, device=x.device)  # n - i (times float64: float64)
    denom = suffix - k * logs
    alphas = 1.0 + k / denom
    alphas = torch.where(denom > 0, alphas, torch.full_like(alphas, math.inf))
    return alphas[: n - 1]


def ks_distances(x: torch.Tensor, alphas: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """D(i) for the given candidate indices, computed in blocks of candidates.

    ``candidates`` must ascend. Each block is one dense (block x tail) tensor expression, so the
    number of kernel launches grows with n / block size, never with n.
    """
    x = x.to(torch.float64)
    n = x.numel()
    logs = torch.log(x)
    out = torch.empty(candidates.numel(), dtype=torch.float64, device=x.device)
    if candidates.numel() == 0:
        return out
    block = max(1, _KS_BLOCK_ELEMENTS // max(n, 1))
    j = torch.arange(n, device=x.device)
    for start in range(0, candidates.numel(), block):
        idx = candidates[start : start + block]
        cols = j[int(idx[0]) :]  # candidates ascend: no column left of the first one matters
        i = idx.unsqueeze(1)  # (B, 1)
        a = alphas[idx].unsqueeze(1)
        kk = n - i
        t = (cols.unsqueeze(0) - i).to(torch.float64)  # (B, n - lo); t / kk is float64
        theory = 1.0 - torch.exp((1.0 - a) * (logs[cols].unsqueeze(0) - logs[idx].unsqueeze(1)))
        diff = torch.abs(theory - t / kk)
        diff = torch.where(t >= 0, diff, torch.zeros_like(diff))
        out[start : start + block] = diff.amax(dim=1)
    return out


def _fit_at(x: torch.Tensor, alphas: torch.Tensor, i: int) -> PowerLawFit:
    n = x.numel()
    alpha = float(alphas[i])
    if not math.isfinite(alpha) or alpha <= 1.0:
        return PowerLawFit.failed("no_candidate")
    D = float(ks_distances(x, alphas, torch.tensor([i], device=x.device))[0])
    return PowerLawFit(alpha, float(x[i]), D, n - i, "ok")


def _best_of(x: torch.Tensor, alphas: torch.Tensor, candidates: torch.Tensor) -> PowerLawFit:
    """Among candidate indices (ascending), those with finite alpha > 1, the smallest D (the
    smallest xmin among ties)."""
    a = alphas[candidates]
    candidates = candidates[torch.isfinite(a) & (a > 1.0)]
    if candidates.numel() == 0:
        return PowerLawFit.failed("no_candidate")
    if candidates.numel() * x.numel() <= _EXHAUSTIVE:
        D = ks_distances(x, alphas, candidates)
        best = int(torch.argmin(D))  # first minimum: the smallest xmin among ties
        i, d = int(candidates[best]), float(D[best])
    else:
        i, d = _pruned_min(x, alphas, candidates)
    return PowerLawFit(float(alphas[i]), float(x[i]), d, x.numel() - i, "ok")


def ks_lower_bounds(
    x: torch.Tensor, alphas: torch.Tensor, candidates: torch.Tensor, step: int
) -> torch.Tensor:
    """For each candidate, a lower bound of D(i): the largest deviation at every ``step``-th
    eigenvalue of its tail counted back from the last, a subset of the points D(i) maximises
    over."""
    x = x.to(torch.float64)
    n = x.numel()
    logs = torch.log(x)
    points = torch.arange(n - 1, 0, -step, device=x.device)  # point 0 deviates by 0: left out
    out = torch.empty(candidates.numel(), dtype=torch.float64, device=x.device)
    if candidates.numel() == 0:
        return out
    block = max(1, _KS_BLOCK_ELEMENTS // points.numel())
    for start in range(0, candidates.numel(), block):
        idx = candidates[start : start + block]
        i = idx.unsqueeze(1)
        a = alphas[idx].unsqueeze(1)
        kk = n - i
        t = (points.unsqueeze(0) - i).to(torch.float64)  # t / kk is float64
        theory = 1.0 - torch.exp((1.0 - a) * (logs[points].unsqueeze(0) - logs[idx].unsqueeze(1)))
        diff = torch.where(t >= 0, torch.abs(theory - t / kk), torch.zeros_like(t))
        out[start : start + block] = diff.amax(dim=1)
    return out


def _pruned_min(
    x: torch.Tensor, alphas: torch.Tensor, candidates: torch.Tensor
) -> tuple[int, float]:
    """The candidate of smallest D (the smallest index among ties) and its D, exactly, without
    computing every D: each candidate's lower bound from a sqrt(n) grid of its tail, then exact
    D in increasing order of bound until the next bound exceeds the best D found (no candidate
    left can then beat it, or tie it). O(n^1.5) plus the exact D of the few candidates near the
    minimum, against O(n^2) for all: a pooled FARMS spectrum holds 10^4-10^6 eigenvalues."""
    n = x.numel()
    lower = ks_lower_bounds(x, alphas, candidates, max(1, math.isqrt(n)))
    order = torch.argsort(lower)  # ties in any order: (D, index) decides below
    best_d, best_i = math.inf, -1
    for start in range(0, order.numel(), _PRUNED_BATCH):
        chunk = order[start : start + _PRUNED_BATCH]
        # A bound is the same expression as D at fewer points; the slack covers a last-ulp
        # difference between the two evaluations (vectorised exp on some devices).
        chunk = chunk[lower[chunk] <= best_d * (1 + 1e-12)]
        if chunk.numel() == 0:
            break
        idx = torch.sort(candidates[chunk]).values
        D = ks_distances(x, alphas, idx)
        m = int(torch.argmin(D))
        d, i = float(D[m]), int(idx[m])
        if d < best_d or (d == best_d and i < best_i):
            best_d, best_i = d, i
    return best_i, best_d


def fit_median(x: torch.Tensor) -> PowerLawFit:
    """Hill estimator with xmin at the median eigenvalue: i = floor(n / 2)."""
    n = x.numel()
    if n < 3:  # i = n // 2 must leave a tail of at least 2 (i <= n - 2)
        return PowerLawFit.failed("too_few")
    return _fit_at(x, hill_alphas(x), n // 2)  # both take x in float64


def fix_finger_peak(x: torch.Tensor) -> float:
    """10^(left edge of the fullest of 100 equal bins of log10(x)), numpy.histogram's rule.

    Bin b holds edges[b] <= v < edges[b+1]; the maximum falls in the last bin. Edges are built
    the way numpy.linspace builds them so that both agree bit for bit.
    """
    lx = torch.log10(x.to(torch.float64))
    lo, hi = lx.min(), lx.max()
    if hi == lo:
        return float(10.0**lo)
    bins = FIX_FINGER_BINS
    edges = torch.arange(bins + 1, dtype=torch.float64, device=x.device) * ((hi - lo) / bins) + lo
    edges[-1] = hi
    idx = torch.searchsorted(edges, lx, right=True) - 1
    idx = idx.clamp(0, bins - 1)
    counts = torch.bincount(idx, minlength=bins)
    return float(10.0 ** edges[int(torch.argmax(counts))])


def fit_fix_finger(x: torch.Tensor) -> PowerLawFit:
    """xmin among the eigenvalues in [0.95 * peak, 1.5 * peak] (linear units), smallest D.

    The peak is where the log-histogram is fullest (the bulk's mode). WeightWatcher's code
    compares log10(0.95 * peak) with linear eigenvalues, which widens the window; esdtool uses
    the intended linear window (docs/method.md).
    """
    n = x.numel()
    if n < 2:
        return PowerLawFit.failed("too_few")
    x = x.to(torch.float64)
    peak = fix_finger_peak(x)
    lo, hi = FIX_FINGER_WINDOW
    inside = (x >= lo * peak) & (x <= hi * peak)
    inside[n - 1] = False  # a tail of one eigenvalue has no spread
    candidates = torch.nonzero(inside).flatten()
    return _best_of(x, hill_alphas(x), candidates)


def fit_ks(x: torch.Tensor) -> PowerLawFit:
    """xmin with the smallest KS distance over every candidate i = 0..n-2 (Clauset et al.)."""
    n = x.numel()
    if n < 2:
        return PowerLawFit.failed("too_few")
    candidates = torch.arange(n - 1, device=x.device)  # D and alpha take x in float64
    return _best_of(x, hill_alphas(x), candidates)


# The three rules, by the names of esdtool.spectral.ALPHA_METHODS (the table's alpha columns).
ALPHA_FITS = dict(zip(ALPHA_METHODS, (fit_median, fit_fix_finger, fit_ks), strict=True))
