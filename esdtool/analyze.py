"""``analyze``: a checkpoint in, a parquet metrics table out, one tensor at a time.

For each tensor: read it (memory-mapped, one at a time), move it to the device, check it is
finite and non-zero, compute its spectrum, fit it, free it. Tensors that are not matrices,
too small, or not floating point get a ``skipped`` row with the reason. The library reports
progress through an optional hook and never prints.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import math
import os
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import torch

from esdtool import __version__, distributed
from esdtool.checkpoint import FLOAT_DTYPES, Checkpoint, TensorInfo, open_checkpoint
from esdtool.errors import EsdtoolError, OutputError, SettingsError
from esdtool.metrics import empty_metrics, spectrum_metrics
from esdtool.resume import Sidecar, fingerprint, sidecar_path
from esdtool.roles import block_index, infer_role, module_name
from esdtool.settings import AnalyzeSettings
from esdtool.source import ResolvedSource, resolve_source
from esdtool.spectra import auto_dtype, checked_eigenvalues, checked_spectrum, matrices_of
from esdtool.table import write_metrics

__all__ = ["AnalyzeResult", "AnalyzeSettings", "ProgressHook", "analyze", "analyze_tensor"]


class ProgressHook(Protocol):
    """Receives progress from :func:`analyze` (the CLI draws a rich bar from it)."""

    def start(self, total_tensors: int, total_bytes: int) -> None: ...

    def advance(self, name: str, nbytes: int) -> None: ...

    def note(self, message: str) -> None:
        """Something the user should know now (e.g. that a run resumes)."""


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
    resumed: int = 0

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
            "resumed_rows": self.resumed,
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


def memory_needed(info: TensorInfo, dtype: str) -> int:
    """Bytes analysing ``info`` may hold at once: the stored tensor twice (read + the one read
    ahead), and per batch of matrices either the float64 Gram matrix, a 32 MB upcast block and
    the eigensolver's workspace, or (float32) the upcast matrix and the SVD's workspace."""
    rows, cols = matrix_shape(info.shape)
    if cols is None:
        return 2 * info.nbytes
    M, N = min(rows, cols), max(rows, cols)
    count = math.prod(info.shape) // (rows * cols)
    if dtype == "float32":
        work = count * (3 * M * N + 2 * M * M) * 4
    else:
        work = count * 3 * M * M * 8 + (1 << 25)
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
    if len(info.shape) < 2:
        return f"{len(info.shape)}-D tensor, not a matrix"
    if len(info.shape) > 4:
        return f"{len(info.shape)}-D tensor, no matrix view"
    M = min(matrix_shape(info.shape))
    if min_evals > M:
        return f"M = {M} < min_evals = {min_evals}"
    if budget is not None and (need := memory_needed(info, dtype)) > budget:
        return (
            f"needs about {need / 1e9:.1f} GB to analyse, more than the "
            f"{budget / 1e9:.1f} GB budget (--max-tensor-gb)"
        )
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


# Elements of one batch of expert Gram matrices (E x M x M): 32M float64 = 256 MB.
_EXPERT_BATCH_ELEMENTS = 1 << 25


def analyze_tensor(
    info: TensorInfo, tensor: torch.Tensor, settings: AnalyzeSettings, device: torch.device
) -> list[dict[str, Any]]:
    """The table rows of one tensor already in memory: one per matrix (one per expert).

    The experts of a 3-D tensor go through the eigensolver in batches (one batched Gram
    product and one batched eigvalsh per batch), the rows still one per expert.
    """
    dtype = auto_dtype(device) if settings.dtype == "auto" else getattr(torch, settings.dtype)
    tensor = tensor.to(device, non_blocking=True)
    rows, cols = matrix_shape(info.shape)
    if tensor.ndim == 3:
        return _analyze_experts(info, tensor, settings, device, dtype)
    started = time.perf_counter()
    (matrix,) = matrices_of(tensor)
    row = _base_row(info, rows, cols)
    evals, finite = checked_spectrum(matrix, dtype, settings.conv_norm)
    if finite:
        _fill(row, evals, settings)
    else:
        row.update(status="nonfinite", reason="NaN or Inf entries")
    row["device"] = str(device)
    row["seconds"] = time.perf_counter() - started
    return [row]


def _analyze_experts(
    info: TensorInfo,
    tensor: torch.Tensor,
    settings: AnalyzeSettings,
    device: torch.device,
    dtype: torch.dtype,
) -> list[dict[str, Any]]:
    rows, cols = matrix_shape(info.shape)
    M = min(rows, cols)
    step = max(1, _EXPERT_BATCH_ELEMENTS // (M * M))
    out = []
    for start in range(0, tensor.shape[0], step):
        started = time.perf_counter()
        evals, finite = checked_eigenvalues(tensor[start : start + step], dtype)
        chunk = []
        for offset, ok in enumerate(finite.tolist()):
            row = _base_row(info, rows, cols)
            row["slice"] = start + offset
            if ok:
                _fill(row, evals[offset], settings)
            else:
                row.update(status="nonfinite", reason="NaN or Inf entries")
            row["device"] = str(device)
            chunk.append(row)
        for row in chunk:  # the batch's time, shared out
            row["seconds"] = (time.perf_counter() - started) / len(chunk)
        out.extend(chunk)
    return out


def _fill(row: dict[str, Any], evals: torch.Tensor, settings: AnalyzeSettings) -> None:
    row["num_evals"] = evals.numel()
    row["eigenvalues"] = evals.float().cpu().numpy()
    row.update(spectrum_metrics(evals, row["M"], row["N"], settings))
    row["status"] = "zero" if row["lambda_max"] == 0 else "ok"


def analyze(
    source: str | os.PathLike[str],
    output: str | os.PathLike[str],
    settings: AnalyzeSettings | None = None,
    *,
    revision: str | None = None,
    token: str | None = None,
    progress: ProgressHook | None = None,
    resume: bool = True,
) -> AnalyzeResult:
    """Analyse every selected tensor of ``source`` and write the metrics table to ``output``.

    ``source`` is a .safetensors file, a model directory (single file or sharded with an
    index), or a hub id. All headers are checked before any computing starts, so a damaged
    checkpoint fails fast; a tensor that fails later gets an ``error`` row and the rest go on.

    Each finished tensor's rows are appended to a sidecar next to ``output``; a run that was
    killed or interrupted resumes from it when started again with the same output, checkpoint
    and settings (``resume=False`` starts afresh). Ctrl-C raises :class:`AnalysisInterrupted`,
    which says how many rows are kept.

    Under ``torchrun`` (WORLD_SIZE > 1) each process computes a cost-balanced share of the
    tensors on its own device and rank 0 writes the whole table, the same rows as one process
    would write. Every rank returns its own share's summary.
    """
    settings = settings or AnalyzeSettings()
    started = time.perf_counter()
    world = distributed.join(settings.device)
    try:
        device = resolve_device(distributed.rank_device(settings.device, world))
        if settings.dtype == "auto":  # the table records the precision actually used
            settings = replace(settings, dtype=str(auto_dtype(device)).removeprefix("torch."))
        if world is not None and not world.main:
            distributed.barrier(world)  # rank 0 fetches a hub snapshot first; we reuse it
        resolved = resolve_source(source, revision=revision, token=token)
        if world is not None and world.main:
            distributed.barrier(world)
        with open_checkpoint(resolved.files) as ckpt:
            names = list(filter(settings.selects, ckpt.keys()))
            if not names:
                raise SettingsError(
                    f"{resolved.source}: no tensor names pass --include/--exclude "
                    f"({len(ckpt.keys())} tensors in the checkpoint)"
                )
            _check_something_analysable(ckpt, names, settings, resolved.source)
            side = _open_sidecar(Path(output), resolved, settings, world, resume, progress)
            try:
                rows = _analyze_names(ckpt, names, settings, device, progress, world, side)
            except KeyboardInterrupt:
                side.close()
                raise AnalysisInterrupted(side) from None
            metadata = _metadata(resolved, ckpt, settings, device, world)
        mine = rows
        if world is not None:
            rows = distributed.gather_rows(world, rows) or []
        if world is None or world.main:
            rows.sort(key=lambda r: (r["_order"], -1 if r["slice"] is None else r["slice"]))
            write_metrics(rows, Path(output), metadata)
        if world is not None:
            distributed.barrier(world)  # the table exists before any rank returns
        side.remove()
        shown = rows if world is None or world.main else mine
        seconds = time.perf_counter() - started
        result = _summarise(shown, Path(output), seconds, device, resolved)
        return replace(result, resumed=side.kept_rows)
    finally:
        if world is not None:
            distributed.leave(world)


def _analyze_names(
    ckpt: Checkpoint,
    names: list[str],
    settings: AnalyzeSettings,
    device: torch.device,
    progress: ProgressHook | None,
    world: distributed.World | None = None,
    side: Sidecar | None = None,
) -> list[dict[str, Any]]:
    """Rows of this process's share of ``names``, each tagged ``_order`` (its place in
    ``names``). Tensors are read one ahead by a reader thread while the current one computes.
    Tensors the sidecar already holds are not computed again; new ones are appended to it."""
    infos = [ckpt.info(n) for n in names]
    budget = memory_budget(settings, device)
    reasons = [skip_reason(info, settings.min_evals, budget, settings.dtype) for info in infos]
    work = [i for i, r in enumerate(reasons) if r is None]
    if world is not None:
        shares = distributed.partition([distributed.matrix_cost(infos[i].shape) for i in work],
                                       world.size)  # fmt: skip
        work = [work[j] for j in shares[world.rank]]
    header_only = [i for i, r in enumerate(reasons) if r is not None]
    if world is not None and not world.main:
        header_only = []  # rank 0 writes the skipped rows
    mine = sorted(work + header_only)
    if progress:
        progress.start(len(mine), sum(infos[i].nbytes for i in mine))
    rows: list[dict[str, Any]] = []
    for i in header_only:
        rows.append({**_row_without_spectrum(infos[i], "skipped", reasons[i]), "_order": i})
    if progress:
        for i in header_only:
            progress.advance(infos[i].name, infos[i].nbytes)
    order = {info.name: i for i, info in enumerate(infos)}
    kept = side.kept if side is not None else {}
    for i in work:
        if infos[i].name in kept:
            rows.extend({**row, "_order": i} for row in kept[infos[i].name])
            if progress:
                progress.advance(infos[i].name, infos[i].nbytes)
    todo = [infos[i] for i in work if infos[i].name not in kept]
    pin = device.type == "cuda"
    for info, tensor in prefetched(ckpt, todo, pin=pin):
        try:
            if isinstance(tensor, Exception):
                raise tensor
            new = analyze_tensor(info, tensor, settings, device)
        except Exception as exc:  # one bad tensor must not lose the others' rows
            new = [_row_without_spectrum(info, "error", f"{type(exc).__name__}: {exc}")]
        del tensor
        if side is not None:
            side.append(new)
        rows.extend({**row, "_order": order[info.name]} for row in new)
        if progress:
            progress.advance(info.name, info.nbytes)
    return rows


def prefetched(
    ckpt: Checkpoint, infos: list[TensorInfo], *, depth: int = 1, pin: bool = False
) -> Iterator[tuple[TensorInfo, torch.Tensor | Exception]]:
    """(info, tensor) for each of ``infos`` in order, read by a background thread that stays
    at most ``depth`` tensors ahead (memory: the current tensor plus ``depth`` + 1 more).

    Reading (page faults, decompression of the mmap, pinning for a fast host-to-GPU copy)
    overlaps with the current tensor's eigensolver, which releases the GIL. A read error is
    handed over in place of the tensor, so the caller can record it and go on.
    """
    items: queue.Queue[Any] = queue.Queue(maxsize=max(1, depth))
    stop = threading.Event()

    def read() -> None:
        for info in infos:
            if stop.is_set():
                break
            try:
                tensor = ckpt.get_tensor(info.name)
                item: Any = (info, tensor.pin_memory() if pin else tensor)
            except Exception as exc:
                item = (info, exc)
            while not stop.is_set():
                try:
                    items.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
        items.put(None)

    reader = threading.Thread(target=read, name="esdtool-reader", daemon=True)
    reader.start()
    try:
        while (item := items.get()) is not None:
            yield item
    finally:
        stop.set()
        with contextlib.suppress(queue.Empty):
            while True:
                items.get_nowait()
        reader.join(timeout=5)


class AnalysisInterrupted(EsdtoolError):
    """Ctrl-C during an analysis: the finished rows are safe in the sidecar."""

    exit_code = 130

    def __init__(self, side: Sidecar) -> None:
        done = len(side.kept) + side.appended
        super().__init__(
            f"interrupted; {done} finished tensor(s) kept in {side.path}",
            hint="run the same command again to resume (--no-resume starts over)",
        )


def _check_something_analysable(
    ckpt: Checkpoint, names: list[str], settings: AnalyzeSettings, source: str
) -> None:
    """Fail before any work when no selected tensor can have a spectrum, saying why."""
    reasons = {n: skip_reason(ckpt.info(n), settings.min_evals) for n in names}
    if all(r is not None for r in reasons.values()):
        sample = "; ".join(f"{n}: {r}" for n, r in list(reasons.items())[:3])
        raise SettingsError(
            f"{source}: nothing to analyse: none of its {len(names)} selected tensors is a "
            f"floating-point matrix with at least {settings.min_evals} rows and columns "
            f"({sample})"
        )


def _open_sidecar(
    output: Path,
    resolved: ResolvedSource,
    settings: AnalyzeSettings,
    world: distributed.World | None,
    resume: bool,
    progress: ProgressHook | None,
) -> Sidecar:
    rank, size = (world.rank, world.size) if world is not None else (0, 1)
    path = sidecar_path(output, rank, size)
    digest = fingerprint(list(resolved.files), settings.to_dict(), {"world": size})
    try:
        side = Sidecar.open(path, digest, resume=resume)
    except OSError as exc:
        raise OutputError(f"{path}: cannot write the resume file ({exc.strerror or exc})") from exc
    note = getattr(progress, "note", None)
    if note is not None and rank == 0:
        if side.kept:
            note(f"resuming: keeping {side.kept_rows} finished row(s) from {path}")
        elif side.discarded:
            note(f"{path} is from another checkpoint or other settings; starting afresh")
    return side


def _row_without_spectrum(info: TensorInfo, status: str, reason: str) -> dict[str, Any]:
    row = _base_row(info, *matrix_shape(info.shape))
    row.update(status=status, reason=reason, seconds=0.0, device=None)
    return row


def _metadata(
    resolved: ResolvedSource,
    ckpt: Checkpoint,
    settings: AnalyzeSettings,
    device: torch.device,
    world: distributed.World | None = None,
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
        "world_size": world.size if world is not None else 1,
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
