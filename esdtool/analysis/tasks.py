"""What analysing each selected tensor takes, decided from headers before any data is read: a
:class:`Task` per tensor name, with its row facts, the bytes to read, and either the reason it
gets no spectrum or, for a quantized weight, the parts to read and dequantize; with an adapter
merged in (``analyze MODEL --adapter``), the adapter tensors each adapted weight adds."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace

import torch

from esdtool.adapters import AdapterLayout, LowRankUpdate, Merge, merged_weight
from esdtool.adapters.layout import strip_prefix
from esdtool.analysis.resources import skip_reason
from esdtool.analysis.roles import infer_role, module_name
from esdtool.analysis.rows import header_row
from esdtool.analysis.settings import AnalyzeSettings
from esdtool.dequant import Layout, QuantizedWeight
from esdtool.errors import OptionError
from esdtool.io.checkpoint import Checkpoint, TensorInfo
from esdtool.io.table import MatrixRow

# The adapter's tensors among a quantized weight's parts (by role) when an adapter changes it.
FROM_ADAPTER = "adapter:"


@dataclass(frozen=True)
class Task:
    """One selected tensor's work.

    info:    the row facts: its name, stored dtype and shard; for a quantized weight the shape
             is the dequantized one.
    nbytes:  bytes read from the checkpoint (every part of a quantized weight).
    status:  "skipped" or "error" when decided from headers, with ``reason``; None to compute.
    weight:  the quantized weight to dequantize first, or None for a plain tensor.
    module:  the module name of the row when it is not the tensor name without ``.weight``.
    label:   the ``quantization`` column.
    update:  a LoRA module's low-rank update, analysed from its factors, or None.
    adapter: the ``adapter`` column (rows of an adapter, or of a weight an adapter changed).
    merge:   an adapter's change to this base tensor (``--adapter``), or None.
    """

    info: TensorInfo
    nbytes: int
    status: str | None = None
    reason: str | None = None
    weight: QuantizedWeight | None = None
    module: str | None = None
    label: str | None = None
    update: LowRankUpdate | None = None
    adapter: str | None = None
    merge: Merge | None = None


def plan_tasks(
    ckpt: Checkpoint,
    names: list[str],
    layout: Layout,
    settings: AnalyzeSettings,
    budget: int | None,
    adapter: AdapterLayout | None = None,
    merges: Mapping[str, tuple[Merge, TensorInfo | None, str]] | None = None,
) -> list[Task]:
    """A :class:`Task` for each of ``names`` (``budget``: bytes one tensor may use, or None to
    ignore memory); ``adapter``: the layout of a PEFT adapter's file; ``merges``: by base
    tensor name, what a merged adapter does to it (the :class:`Merge`, the header of the
    adapter tensor that replaces it, and the ``adapter`` column)."""
    if adapter is not None:
        return [_adapter_task(ckpt, ckpt.info(name), adapter, settings, budget) for name in names]
    tasks = []
    for name in names:
        info = ckpt.info(name)
        weight = layout.weights.get(name)
        note = layout.notes.get(name)
        if weight is not None and settings.raw_codes:
            task = _raw(info, weight.label, settings, budget, weight.module)
        elif weight is not None:
            task = _quantized(ckpt, info, weight, settings, budget)
        elif note is not None and note.codes and settings.raw_codes:
            task = _raw(info, note.reason, settings, budget, None)
        elif note is not None:
            task = Task(info, info.nbytes, note.status, note.reason)
        else:
            reason = skip_reason(info, settings.min_evals, budget, settings.dtype)
            task = Task(info, info.nbytes, "skipped" if reason else None, reason)
        if merges and name in merges:
            task = _merged(task, *merges[name], settings, budget)
        tasks.append(task)
    return tasks


def _merged(
    task: Task,
    merge: Merge,
    saved: TensorInfo | None,
    label: str,
    settings: AnalyzeSettings,
    budget: int | None,
) -> Task:
    """``task`` with an adapter's change: a ``modules_to_save`` tensor read from the adapter in
    place of the base one, or a LoRA update added to the (dequantized) base weight."""
    if saved is not None:  # the adapter's tensor, under the base tensor's name
        info = replace(saved, name=task.info.name)
        reason = skip_reason(info, settings.min_evals, budget, settings.dtype)
        return Task(info, info.nbytes, "skipped" if reason else None, reason,
                    module=task.module, adapter=label, merge=merge)  # fmt: skip
    update = merge.update
    assert update is not None
    task = replace(task, adapter=label, merge=merge)
    if task.status is not None or budget is None:
        return task
    # Memory beside the weight's own analysis: the factors, the dense update and the sum (and
    # DoRA's transposed sum), in float32 or wider.
    count = math.prod(task.info.shape)
    width = 8 if task.info.dtype == "F64" else 4
    need = 2 * update.rank * sum(update.shape) * width + 3 * count * width
    dense = task.info
    if task.weight is not None:  # as _quantized counts it: the parts, the decoding's temporaries
        dense = replace(task.info, dtype="F32", end=task.info.begin + 4 * count)
        need += 2 * task.nbytes + 12 * count
    reason = skip_reason(dense, settings.min_evals, budget - need, settings.dtype)
    return replace(task, status="skipped" if reason else None, reason=reason)


def _adapter_task(
    ckpt: Checkpoint,
    info: TensorInfo,
    adapter: AdapterLayout,
    settings: AnalyzeSettings,
    budget: int | None,
) -> Task:
    """A tensor of an adapter: a LoRA update (its row takes the update's shape and needs only
    the factors in memory), a part noted from the headers, or a weight saved in full."""
    update = adapter.updates.get(info.name)
    if update is not None:
        nbytes = sum(ckpt.info(n).nbytes for _, n in update.parts())
        row = replace(info, shape=update.shape)
        reason = skip_reason(row, settings.min_evals, None, settings.dtype)
        # Memory: the stored factors (read ahead too), their float64 copies and the thin QRs'
        # (about two more float64 copies); the r x r core and M eigenvalues are small beside.
        count = sum(math.prod(ckpt.info(n).shape) for _, n in update.parts())
        need = 2 * nbytes + 24 * count
        if reason is None and budget is not None and need > budget:
            reason = (f"needs about {need / 1e9:.3g} GB to analyse, more than the "
                      f"{budget / 1e9:.3g} GB budget (--max-tensor-gb)")  # fmt: skip
        return Task(row, nbytes, "skipped" if reason else None, reason, None, update.module,
                    None, update, update.label)  # fmt: skip
    note = adapter.notes.get(info.name)
    if note is not None:
        status, reason, kind = note
        module = module_name(strip_prefix(info.name))
        return Task(info, info.nbytes, status, reason, module=module, adapter=kind)
    module, label = adapter.full[info.name]
    reason = skip_reason(info, settings.min_evals, budget, settings.dtype)
    return Task(info, info.nbytes, "skipped" if reason else None, reason,
                module=module, adapter=label)  # fmt: skip


def _quantized(
    ckpt: Checkpoint,
    info: TensorInfo,
    weight: QuantizedWeight,
    settings: AnalyzeSettings,
    budget: int | None,
) -> Task:
    nbytes = sum(ckpt.info(n).nbytes for n in weight.names())
    row = replace(info, shape=weight.shape)
    # Memory: the stored parts (read ahead too), the float32 weight they decode to, and the
    # decoding's own temporaries (unpacked int32 codes, scales and zero points spread over the
    # matrix: about three more float32 matrices).
    count = _count(weight)
    dense = replace(info, dtype="F32", shape=weight.shape, end=info.begin + 4 * count)
    left = None if budget is None else budget - 2 * nbytes - 12 * count
    reason = skip_reason(dense, settings.min_evals, left, settings.dtype)
    return Task(row, nbytes, "skipped" if reason else None, reason, weight, weight.module,
                weight.label)  # fmt: skip


def _raw(
    info: TensorInfo,
    what: str,
    settings: AnalyzeSettings,
    budget: int | None,
    module: str | None,
) -> Task:
    """--raw-codes: the stored codes as they are, when they are floats (FP8); ``what`` says
    how they are quantized."""
    reason = skip_reason(info, settings.min_evals, budget, settings.dtype)
    if reason and info.dtype.startswith(("I", "U")):
        reason = f"integer codes have no spectrum of their own ({info.dtype}; {what})"
    return Task(info, info.nbytes, "skipped" if reason else None, reason, None, module,
                f"raw codes ({what})")  # fmt: skip


def _count(weight: QuantizedWeight) -> int:
    return math.prod(weight.shape)


def check_farms_windows(infos: list[TensorInfo], settings: AnalyzeSettings) -> None:
    """With --estimator farms, every block projection to analyse (role linear or expert: what
    plans adapt) takes the window the settings give; one error naming how many do not and the
    first, before any work (FARMS' own code would cut the window short, changing its aspect
    ratio). Other matrices that cannot take it (a tall bias table, a small head) get null FARMS
    columns: they are no plan's candidates, and must not stop the analysis."""
    if settings.estimator != "farms":
        return
    from esdtool.spectral.farms import windows

    misfits = []
    for info in infos:
        if len(info.shape) not in (2, 3) or infer_role(info.name, len(info.shape)) not in (
            "linear",
            "expert",
        ):
            continue  # other matrices that cannot take it get null FARMS columns (not plans')
        rows, cols = info.shape[-2], info.shape[-1]
        try:
            windows(rows, cols, settings.farms_rows, settings.farms_q, settings.farms_grid)
        except ValueError as exc:
            misfits.append((info.name, exc))
    if misfits:
        name, exc = misfits[0]
        fits_q = "--farms-q 1 always fits" if settings.farms_q > 1 else "raise --farms-q"
        raise OptionError(
            f"{len(misfits)} matri{'x' if len(misfits) == 1 else 'ces'} cannot take the FARMS "
            f"window of --farms-rows {settings.farms_rows} and --farms-q {settings.farms_q:g} "
            f"(e.g. {name}: {exc})",
            hint=f"lower --farms-rows or --farms-q ({fits_q}), or --exclude those matrices",
        )


