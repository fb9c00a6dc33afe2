"""Which stored tensors make up which weight: the quantized weights of a checkpoint, from its
``quantization_config`` and the tensors' names, dtypes and shapes (headers only, no data).

:func:`layout_of` returns a :class:`Layout`: one :class:`QuantizedWeight` per weight to
dequantize, and a :class:`Note` for every other tensor that must not be analysed as it is
(scales, zero points, group indices, codes of a format esdtool cannot decode, parts that do not
fit together). Plain tensors appear in neither and are analysed as before.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from esdtool.dequant import formats
from esdtool.dequant.scheme import CT_FORMATS, SUPPORTED, Scheme
from esdtool.io.checkpoint import TensorInfo

_F8 = {"F8_E4M3": "fp8_e4m3", "F8_E5M2": "fp8_e5m2", "F8_E4M3FNUZ": "fp8_e4m3fnuz",
       "F8_E5M2FNUZ": "fp8_e5m2fnuz"}  # fmt: skip
_INTS = {"I8", "U8", "I16", "U16", "I32", "U32", "I64", "U64"}
# Tensor-name endings that only quantized checkpoints have (scales, zero points, codes, ...).
_AUX_LAST = {
    "weight_scale", "weight_scale_inv", "weight_scale_2", "weight_zero_point", "weight_g_idx",
    "weight_shape", "weight_global_scale", "weight_packed", "input_scale", "input_zero_point",
    "input_global_scale", "output_scale", "output_zero_point", "k_scale", "v_scale", "q_scale",
    "activation_scale", "input_scale_ub", "qweight", "qzeros", "scales", "g_idx", "SCB",
    "weight_format",
}  # fmt: skip
_AUX_TAIL = ("_blocks", "_scales", "_scale", "_scale_inv", "_zero_point", "_global_scale")


@dataclass(frozen=True)
class QuantizedWeight:
    """One weight stored quantized: the tensors it is made of and how to decode them.

    name:   the stored tensor holding its codes; its table row carries this name.
    module: the module it belongs to (PEFT's module path).
    label:  the table's ``quantization`` value, e.g. "fp8_e4m3 block 128x128", "gptq int4 g128".
    shape:  the weight's shape once dequantized, as a bf16 checkpoint would store it.
    parts:  (role, tensor name) of every tensor it is made of, codes first.
    codec:  which :mod:`~esdtool.dequant.formats` function decodes it.
    params: that function's settings (block, bits, group size, zero offset).
    """

    name: str
    module: str
    label: str
    shape: tuple[int, ...]
    parts: tuple[tuple[str, str], ...]
    codec: str
    params: tuple[tuple[str, Any], ...] = ()

    def names(self) -> list[str]:
        return [name for _, name in self.parts]

    def decode(self, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The float32 weight from its parts (``tensors`` by role), on their device."""
        p = dict(self.params)
        t = tensors
        if self.codec == "scaled":
            return formats.blockwise(t["codes"], t["scale"], p["block"], t.get("zero"))
        if self.codec == "grouped":  # int codes with a g_idx (activation order)
            return formats.by_group_index(t["codes"], t["scale"], t["g_idx"], t.get("zero"))
        if self.codec == "packed":
            cols = self.shape[-1]
            if "shape" in t and tuple(t["shape"].tolist()) != self.shape:
                raise ValueError(
                    f"weight_shape says {t['shape'].tolist()}, the packed codes and scales "
                    f"say {list(self.shape)}"
                )
            codes = formats.unpack(t["codes"], p["bits"], dim=-1)[..., :cols]
            codes = codes.to(torch.int32) - (1 << (p["bits"] - 1))  # stored offset to unsigned
            zero = t.get("zero")
            if zero is not None:
                zero = formats.unpack(zero, p["bits"], dim=0)[: self.shape[0]]
                zero = zero.to(torch.int32) - (1 << (p["bits"] - 1))
            if "g_idx" in t:
                return formats.by_group_index(codes, t["scale"], t["g_idx"], zero)
            return formats.blockwise(codes, t["scale"], p["block"], zero)
        if self.codec == "mxfp4":
            values = formats.mxfp4(t["codes"], t["scale"])
            # 3-D experts come out as transformers lays them out: [experts, in, out].
            return values.transpose(1, 2) if values.ndim == 3 else values
        if self.codec == "gptq":
            return formats.gptq(
                t["codes"], t["zero"], t["scale"], t["g_idx"], p["bits"],
                zero_offset=p["zero_offset"],
            )  # fmt: skip
        if self.codec == "awq":
            return formats.awq(t["codes"], t.get("zero"), t["scale"], p["group_size"])
        raise ValueError(f"unknown codec {self.codec!r}")


@dataclass(frozen=True)
class Note:
    """Why a tensor is not analysed as stored: ``status`` "skipped" (a part of a weight, or a
    format esdtool cannot decode) or "error" (parts that do not fit together). ``codes``: the
    tensor holds a weight's codes (``--raw-codes`` may analyse them as stored)."""

    status: str
    reason: str
    codes: bool = False  # the tensor holds a weight's codes (``raw_codes`` may analyse them)


@dataclass
class Layout:
    """Every quantized weight of a checkpoint and every tensor not to analyse as stored.

    weights: QuantizedWeight by the name of its codes tensor.
    notes:   Note by tensor name.
    scheme:  the config's quantization scheme, None when config.json declares none.
    """

    weights: dict[str, QuantizedWeight] = field(default_factory=dict)
    notes: dict[str, Note] = field(default_factory=dict)
    scheme: Scheme | None = None

    @property
    def quantized(self) -> bool:
        return self.scheme is not None or bool(self.weights)

    def summary(self, names: list[str]) -> list[str]:
        """One line per quantization label among ``names`` (the selected tensors), and one for
        the weights skipped because their format cannot be decoded."""
        counts: dict[str, int] = {}
        for name in names:
            if name in self.weights:
                counts[self.weights[name].label] = counts.get(self.weights[name].label, 0) + 1
        lines = [f"dequantized {n} {label} weight(s)" for label, n in counts.items()]
        unsupported = [n for n in names if n in self.notes and "cannot dequantize" in
                       self.notes[n].reason]  # fmt: skip
        if unsupported:
            lines.append(
                f"skipped {len(unsupported)} quantized weight(s) esdtool cannot dequantize "
                f"({self.notes[unsupported[0]].reason})"
            )
        return lines


def layout_of(infos: Mapping[str, TensorInfo], scheme: Scheme | None) -> Layout:
    """The :class:`Layout` of a checkpoint whose tensors are ``infos`` (by name)."""
    layout = Layout(scheme=scheme)
    method = scheme.method if scheme else None
    if method is None or method in ("fp8", "fbgemm_fp8", "compressed-tensors"):
        _scaled_floats(infos, scheme, layout)
    if method == "compressed-tensors":
        _compressed_ints(infos, scheme, layout)  # type: ignore[arg-type]
    elif method == "mxfp4":
        _mxfp4(infos, layout)
    elif method in ("gptq", "awq"):
        _gptq_awq(infos, scheme, layout)  # type: ignore[arg-type]
    _remaining(infos, layout)
    return layout


def _unsupported(scheme: Scheme | None, detail: str = "") -> str:
    what = f"quant_method {scheme.method!r}" if scheme and scheme.method else "a quantization"
    extra = f" ({detail})" if detail else ""
    return f"quantized with {what}{extra}, which esdtool cannot dequantize"


def _claim(layout: Layout, weight: QuantizedWeight, infos: Mapping[str, TensorInfo]) -> None:
    layout.weights[weight.name] = weight
    for role, name in weight.parts[1:]:
        what = {"scale": "scales", "zero": "zero points", "g_idx": "group index",
                "shape": "shape"}.get(role, role)  # fmt: skip
        layout.notes[name] = Note("skipped", f"{what} of {weight.name} ({weight.label})")


def _broken(layout: Layout, names: list[str], reason: str) -> None:
    for name in names:
        layout.notes[name] = Note("error", reason)


def _module(name: str, *suffixes: str) -> str:
    for suffix in suffixes:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _block_of(shape: tuple[int, ...], grid: tuple[int, ...], hint: tuple[int, int] | None):
    """The (bm, bn) block a scale ``grid`` [..., sr, sc] covers on a weight ``shape``
    [..., R, C], or None when it fits none. ``hint`` (the config's) must fit when given;
    otherwise the power-of-two block that fits wins, then an exact division."""
    if len(grid) != len(shape) or grid[:-2] != shape[:-2]:
        return None
    (rows, cols), (sr, sc) = shape[-2:], grid[-2:]
    if hint is not None:
        fits = math.ceil(rows / hint[0]) == sr and math.ceil(cols / hint[1]) == sc
        return hint if fits else None

    def side(n: int, s: int) -> int | None:
        if s < 1 or s > n:
            return None
        for b in (1 << k for k in range(0, 31)):
            if math.ceil(n / b) == s:
                return b
        return n // s if n % s == 0 else None

    bm, bn = side(rows, sr), side(cols, sc)
    return None if bm is None or bn is None else (bm, bn)


def _scale_block(
    shape: tuple[int, ...], scale: tuple[int, ...], hints: tuple[tuple[int, int], ...]
) -> tuple[tuple[int, int], str] | None:
    """(block, strategy) of a scale of shape ``scale`` on a weight ``shape``: per tensor (one
    value), per channel ([..., R, 1]), per group ([..., R, G]) or per 2-D block."""
    rows, cols = shape[-2], shape[-1]
    if math.prod(scale) == 1 and len(shape) == 2:
        return (rows, cols), "tensor"
    if len(scale) == len(shape) and scale[:-1] == shape[:-1] and scale[-1] == 1:
        return (1, cols), "channel"
    for hint in hints or (None,):  # type: ignore[arg-type]
        block = _block_of(shape, scale, hint)
        if block is not None:
            if block[0] == 1:
                return block, f"group {block[1]}"
            return block, f"block {block[0]}x{block[1]}"
    return None


def _scaled_floats(infos: Mapping[str, TensorInfo], scheme: Scheme | None, layout: Layout) -> None:
    """FP8 (and compressed-tensors' int8) weights with a ``_scale_inv`` or ``_scale`` sibling:
    fine-grained FP8 (DeepSeek, Qwen3-FP8), fbgemm_fp8, compressed-tensors float/int-quantized,
    and the same tensors found with no config."""
    method = scheme.method if scheme else None
    hints: tuple[tuple[int, int], ...] = ()
    if scheme and scheme.block:
        hints = (scheme.block,)
    elif scheme and method == "compressed-tensors":
        hints = scheme.blocks + tuple((1, g) for g in scheme.group_sizes)
    for name, info in infos.items():
        ints = method == "compressed-tensors" and info.dtype == "I8"
        if info.dtype not in _F8 and not ints:
            continue
        if len(info.shape) < 2:
            continue
        scale_name = next((name + s for s in ("_scale_inv", "_scale") if name + s in infos), None)
        if scale_name is None:
            continue
        scale = infos[scale_name]
        zero_name = name + "_zero_point" if name + "_zero_point" in infos else None
        found = _scale_block(info.shape, scale.shape, hints)
        parts = [name, scale_name] + ([zero_name] if zero_name else [])
        if found is None:
            _broken(layout, parts, (
                f"{scale_name} {list(scale.shape)} does not fit the weight {list(info.shape)} "
                f"per tensor, channel, group or block"
                + (f" (config block {hints[0][0]}x{hints[0][1]})" if hints else "")
            ))  # fmt: skip
            continue
        block, strategy = found
        kind = _F8.get(info.dtype, "int8")
        roles = [("codes", name), ("scale", scale_name)]
        roles += [("zero", zero_name)] if zero_name else []
        weight = QuantizedWeight(
            name=name, module=_module(name, ".weight"), label=f"{kind} {strategy}",
            shape=info.shape, parts=tuple(roles), codec="scaled",
            params=(("block", block),),
        )  # fmt: skip
        _claim(layout, weight, infos)


def _compressed_ints(infos: Mapping[str, TensorInfo], scheme: Scheme, layout: Layout) -> None:
    """compressed-tensors pack-quantized: int4/int8 codes packed into int32 ``weight_packed``,
    with ``weight_scale``, ``weight_shape`` and optionally ``weight_zero_point``,
    ``weight_g_idx``."""
    unknown = [f for f in scheme.formats if f not in CT_FORMATS and f != "dense"]
    for name, info in infos.items():
        if not name.endswith(".weight_packed"):
            continue
        base = name[: -len("_packed")]
        parts = {"codes": name, "scale": base + "_scale", "shape": base + "_shape",
                 "zero": base + "_zero_point", "g_idx": base + "_g_idx"}  # fmt: skip
        present = {role: n for role, n in parts.items() if n in infos}
        if unknown or info.dtype != "I32" or "scale" not in present:
            detail = f"format {unknown[0]}" if unknown else f"{info.dtype} weight_packed"
            layout.notes[name] = Note("skipped", _unsupported(scheme, detail), codes=True)
            continue
        scale = infos[present["scale"]]
        names = list(present.values())
        if len(scheme.num_bits) != 1:
            widths = ", ".join(map(str, scheme.num_bits)) or "none"
            _broken(layout, names, f"config_groups name {widths} bit widths; cannot unpack {name}")
            continue
        bits = scheme.num_bits[0]
        if len(info.shape) != 2:
            _broken(layout, names, f"{name} {list(info.shape)} is not a packed matrix")
            continue
        rows, words = info.shape
        cols = infos[present["g_idx"]].shape[0] if "g_idx" in present else words * 32 // bits
        if math.ceil(cols * bits / 32) != words:
            _broken(layout, names, f"{name} {list(info.shape)} does not hold {cols} columns")
            continue
        shape = (rows, cols)
        params: list[tuple[str, Any]] = [("bits", bits)]
        if "g_idx" in present:
            if infos[present["g_idx"]].shape != (cols,) or scale.shape[:1] != (rows,):
                _broken(layout, names, f"{present['g_idx']} does not fit {name}")
                continue
            strategy = f"group {math.ceil(cols / scale.shape[-1])} act-order"
        else:
            hints = scheme.blocks + tuple((1, g) for g in scheme.group_sizes)
            found = _scale_block(shape, scale.shape, hints)
            if found is None:
                _broken(layout, names, f"{present['scale']} {list(scale.shape)} does not fit "
                        f"the weight [{rows}, {cols}]")  # fmt: skip
                continue
            block, strategy = found
            params.append(("block", block))
        ordered = [(r, present[r]) for r in ("codes", "scale", "zero", "g_idx", "shape")
                   if r in present]  # fmt: skip
        weight = QuantizedWeight(
            name=name, module=_module(name, ".weight_packed"),
            label=f"int{bits} {strategy}", shape=shape, parts=tuple(ordered),
            codec="packed", params=tuple(params),
        )  # fmt: skip
        _claim(layout, weight, infos)


def _mxfp4(infos: Mapping[str, TensorInfo], layout: Layout) -> None:
    """gpt-oss MXFP4: ``X_blocks`` [..., G, 16] bytes and ``X_scales`` [..., G] exponents."""
    for name, info in infos.items():
        if not name.endswith("_blocks"):
            continue
        scale_name = name[: -len("_blocks")] + "_scales"
        if scale_name not in infos:
            layout.notes[name] = Note("error", f"MXFP4 blocks without their {scale_name}")
            continue
        scale = infos[scale_name]
        ok = (
            info.dtype == "U8" and scale.dtype in ("U8", "F8_E8M0")
            and len(info.shape) in (3, 4) and info.shape[:-1] == scale.shape
        )  # fmt: skip
        if not ok:
            _broken(layout, [name, scale_name], (
                f"{name} {info.dtype} {list(info.shape)} and {scale_name} {scale.dtype} "
                f"{list(scale.shape)} are not MXFP4 blocks and scales"
            ))  # fmt: skip
            continue
        *lead, groups, width = info.shape
        cols = groups * width * 2
        shape = (lead[0], cols, lead[1]) if len(lead) == 2 else (lead[0], cols)
        weight = QuantizedWeight(
            name=name, module=_module(name, "_blocks"), label="mxfp4", shape=tuple(shape),
            parts=(("codes", name), ("scale", scale_name)), codec="mxfp4",
        )  # fmt: skip
        _claim(layout, weight, infos)


def _gptq_awq(infos: Mapping[str, TensorInfo], scheme: Scheme, layout: Layout) -> None:
    """GPTQ and AWQ: ``qweight``, ``qzeros``, ``scales`` (and GPTQ's ``g_idx``) per module."""
    gptq = scheme.method == "gptq"
    bits = scheme.bits
    for name, info in infos.items():
        if not name.endswith(".qweight"):
            continue
        module = name[: -len(".qweight")]
        parts = {"codes": name, "zero": module + ".qzeros", "scale": module + ".scales",
                 "g_idx": module + ".g_idx"}  # fmt: skip
        present = {role: n for role, n in parts.items() if n in infos}
        names = list(present.values())
        tag = f"{scheme.method} int{bits}"
        unsupported = None
        if gptq and scheme.version not in ("gptq", "gptq_v2"):
            unsupported = f"checkpoint_format {scheme.version}"
        elif not gptq and (scheme.version != "gemm" or bits != 4):
            unsupported = f"AWQ version {scheme.version}, {bits}-bit"
        if unsupported:
            for n in names:
                layout.notes[n] = Note("skipped", _unsupported(scheme, unsupported), n == name)
            continue
        if "scale" not in present or ((gptq or scheme.zero_point) and "zero" not in present):
            _broken(layout, names, f"{name} without its qzeros/scales")
            continue
        q, s = info, infos[present["scale"]]
        groups, rows = s.shape if len(s.shape) == 2 else (0, 0)
        if gptq:
            cols = q.shape[0] * 32 // bits if len(q.shape) == 2 else 0
            fits = len(q.shape) == 2 and q.shape[1] == rows
        else:
            cols = q.shape[0] if len(q.shape) == 2 else 0
            fits = len(q.shape) == 2 and q.shape[1] * 8 == rows
        group = scheme.group_size if scheme.group_size != -1 else cols
        fits = fits and q.dtype == "I32" and groups == math.ceil(cols / max(group, 1))
        if "zero" in present:
            z = infos[present["zero"]]
            fits = fits and z.shape == (groups, math.ceil(rows * bits / 32))
        if "g_idx" in present:
            fits = fits and infos[present["g_idx"]].shape == (cols,)
        if not fits:
            _broken(layout, names, (
                f"{name} {list(q.shape)} and {present['scale']} {list(s.shape)} do not fit "
                f"{tag} with group size {scheme.group_size}"
            ))  # fmt: skip
            continue
        label = f"{tag} g{group}" + (" act-order" if gptq and scheme.desc_act else "")
        params: tuple[tuple[str, Any], ...]
        if gptq:
            params = (("bits", bits), ("zero_offset", scheme.zero_offset))
            codec = "gptq"
            if "g_idx" not in present:
                layout.notes[name] = Note("error", f"{name} without its g_idx")
                continue
        else:
            params = (("group_size", group),)
            codec = "awq"
        ordered = tuple((r, present[r]) for r in ("codes", "scale", "zero", "g_idx")
                        if r in present)  # fmt: skip
        weight = QuantizedWeight(
            name=name, module=module, label=label, shape=(rows, cols), parts=ordered,
            codec=codec, params=params,
        )  # fmt: skip
        _claim(layout, weight, infos)


def _weight_like(name: str) -> bool:
    """Named like a weight's codes (not, say, an integer ``position_ids`` buffer)."""
    last = name.rsplit(".", 1)[-1]
    return last in ("weight", "qweight", "weight_packed") or name.endswith(("_blocks", "_proj"))


_AUX_RE = re.compile(r"\.weight\.[A-Za-z0-9_.]+$")  # bitsandbytes: X.weight.absmax, ...


def _remaining(infos: Mapping[str, TensorInfo], layout: Layout) -> None:
    """Notes for the tensors no format claimed, in a quantized checkpoint: quantization
    tensors of a format not decoded, and codes that cannot be read as weights."""
    if not layout.quantized and not any(i.dtype in _F8 for i in infos.values()):
        return
    scheme = layout.scheme
    method = scheme.method if scheme else None
    for name, info in infos.items():
        if name in layout.weights or name in layout.notes:
            continue
        last = name.rsplit(".", 1)[-1]
        aux = last in _AUX_LAST or name.endswith(_AUX_TAIL) or _AUX_RE.search(name) is not None
        if aux and layout.quantized:
            layout.notes[name] = Note(
                "skipped", f"quantization tensor ({last}), not a weight; {_unsupported(scheme)}"
                if method not in SUPPORTED else f"quantization tensor ({last}), not a weight"
            )  # fmt: skip
        elif info.dtype in _F8 and scheme is not None:
            detail = "no scale found beside it" if method in SUPPORTED else ""
            layout.notes[name] = Note("skipped", _unsupported(scheme, detail), codes=True)
        elif info.dtype in _INTS and layout.quantized and _weight_like(name):
            reason = _unsupported(scheme, f"{info.dtype} codes")
            layout.notes[name] = Note("skipped", reason, codes=True)
