"""Which stored tensors make up which weight: the quantized weights of a checkpoint, from its
``quantization_config`` and the tensors' names, dtypes and shapes.

:func:`layout_of` returns a :class:`~esdtool.dequant.records.Layout`: one ``QuantizedWeight``
per weight to dequantize, and a ``Note`` for every other tensor that must not be analysed as it
is (scales, zero points, group indices, codes of a format esdtool cannot decode, parts that do
not fit together). Plain tensors appear in neither and are analysed as before.

Every part's dtype and shape is checked here, from the headers, against what its format
defines: a scale of the wrong dtype or a zero point of the wrong shape makes the weight an
``error`` row, never a number decoded with the wrong scale. The only data read is a packed
weight's two-number ``weight_shape``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from typing import Any

import torch

from esdtool.dequant.records import Layout, Note, QuantizedWeight
from esdtool.dequant.scheme import CT_FORMATS, SUPPORTED, Scheme
from esdtool.io.checkpoint import TensorInfo

_F8 = {"F8_E4M3": "fp8_e4m3", "F8_E5M2": "fp8_e5m2", "F8_E4M3FNUZ": "fp8_e4m3fnuz",
       "F8_E5M2FNUZ": "fp8_e5m2fnuz"}  # fmt: skip
_INTS = {"I8", "U8", "I16", "U16", "I32", "U32", "I64", "U64"}
_SCALES = {"F32", "F16", "BF16", "F64"}  # value scales; E8M0 exponents only where defined
_INDEX = {"I32", "I64"}
# Tensor-name endings that only quantized checkpoints have (scales, zero points, codes, ...).
_AUX_LAST = {
    "weight_scale", "weight_scale_inv", "weight_scale_2", "weight_zero_point", "weight_g_idx",
    "weight_shape", "weight_global_scale", "input_scale", "input_zero_point",
    "input_global_scale", "output_scale", "output_zero_point", "k_scale", "v_scale", "q_scale",
    "activation_scale", "input_scale_ub", "qzeros", "scales", "g_idx", "SCB", "weight_format",
}  # fmt: skip
_AUX_TAIL = ("_scales", "_scale", "_scale_inv", "_zero_point", "_global_scale")
_AUX_RE = re.compile(r"\.weight\.[A-Za-z0-9_.]+$")  # bitsandbytes: X.weight.absmax, ...

Reader = Callable[[str], torch.Tensor]


def layout_of(
    infos: Mapping[str, TensorInfo], scheme: Scheme | None, read: Reader | None = None
) -> Layout:
    """The :class:`Layout` of a checkpoint whose tensors are ``infos`` (by name). ``read``
    reads a tensor's data; it is used only for compressed-tensors' two-number ``weight_shape``
    (without it, packed weights are errors)."""
    layout = Layout(scheme=scheme)
    method = scheme.method if scheme else None
    if method is None or method in ("fp8", "fbgemm_fp8", "compressed-tensors"):
        _scaled_floats(infos, scheme, layout)
    if method == "compressed-tensors":
        _compressed_ints(infos, scheme, layout, read)  # type: ignore[arg-type]
    elif method == "mxfp4":
        _mxfp4(infos, layout)
    elif method in ("gptq", "awq"):
        _gptq_awq(infos, scheme, layout)  # type: ignore[arg-type]
    _remaining(infos, layout)
    return layout


def _unsupported(scheme: Scheme | None, detail: str = "") -> str:
    what = f"quant_method {scheme.method!r}" if scheme and scheme.method else "a quantization"
    if scheme is None:
        what += " config.json does not declare"
    extra = f" ({detail})" if detail else ""
    return f"quantized with {what}{extra}, which esdtool cannot dequantize"


def _claim(layout: Layout, weight: QuantizedWeight) -> None:
    """Record ``weight``; a part some other weight already claimed makes both errors."""
    names = weight.names()
    taken = [n for n in names if n in layout.notes or n in layout.weights]
    if taken:
        _broken(layout, names, f"{taken[0]} would belong to two quantized weights")
        other = layout.weights.pop(taken[0], None)
        if other is not None:
            _broken(layout, other.names(), f"{taken[0]} would belong to two quantized weights")
        return
    layout.weights[weight.name] = weight
    for role, name in weight.parts[1:]:
        what = {"scale": "scales", "zero": "zero points", "g_idx": "group index",
                "shape": "shape"}.get(role, role)  # fmt: skip
        layout.notes[name] = Note("skipped", f"{what} of {weight.name} ({weight.label})")


def _broken(layout: Layout, names: list[str], reason: str) -> None:
    for name in names:
        layout.weights.pop(name, None)
        layout.notes[name] = Note("error", reason)


def _module(name: str, *suffixes: str) -> str:
    for suffix in suffixes:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _is_aux(name: str) -> bool:
    last = name.rsplit(".", 1)[-1]
    return last in _AUX_LAST or name.endswith(_AUX_TAIL) or _AUX_RE.search(name) is not None


def _infer_side(n: int, s: int) -> int | None:
    """The power-of-two block that cuts ``n`` into ``s`` pieces (the last may be partial)."""
    if s < 1 or s > n:
        return None
    return next((b for b in (1 << k for k in range(31)) if math.ceil(n / b) == s), None)


def _scale_block(
    shape: tuple[int, ...],
    scale: tuple[int, ...],
    hints: tuple[tuple[int, int], ...],
    *,
    strict: bool,
) -> tuple[tuple[int, int], str] | None:
    """(block, strategy) of a scale of shape ``scale`` on a weight ``shape`` [..., R, C]: per
    tensor (one value), per channel ([..., R, 1]), per group ([..., R, G]) or per 2-D block.

    ``hints`` are the blocks the config names; with ``strict`` (the config names a block for
    every weight) only they fit. Without hints, a block is inferred only when it is square or a
    row group, with power-of-two sides: a [4, 2] grid on [256, 512] could be 64x256 blocks or
    transposed 128x128 ones, and esdtool does not guess between them."""
    rows, cols = shape[-2], shape[-1]
    if not strict:
        if math.prod(scale) == 1 and len(scale) <= 2 and len(shape) == 2:
            return (rows, cols), "tensor"
        if len(scale) == len(shape) and scale[:-1] == shape[:-1] and scale[-1] == 1:
            return (1, cols), "channel"
    if len(scale) != len(shape) or scale[:-2] != shape[:-2]:
        return None
    sr, sc = scale[-2:]
    candidates: list[tuple[int, int]] = list(hints)
    if not hints:
        bm, bn = _infer_side(rows, sr), _infer_side(cols, sc)
        if bm is not None and bn is not None and (bm == bn or sr == rows):
            candidates.append((1 if sr == rows else bm, bn))
    for bm, bn in candidates:
        if math.ceil(rows / bm) == sr and math.ceil(cols / bn) == sc:
            if bm == 1:
                return (1, bn), f"group {bn}"
            return (bm, bn), f"block {bm}x{bn}"
    return None


def _scaled_floats(infos: Mapping[str, TensorInfo], scheme: Scheme | None, layout: Layout) -> None:
    """FP8 (and compressed-tensors' int8) weights with a ``_scale_inv`` or ``_scale`` sibling:
    fine-grained FP8 (DeepSeek, Qwen3-FP8), fbgemm_fp8, compressed-tensors float/int-quantized,
    and the same tensors found with no config."""
    method = scheme.method if scheme else None
    hints: tuple[tuple[int, int], ...] = ()
    strict = False
    if scheme and scheme.block:
        hints, strict = (scheme.block,), True  # fine-grained FP8: the config's block only
    elif scheme and method == "compressed-tensors":
        hints = scheme.blocks + tuple((1, g) for g in scheme.group_sizes)
    for name, info in infos.items():
        ints = method == "compressed-tensors" and info.dtype == "I8"
        if (info.dtype not in _F8 and not ints) or len(info.shape) < 2 or _is_aux(name):
            continue
        scale_name = next((name + s for s in ("_scale_inv", "_scale") if name + s in infos), None)
        if scale_name is None:
            continue
        scale = infos[scale_name]
        zero_name = name + "_zero_point" if name + "_zero_point" in infos else None
        parts = [name, scale_name] + ([zero_name] if zero_name else [])
        found = _scale_block(info.shape, scale.shape, hints, strict=strict)
        problem = None
        if scale.dtype not in _SCALES | {"F8_E8M0"}:
            problem = f"{scale_name} is {scale.dtype}, not a float scale"
        elif found is None:
            problem = (
                f"{scale_name} {list(scale.shape)} does not fit the weight {list(info.shape)} "
                + (f"with the config's {hints[0][0]}x{hints[0][1]} blocks" if strict else
                   "per tensor, channel, group or block")
            )  # fmt: skip
        elif zero_name and (
            infos[zero_name].shape != scale.shape or infos[zero_name].dtype not in _INTS
        ):
            z = infos[zero_name]
            problem = f"{zero_name} {z.dtype} {list(z.shape)} does not match its scales"
        if problem:
            _broken(layout, parts, problem)
            continue
        block, strategy = found  # type: ignore[misc]
        roles = [("codes", name), ("scale", scale_name)]
        roles += [("zero", zero_name)] if zero_name else []
        kind = _F8.get(info.dtype, "int8")
        _claim(layout, QuantizedWeight(
            name=name, module=_module(name, ".weight"), label=f"{kind} {strategy}",
            shape=info.shape, parts=tuple(roles), codec="scaled", params=(("block", block),),
        ))  # fmt: skip


def _compressed_ints(
    infos: Mapping[str, TensorInfo], scheme: Scheme, layout: Layout, read: Reader | None
) -> None:
    """compressed-tensors pack-quantized: int4/int8 codes packed into int32 ``weight_packed``,
    with ``weight_scale`` and ``weight_shape``, and optionally ``weight_zero_point`` (packed
    along rows) and ``weight_g_idx``."""
    unknown = [f for f in scheme.formats if f not in CT_FORMATS and f != "dense"]
    for name, info in infos.items():
        if not name.endswith(".weight_packed"):
            continue
        base = name[: -len("_packed")]
        roles = {"codes": name, "scale": base + "_scale", "zero": base + "_zero_point",
                 "g_idx": base + "_g_idx", "shape": base + "_shape"}  # fmt: skip
        present = {role: n for role, n in roles.items() if n in infos}
        names = list(present.values())
        if unknown or info.dtype != "I32":
            detail = f"format {unknown[0]}" if unknown else f"{info.dtype} weight_packed"
            layout.notes[name] = Note("skipped", _unsupported(scheme, detail), codes=True)
            continue
        problem, weight = _packed_weight(name, infos, present, scheme, read)
        if problem:
            _broken(layout, names, problem)
        else:
            _claim(layout, weight)  # type: ignore[arg-type]


def _packed_weight(
    name: str,
    infos: Mapping[str, TensorInfo],
    present: dict[str, str],
    scheme: Scheme,
    read: Reader | None,
) -> tuple[str | None, QuantizedWeight | None]:
    """The checked QuantizedWeight of one ``weight_packed``, or what is wrong with it."""
    info = infos[name]
    if len(scheme.num_bits) != 1:
        widths = ", ".join(map(str, scheme.num_bits)) or "no"
        return f"config_groups name {widths} bit widths; cannot unpack {name}", None
    bits = scheme.num_bits[0]
    for role in ("scale", "shape"):
        if role not in present:
            return f"{name} without its weight_{role}", None
    shape_info, scale = infos[present["shape"]], infos[present["scale"]]
    if shape_info.shape != (2,) or shape_info.dtype not in _INDEX or read is None:
        return (
            f"{present['shape']} {shape_info.dtype} {list(shape_info.shape)} is not [rows, cols]",
            None,
        )
    rows, cols = (int(v) for v in read(present["shape"]).tolist())
    if len(info.shape) != 2 or info.shape != (rows, math.ceil(cols * bits / 32)) or cols < 1:
        return f"{name} {list(info.shape)} does not hold [{rows}, {cols}] at {bits} bits", None
    if scale.dtype not in _SCALES:
        return f"{present['scale']} is {scale.dtype}, not a float scale", None
    params: list[tuple[str, Any]] = [("bits", bits)]
    if "g_idx" in present:
        g = infos[present["g_idx"]]
        if (
            g.shape != (cols,)
            or g.dtype not in _INDEX
            or len(scale.shape) != 2
            or scale.shape[0] != rows
        ):
            return f"{present['g_idx']} and {present['scale']} do not fit {name}", None
        strategy = f"group {math.ceil(cols / scale.shape[1])} act-order"
    else:
        hints = scheme.blocks + tuple((1, g) for g in scheme.group_sizes)
        found = _scale_block((rows, cols), scale.shape, hints, strict=False)
        if found is None:
            return f"{present['scale']} {list(scale.shape)} does not fit [{rows}, {cols}]", None
        block, strategy = found
        params.append(("block", block))
    if "zero" in present:
        z = infos[present["zero"]]
        want = (math.ceil(rows * bits / 32), scale.shape[-1] if len(scale.shape) == 2 else 1)
        if z.dtype != "I32" or z.shape != want:
            return f"{present['zero']} {z.dtype} {list(z.shape)} is not I32 {list(want)}", None
    order = ("codes", "scale", "zero", "g_idx", "shape")
    return None, QuantizedWeight(
        name=name, module=_module(name, ".weight_packed"), label=f"int{bits} {strategy}",
        shape=(rows, cols), parts=tuple((r, present[r]) for r in order if r in present),
        codec="packed", params=tuple(params),
    )  # fmt: skip


def _mxfp4(infos: Mapping[str, TensorInfo], layout: Layout) -> None:
    """gpt-oss MXFP4: ``X_blocks`` [E, out, G, 16] bytes and ``X_scales`` [E, out, G]
    exponents (2-D [out, G, 16] blocks too)."""
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
        _claim(layout, QuantizedWeight(
            name=name, module=_module(name, ".weight_blocks", "_blocks"), label="mxfp4",
            shape=tuple(shape),
            parts=(("codes", name), ("scale", scale_name)), codec="mxfp4",
        ))  # fmt: skip


def _gptq_awq(infos: Mapping[str, TensorInfo], scheme: Scheme, layout: Layout) -> None:
    """GPTQ and AWQ: ``qweight``, ``qzeros``, ``scales`` (and GPTQ's ``g_idx``) per module."""
    gptq = scheme.method == "gptq"
    bits = scheme.bits
    for name in infos:
        if not name.endswith(".qweight"):
            continue
        module = name[: -len(".qweight")]
        roles = {"codes": name, "zero": module + ".qzeros", "scale": module + ".scales",
                 "g_idx": module + ".g_idx"}  # fmt: skip
        present = {role: n for role, n in roles.items() if n in infos}
        names = list(present.values())
        unsupported = None
        if gptq and scheme.version not in ("gptq", "gptq_v2"):
            unsupported = f"checkpoint_format {scheme.version}"
        elif not gptq and (scheme.version != "gemm" or bits != 4):
            unsupported = f"AWQ version {scheme.version}, {bits}-bit"
        elif not gptq and not scheme.zero_point:
            unsupported = "AWQ without zero points"
        if unsupported:
            for n in names:
                layout.notes[n] = Note("skipped", _unsupported(scheme, unsupported), n == name)
            continue
        problem, weight = _gptq_awq_weight(name, infos, present, scheme)
        if problem:
            _broken(layout, names, problem)
        else:
            _claim(layout, weight)  # type: ignore[arg-type]


def _gptq_awq_weight(
    name: str, infos: Mapping[str, TensorInfo], present: dict[str, str], scheme: Scheme
) -> tuple[str | None, QuantizedWeight | None]:
    """The checked QuantizedWeight of one GPTQ/AWQ ``qweight``, or what is wrong with it."""
    gptq, bits = scheme.method == "gptq", scheme.bits
    needed = ("zero", "scale", "g_idx") if gptq else ("zero", "scale")
    missing = [r for r in needed if r not in present]
    if missing:
        suffix = {"zero": "qzeros", "scale": "scales", "g_idx": "g_idx"}[missing[0]]
        return f"{name} without its {suffix}", None
    q, s, z = infos[name], infos[present["scale"]], infos[present["zero"]]
    if len(s.shape) != 2 or len(q.shape) != 2:
        return (
            f"{name} {list(q.shape)} and {present['scale']} {list(s.shape)} are not matrices",
            None,
        )
    groups, rows = s.shape
    if gptq:
        cols = q.shape[0] * 32 // bits
        fits = q.shape[1] == rows and (q.shape[0] * 32) % bits == 0
    else:
        cols, fits = q.shape[0], q.shape[1] * 8 == rows
    group = scheme.group_size if scheme.group_size != -1 else cols
    fits = fits and groups == math.ceil(cols / max(group, 1))
    fits = fits and z.shape == (groups, math.ceil(rows * bits / 32))
    dtypes = q.dtype == "I32" and z.dtype == "I32" and s.dtype in _SCALES
    if gptq:
        g = infos[present["g_idx"]]
        fits = fits and g.shape == (cols,)
        dtypes = dtypes and g.dtype in _INDEX
    if not (fits and dtypes):
        parts = ", ".join(f"{infos[n].dtype} {list(infos[n].shape)}" for n in present.values())
        return (
            f"{name}: its parts ({parts}) do not fit {scheme.method} int{bits} with group size "
            f"{scheme.group_size}"
        ), None
    label = f"{scheme.method} int{bits} g{group}" + (
        " act-order" if gptq and scheme.desc_act else ""
    )
    if gptq:
        params: tuple[tuple[str, Any], ...] = (("bits", bits), ("zero_offset", scheme.zero_offset))
    else:
        params = (("group_size", group),)
    order = ("codes", "scale", "zero", "g_idx")
    return None, QuantizedWeight(
        name=name, module=name[: -len(".qweight")], label=label, shape=(rows, cols),
        parts=tuple((r, present[r]) for r in order if r in present),
        codec="gptq" if gptq else "awq", params=params,
    )  # fmt: skip


def _weight_like(name: str) -> bool:
    """Named like a weight's codes (not, say, an integer ``position_ids`` buffer)."""
    last = name.rsplit(".", 1)[-1]
    return last in ("weight", "qweight", "weight_packed") or name.endswith(("_blocks", "_proj"))


def _remaining(infos: Mapping[str, TensorInfo], layout: Layout) -> None:
    """Notes for the tensors no format claimed, in a quantized checkpoint (a config declares
    a quantization, a weight was recognised, or integer codes are named like weights): codes
    that cannot be read as weights, and quantization tensors of a format not decoded."""
    codes = [n for n, i in infos.items() if _weight_like(n) and i.dtype in _INTS | set(_F8)]
    if layout.scheme is None and not layout.weights and not codes:
        return
    scheme = layout.scheme
    method = scheme.method if scheme else None
    for name, info in infos.items():
        if name in layout.weights or name in layout.notes:
            continue
        last = name.rsplit(".", 1)[-1]
        if _weight_like(name) and info.dtype in _INTS and len(info.shape) >= 1:
            reason = _unsupported(scheme, f"{info.dtype} codes")
            layout.notes[name] = Note("skipped", reason, codes=True)
        elif _is_aux(name):
            tail = "" if method in SUPPORTED else f"; {_unsupported(scheme)}"
            layout.notes[name] = Note(
                "skipped", f"quantization tensor ({last}), not a weight{tail}"
            )
        elif info.dtype in _F8 and scheme is not None:
            detail = "no scale found beside it" if method in SUPPORTED else ""
            layout.notes[name] = Note("skipped", _unsupported(scheme, detail), codes=True)
