"""Eigenvalue spectra of weight tensors (method.md sections 1-2).

lambda_i = sigma_i(W)^2, the eigenvalues of the Gram matrix on W's smaller side, ascending,
with no 1/N normalisation. Pure functions on tensors; the device is the tensors' own.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch

DEFAULT_CONV_NORM = 0.5


@contextlib.contextmanager
def _exact_matmul(device: torch.device) -> Iterator[None]:
    """Disable TF32 for the Gram product on CUDA: TF32 keeps 10 mantissa bits, which moves
    small eigenvalues by far more than float32 rounding would."""
    if device.type != "cuda":
        yield
        return
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


# Elements of W upcast at a time while forming the Gram matrix (32 MB in float64), so that a
# bf16 embedding of 128k x 4k never exists whole in float64.
_GRAM_BLOCK_ELEMENTS = 1 << 22


def gram(W: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """W W^T or W^T W in ``dtype``, whichever is M x M (M = the smaller side).

    Batched over leading dimensions. The long side is summed in blocks, each upcast on its
    own (row blocks of a tall matrix are contiguous slices), so memory stays at the stored
    tensor plus one block plus the M x M result.
    """
    tall = W.shape[-2] > W.shape[-1]
    M, L = (W.shape[-1], W.shape[-2]) if tall else (W.shape[-2], W.shape[-1])
    step = max(1, _GRAM_BLOCK_ELEMENTS // max(1, M * math.prod(W.shape[:-2])))
    G = torch.zeros(*W.shape[:-2], M, M, dtype=dtype, device=W.device)
    for start in range(0, L, step):
        if tall:
            block = W[..., start : start + step, :].to(dtype)
            G += block.mT @ block
        else:
            block = W[..., start : start + step].to(dtype)
            G += block @ block.mT
    return G


def eigenvalues(W: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Squared singular values of W (or of each matrix in a batch), ascending, in ``dtype``.

    float64: the eigenvalues of the Gram matrix on the smaller side, whose rounding error is
    about 1e-16 * lambda_max. float32: the singular values of W itself, squared. A float32 Gram
    matrix would be faster but its error, about 1e-7 * lambda_max, swamps the small
    eigenvalues (alpha_fix_finger moved by 23% on MiniLM); the SVD's error on sigma is about
    1e-7 * sigma_max, so lambda = sigma^2 keeps ~1e-5 relative accuracy where it matters.
    Tiny negative values from rounding are set to 0.
    """
    return checked_eigenvalues(W, dtype)[0]


# Gram diagonal (sum of squared entries of a row) where float64 squares lose nothing: below,
# small entries' squares underflow (1e-170 squares to 0); above, sums near overflow.
_SAFE_GRAM = (2.0**-800, 2.0**800)
# Largest |w| a float32 SVD can take without its squares leaving float32's range.
_SAFE_FLOAT32 = (2.0**-60, 2.0**60)


