"""The records of the dequant stage: a quantized weight (its parts and how to decode them), a note
for a tensor not to analyse as stored, and a checkpoint's whole layout."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from esdtool.dequant import formats
from esdtool.dequant.scheme import Scheme


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
        """The float32 weight from its parts (``tensors`` by role), on their device. Every
        part's shape and dtype was checked from the headers (:func:`layout_of`)."""
        p = dict(self.params)
        t = tensors
        if self.codec == "scaled":
            return formats.blockwise(t["codes"], t["scale"], p["block"], t.get("zero"))
        if self.codec == "packed":
            bits, (rows, cols) = p["bits"], self.shape
            if tuple(t["shape"].tolist()) != self.shape:  # read at layout time; now again
                raise ValueError(f"weight_shape changed to {t['shape'].tolist()[:2]} on reading")
            offset = 1 << (bits - 1)  # codes and zero points are stored unsigned, plus offset
            codes = formats.unpack(t["codes"], bits, dim=-1)[..., :cols] - offset
            zero = t.get("zero")
            if zero is not None:
                zero = formats.unpack(zero, bits, dim=0)[:rows] - offset
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
            return formats.awq(t["codes"], t["zero"], t["scale"], p["group_size"])
        raise ValueError(f"unknown codec {self.codec!r}")


@dataclass(frozen=True)
class Note:
    """Why a tensor is not analysed as stored: ``status`` "skipped" (a part of a weight, or a
    format esdtool cannot decode) or "error" (parts that do not fit together). ``codes``: the
    tensor holds a weight's codes (``--raw-codes`` may analyse them as stored)."""

    status: str
    reason: str
    codes: bool = False


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

    def summary(self, names: list[str], raw_codes: bool = False) -> list[str]:
        """One line per quantization label among ``names`` (the selected tensors), and one for
        the weights skipped because their format cannot be decoded."""
        counts: dict[str, int] = {}
        for name in names:
            if name in self.weights:
                label = self.weights[name].label
                counts[label] = counts.get(label, 0) + 1
        verb = "analysed as raw codes" if raw_codes else "dequantized"
        lines = [f"{verb} {n} {label} weight(s)" for label, n in counts.items()]
        undecoded = [n for n in names if n in self.notes and self.notes[n].codes]
        if undecoded:
            what = "analysed as raw codes where stored as floats" if raw_codes else "skipped"
            lines.append(
                f"{len(undecoded)} quantized weight(s) esdtool cannot dequantize, {what} "
                f"({self.notes[undecoded[0]].reason})"
            )
        return lines
