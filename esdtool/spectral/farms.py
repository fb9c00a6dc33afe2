"""FARMS: the eigenvalue spectrum of a matrix without its aspect-ratio bias (method.md, FARMS).

Hill alphas and Marchenko-Pastur spike counts depend on a matrix's aspect ratio Q, so matrices
of different shapes are not compared on equal terms. FARMS (Eigenspectrum Analysis of Neural
Networks without Aspect Ratio Bias, ICML 2025; HUST-AI-HYZ/FARMS) fits instead the pooled
spectrum of a grid of equally shaped windows of the matrix, the same window shape for every
matrix. Windows are placed as FARMS' ``fixed_sampling`` places them:

- window rows n = min(requested rows, rows, cols), window columns c = int(n Q);
- an ops x ops grid of starts: step = max(1, (side - window) // (ops - 1)), at most ops starts
  of step apart that keep the window inside the matrix, each clamped to side - window;
- one window (at 0, 0) when ops is 1 (FARMS' code divides by ops - 1 there).

A window that cannot fit (c > cols, or c < 1) is refused: FARMS' code would cut it short,
silently giving it another aspect ratio. The matrix is taken as stored (out x in), as FARMS
takes an nn.Linear's weight. Pure: tensors in, records out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from esdtool.spectral.metrics import SpectrumMetrics, spectrum_metrics
from esdtool.spectral.spectra import _GRAM_BLOCK_ELEMENTS, checked_eigenvalues

# Elements of one batch of windows' Gram matrices (B x m x m float64: 256 MB), bounding the
# memory FARMS adds to a tensor's analysis whatever the window settings.
_BATCH_ELEMENTS = 1 << 25


@dataclass(frozen=True)
class FarmsWindows:
    """Where a matrix's windows lie: each is ``n`` x ``c``, at every (row start, col start)."""

    n: int
    c: int
    row_starts: tuple[int, ...]
    col_starts: tuple[int, ...]

    @property
    def count(self) -> int:
        return len(self.row_starts) * len(self.col_starts)

    @property
    def M(self) -> int:
        """Eigenvalues per window: the window's smaller side."""
        return min(self.n, self.c)

    @property
    def N(self) -> int:
        return max(self.n, self.c)


def windows(rows: int, cols: int, n_rows: int, q: float, grid: int) -> FarmsWindows:
    """The windows of a ``rows`` x ``cols`` matrix for the settings (requested window rows,
    aspect ratio Q = columns / rows of a window, grid of ops x ops starts). ValueError when the
    settings are bad or the window does not fit."""
    if n_rows < 2 or not (math.isfinite(q) and q > 0) or grid < 1:
        raise ValueError(f"FARMS needs window rows >= 2, Q > 0 and a grid >= 1 (got {n_rows}, "
                         f"{q}, {grid})")  # fmt: skip
    n = min(n_rows, rows, cols)
    if n < 1 or n * q > cols or n * q < 1:  # as floats: int() of a huge n q would overflow
        raise ValueError(f"a {n} x {int(min(n * q, 1e18))} window does not fit a {rows} x {cols} "
                         "matrix")  # fmt: skip
    c = int(n * q)  # 1 <= c <= cols: n q lies in [1, cols]
    return FarmsWindows(n, c, _starts(rows, n, grid), _starts(cols, c, grid))


def _starts(side: int, window: int, grid: int) -> tuple[int, ...]:
    if grid == 1:
        return (0,)
    step = max(1, (side - window) // (grid - 1))
    count = min(grid, max(1, (side - window) // step + 1))
    return tuple(i * step for i in range(count))  # the last start is at most side - window


def farms_spectrum(
    W: torch.Tensor,
    n_rows: int,
    q: float,
    grid: int,
    dtype: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, bool, FarmsWindows]:
    """The pooled spectrum of ``W``'s windows, ascending in ``dtype`` (each window's squared
    singular values as :func:`~esdtool.spectral.spectra.eigenvalues` computes them), whether
    every window was finite, and the windows. The windows go through the eigensolver in
    batches of at most 256 MB of Gram matrices."""
    placed = windows(W.shape[-2], W.shape[-1], n_rows, q, grid)
    n, c = placed.n, placed.c
    rows = torch.as_tensor(placed.row_starts, device=W.device)
    cols = torch.as_tensor(placed.col_starts, device=W.device)
    starts = torch.cartesian_prod(rows, cols)  # (K, 2), row-major as FARMS loops
    # Windows per batch: within the memory bound (each window and its Gram matrix), and few
    # enough that the batch's Gram product is one block of spectra.gram (no partial sums).
    step = max(1, min(_BATCH_ELEMENTS // (n * c + placed.M * placed.M),
                      _GRAM_BLOCK_ELEMENTS // (placed.M * placed.N)))  # fmt: skip
    pooled, finite = [], True
    offsets_r = torch.arange(n, device=W.device)
    offsets_c = torch.arange(c, device=W.device)
    for first in range(0, starts.shape[0], step):
        batch = starts[first : first + step]
        r = (batch[:, 0, None] + offsets_r)[:, :, None]  # (B, n, 1)
        k = (batch[:, 1, None] + offsets_c)[:, None, :]  # (B, 1, c)
        evals, ok = checked_eigenvalues(W[r, k], dtype)  # gathered: (B, n, c)
        finite = finite and bool(ok.all())
        pooled.append(evals.reshape(-1))
    spectrum = torch.sort(torch.cat(pooled)).values
    return spectrum, finite, placed


@dataclass(frozen=True)
class FarmsMetrics:
    """The FARMS numbers of one matrix: the metrics of its pooled window spectrum (the three
    alphas and the MP fit, with M x N the window's sides) and its windows."""

    metrics: SpectrumMetrics
    windows: FarmsWindows

    @property
    def spikes_per_window(self) -> float:
        """Pooled eigenvalues above the Tracy-Widom edge of one window's shape, per window
        (NaN when the count is undefined, or every window is zero: no bulk, no edge)."""
        count = self.metrics.spikes.num_spikes
        if count is None or self.metrics.lambda_max == 0:
            return math.nan
        return count / self.windows.count


def farms_metrics(
    W: torch.Tensor,
    n_rows: int,
    q: float,
    grid: int,
    dtype: torch.dtype = torch.float64,
    **fits: Any,
) -> FarmsMetrics | None:
    """:class:`FarmsMetrics` of ``W`` (``fits``: :func:`spectrum_metrics`' keyword settings);
    None when a window is not finite."""
    pooled, finite, placed = farms_spectrum(W, n_rows, q, grid, dtype)
    if not finite or not math.isfinite(float(pooled[-1])):
        return None
    return FarmsMetrics(spectrum_metrics(pooled, placed.M, placed.N, **fits), placed)
