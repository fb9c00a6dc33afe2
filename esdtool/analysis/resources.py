"""What an analysis may use, decided before any computing: the device, the memory budget, and
which tensors get no spectrum (and why), from their headers alone."""

from __future__ import annotations

import os

import torch

from esdtool.analysis.settings import AnalyzeSettings
from esdtool.errors import OptionError
from esdtool.io.checkpoint import FLOAT_DTYPES, TensorInfo
from esdtool.spectral.spectra import matrix_view


def resolve_device(device: str) -> torch.device:
    """ "auto" -> the first CUDA device when there is one, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise OptionError(f"--device {device}: not a device ({exc})") from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise OptionError(
                f"--device {device}: CUDA is not available here", hint="use --device cpu"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise OptionError(
                f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) here"
            )
    return dev


def memory_needed(info: TensorInfo, dtype: str) -> int:
    """Bytes analysing ``info`` may hold at once: the stored tensor twice (read + the one read
    ahead), and per batch of matrices either the float64 Gram matrix, a 32 MB upcast block and
    the eigensolver's workspace, or (float32) the upcast matrix and the SVD's workspace."""
    view = matrix_view(info.shape)
    if view is None:
        return 2 * info.nbytes
    M, N = min(view.rows, view.cols), max(view.rows, view.cols)
    if dtype == "float32":
        work = view.count * (3 * M * N + 2 * M * M) * 4
    else:
        work = view.count * 3 * M * M * 8 + (1 << 25)
    return 2 * info.nbytes + work


def memory_budget(settings: AnalyzeSettings, device: torch.device) -> int:
    """--max-tensor-gb in bytes, or the default: 80% of the GPU's free memory, half the RAM
    that is available (Linux's MemAvailable, else free pages)."""
    if settings.max_tensor_gb is not None:
        return int(settings.max_tensor_gb * 1e9)
    if device.type == "cuda":
        return int(0.8 * torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        return int(fields["MemAvailable"].split()[0]) * 1024 // 2
    except (OSError, KeyError, ValueError):
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2


def skip_reason(
    info: TensorInfo, min_evals: int, budget: int | None = None, dtype: str = "float64"
) -> str | None:
    """Why a tensor gets no spectrum, decided from its header alone; None to analyse it."""
    if info.dtype not in FLOAT_DTYPES:
        kinds = {"BOOL": "boolean", "F8_E8M0": "scale-only (exponent) float"}
        return f"{kinds.get(info.dtype, 'integer/packed (quantized?)')} dtype {info.dtype}"
    if 0 in info.shape:
        return f"empty tensor (shape {list(info.shape)})"
    view = matrix_view(info.shape)
    if view is None:
        if len(info.shape) < 2:
            return f"{len(info.shape)}-D tensor, not a matrix"
        return f"{len(info.shape)}-D tensor, no matrix view"
    M = min(view.rows, view.cols)
    if view.pooled:  # a conv kernel's kh*kw spectra are pooled into one
        if min_evals > M * view.count:
            return f"{M * view.count} pooled eigenvalues < min_evals = {min_evals}"
    elif min_evals > M:
        return f"M = {M} < min_evals = {min_evals}"
    if budget is not None and (need := memory_needed(info, dtype)) > budget:
        return (
            f"needs about {need / 1e9:.3g} GB to analyse, more than the "
            f"{budget / 1e9:.3g} GB budget (--max-tensor-gb)"
        )
    return None
