"""AlphaPruning's layer-wise sparsity plan, re-implemented in plain numpy from its published code.

Source: haiquanlu/AlphaPruning.

- ``lib/prune.py`` at commit 541cb9aa9a1af50741d632353b5808740d3ade94 (15,753 characters):
  ``ww_sparsity`` (L152-187) and the ``*_ww`` wrappers that call it with
  ``s1 = 1 - epsilon, s2 = 1 + epsilon`` (L406-429). "P<n>" in the comments below is a line of
  this file.
- ``lib/esd_utils.py`` at commit a585914bdb9805b603777bd694b324b8ea625026 (7,035 characters):
  ``net_esd_estimator`` (L69-184), which ``get_esd_metrics`` calls with only
  ``fix_fingers='xmin_peak'`` for the default metric ``alpha_peak``. The other defaults apply:
  ``bins=100``, ``filter_zeros=False``. The version at 08659df326d791aa41375c898f1a8cd59acebc2c
  has the same ``net_esd_estimator`` body. "L<n>" in the comments below is a line of this file.

The per-module metric the plan reads (``data/<model>/alpha_peak.npy``, P166) is
``net_esd_estimator(...)['alpha']``, one value per nn.Linear of ``model.model.layers`` in
named_modules() order (q, k, v, o, gate, up, down for Llama: 7 per block).

Precision. ``ww_sparsity`` works in float64 (``torch.tensor`` of numpy float64 values) except
for one float32 quirk in the numerator of the scaler, which ``faithful_float32`` reproduces.
``net_esd_estimator`` runs in float32 torch on CPU. ``alpha_peak(precision="float32")`` does
every step with numpy float32 arithmetic. It cannot be bit-identical to torch: numpy sums in
another order than ``torch.sum`` (a float32 alpha differs from torch's by up to about 1e-4
absolute: the denominator sum(ln lambda) - n ln lambda_i cancels), and log, log10 and pow are
taken as float64 results rounded to float32, which is nearly but not always what torch's
kernels return. The histogram bins and the linspace edge follow torch's float32 rounding.
``precision="float64"`` applies the same formulas in float64. That is the mode to test an
implementation against to 1e-12.

No esdtool import.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np

BINS = 100  # L72: net_esd_estimator's default, not overridden by get_esd_metrics


def _dtype(precision: str):
    return {"float32": np.float32, "float64": np.float64}[precision]


def _rounded32(fn):
    """fn evaluated in float64 and rounded to float32: torch's float32 log, log10 and pow on CPU
    are (nearly) correctly rounded, numpy's float32 versions are not. On 200,000 random
    arguments, torch 2.13 differs from this in 4 (log10), 19 (log) and 3,505 (10 ** x) cases,
    and from numpy's float32 functions in 102,787, 12,910 and 41,093."""

    def f(*args):
        out = fn(*(np.asarray(a, dtype=np.float64) for a in args))
        return out.astype(np.float32) if np.ndim(out) else np.float32(out)

    return f


def _elementary(precision: str):
    """(log, log10, power) for the precision."""
    if precision == "float64":
        return np.log, np.log10, np.power
    _dtype(precision)  # KeyError for an unknown precision
    return _rounded32(np.log), _rounded32(np.log10), _rounded32(np.power)


# ----------------------------------------------------------------- ww_sparsity (P152-187)


