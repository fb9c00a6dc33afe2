"""From one tensor to its table rows (:class:`~esdtool.io.table.MatrixRow` records): the header
facts every row has, and the spectra of a tensor already in memory."""

from __future__ import annotations

import math
import time
from dataclasses import replace

import torch

from esdtool.analysis.roles import block_index, infer_role, module_name
from esdtool.analysis.settings import AnalyzeSettings
from esdtool.io.checkpoint import TensorInfo
from esdtool.io.table import MatrixRow
from esdtool.spectral.farms import farms_metrics
from esdtool.spectral.lowrank import lowrank_eigenvalues
from esdtool.spectral.metrics import spectrum_metrics
from esdtool.spectral.peak import alpha_peak
from esdtool.spectral.spectra import (
    auto_dtype,
    checked_eigenvalues,
    checked_spectrum,
    matrices_of,
    matrix_view,
)

# Elements of one batch of expert Gram matrices (E x M x M): 32M float64 = 256 MB.
_EXPERT_BATCH_ELEMENTS = 1 << 25


def header_row(
    info: TensorInfo,
    status: str,
    reason: str | None = None,
    *,
    module: str | None = None,
    quantization: str | None = None,
    adapter: str | None = None,
    lora_rank: int | None = None,
    lora_alpha: float | None = None,
) -> MatrixRow:
    """A row from the header alone: what every row has, with no spectrum (skipped, error).
    ``module`` overrides the module name read off the tensor name (a quantized weight's codes
    tensor, e.g. ``q_proj.qweight``, belongs to ``q_proj``)."""
    view = matrix_view(info.shape)
    if view is not None:
        rows, cols = view.rows, view.cols
    else:  # a vector is (length, None); a scalar (1, None); 5-D and up like their last two
        rows = info.shape[-2] if len(info.shape) >= 2 else (info.shape[0] if info.shape else 1)
        cols = info.shape[-1] if len(info.shape) >= 2 else None
    role_name = info.name if module is None else module + ".weight"
    return MatrixRow(
        name=info.name,
        module=module_name(info.name) if module is None else module,
        role=infer_role(role_name, len(info.shape)),
        layer=block_index(info.name),
        shard=info.shard.name,
        dtype=info.dtype,
        rows=rows,
        cols=cols,
        status=status,
        reason=reason,
        seconds=0.0,
        quantization=quantization,
        adapter=adapter,
        lora_rank=lora_rank,
        lora_alpha=lora_alpha,
    )


def _measured(
    row: MatrixRow,
    evals: torch.Tensor,
    finite: bool,
    settings: AnalyzeSettings,
    matrix: torch.Tensor,
    mp_sides: tuple[int, int] | None = None,
) -> MatrixRow:
    """``row`` with the spectrum ``evals`` of ``matrix`` and its metrics; marked nonfinite for
    NaN/Inf entries, skipped when float64 cannot hold the eigenvalues of finite entries."""
    if not finite:
        return replace(row, status="nonfinite", reason="NaN or Inf entries")
    top = float(evals[-1])
    if not math.isfinite(top) or top == 0:
        peak = float(matrix.to(torch.float64).abs().amax())  # fp8 has no amax of its own
        if peak > 0:  # finite, non-zero entries whose squares leave float64's range
            side = "overflow" if top > 0 else "underflow"
            reason = f"eigenvalues {side} float64 (largest |entry| {peak:.3g}); rescale the weights"
            return replace(row, status="skipped", reason=reason)
    assert row.M is not None and row.N is not None
    fits = {
        "eig_threshold": settings.eig_threshold, "sigma_fit": settings.sigma_fit,
        "tw_quantile": settings.tw_quantile, "weighted_alpha": settings.weighted_alpha,
        "spike_rule": settings.spike_rule,
    }  # fmt: skip
    metrics = spectrum_metrics(evals, row.M, row.N, mp_sides=mp_sides, **fits)
    farms = None
    if settings.estimator == "farms" and matrix.ndim == 2 and metrics.lambda_max > 0:
        try:
            farms = farms_metrics(matrix, settings.farms_rows, settings.farms_q,
                                  settings.farms_grid, evals.dtype, **fits)  # fmt: skip
        except ValueError:  # no window fits: a matrix no plan adapts (projections are checked)
            farms = None
    peak = alpha_peak(evals) if settings.alpha_peak and metrics.lambda_max > 0 else None
    return replace(
        row,
        status="zero" if metrics.lambda_max == 0 else "ok",
        eigenvalues=evals.float().cpu().numpy(),
        metrics=metrics,
        farms=farms,
        alpha_peak=peak,
    )


