"""``analyze``: a checkpoint in, a parquet metrics table out, one tensor at a time.

For each tensor: read it (memory-mapped, one at a time), move it to the device, check it is
finite and non-zero, compute its spectrum, fit it, free it. Tensors that are not matrices,
too small, or not floating point get a ``skipped`` row with the reason. The library reports
progress through an optional hook and never prints.
"""

from __future__ import annotations

import datetime as _dt
import math
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import torch

from esdtool import __version__
from esdtool.checkpoint import FLOAT_DTYPES, Checkpoint, TensorInfo, open_checkpoint
from esdtool.errors import SettingsError
from esdtool.metrics import empty_metrics, spectrum_metrics
from esdtool.roles import block_index, infer_role, module_name
from esdtool.settings import AnalyzeSettings
from esdtool.source import ResolvedSource, resolve_source
from esdtool.spectra import all_finite, auto_dtype, matrices_of, spectrum
from esdtool.table import write_metrics

__all__ = ["AnalyzeResult", "AnalyzeSettings", "ProgressHook", "analyze", "analyze_tensor"]


class ProgressHook(Protocol):
    """Receives progress from :func:`analyze` (the CLI draws a rich bar from it)."""

    def start(self, total_tensors: int, total_bytes: int) -> None: ...

    def advance(self, name: str, nbytes: int) -> None: ...