def ww_sparsity(
    metrics: np.ndarray,
    numels: np.ndarray,
    sparsity: float,
    epsilon: float,
    block: int | None,
    faithful_float32: bool = False,
) -> np.ndarray:
    """Per-module pruning ratios, as ``prune_*_ww`` hands them to the pruners (P406-429).

    ``metrics``: one value per prunable module, in module order (P166). ``numels``: each module's
    ``weight.numel()`` (P159-162). ``block``: the modules per decoder layer (P164: 7 for Llama,
    6 for OPT) for ``--mapping_type block_wise`` (the default), or None for any other
    mapping_type (per-module ratios).

    The formula, in float64 (P174-183):
        r_k     = ((m_k - min m) / (max m - min m)) * (s2 - s1) + s1,  s1 = 1 - eps, s2 = 1 + eps
        scaler  = sum(numel) * sparsity / sum(numel * r)
        ratio_k = r_k * scaler
    The result is not clamped (a ratio can exceed 1), and if max m == min m every ratio is NaN
    (0/0, no guard in the origin).

    ``faithful_float32=True`` reproduces the origin's numerator. There ``torch.sum(prunables)``
    is an int64 tensor, and an int64 tensor times a python float gives the default dtype
    float32, so the numerator is fl32(fl32(T) * fl32(sparsity)). The denominator is float64
    (int64 tensor * float64 tensor), and the float32 / float64 division is float64. The default
    (False) is the intended float64 ``T * sparsity``.
    """
    m = np.asarray(metrics, dtype=np.float64)  # P166: np.load of a float64 array
    numel = np.asarray(numels, dtype=np.int64)  # P175: torch.tensor(list of int) is int64
    s1 = 1.0 - epsilon  # P416 (same in P407 and P424)
    s2 = 1.0 + epsilon  # P417
    if block is not None:  # P168: args.mapping_type == 'block_wise'
        block_metrics = [np.mean(m[i : i + block]) for i in range(0, len(m), block)]  # P169
        m = np.array([v for v in block_metrics for _ in range(block)], dtype=np.float64)  # P170
    if m.shape != numel.shape:
        # The origin never checks this; torch would fail to broadcast P182 (or silently
        # broadcast a length-1 side).
        raise ValueError(f"{m.shape[0]} metric values for {numel.shape[0]} modules")
    scores = m  # P174: float64 tensor
    mx = np.max(scores)  # P178
    mn = np.min(scores)  # P179
    with np.errstate(divide="ignore", invalid="ignore"):
        r = ((scores - mn) / (mx - mn)) * (s2 - s1) + s1  # P181, s2 - s1 in python float
    total = int(np.sum(numel))  # P182: torch.sum(prunables), int64
    if faithful_float32:
        num = float(np.float32(np.float32(total) * np.float32(sparsity)))  # P182, float32
    else:
        num = float(total) * sparsity  # the intended float64 product
    den = np.sum(numel.astype(np.float64) * r)  # P182: int64 * float64 tensor, float64
    with np.errstate(divide="ignore", invalid="ignore"):
        scaler = num / den  # P182: float64 result
        return r * scaler  # P183


# ---------------------------------------------- net_esd_estimator, xmin_peak (L138-170)


def _histc_peak_edge(h: np.ndarray, dt) -> tuple[int, object]:
    """Index of the fullest bin and its left edge: L142-148 (before the 10 **).

    torch.histc (CPU, linear interpolation without local search): the bin of x is
    ``int((x - lo) * bins / (hi - lo))`` in the input dtype, truncated, with pos == bins moved
    to bins - 1 (the last bin is closed on the right); if lo == hi histc widens the range to
    [lo - 1, hi + 1]. ``torch.linspace(lo, hi, bins + 1)`` on CPU: step = (hi - lo) / bins,
    element idx = lo + step * idx for idx < (bins + 1) // 2, else hi - step * (bins - idx).
    In float32 the product and the sum are rounded once (as torch's fused multiply-add does);
    in float64 the formula is applied as written (two roundings). argmax returns the first
    maximal bin.
    """
    lo, hi = h.min(), h.max()  # L143
    blo, bhi = (dt(float(lo) - 1), dt(float(hi) + 1)) if lo == hi else (lo, hi)
    pos = ((h - blo) * dt(BINS) / (bhi - blo)).astype(np.int64)  # L144: histc
    pos[pos == BINS] = BINS - 1
    counts = np.bincount(pos, minlength=BINS)
    ih = int(np.argmax(counts))  # L147: first maximum
    step = (hi - lo) / dt(BINS)  # L145: linspace(lo, hi, bins + 1)
    if dt is np.float32:
        # torch's CPU build fuses the product and the sum (one rounding, FMA); checked against
        # torch 2.13 linspace on 30,300 float32 values: equal everywhere, while the two-rounding
        # formula differs in about 18% of them.
        if ih < (BINS + 1) // 2:
            edge = _round_f32(Fraction(float(lo)) + Fraction(float(step)) * ih)
        else:
            edge = _round_f32(Fraction(float(hi)) - Fraction(float(step)) * (BINS - ih))
    elif ih < (BINS + 1) // 2:
        edge = lo + step * dt(ih)
    else:
        edge = hi - step * dt(BINS - ih)
    return ih, edge


