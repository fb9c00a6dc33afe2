"""Which tensors of an adapter make up which weight change, from headers alone.

PEFT saves a LoRA module ``m`` as ``base_model.model.m.lora_A.weight`` [r, in] and
``...m.lora_B.weight`` [out, r] (an embedding as ``lora_embedding_A`` [r, num_embeddings] and
``lora_embedding_B`` [dim, r]), DoRA adds ``...m.lora_magnitude_vector`` [out], and a module of
``modules_to_save`` is saved whole under its own name. Each A/B pair becomes one
:class:`LowRankUpdate` (its row carries the ``lora_A`` name); B, the magnitude and the parts
esdtool cannot read become notes (skipped rows naming the module); every other tensor is a
weight saved in full, analysed as it is.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from esdtool.adapters.config import AdapterConfig
from esdtool.io.checkpoint import FLOAT_DTYPES, TensorInfo

PREFIX = "base_model.model."
_PARTS = {  # suffix -> (role, kind)
    ".lora_A.weight": ("A", "linear"),
    ".lora_B.weight": ("B", "linear"),
    ".lora_embedding_A": ("A", "embedding"),
    ".lora_embedding_B": ("B", "embedding"),
    ".lora_magnitude_vector": ("magnitude", None),
    ".lora_magnitude_vector.weight": ("magnitude", None),
    ".lora_B.bias": ("bias", None),
}


@dataclass(frozen=True)
class LowRankUpdate:
    """One module's weight change Delta W = scaling * B A (transposed for embeddings and
    fan_in_fan_out layers, which leaves the spectrum as it is).

    name:     the lora_A tensor; the row carries its name.
    module:   the module's path in the base model (PEFT's rank_pattern key).
    a, b:     the lora_A and lora_B tensor names.
    shape:    Delta W's shape, as the base weight stores it.
    rank:     r, the rows of lora_A (PEFT's resolved r; checked against the config).
    alpha:    lora_alpha resolved for the module.
    scaling:  alpha / r, or alpha / sqrt(r) with rsLoRA.
    label:    the ``adapter`` column: "lora", "dora", with " rslora" when it applies.
    magnitude: the DoRA magnitude vector's name, or None.
    embedding: an embedding's update (lora_embedding_A / _B): B A transposed to the table's
              [num_embeddings, dim].
    """

    name: str
    module: str
    a: str
    b: str
    shape: tuple[int, int]
    rank: int
    alpha: float
    scaling: float
    label: str
    magnitude: str | None = None
    embedding: bool = False

    def parts(self) -> list[tuple[str, str]]:
        return [("A", self.a), ("B", self.b)]

    def merge_parts(self) -> list[tuple[str, str]]:
        """The tensors a merge reads: the factors, and DoRA's magnitude vector."""
        extra = [("magnitude", self.magnitude)] if self.magnitude else []
        return self.parts() + extra


@dataclass(frozen=True)
class AdapterLayout:
    """An adapter's tensors: ``updates`` by lora_A name; ``notes`` (tensor name -> (status,
    reason, adapter column)) for tensors with no row of their own to compute; ``full`` (tensor
    name -> (module, adapter column)) for weights saved whole (modules_to_save, trainable token
    rows)."""

    config: AdapterConfig
    updates: Mapping[str, LowRankUpdate] = field(default_factory=dict)
    notes: Mapping[str, tuple[str, str, str]] = field(default_factory=dict)
    full: Mapping[str, tuple[str, str]] = field(default_factory=dict)


def strip_prefix(name: str) -> str:
    """A saved tensor's name as PEFT matches it (without ``base_model.model.``)."""
    return name[len(PREFIX) :] if name.startswith(PREFIX) else name


def adapter_layout(infos: Mapping[str, TensorInfo], config: AdapterConfig) -> AdapterLayout:
    """Pair every module's parts and check their shapes against each other and the config."""
    groups: dict[str, dict[str, TensorInfo]] = {}
    kinds: dict[str, set[str]] = {}
    clashes: dict[str, list[str]] = {}
    full: dict[str, tuple[str, str]] = {}
    notes: dict[str, tuple[str, str, str]] = {}
    for name, info in infos.items():
        part = next(((s, *_PARTS[s]) for s in _PARTS if name.endswith(s)), None)
        if part is None:
            module = strip_prefix(name)
            module = module[: -len(".weight")] if module.endswith(".weight") else module
            if ".lora_" in name:  # a part of a LoRA variant esdtool does not know (lora_diag...)
                notes[name] = ("error", f"unknown LoRA part {module}: not analysed", "unknown")
            elif "trainable_tokens_delta" in name:
                full[name] = (module, "trainable_tokens")
            else:
                full[name] = (module, "modules_to_save")
            continue
        suffix, role, kind = part
        module = strip_prefix(name[: -len(suffix)])
        group = groups.setdefault(module, {})
        if role in group:  # two tensors claim one part (prefixed and not, A and embedding A)
            clashes.setdefault(module, [group[role].name]).append(name)
        group.setdefault(role, info)
        if kind is not None:
            kinds.setdefault(module, set()).add(kind)
    updates: dict[str, LowRankUpdate] = {}
    for module, parts in groups.items():
        problem = _problem(parts, config, module)
        if module in clashes:
            problem = ("error", f"LoRA module {module} has two tensors for one part: "
                                f"{', '.join(clashes[module][:2])}")  # fmt: skip
        elif len(kinds.get(module, ())) > 1:
            problem = ("error", f"LoRA module {module} has both linear and embedding factors")
        a, b = parts.get("A"), parts.get("B")
        if problem is not None:
            names = [i.name for i in parts.values()] + clashes.get(module, [])
            first = a.name if a is not None else names[0]
            for name in dict.fromkeys(names):
                notes[name] = (
                    (*problem, config.label())
                    if name == first
                    else ("skipped", f"part of LoRA module {module} (see {first})", config.label())
                )
            continue
        assert a is not None and b is not None
        r, out, inner = a.shape[0], b.shape[0], a.shape[1]
        alpha = config.alpha(module)
        if kinds[module] == {"embedding"}:
            shape = (inner, out)  # the embedding table is [num_embeddings, dim]
        else:
            shape = (inner, out) if config.fan_in_fan_out else (out, inner)
        magnitude = parts.get("magnitude")
        update = LowRankUpdate(
            name=a.name, module=module, a=a.name, b=b.name, shape=shape, rank=r, alpha=alpha,
            scaling=config.scaling(r, alpha), label=config.label(),
            magnitude=magnitude.name if magnitude else None,
            embedding=kinds[module] == {"embedding"},
        )  # fmt: skip
        updates[a.name] = update
        notes[b.name] = (
            "skipped", f"lora_B of {module}: analysed with its lora_A in one row", "lora_B",
        )  # fmt: skip
        if magnitude is not None:
            notes[magnitude.name] = (
                "skipped",
                f"DoRA magnitude vector of {module} ({magnitude.shape[0]} row norms of the "
                "adapted weight); the module's row analyses its directional update "
                "scaling * B A",
                "dora_magnitude",
            )
        if "bias" in parts:
            notes[parts["bias"].name] = (
                "skipped", f"lora_B bias of {module}: a vector", "lora_bias",
            )  # fmt: skip
    for name, (module, _) in list(full.items()):  # crafted: a module saved whole AND adapted
        if module in groups:
            del full[name]
            notes[name] = ("error", f"{module} is saved in full and has a LoRA update", "clash")
    return AdapterLayout(config, updates, notes, full)


def _problem(
    parts: Mapping[str, TensorInfo], config: AdapterConfig, module: str
) -> tuple[str, str] | None:
    """Why a module's parts make no analysable update, as a (status, reason) note; None when
    they do."""
    a, b = parts.get("A"), parts.get("B")
    if a is None or b is None:
        missing = "lora_A" if a is None else "lora_B"
        return ("error", f"LoRA module {module} has no {missing} in the adapter file")
    if len(a.shape) in (3, 4, 5) and len(b.shape) == len(a.shape):  # Conv1d, Conv2d, Conv3d
        return ("skipped", f"convolutional LoRA update of {module}: not analysed")
    if len(a.shape) != 2 or len(b.shape) != 2:
        return ("error", f"LoRA module {module}: lora_A {list(a.shape)} and lora_B "
                         f"{list(b.shape)} are not matrices")  # fmt: skip
    if a.dtype not in FLOAT_DTYPES or b.dtype not in FLOAT_DTYPES:
        return ("error", f"LoRA module {module}: factors of dtype {a.dtype}/{b.dtype}")
    if a.shape[0] != b.shape[1]:
        return ("error", f"LoRA module {module}: lora_A {list(a.shape)} and lora_B "
                         f"{list(b.shape)} disagree on r")  # fmt: skip
    r = config.rank(module)
    if r != a.shape[0]:
        return ("error", f"LoRA module {module}: adapter_config.json gives r = {r}, its "
                         f"lora_A holds {a.shape[0]} rows")  # fmt: skip
    magnitude = parts.get("magnitude")
    if magnitude is not None and tuple(magnitude.shape) != (b.shape[0],):
        return ("error", f"LoRA module {module}: DoRA magnitude {list(magnitude.shape)} does "
                         f"not match lora_B's {b.shape[0]} rows")  # fmt: skip
    if 0 in a.shape or 0 in b.shape:
        return ("skipped", f"LoRA module {module}: empty factors")
    return None