@dataclass(frozen=True)
class AnalyzeResult:
    """What one analysis produced.

    output:   the parquet file written.
    rows:     rows in the table (every selected tensor, or matrix of a 3-D tensor).
    analysed: rows with a spectrum (status ok or zero).
    skipped:  rows skipped with a reason.
    errors:   one line per row that failed to be read or computed (status error).
    warnings: one line per matrix with NaN/Inf entries (status nonfinite).
    seconds:  wall time of the whole analysis.
    slowest:  (name, seconds) of the slowest row, or None.
    device:   where spectra were computed.
    """

    output: Path
    rows: int
    analysed: int
    skipped: int
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0
    slowest: tuple[str, float] | None = None
    device: str = "cpu"
    source: str = ""
    revision: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (the CLI's ``--json`` output)."""
        return {
            "output": str(self.output),
            "source": self.source,
            "revision": self.revision,
            "rows": self.rows,
            "analysed": self.analysed,
            "skipped": self.skipped,
            "errors": self.errors,
            "warnings": self.warnings,
            "seconds": round(self.seconds, 3),
            "slowest": (
                {"name": self.slowest[0], "seconds": round(self.slowest[1], 4)}
                if self.slowest
                else None
            ),
            "device": self.device,
        }


def resolve_device(device: str) -> torch.device:
    """ "auto" -> the first CUDA device when there is one, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise SettingsError(
                f"--device {device}: CUDA is not available here", hint="use --device cpu"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise SettingsError(
                f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) here"
            )
    return dev


def matrix_shape(shape: tuple[int, ...]) -> tuple[int, int | None]:
    """(rows, cols) of the matrices a tensor is read as: the last two dimensions, the first two
    for a 4-D conv kernel [out, in, kh, kw], and (length, None) for a vector."""
    if len(shape) == 4:
        return shape[0], shape[1]
    if len(shape) >= 2:
        return shape[-2], shape[-1]
    return (shape[0] if shape else 1), None


def skip_reason(info: TensorInfo, min_evals: int) -> str | None:
    """Why a tensor gets no spectrum, decided from its header alone; None to analyse it."""
    if info.dtype not in FLOAT_DTYPES:
        kinds = {"BOOL": "boolean", "F8_E8M0": "scale-only (exponent) float"}
        return f"{kinds.get(info.dtype, 'integer/packed (quantized?)')} dtype {info.dtype}"
    if len(info.shape) < 2:
        return f"{len(info.shape)}-D tensor, not a matrix"
    if len(info.shape) > 4:
        return f"{len(info.shape)}-D tensor, no matrix view"
    M = min(matrix_shape(info.shape))
    if min_evals > M:
        return f"M = {M} < min_evals = {min_evals}"
    return None


def _base_row(info: TensorInfo, rows: int | None, cols: int | None) -> dict[str, Any]:
    """The columns every row has, from the header alone; metrics empty until computed."""
    M = N = None
    if rows is not None and cols is not None:
        M, N = min(rows, cols), max(rows, cols)
    return {
        "name": info.name,
        "module": module_name(info.name),
        "slice": None,
        "role": infer_role(info.name, len(info.shape)),
        "layer": block_index(info.name),
        "shard": info.shard.name,
        "dtype": info.dtype,
        "rows": rows,
        "cols": cols,
        "M": M,
        "N": N,
        "Q": (N / M) if M else None,
        "num_evals": 0,
        "eigenvalues": [],
        "reason": None,
        **empty_metrics(),
    }


def analyze_tensor(
    info: TensorInfo, tensor: torch.Tensor, settings: AnalyzeSettings, device: torch.device
) -> list[dict[str, Any]]:
    """The table rows of one tensor already in memory: one per matrix (one per expert)."""
    dtype = auto_dtype(device) if settings.dtype == "auto" else getattr(torch, settings.dtype)
    tensor = tensor.to(device, non_blocking=True)
    rows_out = []
    shape = info.shape
    rows, cols = matrix_shape(shape)
    for index, matrix in enumerate(matrices_of(tensor)):
        started = time.perf_counter()
        row = _base_row(info, rows, cols)
        if len(shape) == 3:
            row["slice"] = index
        M, N = row["M"], row["N"]
        if not all_finite(matrix):
            row.update(status="nonfinite", reason="NaN or Inf entries")
        else:
            evals = spectrum(matrix, dtype, settings.conv_norm)
            row["num_evals"] = evals.numel()
            row["eigenvalues"] = evals.float().cpu().numpy()
            row.update(spectrum_metrics(evals, M, N, settings))
            row["status"] = "zero" if row["lambda_max"] == 0 else "ok"
        row["device"] = str(device)
        row["seconds"] = time.perf_counter() - started
        rows_out.append(row)
    return rows_out


def analyze(
    source: str | os.PathLike[str],
    output: str | os.PathLike[str],
    settings: AnalyzeSettings | None = None,
    *,
    revision: str | None = None,
    token: str | None = None,
    progress: ProgressHook | None = None,
) -> AnalyzeResult:
    """Analyse every selected tensor of ``source`` and write the metrics table to ``output``.

    ``source`` is a .safetensors file, a model directory (single file or sharded with an
    index), or a hub id. All headers are checked before any computing starts, so a damaged
    checkpoint fails fast; a tensor that fails later gets an ``error`` row and the rest go on.
    """
    settings = settings or AnalyzeSettings()
    started = time.perf_counter()
    device = resolve_device(settings.device)
    if settings.dtype == "auto":  # the table records the precision actually used
        settings = replace(settings, dtype=str(auto_dtype(device)).removeprefix("torch."))
    resolved = resolve_source(source, revision=revision, token=token)
    with open_checkpoint(resolved.files) as ckpt:
        names = list(filter(settings.selects, ckpt.keys()))
        if not names:
            raise SettingsError(
                f"{resolved.source}: no tensor names pass --include/--exclude "
                f"({len(ckpt.keys())} tensors in the checkpoint)"
            )
        rows = _analyze_names(ckpt, names, settings, device, progress)
        metadata = _metadata(resolved, ckpt, settings, device)
    write_metrics(rows, Path(output), metadata)
    return _summarise(rows, Path(output), time.perf_counter() - started, device, resolved)


def _analyze_names(
    ckpt: Checkpoint,
    names: list[str],
    settings: AnalyzeSettings,
    device: torch.device,
    progress: ProgressHook | None,
) -> list[dict[str, Any]]:
    infos = [ckpt.info(n) for n in names]
    if progress:
        progress.start(len(infos), sum(i.nbytes for i in infos))
    rows: list[dict[str, Any]] = []
    for info in infos:
        reason = skip_reason(info, settings.min_evals)
        if reason is not None:
            rows.append(_row_without_spectrum(info, "skipped", reason))
        else:
            try:
                rows.extend(analyze_tensor(info, ckpt.get_tensor(info.name), settings, device))
            except Exception as exc:  # one bad tensor must not lose the others' rows
                rows.append(_row_without_spectrum(info, "error", f"{type(exc).__name__}: {exc}"))
        if progress:
            progress.advance(info.name, info.nbytes)
    return rows


def _row_without_spectrum(info: TensorInfo, status: str, reason: str) -> dict[str, Any]:
    row = _base_row(info, *matrix_shape(info.shape))
    row.update(status=status, reason=reason, seconds=0.0, device=None)
    return row


def _metadata(
    resolved: ResolvedSource, ckpt: Checkpoint, settings: AnalyzeSettings, device: torch.device
) -> dict[str, Any]:
    config = resolved.config or {}
    return {
        "source": resolved.source,
        "source_kind": resolved.kind,
        "revision": resolved.revision,
        "files": [p.name for p in resolved.files],
        "model_type": config.get("model_type"),
        "architectures": config.get("architectures"),
        "checkpoint_metadata": ckpt.metadata(),
        "esdtool_version": __version__,
        "torch_version": torch.__version__,
        "settings": settings.to_dict(),
        "device": str(device),
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
    }


def _summarise(
    rows: list[dict[str, Any]],
    output: Path,
    seconds: float,
    device: torch.device,
    resolved: ResolvedSource,
) -> AnalyzeResult:
    analysed = sum(r["status"] in ("ok", "zero") for r in rows)
    skipped = sum(r["status"] == "skipped" for r in rows)

    def lines(status: str) -> list[str]:
        return [
            f"{r['shard']}: tensor {r['name']!r}: {r['reason']}"
            for r in rows
            if r["status"] == status
        ]

    timed = [r for r in rows if r["status"] == "ok" and not math.isnan(r["seconds"])]
    slowest = max(timed, key=lambda r: r["seconds"], default=None)
    return AnalyzeResult(
        output=output,
        rows=len(rows),
        analysed=analysed,
        skipped=skipped,
        errors=lines("error"),
        warnings=lines("nonfinite"),
        seconds=seconds,
        slowest=(slowest["name"], slowest["seconds"]) if slowest else None,
        device=str(device),
        source=resolved.source,
        revision=resolved.revision,
    )