def read_task(
    ckpt: Checkpoint, task: Task, adapter: Checkpoint | None = None
) -> torch.Tensor | dict[str, torch.Tensor]:
    """The stored tensor of a plain task, or the parts of a quantized weight or a LoRA update
    by role. Of a weight an adapter (``adapter``) changes: the adapter's tensor that replaces
    it; a plain weight merged here, on the CPU (in the reader thread, while the device works;
    on every machine the same bits as PEFT's merge on a CPU); a quantized weight's parts and
    the adapter's (keys prefixed :data:`FROM_ADAPTER`), merged once decoded on the device."""
    if task.update is not None:
        return {role: ckpt.get_tensor(name) for role, name in task.update.parts()}
    if task.merge is not None:
        assert adapter is not None
        if task.merge.saved is not None:
            return adapter.get_tensor(task.merge.saved)
        factors = {role: adapter.get_tensor(name) for role, name in task.merge.parts()}
        if task.weight is None:
            return merged_weight(ckpt.get_tensor(task.info.name), factors, task.merge)
        parts = {role: ckpt.get_tensor(name) for role, name in task.weight.parts}
        return {**parts, **{FROM_ADAPTER + role: t for role, t in factors.items()}}
    if task.weight is None:
        return ckpt.get_tensor(task.info.name)
    return {role: ckpt.get_tensor(name) for role, name in task.weight.parts}


