"""Models already in memory: a ``torch.nn.Module`` (a PEFT-wrapped one too) or a state dict,
read as named tensors one at a time where they live (no copy of the whole model)."""

from __future__ import annotations

import datetime as _dt
import json
from collections.abc import Iterator, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from esdtool.adapters import adapter_layout, read_adapter_config
from esdtool.analysis.resources import memory_budget, resolve_device, skip_reason
from esdtool.analysis.rows import analyze_tensor, analyze_update, header_row
from esdtool.analysis.settings import AnalyzeSettings
from esdtool.analysis.tasks import (
    check_farms_windows,
    materialize,
    plan_tasks,
    read_task,
    task_row,
)
from esdtool.dequant import Layout
from esdtool.dequant.layout import layout_of
from esdtool.dequant.scheme import read_scheme
from esdtool.errors import OptionError
from esdtool.io.checkpoint import TensorInfo, natural_key
from esdtool.io.table import MatrixRow
from esdtool.spectral.spectra import auto_dtype
from esdtool.version import __version__

WEIGHTS = ("base", "merged", "adapter")
MEMORY = Path("<memory>")  # the shard every in-memory row names
# torch dtypes by the safetensors names the table's dtype column uses.
_NAMES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL",
    getattr(torch, "float8_e4m3fn", None): "F8_E4M3",
    getattr(torch, "float8_e5m2", None): "F8_E5M2",
}  # fmt: skip


def is_in_memory(source: object) -> bool:
    """Whether ``source`` is a model or state dict rather than a path or hub id."""
    return isinstance(source, torch.nn.Module | Mapping)


def describe(source: object, weights: str) -> dict[str, Any]:
    """The table metadata of an in-memory source: what it was, and which weights were read."""
    if isinstance(source, Mapping):
        return {"source": f"<state dict of {len(source)} tensors>", "source_kind": "memory"}
    config = getattr(source, "config", None)
    peft = _is_peft(source)
    what = type(source).__name__ + (f" ({weights} weights)" if peft else "")
    return {
        "source": f"<in-memory {what}>",
        "source_kind": "memory",
        "model_type": getattr(config, "model_type", None),
        "architectures": getattr(config, "architectures", None),
        "peft_weights": weights if peft else None,
    }


def tensor_info(name: str, tensor: torch.Tensor) -> TensorInfo:
    """A header for an in-memory tensor, as a checkpoint would describe it."""
    dtype = _NAMES.get(tensor.dtype, str(tensor.dtype).removeprefix("torch.").upper())
    nbytes = tensor.numel() * tensor.element_size()
    return TensorInfo(name, dtype, tuple(tensor.shape), MEMORY, 0, nbytes)


