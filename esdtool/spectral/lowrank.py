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
from collections.abc import Iterator
from contextlib import contextmanager

import torch

# Factors up to this many elements are factorised on one thread: LAPACK's threads cost more
# than such a QR (on 2 busy cores a 32 x 4 QR took 2 ms with 2 threads, 20 us with one: an
# adapter of 18,000 modules 170 s instead of 12 s).
ONE_THREAD_ELEMENTS = 1 << 18


@contextmanager
def _threads_for(elements: int) -> Iterator[None]:
    threads = torch.get_num_threads()
    if elements > ONE_THREAD_ELEMENTS or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def lowrank_eigenvalues(B: torch.Tensor, A: torch.Tensor, scaling: float, M: int) -> torch.Tensor:
    """The M eigenvalues lambda = sigma^2 of (s B A)(s B A)^T on its smaller side, ascending, in
    float64: the k = min(r, out, in) squares of the core's singular values, below them M - k
    exact zeros. ``B`` is [out, r], ``A`` is [r, in], M = min(out, in). Finite factors whose
    product overflows float64 give M infinities (the caller says so)."""
    with torch.no_grad(), _threads_for(B.numel() + A.numel()):
        _, r_b = torch.linalg.qr(B.to(torch.float64))
        _, r_a = torch.linalg.qr(A.to(torch.float64).mT)
        core = (r_b * scaling) @ r_a.mT
        if not bool(torch.isfinite(core).all()):  # finite factors whose product leaves float64
            return core.new_full((M,), math.inf)
        sigma = torch.linalg.svdvals(core)
    nonzero = sigma.square().flip(0)
    zeros = nonzero.new_zeros(M - nonzero.numel())
    return torch.cat([zeros, nonzero])
