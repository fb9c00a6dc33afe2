"""``analyze``: a checkpoint in, a parquet metrics table out, one tensor at a time.

For each tensor: read it (memory-mapped, one at a time), move it to the device, check it is
finite and non-zero, compute its spectrum, fit it, free it. Tensors that are not matrices,
too small, or not floating point get a ``skipped`` row with the reason. The library reports
progress through an optional hook and never prints.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
import time
from collections.abc import Iterator, Mapping
from concurrent.futures import CancelledError, Future
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import torch

from esdtool.adapters import AdapterLayout, adapter_layout, read_adapter_config
from esdtool.analysis import distributed
from esdtool.analysis.distributed import matrix_cost
from esdtool.analysis.memory import analyze_memory, is_in_memory
from esdtool.analysis.merged import MergedAdapter, match_adapter, open_adapter
from esdtool.analysis.progress import TqdmProgress
from esdtool.analysis.resources import memory_budget, resolve_device
from esdtool.analysis.result import AnalyzeResult, ProgressHook, summarise
from esdtool.analysis.resume import Sidecar, fingerprint, sidecar_path
from esdtool.analysis.rows import analyze_tensor, analyze_update
from esdtool.analysis.settings import AnalyzeSettings
from esdtool.analysis.tasks import (
    Task,
    check_farms_windows,
    materialize,
    plan_tasks,
    read_task,
    task_row,
)
from esdtool.dequant import Layout, layout_of, read_scheme
from esdtool.errors import (
    AnalysisInterrupted,
    CheckpointError,
    HubCacheError,
    HubRefusedError,
    OptionError,
    OutputError,
    TransferError,
)
from esdtool.io.atomic import check_output_file
from esdtool.io.checkpoint import Checkpoint, TensorInfo, open_checkpoint, prefetched
from esdtool.io.hub_calls import Cancelled
from esdtool.io.hub_source import open_hub, wants_hub
from esdtool.io.remote import cached_identity
from esdtool.io.source import ADAPTER_CONFIG, ResolvedSource, resolve_source
from esdtool.io.table import MatrixRow, metrics_frame, write_metrics
from esdtool.spectral.spectra import auto_dtype
from esdtool.version import __version__

__all__ = ["AnalyzeResult", "AnalyzeSettings", "ProgressHook", "analyze"]

# Reading a hub checkpoint can fail for every tensor still to come: the transfer (after its
# retries), the hub refusing (a revoked token, a repo gone gated or private, a file gone), the
# HF cache unwritable. Each stops the run in one line, keeping the finished rows for a rerun,
# rather than giving every tensor left the same error row.
_FATAL_READS = (TransferError, HubRefusedError, HubCacheError)


def analyze(
    source: str | os.PathLike[str] | torch.nn.Module | Mapping[str, torch.Tensor],
    output: str | os.PathLike[str] | None = None,
    settings: AnalyzeSettings | None = None,
    *,
    revision: str | None = None,
    token: str | None = None,
    progress: ProgressHook | bool | None = None,
    resume: bool = True,
    weights: str = "base",
    stream: bool = False,
    adapter: str | os.PathLike[str] | None = None,
    quantization_config: Mapping[str, Any] | Any | None = None,
) -> AnalyzeResult:
    """Analyse every selected tensor of ``source``; the table is ``result.table`` and, when
    ``output`` is given, the parquet file written there.

    ``source`` is a .safetensors file, a model directory (single file or sharded with an
    index), a hub id, or a model already in memory: a ``torch.nn.Module`` (its parameters, by
    their ``named_parameters`` names) or a state dict. Of a PEFT model, ``weights="base"``
    reads the frozen base weights, ``"merged"`` each adapted weight plus its LoRA update, and
    ``"adapter"`` the active adapter's updates (one row per module, as for its saved files).
    In-memory tensors are analysed one at a time where they live. ``progress=True`` draws a
    progress bar (a widget in Jupyter, text in a terminal); a hook receives the progress
    instead; the default draws nothing. For files, all headers are
    checked before any computing starts, so a damaged checkpoint fails fast; a tensor that
    fails later gets an ``error`` row and the rest go on.

    Each finished tensor's rows are appended to a sidecar next to ``output``; a run that was
    killed or interrupted resumes from it when started again with the same output, checkpoint
    and settings (``resume=False`` starts afresh). Ctrl-C raises :class:`AnalysisInterrupted`,
    which says how many rows are kept.

    Under ``torchrun`` (WORLD_SIZE > 1) each process computes a cost-balanced share of the
    tensors on its own device and rank 0 writes the whole table, the same rows as one process
    would write. Every rank returns its own share's summary.

    A hub id is analysed while it downloads: shard headers first, then the shards into the HF
    cache on a background thread, in the order the analysis reads them. ``stream=True`` reads
    each tensor with an HTTP range request instead and stores nothing but the table (and the
    resume sidecar). A transfer that fails after its retries raises :class:`TransferError`, a
    request the hub refuses :class:`~esdtool.errors.HubRefusedError`, a shard the HF cache
    cannot hold :class:`~esdtool.errors.HubCacheError`; each keeps the finished rows for the
    next run.

    ``adapter`` (a PEFT LoRA adapter's directory or hub id) analyses the fine-tuned model
    without writing it: each weight the adapter adapts is merged as PEFT's ``merge_and_unload``
    merges it (W + scaling * B A, DoRA's magnitude applied, a quantized weight dequantized
    first) while the model's tensors stream, and its row, under the base tensor's name, says
    ``merged lora`` (or ``merged dora``, ...) in the ``adapter`` column; every other tensor is
    analysed as it is. The table's metadata records the adapter (``merged_adapter``).

    ``quantization_config`` (config.json's ``quantization_config``, a dict or a transformers
    quantization config) says how a state dict's quantized tensors decode (GPTQ, AWQ,
    compressed-tensors: their codes mean nothing without it), so its rows equal those of the
    same tensors saved with that config.json; a model in memory's own config is read by itself,
    and files bring theirs.
    """
    if isinstance(output, AnalyzeSettings):  # analyze(source, AnalyzeSettings(...))
        if settings is not None:
            raise OptionError("analyze: two settings given (the second argument is the output "
                              "file)", hint="analyze(source, output, settings)")  # fmt: skip
        output, settings = None, output
    if progress is True:
        bar = TqdmProgress()
        try:
            return analyze(source, output, settings, revision=revision, token=token,
                           progress=bar, resume=resume, weights=weights, stream=stream,
                           adapter=adapter, quantization_config=quantization_config)  # fmt: skip
        finally:
            bar.close()
    progress = progress or None
    if progress is not None and not callable(getattr(progress, "advance", None)):
        raise OptionError(f"progress must be True, None or a progress hook, not {progress!r}")
    settings = settings or AnalyzeSettings()
    started = time.perf_counter()
    if output is not None:  # before a download or a sidecar: -o /dev/null, -o dir/
        output = check_output_file(output)
    if is_in_memory(source):
        if adapter is not None:
            raise OptionError(
                "adapter= merges an adapter's files into a model's files; this model is in memory",
                hint="load the adapter with PEFT and analyse weights='merged'",
            )
        return _analyze_memory(source, output, settings, progress, weights, started,
                               quantization_config)  # fmt: skip
    if quantization_config is not None:
        raise OptionError(
            f"{os.fspath(source)}: quantization_config= is for tensors in memory; a "
            "checkpoint's comes from its config.json",
            hint="drop quantization_config=",
        )
    world = distributed.join(settings.device)
    try:
        device = resolve_device(distributed.rank_device(settings.device, world))
        if settings.dtype == "auto":  # the table records the precision actually used
            settings = replace(settings, dtype=str(auto_dtype(device)).removeprefix("torch."))
        if not world.main:
            distributed.barrier(world)  # rank 0 fetches a hub snapshot first; we reuse it
        resolved, opened = _open(source, revision, token, stream, progress)
        try:
            merging = None if adapter is None else open_adapter(adapter, token)
        except BaseException:
            opened.close()
            raise
        if world.main:
            distributed.barrier(world)
        with opened as ckpt, contextlib.ExitStack() as stack:
            if merging is not None:
                stack.enter_context(merging.checkpoint)
            if output is not None:  # never the checkpoint (or the adapter) itself
                theirs = merging.resolved.files if merging else ()
                check_output_file(output, resolved.files + theirs)
            names = list(filter(settings.selects, ckpt.keys()))
            if not ckpt.keys():
                raise CheckpointError(f"{resolved.source}: holds no tensors")
            if not names:
                raise OptionError(
                    f"{resolved.source}: no tensor names pass --include/--exclude "
                    f"({len(ckpt.keys())} tensors in the checkpoint)"
                )
            scheme = read_scheme(resolved.config, f"{resolved.source}: config.json")
            infos = {n: ckpt.info(n) for n in ckpt.keys()}  # noqa: SIM118 (not a dict)
            layout = layout_of(infos, scheme, ckpt.get_tensor)
            lora = _adapter_layout(resolved, infos)
            if merging is not None:  # one-line refusals of what cannot be merged
                match_adapter(merging, infos, layout, settings.raw_codes, resolved, lora)
                note = getattr(progress, "note", None)
                if merging.note and note is not None and world.main:
                    note(merging.note)  # its config names another base model
            _check_something_analysable(ckpt, names, layout, settings, resolved.source, lora,
                                        merging)  # fmt: skip
            hub = getattr(ckpt, "identity", None) or cached_identity(resolved)  # a hub id
            side = Sidecar.none()
            if output is not None:
                side = _open_sidecar(Path(output), resolved, settings, world, resume, progress,
                                     hub, merging)  # fmt: skip
            try:
                mine = _analyze_names(ckpt, names, layout, settings, device, progress, world, side,
                                      lora, merging)  # fmt: skip
            except KeyboardInterrupt:
                side.close()
                if output is None:  # nothing was being written, so nothing is kept
                    raise AnalysisInterrupted(
                        "interrupted; no output file was asked for, so no row is kept",
                        hint="give an output file to make a long run resumable",
                    ) from None
                done = len(side.kept) + side.appended
                raise AnalysisInterrupted(
                    f"interrupted; {done} finished tensor(s) kept in {side.path}",
                    hint="run the same command again to resume (--no-resume starts over)",
                ) from None
            except _FATAL_READS as exc:
                side.close()
                kept = (
                    "no output file was asked for, so no row is kept"
                    if output is None
                    else f"{len(side.kept) + side.appended} finished tensor(s) kept in {side.path}"
                )
                raise type(exc)(f"{exc}; {kept}", exc.hint) from exc
            metadata = _metadata(resolved, ckpt, settings, device, world, layout, lora, merging)
        rows = distributed.gather_rows(world, mine)
        table = None
        if rows is not None:  # rank 0: the table, in the checkpoint's order
            position = {name: i for i, name in enumerate(names)}
            rows.sort(key=lambda r: (position[r.name], -1 if r.slice is None else r.slice))
            if output is not None:
                write_metrics(rows, Path(output), metadata)
            table = partial(metrics_frame, rows, metadata)
        distributed.barrier(world)  # the table exists before any rank returns
        side.remove()
        seconds = time.perf_counter() - started
        out = None if output is None else Path(output)
        result = summarise(rows if rows is not None else mine, out, seconds, device)
        return replace(
            result, source=resolved.source, revision=resolved.revision, resumed=side.kept_rows,
            quantization=layout.summary(names, settings.raw_codes), _table=table,
            merged_adapter=metadata["merged_adapter"],
            notes=[merging.note] if merging and merging.note else [],
        )  # fmt: skip
    finally:
        distributed.leave(world)


def _analyze_names(
    ckpt: Checkpoint,
    names: list[str],
    layout: Layout,
    settings: AnalyzeSettings,
    device: torch.device,
    progress: ProgressHook | None,
    world: distributed.World,
    side: Sidecar,
    adapter: AdapterLayout | None = None,
    merging: MergedAdapter | None = None,
) -> list[MatrixRow]:
    """Rows of this process's share of ``names``. Tensors (every part of a quantized weight,
    the adapter tensors merged into a weight) are read one ahead by a reader thread while the
    current one computes. Tensors the sidecar already holds are not computed again; new ones
    are appended to it. Rank 0 also writes the rows decided from headers alone."""
    tasks = plan_tasks(ckpt, names, layout, settings, memory_budget(settings, device), adapter,
                       merging.merges if merging else None)  # fmt: skip
    work = [i for i, t in enumerate(tasks) if t.status is None]
    shares = distributed.partition([matrix_cost(tasks[i].info.shape) for i in work], world.size)
    work = [work[j] for j in shares[world.rank]]
    header_only = [i for i, t in enumerate(tasks) if t.status is not None] if world.main else []
    if progress:
        mine = sorted(work + header_only)
        progress.start(len(mine), sum(tasks[i].nbytes for i in mine))
    rows = [task_row(tasks[i], tasks[i].status or "skipped") for i in header_only]
    if progress:
        for i in header_only:
            progress.advance(tasks[i].info.name, tasks[i].nbytes)
    for i in work:
        if tasks[i].info.name in side.kept:
            rows.extend(side.kept[tasks[i].info.name])
            if progress:
                progress.advance(tasks[i].info.name, tasks[i].nbytes)
    todo = [tasks[i] for i in work if tasks[i].info.name not in side.kept]
    # Shard by shard (the table is put back in the checkpoint's order at the end): a hub
    # download then feeds the analysis from its first shard on.
    shard_rank = {path.name: i for i, path in enumerate(ckpt.files)}
    todo.sort(key=lambda task: shard_rank.get(task.info.shard.name, 0))
    ckpt.will_read(n for task in todo for n in _names_read(task))
    read = lambda task: read_task(ckpt, task, merging.checkpoint if merging else None)  # noqa: E731
    reads = prefetched(todo, read, pin=device.type == "cuda")
    try:
        _analyze_reads(reads, settings, device, progress, side, rows, ckpt)
    except BaseException:  # Ctrl-C, a fatal read: a hub download stops first, so the reader
        ckpt.close()  # thread waiting on it is let go before it is joined
        raise
    finally:
        reads.close()
    return rows


def _analyze_reads(
    reads: Iterator[tuple[Task, Any]],
    settings: AnalyzeSettings,
    device: torch.device,
    progress: ProgressHook | None,
    side: Sidecar,
    rows: list[MatrixRow],
    ckpt: Checkpoint | None = None,
) -> None:
    """Each task's rows from its stored tensors (or its read error), into ``rows`` and the
    sidecar. Rows computed from a hub shard still arriving are held until the whole shard has
    checked out (its size and sha256): a shard that fails replaces them by error rows, so no
    number from bytes the file does not hold is kept."""
    held: list[tuple[Task, list[MatrixRow], list[Future[object]]]] = []

    def settle(wait: bool) -> None:
        waiting, fatal = [], None
        for task, new, futures in held:
            if not wait and not all(f.done() for f in futures):
                waiting.append((task, new, futures))
                continue
            failed = next((e for f in futures if (e := _failure(f)) is not None), None)
            if isinstance(failed, _FATAL_READS):  # after every row that checked out is kept
                fatal = fatal or failed
                continue
            if failed is not None:
                new = [task_row(task, "error", f"{type(failed).__name__}: {failed}")]
            side.append(new)
            rows.extend(new)
        held[:] = waiting
        if fatal is not None:
            raise fatal

    for task, stored in reads:
        if isinstance(stored, _FATAL_READS):  # the hub is gone: stop, keeping the rows
            settle(wait=False)
            raise stored
        try:
            if isinstance(stored, Exception):
                raise stored
            if task.update is not None:
                assert isinstance(stored, dict)
                new = analyze_update(task_row(task, "ok"), stored, task.update.scaling, settings,
                                     device)  # fmt: skip
            else:
                tensor = materialize(task, stored, device)
                new = analyze_tensor(task.info, tensor, settings, device, task_row(task, "ok"))
                del tensor
            if not new:  # every selected tensor gets a row, or the run says why it has none
                raise RuntimeError("no matrix came out of it")
        except Exception as exc:  # one bad tensor must not lose the others' rows
            new = [task_row(task, "error", f"{type(exc).__name__}: {exc}")]
        del stored
        futures = ckpt.unverified(_names_read(task)) if ckpt is not None else []
        held.append((task, new, futures))
        settle(wait=False)
        if progress:
            progress.advance(task.info.name, task.nbytes)
            waiting, waited = getattr(progress, "waiting", None), getattr(ckpt, "waited", None)
            if waiting is not None and waited is not None:
                waiting(waited)
    settle(wait=True)


def _failure(future: Future[object]) -> BaseException | None:
    """What a shard's download ended with (None: it checked out)."""
    failed = None if future.cancelled() else future.exception()
    if future.cancelled() or isinstance(failed, CancelledError | Cancelled):
        return AnalysisInterrupted("the download was stopped")  # the analysis is stopping
    return failed


