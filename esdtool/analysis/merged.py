"""``analyze MODEL --adapter ADAPTER``: a trained PEFT LoRA adapter merged into the weights it
adapts while they stream, as PEFT's ``merge_and_unload`` would merge it, and never written
anywhere.

:func:`open_adapter` resolves and checks the adapter (its config, its tensors' pairing);
:func:`match_adapter` pairs every module it adapts with the base weight it changes, refusing in
one line whatever the merge cannot be scaling * B A of (or DoRA's rescaling of it) for: a
broken or convolutional module, a module or shape the model does not have, a base weight
stored as codes esdtool cannot decode, token-row updates. Each matched base tensor gets a
:class:`~esdtool.adapters.Merge` that :mod:`esdtool.analysis.tasks` reads and applies.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from esdtool.adapters import (
    AdapterConfig,
    AdapterLayout,
    Merge,
    adapter_layout,
    read_adapter_config,
)
from esdtool.adapters.layout import strip_prefix
from esdtool.dequant import Layout
from esdtool.errors import CheckpointError, EsdtoolError, OptionError
from esdtool.io.checkpoint import FLOAT_DTYPES, Checkpoint, TensorInfo, open_checkpoint
from esdtool.io.source import ADAPTER_CONFIG, ADAPTER_WEIGHTS, ResolvedSource, resolve_source

_PARTS = ("lora_B", "dora_magnitude", "lora_bias")  # notes of parts merged with their module
_HINT = (
    "--adapter takes a PEFT LoRA adapter: a directory holding adapter_config.json and "
    "adapter_model.safetensors (as save_pretrained writes them), or its hub id"
)


@dataclass
class MergedAdapter:
    """An adapter opened for merging, matched to the model being analysed.

    source:   ``--adapter`` as given.
    resolved: where its files are (a hub id's snapshot in the HF cache).
    checkpoint: its open adapter_model.safetensors (close it when done).
    config:   its checked adapter_config.json.
    layout:   its tensors, paired into updates (:func:`~esdtool.adapters.adapter_layout`).
    merges:   by base tensor name: the :class:`Merge`, the header of the adapter tensor that
              replaces it (``modules_to_save``) or None, and the rows' ``adapter`` column.
    note:     a warning for the user (the config names another base model), or None.
    """

    source: str
    resolved: ResolvedSource
    checkpoint: Checkpoint
    config: AdapterConfig
    layout: AdapterLayout
    merges: dict[str, tuple[Merge, TensorInfo | None, str]] = field(default_factory=dict)
    note: str | None = None

    @property
    def directory(self) -> Path:
        return self.resolved.files[0].parent.resolve()

    @property
    def file(self) -> Path:
        return self.resolved.files[0]

    def metadata(self) -> dict[str, Any]:
        """The table's ``merged_adapter`` metadata: where the adapter is, its config (as found,
        untrusted), how many modules it changed, and the note, if any."""
        updates = sum(m.update is not None for m, _, _ in self.merges.values())
        saved = {  # modules, not tensors (a saved layer's weight and bias are one module)
            strip_prefix(m.saved).rsplit(".", 1)[0] for m, _, _ in self.merges.values() if m.saved
        }
        return {
            "source": self.source,
            "path": str(self.directory),
            "revision": self.resolved.revision,
            "files": [p.name for p in self.resolved.files],
            "config": dict(self.config.raw),
            "modules": updates,
            "modules_to_save": len(saved),
            "note": self.note,
        }


def open_adapter(adapter: str | os.PathLike[str], token: str | None = None) -> MergedAdapter:
    """The adapter behind ``adapter`` (a directory, its adapter_model.safetensors, or a hub
    id), its config checked and its tensors paired; not yet matched to a model."""
    text = os.fspath(adapter)
    try:
        resolved = resolve_source(text, token=token)
    except EsdtoolError as exc:
        raise type(exc)(f"--adapter {exc}", exc.hint or _HINT) from exc
    if resolved.adapter_config is None:
        raise CheckpointError(
            f"--adapter {text}: not a PEFT adapter (no {ADAPTER_WEIGHTS} with its "
            f"{ADAPTER_CONFIG})",
            hint=_HINT,
        )
    where = (
        f"{resolved.source}: {ADAPTER_CONFIG}"
        if resolved.kind == "hub"
        else str(resolved.files[0].parent / ADAPTER_CONFIG)
    )
    config = read_adapter_config(resolved.adapter_config, where)
    ckpt = open_checkpoint(resolved.files)
    try:
        infos = {n: ckpt.info(n) for n in ckpt.keys()}  # noqa: SIM118 (not a dict)
        layout = adapter_layout(infos, config)
    except BaseException:
        ckpt.close()
        raise
    return MergedAdapter(text, resolved, ckpt, config, layout)


def match_adapter(
    adapter: MergedAdapter,
    infos: Mapping[str, TensorInfo],
    layout: Layout,
    raw_codes: bool,
    model: ResolvedSource,
    model_adapter: AdapterLayout | None = None,
) -> None:
    """Pair each of the adapter's modules with the base tensor it changes (``infos``: the
    model's headers; ``layout``: its quantized weights; ``model_adapter``: the model's own
    adapter layout when the model is itself an adapter), filling ``adapter.merges`` and
    ``adapter.note``; raises a one-line error naming the adapter file for anything the merge
    cannot be computed for."""
    if model_adapter is not None:
        raise OptionError(
            f"{model.source}: is a PEFT adapter itself; --adapter merges an adapter into the "
            "model it was trained on",
            hint="esdtool analyze BASE_MODEL --adapter ADAPTER",
        )
    file = adapter.file
    first = _refused(adapter.layout)
    if first is not None:
        raise CheckpointError(
            f"{file}: {first}: esdtool merges LoRA updates of linear and embedding layers only",
            hint="merge it into its base model with PEFT (merge_and_unload), save that, and "
            "analyse the merged model",
        )
    quantized = {w.module: name for name, w in layout.weights.items()}
    label = "merged " + adapter.config.label()
    merges: dict[str, tuple[Merge, TensorInfo | None, str]] = {}
    for update in adapter.layout.updates.values():
        module = update.module
        name = quantized.get(module, f"{module}.weight")
        if name not in infos:
            raise CheckpointError(
                f"{file}: adapts {module}, and {model.source} has no weight {name}",
                hint=_other_model(adapter),
            )
        weight = layout.weights.get(name)
        note = layout.notes.get(name)
        if weight is not None and raw_codes:
            raise OptionError(
                f"{file}: adapts {module}, whose weight is quantized: --raw-codes analyses the "
                "stored codes, which an update cannot be added to",
                hint="drop --raw-codes (the weight is dequantized, then merged)",
            )
        if weight is None and (note is not None or infos[name].dtype not in FLOAT_DTYPES):
            why = note.reason if note is not None else f"dtype {infos[name].dtype}"
            raise CheckpointError(
                f"{file}: adapts {module}, whose weight in {model.source} esdtool cannot "
                f"decode ({why})"
            )
        shape = weight.shape if weight is not None else infos[name].shape
        if tuple(shape) != tuple(update.shape):
            raise CheckpointError(
                f"{file}: the update of {module} is {list(update.shape)}, and its weight "
                f"{name} in {model.source} is {list(shape)}",
                hint=_other_model(adapter),
            )
        merges[name] = (Merge(update, None, adapter.config.fan_in_fan_out), None, label)
    for saved, (module, kind) in adapter.layout.full.items():
        if kind != "modules_to_save":
            raise CheckpointError(
                f"{file}: {module} holds {kind} (rows of some tokens): esdtool does not merge "
                "token-row updates",
                hint="merge it into its base model with PEFT (merge_and_unload), save that, "
                "and analyse the merged model",
            )
        name, mine = strip_prefix(saved), adapter.checkpoint.info(saved)
        info = infos.get(name)
        if info is None or info.shape != mine.shape:
            got = "no such tensor" if info is None else f"it as {list(info.shape)}"
            raise CheckpointError(
                f"{file}: saves {name} whole ({list(mine.shape)}) in place of the model's, "
                f"and {model.source} has {got}",
                hint=_other_model(adapter),
            )
        merges[name] = (Merge(None, saved), mine, "merged modules_to_save")
    adapter.merges = merges
    adapter.note = _other_base(adapter, model)


def _other_model(adapter: MergedAdapter) -> str:
    base = adapter.config.base_model
    named = f"names {_short(base)}" if base else "names no base model"
    return f"is the adapter for another model? its {ADAPTER_CONFIG} {named}"


def _short(value: object, limit: int = 80) -> str:
    """``repr(value)`` cut to ``limit`` characters (an untrusted value may be huge)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _refused(layout: AdapterLayout) -> str | None:
    """The first reason (with the count of others) a module of the adapter has no merge."""
    reasons = [
        reason
        for _, (status, reason, kind) in sorted(layout.notes.items())
        if status == "error" or (kind not in _PARTS and not reason.startswith("part of "))
    ]
    if not reasons:
        return None
    more = f" (and {len(reasons) - 1} more)" if len(reasons) > 1 else ""
    return reasons[0] + more


def _other_base(adapter: MergedAdapter, model: ResolvedSource) -> str | None:
    """A warning when adapter_config.json's base_model_name_or_path clearly names another
    model: its last path part appears nowhere in the model's name, path or config's
    ``_name_or_path``. The shapes matched, so the merge goes on."""
    base = adapter.config.base_model
    last = (base or "").strip().rstrip("/").rsplit("/", 1)[-1].lower()
    if not last:
        return None
    known = [model.source, str((model.config or {}).get("_name_or_path", ""))]
    if model.kind != "hub":
        known.append(str(Path(model.source).expanduser().resolve()))
    if any(last in text.lower() for text in known):
        return None
    return (
        f"{adapter.file.parent / ADAPTER_CONFIG}: base_model_name_or_path is {_short(base)}, "
        f"and the model is {model.source}: is the adapter for another model? (every module and "
        "shape matched, so it is merged)"
    )