def _round_f32(q: Fraction) -> np.float32:
    """q rounded once to the nearest float32, ties to even."""
    x = np.float32(float(q))
    near = [np.nextafter(x, np.float32(-np.inf)), x, np.nextafter(x, np.float32(np.inf))]
    return min(
        near, key=lambda c: (abs(Fraction(float(c)) - q), int(np.array(c).view(np.int32)) & 1)
    )


def alpha_peak_fit(evals: np.ndarray, precision: str = "float64") -> tuple[float, float, int]:
    """(alpha, D, chosen index) of net_esd_estimator(fix_fingers='xmin_peak') (L138-170).

    ``evals``: the squared singular values of one module (L111). They are sorted ascending
    here (L113); nothing is filtered (filter_zeros=False, L124-126). NaN values when there are
    fewer than 2 eigenvalues or any eigenvalue is <= 0 (the origin would fail on an empty
    ``alphas`` or get -inf logs; not reproduced).

    - Histogram of log10(lambda) with 100 bins over [min, max] (torch.histc rule, see
      :func:`_histc_peak_edge`); xmin2 = 10 ** (left edge of the first fullest bin) (L142-148).
    - xmin_min = log10(0.95 * xmin2), xmin_max = 1.5 * xmin2 (L149-150). Origin quirk: the
      lower bound is a log10 value compared with *linear* eigenvalues (L154).
    - Candidates i = 0 .. N-2 (L152: enumerate(nz_eigs[:-1])): skip while lambda_i < xmin_min,
      stop at the first lambda_i > xmin_max (L154-157).
    - alpha_i = 1 + n / (sum_{j>=i} ln lambda_j - n ln lambda_i), n = N - i (L159-162).
    - Only when alpha_i > 1: D_i = max_t |1 - (lambda_{i+t} / lambda_i)^(1 - alpha_i) - t / n|,
      t = 0 .. n-1 (L160, L163-166).
    - alphas start at 0 and Ds at 1 (L139-140); the first argmin of Ds over all N-1 slots picks
      the result (L168-170), so with no D < 1 it falls back to slot 0.
    """
    dt = _dtype(precision)
    log, log10, power = _elementary(precision)
    e = np.sort(np.asarray(evals).astype(dt).ravel())  # L110-113: float32, ascending
    N = len(e)  # L126
    if N < 2 or not np.all(e > 0):
        return math.nan, math.nan, -1
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        log_e = log(e)  # L127: natural log
        h = log10(e)  # L142
        _, edge = _histc_peak_edge(h, dt)
        xmin2 = power(dt(10), edge)  # L148
        xmin_min = log10(dt(0.95) * xmin2)  # L149 (log10, compared with linear lambdas)
        xmin_max = dt(1.5) * xmin2  # L150
        alphas = np.zeros(N - 1, dtype=dt)  # L139
        ds = np.ones(N - 1, dtype=dt)  # L140
        for i in range(N - 1):  # L152
            xmin = e[i]
            if xmin < xmin_min:  # L154-155
                continue
            if xmin > xmin_max:  # L156-157
                break
            n = dt(N - i)  # L159: float(N - i)
            seq = np.arange(N - i, dtype=dt)  # L160: torch.arange(n) (float32 in the origin)
            alpha = dt(1) + n / (np.sum(log_e[i:], dtype=dt) - n * log_e[i])  # L161
            alphas[i] = alpha  # L162
            if alpha > 1:  # L163
                ds[i] = np.max(np.abs(dt(1) - power(e[i:] / xmin, -alpha + dt(1)) - seq / n))
    k = int(np.argmin(ds))  # L168: first minimum
    return float(alphas[k]), float(ds[k]), k  # L169-170, L172-173


def alpha_peak(evals: np.ndarray, precision: str = "float64") -> float:
    """The module's ``alpha_peak`` (``results['alpha']``, L172); see :func:`alpha_peak_fit`."""
    return alpha_peak_fit(evals, precision)[0]