def analyze_tensor(
    info: TensorInfo,
    tensor: torch.Tensor,
    settings: AnalyzeSettings,
    device: torch.device,
    base: MatrixRow | None = None,
) -> list[MatrixRow]:
    """The table rows of one tensor already in memory: one per matrix (one per expert).
    ``base`` is the row's header facts when they are not ``header_row(info, "ok")`` alone.

    The experts of a 3-D tensor go through the eigensolver in batches (one batched Gram
    product and one batched eigvalsh per batch), the rows still one per expert.
    """
    dtype = auto_dtype(device) if settings.dtype == "auto" else getattr(torch, settings.dtype)
    base = base or header_row(info, "ok")
    tensor = tensor.to(device, non_blocking=True)
    if tensor.ndim == 3:
        return _analyze_experts(base, tensor, settings, device, dtype)
    started = time.perf_counter()
    conv_norm = settings.conv_norm
    if settings.preset == "lora-ar" and tensor.ndim == 4 and tensor.element_size() == 2:
        # The origin scales a 16-bit kernel by sqrt(conv_norm) in its own dtype, rounding it
        # again, before the float32 SVD (its adaptive_rank_assignment.py line 87).
        tensor = tensor * math.sqrt(conv_norm)
        conv_norm = 1.0
    (matrix,) = matrices_of(tensor)
    evals, finite = checked_spectrum(matrix, dtype, conv_norm)
    sides = None
    if settings.spike_rule == "lora-ar" and tensor.ndim == 4:
        # The origin's conv quirk: M and N over the reshaped (kh*kw, out, in) tensor's three
        # dimensions, batch dimension included (its adaptive_rank_assignment.py line 93).
        dims = (tensor.shape[2] * tensor.shape[3], tensor.shape[0], tensor.shape[1])
        sides = (min(dims), max(dims))
    row = _measured(base, evals, finite, settings, matrix, sides)
    return [replace(row, device=str(device), seconds=time.perf_counter() - started)]


def _analyze_experts(
    base: MatrixRow,
    tensor: torch.Tensor,
    settings: AnalyzeSettings,
    device: torch.device,
    dtype: torch.dtype,
) -> list[MatrixRow]:
    assert base.M is not None
    step = max(1, _EXPERT_BATCH_ELEMENTS // (base.M * base.M))
    out: list[MatrixRow] = []
    for start in range(0, tensor.shape[0], step):
        started = time.perf_counter()
        evals, finite = checked_eigenvalues(tensor[start : start + step], dtype)
        chunk = [
            _measured(
                replace(base, slice=start + offset), evals[offset], ok, settings,
                tensor[start + offset],
            )
            for offset, ok in enumerate(finite.tolist())
        ]  # fmt: skip
        seconds = (time.perf_counter() - started) / len(chunk)  # the batch's time, shared out
        out.extend(replace(row, device=str(device), seconds=seconds) for row in chunk)
    return out


def analyze_update(
    base: MatrixRow,
    factors: dict[str, torch.Tensor],
    scaling: float,
    settings: AnalyzeSettings,
    device: torch.device,
) -> list[MatrixRow]:
    """The row of a LoRA update scaling * B A from its factors (``factors["A"]`` [r, in],
    ``factors["B"]`` [out, r]), never formed: its eigenvalues come from an r x r problem
    (:func:`~esdtool.spectral.lowrank.lowrank_eigenvalues`), always in float64, and its
    metrics are those of a low-rank spectrum (no power-law or MP fit)."""
    started = time.perf_counter()
    # float64 first: FP8 factors have no isfinite of their own, and the QR wants float64 anyway
    A, B = (factors[k].to(device, non_blocking=True).to(torch.float64) for k in ("A", "B"))
    finite = bool(torch.isfinite(A).all()) and bool(torch.isfinite(B).all())
    if not finite:
        return [replace(base, status="nonfinite", reason="NaN or Inf entries in lora_A or lora_B",
                        device=str(device))]  # fmt: skip
    assert base.M is not None and base.N is not None
    evals = lowrank_eigenvalues(B, A, scaling, base.M)
    top = float(evals[-1])
    if not math.isfinite(top):
        return [replace(base, status="skipped", device=str(device),
                        reason="eigenvalues overflow float64 (scaling * B A is too large to "
                        "measure); rescale the factors")]  # fmt: skip
    metrics = spectrum_metrics(evals, base.M, base.N, eig_threshold=settings.eig_threshold,
                               low_rank=True)  # fmt: skip
    row = replace(
        base,
        status="zero" if metrics.lambda_max == 0 else "ok",
        eigenvalues=evals.float().cpu().numpy(),
        metrics=metrics,
        device=str(device),
        seconds=time.perf_counter() - started,
    )
    return [row]
