"""The spectrum of a low-rank product Delta W = s B A without forming it (docs/method.md,
"Trained adapters").

Delta W has rank at most r, so its Gram matrix has at most r nonzero eigenvalues. With the
thin QR factorisations B = Q_B R_B and A^T = Q_A R_A, Delta W = Q_B (s R_B R_A^T) Q_A^T, and
since Q_B and Q_A have orthonormal columns the singular values of Delta W are those of the
small core s R_B R_A^T (at most r x r). Cost: O((out + in) r^2) instead of the O(out in M)
of the Gram matrix of the formed product; the result equals that spectrum to rounding.
"""

from __future__ import annotations

import math

import torch


def lowrank_eigenvalues(B: torch.Tensor, A: torch.Tensor, scaling: float, M: int) -> torch.Tensor:
    """The M eigenvalues lambda = sigma^2 of (s B A)(s B A)^T on its smaller side, ascending, in
    float64: the k = min(r, out, in) squares of the core's singular values, below them M - k
    exact zeros. ``B`` is [out, r], ``A`` is [r, in], M = min(out, in). Finite factors whose
    product overflows float64 give M infinities (the caller says so)."""
    with torch.no_grad():
        _, r_b = torch.linalg.qr(B.to(torch.float64))
        _, r_a = torch.linalg.qr(A.to(torch.float64).mT)
        core = (r_b * scaling) @ r_a.mT
        if not bool(torch.isfinite(core).all()):  # finite factors whose product leaves float64
            return torch.full((M,), math.inf, dtype=torch.float64, device=core.device)
        sigma = torch.linalg.svdvals(core)
    nonzero = sigma.square().flip(0)
    zeros = torch.zeros(M - nonzero.numel(), dtype=torch.float64, device=nonzero.device)
    return torch.cat([zeros, nonzero])