def _open(
    source: str | os.PathLike[str],
    revision: str | None,
    token: str | None,
    stream: bool,
    progress: ProgressHook | None,
) -> tuple[ResolvedSource, Checkpoint]:
    """The source and its open checkpoint: a hub id read as it arrives (downloaded alongside,
    or streamed), anything else (and a hub id offline) as local files."""
    if wants_hub(source, stream):
        fetched = getattr(progress, "fetched", None)
        hub = open_hub(os.fspath(source), revision, token, stream=stream, on_fetch=fetched)
        if hub is not None:
            return hub
    resolved = resolve_source(source, revision=revision, token=token)
    return resolved, open_checkpoint(resolved.files, index=resolved.index)


def _names_read(task: Task) -> list[str]:
    """The model's stored tensors a task reads (every part of a quantized weight or a LoRA
    update; none for a tensor a merged adapter's own copy replaces)."""
    if task.merge is not None and task.merge.saved is not None:
        return []
    parts = task.weight.parts if task.weight else task.update.parts() if task.update else []
    return [task.info.name, *(n for _, n in parts)]


def _check_something_analysable(
    ckpt: Checkpoint,
    names: list[str],
    layout: Layout,
    settings: AnalyzeSettings,
    source: str,
    adapter: AdapterLayout | None = None,
    merging: MergedAdapter | None = None,
) -> None:
    """Fail before any work when no selected tensor can have a spectrum, saying why."""
    tasks = plan_tasks(ckpt, names, layout, settings, None, adapter,
                       merging.merges if merging else None)  # fmt: skip
    check_farms_windows([t.info for t in tasks if t.status is None and t.update is None],
                        settings)  # fmt: skip
    if all(t.status is not None for t in tasks):
        sample = "; ".join(f"{t.info.name}: {t.reason}" for t in tasks[:3])
        raise OptionError(
            f"{source}: nothing to analyse: none of its {len(names)} selected tensors is a "
            f"floating-point matrix with at least {settings.min_evals} rows and columns "
            f"({sample})"
        )