def materialize(
    task: Task, stored: torch.Tensor | dict[str, torch.Tensor], device: torch.device
) -> torch.Tensor:
    """The tensor to analyse, on ``device``: the stored (or already merged) one, or the
    dequantized weight (its parts moved to ``device`` and decoded there), with a LoRA update
    merged in there when an adapter changes it."""
    if task.merge is None or task.merge.update is None or task.weight is None:
        return _dense(task, stored, device)
    assert isinstance(stored, dict)
    factors = {role.removeprefix(FROM_ADAPTER): t.to(device, non_blocking=True)
               for role, t in stored.items() if role.startswith(FROM_ADAPTER)}  # fmt: skip
    parts = {role: t for role, t in stored.items() if not role.startswith(FROM_ADAPTER)}
    return merged_weight(_dense(task, parts, device), factors, task.merge)


def _dense(
    task: Task, stored: torch.Tensor | dict[str, torch.Tensor], device: torch.device
) -> torch.Tensor:
    """The stored tensor, or the dequantized weight, on ``device``."""
    if task.weight is None:
        assert isinstance(stored, torch.Tensor)
        return stored.to(device, non_blocking=True)
    assert isinstance(stored, dict)
    parts = {role: t.to(device, non_blocking=True) for role, t in stored.items()}
    dense = task.weight.decode(parts)
    if tuple(dense.shape) != task.weight.shape:  # a decoding bug must not become a number
        raise RuntimeError(
            f"dequantized to {list(dense.shape)}, expected {list(task.weight.shape)}"
        )
    return dense


def task_row(task: Task, status: str, reason: str | None = None) -> MatrixRow:
    """The header facts of ``task``'s row with ``status`` (and ``reason``, else its own)."""
    update = task.update
    return header_row(
        task.info, status, reason or task.reason, module=task.module, quantization=task.label,
        adapter=task.adapter, lora_rank=update.rank if update else None,
        lora_alpha=update.alpha if update else None,
    )  # fmt: skip