def named_tensors(source: object, weights: str = "base") -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of every tensor of ``source``, detached, one at a time.

    A state dict gives its items (every value must be a tensor). A module gives its parameters
    under their ``named_parameters`` names (a tied weight once). A PEFT model gives its base
    model's weights under the base model's names: ``weights="base"`` the frozen weights as they
    are, ``"merged"`` each adapted weight plus its LoRA update (PEFT's own ``get_delta_weight``),
    never the adapter matrices themselves (``weights="adapter"`` reads those, as updates:
    :func:`analyze_memory`).
    """
    if weights not in WEIGHTS:
        raise OptionError(f"weights must be one of {', '.join(WEIGHTS)}, not {weights!r}")
    if weights in ("merged", "adapter") and not _is_peft(source):
        raise OptionError(f"weights={weights!r} is for a PEFT model; this has no adapters")
    if isinstance(source, Mapping):
        for name, tensor in source.items():
            if not isinstance(name, str) or not isinstance(tensor, torch.Tensor):
                raise OptionError(
                    f"a state dict maps names to tensors; {name!r} maps to {type(tensor).__name__}"
                )
            yield name, tensor.detach()
        return
    if not _is_peft(source):
        for name, param in source.named_parameters():  # type: ignore[union-attr]
            yield name, param.detach()
        return
    yield from _peft_tensors(source, weights)


def _is_peft(model: object) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def _peft_tensors(model: Any, weights: str) -> Iterator[tuple[str, torch.Tensor]]:
    """The base model's weights of a PEFT model, named as in the base model.

    "base": the frozen weights (refused when adapters are merged into them: the base weights
    are gone). "merged": each LoRA layer's weight plus PEFT's ``get_delta_weight`` of its
    active adapters (none when adapters are disabled; as they are when already merged), and a
    ``modules_to_save`` copy in place of its original. Tuners whose merge is more than a sum
    (DoRA's magnitude, LoHa, LoKr, IA3, LoRA on embeddings) are refused, never approximated.
    """
    from peft.tuners.lora import LoraLayer
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils import ModulesToSaveWrapper

    base = model.get_base_model()
    modules = dict(base.named_modules())
    tuners = {n: m for n, m in modules.items() if isinstance(m, BaseTunerLayer)}
    wrappers = {n: m for n, m in modules.items() if isinstance(m, ModulesToSaveWrapper)}
    if weights == "base" and any(getattr(m, "merged", False) for m in tuners.values()):
        raise OptionError(
            "the adapters are merged into the base weights (merge_adapter()): the base weights "
            "are not in the model",
            hint="unmerge_adapter() first, or analyse weights='merged'",
        )
    deltas: dict[str, list[Any]] = {}
    if weights == "merged":
        for name, layer in tuners.items():
            if layer.merged or layer.disable_adapters:
                continue  # the weight already holds the update, or the adapters are off
            active = list(layer.active_adapters)
            unsupported = not isinstance(layer, LoraLayer) or any(
                a in getattr(layer, "lora_embedding_A", {}) or layer.use_dora.get(a, False)
                for a in active
            )
            if unsupported:
                raise OptionError(
                    f"weights='merged' adds LoRA updates, and {name} is a "
                    f"{type(layer).__name__} (DoRA, LoHa, LoKr, IA3 and LoRA on embeddings "
                    "merge otherwise)",
                    hint="merge a copy with PEFT (model.merge_and_unload()) and analyse that",
                )
            deltas[name] = [(layer, a) for a in active if a in layer.lora_A]
    for name, param in base.named_parameters():
        clean = _base_name(name, tuners, wrappers, weights)
        if clean is None:
            continue
        tensor = param.detach()
        owner = name.rsplit(".base_layer.", 1)[0] if ".base_layer." in name else None
        if owner in deltas and name.endswith(".weight"):
            for layer, adapter in deltas[owner]:
                tensor = tensor + layer.get_delta_weight(adapter).detach().to(tensor.dtype)
        yield clean, tensor


def _base_name(
    name: str, tuners: dict[str, Any], wrappers: dict[str, Any], weights: str
) -> str | None:
    """The base model's name of a PEFT model's parameter, or None for an adapter's own
    parameter (LoRA's A and B, a modules_to_save copy not in use)."""
    parts = name.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        path, rest = ".".join(parts[:cut]), parts[cut:]
        if path in tuners:
            if rest[0] != "base_layer":
                return None  # lora_A, lora_B, lora_magnitude_vector, ...
            return ".".join(parts[:cut] + rest[1:])
        if path in wrappers:
            wrapper = wrappers[path]
            if rest[0] == "original_module":
                use = weights == "base" or wrapper.disable_adapters or not wrapper.active_adapters
                return ".".join(parts[:cut] + rest[1:]) if use else None
            if rest[0] == "modules_to_save" and weights == "merged" and len(rest) > 2:
                active = wrapper.active_adapters
                if not wrapper.disable_adapters and active and rest[1] == active[0]:
                    return ".".join(parts[:cut] + rest[2:])
            return None
    return name


def analyze_memory(
    source: object,
    settings: AnalyzeSettings,
    progress: Any,
    weights: str,
    quantization_config: Any = None,
) -> tuple[list[MatrixRow], dict[str, Any], torch.device]:
    """The rows of every selected tensor of an in-memory ``source``, the table's metadata, and
    the device the spectra were computed on. ``quantization_config``: how a state dict's
    quantized tensors decode (config.json's), checked as a file's is."""
    device = resolve_device(settings.device)
    if settings.dtype == "auto":
        settings = replace(settings, dtype=str(auto_dtype(device)).removeprefix("torch."))
    budget = memory_budget(settings, device)
    adapter_meta = None
    scheme, raw_config = _scheme(source, quantization_config)
    if weights not in WEIGHTS:
        raise OptionError(f"weights must be one of {', '.join(WEIGHTS)}, not {weights!r}")
    if weights == "adapter":
        if not _is_peft(source):
            raise OptionError("weights='adapter' is for a PEFT model; this has no adapters")
        rows, adapter_meta = _adapter_rows(source, settings, progress, device, budget)
    else:
        rows = _tensor_rows(source, weights, settings, progress, device, budget, scheme)
    metadata = {
        "source_path": None, "revision": None, "files": [], "model_type": None,
        "architectures": None, **describe(source, weights), "checkpoint_metadata": {},
        "quantization_config": raw_config, "adapter": adapter_meta, "esdtool_version": __version__,
        "torch_version": torch.__version__, "settings": settings.to_dict(),
        "device": str(device), "world_size": 1,
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
    }  # fmt: skip
    return rows, metadata, device


def _unreadable(tensor: torch.Tensor) -> str | None:
    """Why an in-memory tensor has no matrix esdtool can read, in words, or None."""
    if tensor.is_nested:
        return "a nested tensor (ragged rows): there is no one matrix to measure"
    if tensor.layout != torch.strided:
        return (f"a sparse tensor ({str(tensor.layout).removeprefix('torch.')}): analyse its "
                "dense form (tensor.to_dense())")  # fmt: skip
    if tensor.is_complex():
        return "complex values: esdtool measures real weight matrices"
    if tensor.is_meta:
        return "on the meta device: no data (not loaded, or offloaded)"
    return None


def _scheme(source: object, given: Any = None) -> tuple[Any, dict[str, Any] | None]:
    """The quantization scheme of tensors in memory, as a checkpoint's config.json would give
    it, and that config as plain JSON: ``given`` (config.json's ``quantization_config``), else
    the config a model was loaded with; (None, None) for a plain state dict or an unquantized
    model (FP8 weights with their scales are found by name either way)."""
    qc = given
    if qc is None and isinstance(source, torch.nn.Module):
        model = source.get_base_model() if _is_peft(source) else source  # type: ignore[operator]
        qc = getattr(getattr(model, "config", None), "quantization_config", None)
    if qc is None:
        return None, None
    raw = qc.to_dict() if hasattr(qc, "to_dict") else qc
    try:
        plain = json.loads(json.dumps(raw, default=_plain))
    except (TypeError, ValueError, RecursionError) as exc:
        raise OptionError(f"quantization_config: not a JSON object ({exc})") from exc
    scheme = read_scheme({"quantization_config": plain}, "<in-memory quantization_config>")
    return scheme, plain if isinstance(plain, dict) else None


def _planned_rows(
    source: object,
    settings: AnalyzeSettings,
    progress: Any,
    device: torch.device,
    budget: int | None,
    scheme: Any = None,
) -> list[MatrixRow]:
    """The base weights' rows through the same task planning as files (quantized weights
    dequantized with their scales, scales and zero points noted, the same refusals), so every
    row equals the row of the same tensors saved and analysed from disk. The tensors are the
    model's own (references, no copies)."""
    tensors = dict(named_tensors(source, "base"))
    if not tensors:
        raise OptionError("nothing to analyse: the model or state dict holds no tensor")
    if all(t.is_meta for t in tensors.values()):
        raise OptionError(
            "the model's weights are on the meta device (not loaded, or offloaded): there "
            "is nothing to measure",
            hint="analyse the checkpoint's files instead: esdtool.analyze('path/to/model')",
        )
    names = [n for n in tensors if settings.selects(n)]
    if not names:
        raise OptionError("nothing to analyse: no tensor name passes --include/--exclude")
    odd = {n: r for n in tensors if (r := _unreadable(tensors[n])) is not None}
    readable = _StateDict({n: t for n, t in tensors.items() if n not in odd})
    layout = layout_of(readable.infos, scheme, readable.get_tensor)
    plain = [n for n in names if n not in odd]
    tasks = {t.info.name: t for t in plan_tasks(readable, plain, layout, settings, budget)}  # type: ignore[arg-type]
    check_farms_windows([t.info for t in tasks.values() if t.status is None], settings)
    if progress:
        progress.start(len(names), sum(t.nbytes for t in tasks.values()))
    rows: list[MatrixRow] = []
    for name in names:
        if name in odd:
            info = TensorInfo(name, str(tensors[name].dtype).removeprefix("torch.").upper(), (),
                              MEMORY, 0, 0)  # fmt: skip
            rows.append(header_row(info, "skipped", odd[name]))
            if progress:
                progress.advance(name, 0)
            continue
        task = tasks[name]
        try:
            if task.status is not None:
                rows.append(task_row(task, task.status))
            else:
                tensor = materialize(task, read_task(readable, task), device)  # type: ignore[arg-type]
                rows.extend(analyze_tensor(task.info, tensor, settings, device,
                                           task_row(task, "ok")))  # fmt: skip
        except Exception as exc:  # one bad tensor must not lose the others' rows
            rows.append(task_row(task, "error", f"{type(exc).__name__}: {exc}"))
        if progress:
            progress.advance(name, task.nbytes)
    return rows


def _tensor_rows(
    source: object,
    weights: str,
    settings: AnalyzeSettings,
    progress: Any,
    device: torch.device,
    budget: int | None,
    scheme: Any = None,
) -> list[MatrixRow]:
    """The rows of every selected named tensor: the base weights through the files' task
    planning; a PEFT model's merged weights one at a time (each sum made as it is read)."""
    if weights == "base":
        return _planned_rows(source, settings, progress, device, budget, scheme)
    infos, count = [], 0
    for name, tensor in named_tensors(source, weights):
        count += 1
        if tensor.is_meta:
            raise OptionError(
                "the model's weights are on the meta device (not loaded, or offloaded): there "
                "is nothing to measure",
                hint="analyse the checkpoint's files instead: esdtool.analyze('path/to/model')",
            )
        if settings.selects(name):
            infos.append(tensor_info(name, tensor))
    if not count:
        raise OptionError("nothing to analyse: the model or state dict holds no tensor")
    if not infos:
        raise OptionError("nothing to analyse: no tensor name passes --include/--exclude")
    skips = {i.name: skip_reason(i, settings.min_evals, budget, settings.dtype) for i in infos}
    check_farms_windows([i for i in infos if skips[i.name] is None], settings)
    if progress:
        progress.start(len(infos), sum(i.nbytes for i in infos))
    rows: list[MatrixRow] = []
    for name, tensor in named_tensors(source, weights):
        if not settings.selects(name):
            continue
        info = tensor_info(name, tensor)
        reason = skip_reason(info, settings.min_evals, budget, settings.dtype)
        if reason is not None:
            rows.append(header_row(info, "skipped", reason))
        else:
            try:
                rows.extend(analyze_tensor(info, tensor, settings, device))
            except Exception as exc:  # one bad tensor must not lose the others' rows
                rows.append(header_row(info, "error", f"{type(exc).__name__}: {exc}"))
        del tensor
        if progress:
            progress.advance(name, info.nbytes)
    return rows


def _plain(value: object) -> object:
    """JSON for what a PEFT config holds besides JSON: sets, enums."""
    if isinstance(value, set | frozenset):
        return sorted(value, key=str)
    return getattr(value, "value", str(value))


class _StateDict:
    """An adapter's state dict with the two methods task planning reads a checkpoint by."""

    def __init__(self, tensors: Mapping[str, torch.Tensor]) -> None:
        self.tensors = tensors
        self.infos = {name: tensor_info(name, t) for name, t in tensors.items()}

    def info(self, name: str) -> TensorInfo:
        return self.infos[name]

    def get_tensor(self, name: str) -> torch.Tensor:
        return self.tensors[name]


def _adapter_rows(
    model: Any, settings: AnalyzeSettings, progress: Any, device: torch.device, budget: int | None
) -> tuple[list[MatrixRow], dict[str, Any]]:
    """weights="adapter": the active LoRA adapter's rows exactly as ``analyze`` reads them from
    the directory ``save_pretrained`` would write (PEFT's own state dict and config), and the
    config for the table's metadata."""
    from peft import get_peft_model_state_dict

    active = list(getattr(model, "active_adapters", None) or [model.active_adapter])
    if len(active) != 1:
        raise OptionError(
            f"weights='adapter' reads one adapter; {len(active)} are active ({active})",
            hint="model.set_adapter(name) first",
        )
    name = active[0]
    # As save_pretrained writes it (sets as sorted lists, enums as their values).
    raw = json.loads(json.dumps(model.peft_config[name].to_dict(), default=_plain))
    config = read_adapter_config(raw, f"<in-memory adapter {name!r}>")
    state = {k: v.detach() for k, v in get_peft_model_state_dict(model, adapter_name=name).items()}
    tensors = _StateDict(state)
    layout = adapter_layout(tensors.infos, config)
    names = sorted((n for n in state if settings.selects(n)), key=natural_key)  # as files
    if not names:
        raise OptionError("nothing to analyse: no adapter tensor name passes --include/--exclude")
    tasks = plan_tasks(tensors, names, Layout(), settings, budget, layout)  # type: ignore[arg-type]
    check_farms_windows([t.info for t in tasks if t.status is None and t.update is None],
                        settings)  # fmt: skip
    if progress:
        progress.start(len(tasks), sum(t.nbytes for t in tasks))
    rows: list[MatrixRow] = []
    for task in tasks:
        try:
            if task.status is not None:
                rows.append(task_row(task, task.status))
            elif task.update is not None:
                factors = read_task(tensors, task)  # type: ignore[arg-type]
                assert isinstance(factors, dict)
                rows.extend(analyze_update(task_row(task, "ok"), factors, task.update.scaling,
                                           settings, device))  # fmt: skip
            else:
                tensor = tensors.get_tensor(task.info.name)
                rows.extend(analyze_tensor(task.info, tensor, settings, device,
                                           task_row(task, "ok")))  # fmt: skip
        except Exception as exc:  # one bad tensor must not lose the others' rows
            rows.append(task_row(task, "error", f"{type(exc).__name__}: {exc}"))
        if progress:
            progress.advance(task.info.name, task.nbytes)
    return rows, dict(config.raw)