def _adapter_layout(
    resolved: ResolvedSource, infos: Mapping[str, TensorInfo]
) -> AdapterLayout | None:
    """The layout of a PEFT adapter's file, its config checked; None for a model."""
    if resolved.adapter_config is None:
        return None
    where = f"{Path(resolved.files[0]).parent / ADAPTER_CONFIG}"
    if resolved.kind == "hub":
        where = f"{resolved.source}: {ADAPTER_CONFIG}"
    return adapter_layout(infos, read_adapter_config(resolved.adapter_config, where))


def _open_sidecar(
    output: Path,
    resolved: ResolvedSource,
    settings: AnalyzeSettings,
    world: distributed.World,
    resume: bool,
    progress: ProgressHook | None,
    hub: dict[str, str] | None = None,
    merging: MergedAdapter | None = None,
) -> Sidecar:
    path = sidecar_path(output, world.rank, world.size)
    # config.json's quantization_config decides how weights decode: a changed one is another run.
    quantization = (resolved.config or {}).get("quantization_config")
    # adapter_config.json decides every adapter row's scaling: a changed one is another run.
    extra = {"world": world.size, "quantization_config": quantization,
             "adapter_config": resolved.adapter_config}  # fmt: skip
    if hub is not None:  # a hub checkpoint read as it arrives: repo, commit, headers
        extra["hub"] = hub
    files = list(resolved.files) if hub is None else []
    if merging is not None:  # another adapter (or the same one re-saved) is another run
        extra["merged_adapter"] = dict(merging.config.raw)
        files += list(merging.resolved.files)
    digest = fingerprint(files, settings.to_dict(), extra)
    try:
        side = Sidecar.open(path, digest, resume=resume)
    except OSError as exc:
        raise OutputError(f"{path}: cannot write the resume file ({exc.strerror or exc})") from exc
    note = getattr(progress, "note", None)
    if note is not None and world.main:
        if side.kept:
            note(f"resuming: keeping {side.kept_rows} finished row(s) from {path}")
        elif side.discarded:
            note(f"{path} is from another checkpoint or other settings; starting afresh")
    return side


