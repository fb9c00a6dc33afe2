"""Models already in memory: a ``torch.nn.Module`` (a PEFT-wrapped one too) or a state dict,
read as named tensors one at a time where they live (no copy of the whole model)."""

from __future__ import annotations

import datetime as _dt
from collections.abc import Iterator, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from esdtool.analysis.resources import memory_budget, resolve_device, skip_reason
from esdtool.analysis.rows import analyze_tensor, header_row
from esdtool.analysis.settings import AnalyzeSettings
from esdtool.errors import OptionError
from esdtool.io.checkpoint import TensorInfo
from esdtool.io.table import MatrixRow
from esdtool.spectral.spectra import auto_dtype
from esdtool.version import __version__

WEIGHTS = ("base", "merged")
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
    never the adapter matrices themselves (their spectra are a plan's business, not a model's).
    """
    if weights not in WEIGHTS:
        raise OptionError(f"weights must be one of {', '.join(WEIGHTS)}, not {weights!r}")
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
    """The base model's weights of a PEFT model, named as in the base model."""
    base = model.get_base_model()
    adapters = {}
    for name, module in base.named_modules():
        if hasattr(module, "base_layer") and hasattr(module, "get_delta_weight"):
            adapters[name] = module
    for name, param in base.named_parameters():
        parts = name.split(".")
        if any(p.startswith(("lora_", "hada_", "lokr_", "oft_", "vera_")) for p in parts):
            continue
        clean = ".".join(p for p in parts if p != "base_layer")
        tensor = param.detach()
        owner = ".".join(parts[:-2]) if "base_layer" in parts else None
        if weights == "merged" and owner in adapters and parts[-1] == "weight":
            module = adapters[owner]
            for adapter in module.active_adapters:
                if adapter in getattr(module, "lora_A", {}):
                    delta = module.get_delta_weight(adapter).detach()
                    tensor = tensor + delta.to(tensor.dtype)
        yield clean, tensor


def analyze_memory(
    source: object, settings: AnalyzeSettings, progress: Any, weights: str
) -> tuple[list[MatrixRow], dict[str, Any], torch.device]:
    """The rows of every selected tensor of an in-memory ``source``, the table's metadata, and
    the device the spectra were computed on."""
    device = resolve_device(settings.device)
    if settings.dtype == "auto":
        settings = replace(settings, dtype=str(auto_dtype(device)).removeprefix("torch."))
    budget = memory_budget(settings, device)
    infos = [tensor_info(n, t) for n, t in named_tensors(source, "base") if settings.selects(n)]
    if not infos:
        raise OptionError("nothing to analyse: no tensor name passes --include/--exclude")
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
    metadata = {
        "source_path": None, "revision": None, "files": [], "model_type": None,
        "architectures": None, **describe(source, weights), "checkpoint_metadata": {},
        "quantization_config": None, "esdtool_version": __version__,
        "torch_version": torch.__version__, "settings": settings.to_dict(),
        "device": str(device), "world_size": 1,
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
    }  # fmt: skip
    return rows, metadata, device
