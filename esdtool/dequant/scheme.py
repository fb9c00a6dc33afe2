"""A checkpoint's ``quantization_config`` (config.json), read and checked all at once.

The config is untrusted JSON: every field used is type-checked here, and a malformed one is a
:class:`~esdtool.errors.CheckpointError` listing every problem, before any tensor is read.
Fields esdtool does not use are ignored (and kept verbatim in the table's metadata).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from esdtool.errors import CheckpointError

# quant_method values esdtool dequantizes; any other value is named in skip reasons.
SUPPORTED = ("fp8", "fbgemm_fp8", "compressed-tensors", "mxfp4", "gptq", "awq")
# compressed-tensors formats (global ``format`` or per config group).
CT_FORMATS = ("float-quantized", "int-quantized", "pack-quantized", "naive-quantized")


@dataclass(frozen=True)
class Scheme:
    """What config.json says about quantization.

    method:      ``quant_method`` (lower case), e.g. "fp8", "gptq"; "" when the config has none.
    block:       FP8 ``weight_block_size`` (rows, cols), or None (per tensor).
    bits:        GPTQ/AWQ code width.
    group_size:  GPTQ/AWQ group size; -1 means one group per column (per channel).
    zero_offset: GPTQ stores zero points minus this (1 for format v1, 0 for gptq_v2).
    desc_act:    GPTQ act-order (groups follow ``g_idx``).
    version:     AWQ kernel layout ("gemm" is the one supported) or the GPTQ checkpoint format.
    zero_point:  AWQ asymmetric (zero points stored).
    formats:     compressed-tensors formats named by the config.
    group_sizes: compressed-tensors weight group sizes named by the config groups.
    blocks:      compressed-tensors weight block structures named by the config groups.
    num_bits:    compressed-tensors weight code widths named by the config groups.
    raw:         the ``quantization_config`` object as found.
    """

    method: str
    block: tuple[int, int] | None = None
    bits: int = 4
    group_size: int = 128
    zero_offset: int = 1
    desc_act: bool = False
    version: str = ""
    zero_point: bool = True
    formats: tuple[str, ...] = ()
    group_sizes: tuple[int, ...] = ()
    blocks: tuple[tuple[int, int], ...] = ()
    num_bits: tuple[int, ...] = ()
    raw: Any = None


def read_scheme(config: dict[str, Any] | None, where: str) -> Scheme | None:
    """The :class:`Scheme` of ``config`` (a parsed config.json), or None when it declares no
    quantization. ``where`` names the config in error messages."""
    if not isinstance(config, dict) or config.get("quantization_config") is None:
        return None
    qc = config["quantization_config"]
    problems: list[str] = []
    if not isinstance(qc, dict):
        raise CheckpointError(f"{where}: quantization_config is not a JSON object")
    method = qc.get("quant_method")
    if not isinstance(method, str):
        problems.append(f"quant_method is {_short(method)}, not a string")
        method = ""
    method = method.lower()
    fields: dict[str, Any] = {"method": method, "raw": qc}
    if method == "fp8":
        block = qc.get("weight_block_size")
        if block is not None:
            if _pair(block) is None:
                problems.append(f"weight_block_size is {_short(block)}, not two sizes >= 1")
            else:
                fields["block"] = _pair(block)
    elif method in ("gptq", "awq"):
        fields.update(_gptq_awq(qc, method, problems))
    elif method == "compressed-tensors":
        fields.update(_compressed(qc, problems))
    if problems:
        raise CheckpointError(
            f"{where}: quantization_config: {'; '.join(problems)}",
            hint="the checkpoint's config.json is damaged or not one its format's tools wrote",
        )
    return Scheme(**fields)


def _gptq_awq(qc: dict[str, Any], method: str, problems: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    bits = qc.get("bits", qc.get("w_bit", 4))
    if type(bits) is not int or bits not in (2, 3, 4, 8):
        problems.append(f"bits is {_short(bits)}, not 2, 3, 4 or 8")
    else:
        out["bits"] = bits
    group = qc.get("group_size", qc.get("q_group_size", 128))
    if type(group) is not int or not (group == -1 or group >= 1):
        problems.append(f"group_size is {_short(group)}, not -1 or a size >= 1")
    else:
        out["group_size"] = group
    if method == "gptq":
        fmt = qc.get("checkpoint_format", qc.get("format", "gptq"))
        if not isinstance(fmt, str):
            problems.append(f"checkpoint_format is {_short(fmt)}, not a string")
            fmt = "gptq"
        out["version"] = fmt.lower()
        out["zero_offset"] = 0 if fmt.lower() == "gptq_v2" else 1
        desc = qc.get("desc_act", False)
        if not isinstance(desc, bool):
            problems.append(f"desc_act is {_short(desc)}, not true or false")
        else:
            out["desc_act"] = desc
    else:
        version = qc.get("version", "gemm")
        zero = qc.get("zero_point", True)
        if not isinstance(version, str):
            problems.append(f"version is {_short(version)}, not a string")
        else:
            out["version"] = version.lower()
        if not isinstance(zero, bool):
            problems.append(f"zero_point is {_short(zero)}, not true or false")
        else:
            out["zero_point"] = zero
    return out


def _compressed(qc: dict[str, Any], problems: list[str]) -> dict[str, Any]:
    formats: list[str] = []
    sizes: list[int] = []
    blocks: list[tuple[int, int]] = []
    bits: list[int] = []
    if isinstance(qc.get("format"), str):
        formats.append(qc["format"])
    groups = qc.get("config_groups") or {}
    if not isinstance(groups, dict):
        problems.append("config_groups is not a JSON object")
        groups = {}
    for key, group in groups.items():
        if not isinstance(group, dict):
            problems.append(f"config_groups.{_short(key, 40)} is not a JSON object")
            continue
        if isinstance(group.get("format"), str):
            formats.append(group["format"])
        weights = group.get("weights")
        if weights is None:
            continue
        if not isinstance(weights, dict):
            problems.append(f"config_groups.{_short(key, 40)}.weights is not a JSON object")
            continue
        size = weights.get("group_size")
        if size is not None:
            if type(size) is not int or size < 1:
                problems.append(f"group_size is {_short(size)}, not a size >= 1")
            else:
                sizes.append(size)
        width = weights.get("num_bits")
        if width is not None:
            if type(width) is not int or width not in (2, 4, 8):
                problems.append(f"num_bits is {_short(width)}, not 2, 4 or 8")
            else:
                bits.append(width)
        block = weights.get("block_structure")
        if block is not None:
            if _pair(block) is None:
                problems.append(f"block_structure is {_short(block)}, not two sizes >= 1")
            else:
                blocks.append(_pair(block))  # type: ignore[arg-type]
    return {
        "formats": tuple(dict.fromkeys(f.lower() for f in formats)),
        "group_sizes": tuple(dict.fromkeys(sizes)),
        "blocks": tuple(dict.fromkeys(blocks)),
        "num_bits": tuple(dict.fromkeys(bits)),
    }


def _pair(value: object) -> tuple[int, int] | None:
    if (
        isinstance(value, list)
        and len(value) == 2
        and all(type(v) is int and 1 <= v < 1 << 31 for v in value)
    ):
        return (value[0], value[1])
    return None


def _short(value: object, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
