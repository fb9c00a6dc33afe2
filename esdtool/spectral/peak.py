"""AlphaPruning's ``alpha_peak``: the power-law alpha its pruning ratios come from, computed as
its code computes it (the ``alphapruning`` analysis preset; docs/method.md "AlphaPruning").

haiquanlu/AlphaPruning, ``lib/esd_utils.py`` ``net_esd_estimator(fix_fingers="xmin_peak")``:
the float32 eigenvalues (squared singular values, ascending; zeros kept), a 100-bin histogram
of their log10 (``torch.histc``), xmin2 = 10 ** (left edge of the first fullest bin), and the
Hill fit with a one-sided KS distance at every eigenvalue from the first at or above
``log10(0.95 xmin2)`` (a log10 value compared with linear eigenvalues: their quirk, kept) to
the last at or below ``1.5 xmin2``, never the largest; alpha of the first smallest distance.
Every step runs in float32 torch, in their order, so the number is theirs bit for bit on the
same eigenvalues, quirks included: slots never tried hold alpha 0 and distance 1, so a
spectrum where no candidate fits (alpha <= 1 everywhere) gets alpha 0, as theirs does.
"""

from __future__ import annotations

import math

import torch

PEAK_BINS = 100  # their net_esd_estimator's default, which get_esd_metrics keeps


def alpha_peak(evals: torch.Tensor, bins: int = PEAK_BINS) -> float:
    """``alpha_peak`` of one spectrum (``evals`` ascending; computed in float32 as theirs is).

    NaN where their code has no number: fewer than 2 eigenvalues (their search is empty and
    ``argmin`` of nothing fails), a zero eigenvalue (log10 0 is -inf and ``torch.histc``
    refuses an infinite range), or an infinite alpha (a flat spectrum, as of an orthogonal
    matrix: n / 0)."""
    nz = evals.detach().to("cpu", torch.float32)
    N = nz.numel()
    if N < 2 or not bool((nz > 0).all()) or not bool(torch.isfinite(nz).all()):
        return math.nan
    log_nz = torch.log(nz)
    alphas = nz.new_zeros(N - 1)  # float32 on the CPU, as nz, whatever torch's defaults
    Ds = nz.new_ones(N - 1)
    logs10 = torch.log10(nz)
    lo, hi = logs10.min(), logs10.max()
    counts = torch.histc(logs10, bins, min=float(lo), max=float(hi))
    edges = torch.linspace(lo, hi, bins + 1, dtype=nz.dtype, device=nz.device)
    xmin2 = 10 ** edges[torch.argmax(counts)]
    xmin_min = torch.log10(0.95 * xmin2)
    xmin_max = 1.5 * xmin2
    for i in range(N - 1):
        xmin = nz[i]
        if xmin < xmin_min:
            continue
        if xmin > xmin_max:
            break
        n = float(N - i)
        seq = torch.arange(n, dtype=nz.dtype, device=nz.device)
        alpha = 1 + n / (torch.sum(log_nz[i:]) - n * log_nz[i])
        alphas[i] = alpha
        if alpha > 1:
            Ds[i] = torch.max(torch.abs(1 - (nz[i:] / xmin) ** (-alpha + 1) - seq / n))
    alpha = float(alphas[torch.argmin(Ds)])
    # Their inf (a flat spectrum: sum of log ratios 0) or NaN is no alpha; the table holds none.
    return alpha if math.isfinite(alpha) else math.nan