def _metadata(
    resolved: ResolvedSource,
    ckpt: Checkpoint,
    settings: AnalyzeSettings,
    device: torch.device,
    world: distributed.World,
    layout: Layout,
    adapter: AdapterLayout | None = None,
    merging: MergedAdapter | None = None,
) -> dict[str, Any]:
    config = resolved.config or {}
    local = resolved.kind in ("file", "directory")
    return {
        "source": resolved.source,
        "source_path": str(Path(resolved.source).expanduser().resolve()) if local else None,
        "source_kind": resolved.kind,
        "revision": resolved.revision,
        "files": [p.name for p in resolved.files],
        "model_type": config.get("model_type"),
        "architectures": config.get("architectures"),
        "checkpoint_metadata": ckpt.metadata(),
        # As found in config.json (untrusted: rendered escaped, never interpreted further).
        "quantization_config": layout.scheme.raw if layout.scheme else None,
        # A PEFT adapter's config (untrusted, as found); None for a model. Its rows are the
        # modules' weight changes (the adapter, lora_rank, lora_alpha columns).
        "adapter": dict(adapter.config.raw) if adapter else None,
        # An adapter merged into this model's weights (--adapter): its path, config (as found)
        # and modules. The rows are the fine-tuned model's weights: a model's table.
        "merged_adapter": merging.metadata() if merging else None,
        "esdtool_version": __version__,
        "torch_version": torch.__version__,
        "settings": settings.to_dict(),
        "device": str(device),
        "world_size": world.size,
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
    }


def _analyze_memory(
    source: object,
    output: Path | None,
    settings: AnalyzeSettings,
    progress: ProgressHook | None,
    weights: str,
    started: float,
    quantization_config: Any = None,
) -> AnalyzeResult:
    """:func:`analyze` of a module or state dict: the same rows, one tensor at a time."""
    rows, metadata, device = analyze_memory(source, settings, progress, weights,
                                            quantization_config)  # fmt: skip
    if output is not None:
        write_metrics(rows, Path(output), metadata)
    result = summarise(rows, output, time.perf_counter() - started, device)
    return replace(result, source=metadata["source"], _table=partial(metrics_frame, rows, metadata))