def checked_eigenvalues(
    W: torch.Tensor, dtype: torch.dtype = torch.float64
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`eigenvalues` and, per matrix, whether W is finite (no NaN or Inf).

    On the float64 path the check is free: each entry of W lands in exactly one diagonal
    entry of the Gram matrix as its square, and a finite bf16/fp16/fp32 value squared and
    summed cannot overflow float64, so W is finite exactly when diag(G) is. Only float64
    weights can leave that range (entries of 1e160 square to inf, of 1e-170 to 0): a matrix
    whose diagonal is not finite, or outside the safe range, is checked on its data and, when
    finite, computed again on W * 2^-e (exact) with its eigenvalues scaled back by 2^2e, so they
    are true, or inf / 0 where float64 cannot hold them (the caller says so). A matrix that is
    not finite gets zeros for eigenvalues (the caller reports it; nothing is fitted).
    """
    with torch.no_grad():
        if dtype != torch.float64 and W.dtype == torch.float64:
            peak = W.abs().amax()
            if not (_SAFE_FLOAT32[0] <= float(peak) <= _SAFE_FLOAT32[1]):
                return checked_eigenvalues(W)  # in float64: float32 would over/underflow
        if dtype == torch.float64:
            with _exact_matmul(W.device):
                G = gram(W)  # float64
            diag = G.diagonal(dim1=-2, dim2=-1)
            finite = torch.isfinite(diag).all(-1)
            peak = diag.amax(-1)
            odd = ~finite | (peak < _SAFE_GRAM[0]) | (peak > _SAFE_GRAM[1])
            if not bool(finite.all()):
                G[~finite] = 0
            evals = torch.linalg.eigvalsh(G)
            if bool(odd.any()):
                finite = _rescaled(W, evals, finite, odd)
        else:
            upcast = W.to(dtype)
            finite = torch.isfinite(upcast).flatten(-2).all(-1)
            if not bool(finite.all()):
                upcast[~finite] = 0
            evals = torch.linalg.svdvals(upcast).square().flip(-1)
            top = evals[..., -1]
            tiny = torch.finfo(torch.float32).tiny  # below it: subnormal, digits lost
            if bool(finite.all()) and not bool(((top >= tiny) & torch.isfinite(top)).all()):
                # Squares left float32's range (|w| ~ 1e19, subnormal, or an all-zero matrix):
                # float64 holds them; the float32 path must not call them out of range.
                return checked_eigenvalues(W)  # in float64
    return evals.clamp_min_(0), finite


def _rescaled(
    W: torch.Tensor, evals: torch.Tensor, finite: torch.Tensor, odd: torch.Tensor
) -> torch.Tensor:
    """Recompute, in place in ``evals``, the spectra of the ``odd`` matrices of W (batched like
    ``finite``) on W * 2^-e, e = floor(log2 max|w|); return finiteness read from the data."""
    batch = W.reshape(-1, *W.shape[-2:])
    flat_evals, flat_finite, flat_odd = (
        evals.reshape(-1, evals.shape[-1]),
        finite.reshape(-1),
        odd.reshape(-1),
    )
    for i in torch.nonzero(flat_odd).flatten().tolist():
        matrix = batch[i].to(torch.float64)
        peak = float(matrix.abs().amax())
        flat_finite[i] = math.isfinite(peak)
        if not math.isfinite(peak) or peak == 0:
            flat_evals[i] = 0
            continue
        e = math.floor(math.log2(peak))
        with _exact_matmul(W.device):
            G = gram(torch.ldexp(matrix, torch.tensor(-e, device=W.device)))  # float64
        scaled = torch.linalg.eigvalsh(G).clamp_min(0)
        flat_evals[i] = torch.ldexp(scaled, torch.tensor(2 * e, device=W.device))
    return flat_finite.reshape(finite.shape)


# CUDA compute capabilities with full- or half-rate FP64 (P100, V100, A100, H100/H200, B200).
_FP64_GPUS = {(6, 0), (7, 0), (8, 0), (9, 0), (10, 0)}


def auto_dtype(device: torch.device) -> torch.dtype:
    """float64 where it is fast (CPUs, data-centre GPUs), float32 on GPUs with slow FP64."""
    if device.type == "cuda" and torch.cuda.get_device_capability(device) not in _FP64_GPUS:
        return torch.float32
    return torch.float64


@dataclass(frozen=True)
class MatrixView:
    """How a tensor of some shape is read as matrices: the one rule every module uses.

    rows, cols: the sides of each matrix (out x in features).
    count:      how many such matrices (experts of a 3-D tensor, kernel positions of a 4-D one).
    pooled:     True when the ``count`` matrices make one spectrum (4-D conv kernels), False when
                each is its own row (3-D experts) or there is one matrix.
    """

    rows: int
    cols: int
    count: int = 1
    pooled: bool = False


def matrix_view(shape: tuple[int, ...]) -> MatrixView | None:
    """The matrices of a tensor of ``shape``: a 2-D weight is one; a 3-D tensor [E, rows, cols]
    holds E experts; a 4-D conv kernel [out, in, kh, kw] holds kh*kw matrices W[:, :, i, j]
    pooled into one spectrum. None for vectors, scalars and tensors of 5 or more dimensions."""
    if len(shape) == 2:
        return MatrixView(shape[0], shape[1])
    if len(shape) == 3:
        return MatrixView(shape[1], shape[2], shape[0])
    if len(shape) == 4:
        return MatrixView(shape[0], shape[1], shape[2] * shape[3], pooled=True)
    return None


def matrices_of(tensor: torch.Tensor) -> list[torch.Tensor]:
    """The matrices whose spectra describe ``tensor`` (views, no copies), as
    :func:`matrix_view` says: the weights' own for 2-D, one per expert for 3-D, and for 4-D conv
    kernels one batch of the kh*kw matrices, whose spectra :func:`spectrum` pools.
    """
    if tensor.ndim == 2:
        return [tensor]
    if tensor.ndim == 3:
        return list(tensor.unbind(0))
    if tensor.ndim == 4:
        return [tensor.flatten(2).permute(2, 0, 1)]
    raise ValueError(f"no matrix view for a {tensor.ndim}-D tensor")


def spectrum(
    matrix: torch.Tensor,
    dtype: torch.dtype = torch.float64,
    conv_norm: float = DEFAULT_CONV_NORM,
) -> torch.Tensor:
    """Sorted eigenvalues of one entry of :func:`matrices_of`.

    A 3-D entry (conv kernel positions) is pooled into one spectrum and scaled by conv_norm,
    the same as scaling every W[:, :, i, j] by sqrt(conv_norm) (TempBalance's convention).
    """
    return checked_spectrum(matrix, dtype, conv_norm)[0]


def checked_spectrum(
    matrix: torch.Tensor,
    dtype: torch.dtype = torch.float64,
    conv_norm: float = DEFAULT_CONV_NORM,
) -> tuple[torch.Tensor, bool]:
    """:func:`spectrum` and whether the matrix (every kernel position) is finite."""
    evals, finite = checked_eigenvalues(matrix, dtype)
    if evals.ndim > 1:
        evals = torch.sort(evals.flatten()).values * conv_norm
    return evals, bool(finite.all())
