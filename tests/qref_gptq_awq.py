"""Reference GPTQ and AWQ checkpoints, built and dequantized by GPT-QModel's own code.

The reference implementation is GPT-QModel (PyPI ``gptqmodel``, ModelCloud), the library that
transformers 5 and optimum 2 themselves delegate GPTQ and AWQ loading, packing and
dequantization to (``transformers/integrations/awq.py``, ``transformers/quantizers/
quantizer_gptq.py`` and ``optimum/gptq/quantizer.py`` all import ``gptqmodel``). Its pure-torch
CPU kernels and packers are used here; nothing in this module packs or unpacks a bit itself.

CI install (into the test venv that already has torch, transformers, accelerate, numpy,
safetensors and pillow, as ``.[test]`` brings them)::

    pip install --no-deps gptqmodel==7.7.0 pypcre==0.6.4 logbar==0.4.15 device-smi==0.5.7 \
        tokenicer==0.0.14 defuser==0.0.28 threadpoolctl requests urllib3 certifi charset-normalizer

``--no-deps`` is required: gptqmodel 7.7.0 declares ``torch>=2.14.1`` (a plain install pulls a
CUDA torch, triton and the nvidia-* wheels, several GB) plus torchao, datasets, maturin and ninja,
none of which the modules used here import. The packages above are about 24 MB installed and take
about 12 s (9 s of it compiling pypcre, an sdist whose small C extension needs a C compiler and the
libpcre2-8 runtime, both on the project's machines). gptqmodel 7.7.0 is itself an sdist with no
build step (its C++/CUDA kernels are JIT-built only when used; the torch code used here needs none).

Optional cross-check of the deprecated original AWQ code (:func:`autoawq_dequantize_awq`)::

    pip install --no-deps autoawq==0.2.9

Side effects of ``import gptqmodel`` (done lazily, inside these functions): it logs a banner, sets
``PYTORCH_ALLOC_CONF`` and ``CUDA_DEVICE_ORDER`` if unset, wraps ``safetensors.torch.save_file``
in a lock and patches transformers' GPTQ quantizer (device-map compatibility). The import takes
about 5-8 s on the project's machine.

Layouts (GPT-QModel 7.7.0, confirmed bit for bit against an independent decoder):

* GPTQ ``qweight`` int32 ``[in * bits / 32, out]`` packs the input axis: for 2/4/8 bits, input
  ``i`` is in row ``i // (32 // bits)`` at shift ``bits * (i % (32 // bits))`` (low bits first).
  ``qzeros`` int32 ``[groups, out * bits / 32]`` packs the output axis the same way. 3 bits: each
  32 codes are one 96-bit little-endian stream over 3 consecutive words (code ``j`` at stream bit
  ``3 * j``, so codes 10 and 21 straddle two words).
  ``scales`` f16 ``[groups, out]``, ``g_idx`` int32 ``[in]`` (group of each input column).
  ``W[o, i] = scales[g_idx[i], o] * (q[i, o] - z[g_idx[i], o])``.
* ``checkpoint_format`` "gptq" (v1, also when the key is absent, as in TheBloke's exports) stores
  ``z - 1``; "gptq_v2" stores ``z``. GPT-QModel writes v1 by subtracting 0x11111111 (4 bits),
  0x01010101 (8 bits) or 0x55555555 (2 bits) from each whole int32 word and reads it back by adding
  the same; for 3 bits it shifts each decoded field. Symmetric: ``z = 2 ** (bits - 1)`` (4-bit v1
  words read 0x77777777). Caveat, v1 with ``sym=False`` only: a zero point of 0 (a group whose
  weights in one output row are all >= 0) borrows across fields under the whole-word subtraction,
  and GPT-QModel's two decoders then disagree: the kernel path (word add, exact round trip) and
  ``convert_gptq_file`` (per-field +1, wrong on those rows). v2 and symmetric checkpoints agree
  bit for bit. Keep v1 asymmetric test weights free of all-positive groups, or follow the kernel.
* AWQ GEMM ``qweight`` int32 ``[in, out / 8]`` packs the output axis, 8 codes per word in the order
  ``AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]``: nibble ``p`` (shift ``4 * p``) of word ``c`` holds
  output column ``8 * c + AWQ_ORDER[p]``. ``qzeros`` int32 ``[in / group, out / 8]`` likewise;
  ``scales`` f16 ``[in / group, out]``; no zero offset; no g_idx.
  ``W[o, i] = scales[i // group, o] * (q[i, o] - z[i // group, o])``. With ``zero_point=False``
  GPT-QModel still stores qzeros, all equal to 8.
"""

from __future__ import annotations

import json
import os
import zlib
from collections.abc import Mapping
from pathlib import Path
from types import SimpleNamespace

import torch
from safetensors.torch import load_file, save_file

GPTQMODEL_VERSION = "7.7.0"
AUTOAWQ_VERSION = "0.2.9"
PIP_INSTALL = (
    "pip install --no-deps --target .venv/reference-formats -r tests/reference-formats.txt "
    "(make install does it)"
)

REFERENCE: dict[str, dict[str, str]] = {
    "gptq": {
        "package": "gptqmodel",
        "version": GPTQMODEL_VERSION,
        "quantize": "gptqmodel.quantization.quantizer.Quantizer.find_params / .quantize (RTN)",
        "pack": "gptqmodel.nn_modules.qlinear.torch.TorchLinear.pack_block",
        "to_v1": "gptqmodel.utils.model.convert_gptq_v2_to_v1_format_module",
        "from_v1": "gptqmodel.utils.model.convert_gptq_v1_to_v2_format_module",
        "dequantize": "gptqmodel.nn_modules.qlinear.torch.TorchLinear.dequantize_weight",
        "dequantize_checkpoint": "gptqmodel.utils.model_dequant.convert_gptq_file",
    },
    "awq": {
        "package": "gptqmodel",
        "version": GPTQMODEL_VERSION,
        "quantize": "gptqmodel.looper.awq_processor.AWQProcessor.pseudo_quantize_tensor (RTN)",
        "pack": "gptqmodel.nn_modules.qlinear.torch_awq.AwqTorchLinear.pack",
        "dequantize": "gptqmodel.quantization.awq.utils.packing_utils.dequantize_gemm",
        "cross_check": f"autoawq=={AUTOAWQ_VERSION} awq.utils.packing_utils.dequantize_gemm",
    },
}


def _gptqmodel() -> SimpleNamespace:
    """GPT-QModel's pieces used here; ImportError naming the pip command when it is missing."""
    # The pure-python packer is the reference; never JIT-build the optional C++ pack extension.
    os.environ.setdefault("GPTQMODEL_DISABLE_PACK_EXT", "1")
    try:
        from gptqmodel.looper.awq_processor import AWQProcessor
        from gptqmodel.nn_modules.qlinear.torch import TorchLinear
        from gptqmodel.nn_modules.qlinear.torch_awq import AwqTorchLinear
        from gptqmodel.quantization import FORMAT, AWQConfig, QuantizeConfig
        from gptqmodel.quantization.awq.utils.packing_utils import dequantize_gemm
        from gptqmodel.quantization.quantizer import Quantizer
        from gptqmodel.utils.model import (
            convert_gptq_v1_to_v2_format_module,
            convert_gptq_v2_to_v1_format_module,
        )
        from gptqmodel.utils.model_dequant import convert_gptq_file
        from gptqmodel.version import __version__
    except ImportError as exc:
        raise ImportError(f"the GPTQ/AWQ reference needs GPT-QModel: {PIP_INSTALL}") from exc
    if __version__ != GPTQMODEL_VERSION:
        raise ImportError(
            f"the GPTQ/AWQ reference is pinned to gptqmodel=={GPTQMODEL_VERSION}, "
            f"found {__version__}: {PIP_INSTALL}"
        )
    return SimpleNamespace(
        AWQConfig=AWQConfig,
        AWQProcessor=AWQProcessor,
        AwqTorchLinear=AwqTorchLinear,
        FORMAT=FORMAT,
        QuantizeConfig=QuantizeConfig,
        Quantizer=Quantizer,
        TorchLinear=TorchLinear,
        convert_gptq_file=convert_gptq_file,
        convert_gptq_v1_to_v2_format_module=convert_gptq_v1_to_v2_format_module,
        convert_gptq_v2_to_v1_format_module=convert_gptq_v2_to_v1_format_module,
        dequantize_gemm=dequantize_gemm,
    )


def _prefix(name: str) -> str:
    if not name.endswith(".weight"):
        raise ValueError(f"{name!r}: weights are keyed '<module>.weight'")
    return name[: -len(".weight")]


def _group_size(group_size: int, in_features: int) -> int:
    size = in_features if group_size == -1 else group_size
    if size <= 0 or in_features % size:
        raise ValueError(f"in_features {in_features} is not a multiple of group_size {size}")
    return size


def _write(directory: Path, tensors: dict[str, torch.Tensor], config: dict) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.contiguous() for k, v in tensors.items()},
        str(directory / "model.safetensors"),
        metadata={"format": "pt"},
    )
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return directory


def _read(directory: Path) -> tuple[dict[str, torch.Tensor], dict]:
    config = json.loads((directory / "config.json").read_text())
    return load_file(str(directory / "model.safetensors")), config["quantization_config"]


def _prefixes(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    return sorted(k[: -len(".qweight")] for k in tensors if k.endswith(".qweight"))


def _act_order_permutation(name: str, in_features: int) -> torch.Tensor:
    """GPTQ act-order's permutation: input columns by decreasing Hessian diagonal. The diagonal
    is that of X^T X for a seeded (per weight name) batch of inputs with uneven channel scales."""
    gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    channel_scale = torch.rand(in_features, generator=gen) * 4 + 0.25
    x = torch.randn(64, in_features, generator=gen) * channel_scale
    return torch.argsort((x * x).sum(0), descending=True)


def build_gptq_checkpoint(
    directory: Path,
    weights: Mapping[str, torch.Tensor],
    *,
    bits: int = 4,
    group_size: int = 128,
    desc_act: bool = False,
    sym: bool = True,
    checkpoint_format: str | None = "gptq",
    config_extra: Mapping[str, object] | None = None,
) -> Path:
    """Write a GPTQ checkpoint of ``weights`` (``{"<module>.weight": [out, in] float}``).

    Each weight is RTN-quantized per group by GPT-QModel's GPTQ ``Quantizer`` (min/max, as GPTQ
    does before its Hessian updates, which are skipped) and packed by ``TorchLinear.pack_block``;
    v1 (``checkpoint_format`` "gptq", or None to omit the key as TheBloke's exports do) is then
    made by ``convert_gptq_v2_to_v1_format_module``. ``desc_act=True`` quantizes the columns in
    act-order (a seeded permutation) so ``g_idx`` is a non-monotone group map, as GPTQ writes it.
    Both dimensions must be multiples of 32 (GPT-QModel's packer requires it). Returns
    ``directory``, holding model.safetensors and config.json.
    """
    if bits not in (2, 3, 4, 8):
        raise ValueError(f"GPTQ bits must be 2, 3, 4 or 8, not {bits}")
    if checkpoint_format not in ("gptq", "gptq_v2", None):
        raise ValueError(f"checkpoint_format must be gptq, gptq_v2 or None: {checkpoint_format}")
    g = _gptqmodel()
    fmt = g.FORMAT.GPTQ_V2 if checkpoint_format == "gptq_v2" else g.FORMAT.GPTQ
    tensors: dict[str, torch.Tensor] = {}
    for name, weight in weights.items():
        prefix = _prefix(name)
        w = weight.detach().to(torch.float32).cpu()
        out_features, in_features = w.shape
        size = _group_size(group_size, in_features)
        perm = _act_order_permutation(name, in_features) if desc_act else torch.arange(in_features)
        inv_perm = torch.argsort(perm)

        qcfg = g.QuantizeConfig(
            bits=bits, group_size=group_size, desc_act=desc_act, sym=sym, offload_to_disk=False
        )  # offload_to_disk would make a directory under /tmp
        quantizer = g.Quantizer(qcfg)
        quantizer.configure(perchannel=True)
        w_perm = w[:, perm]
        q_perm = torch.empty_like(w_perm)
        scales, zeros = [], []
        for start in range(0, in_features, size):
            block = w_perm[:, start : start + size]
            quantizer.find_params(block, weight=True)
            q_perm[:, start : start + size] = quantizer.quantize(block)
            scales.append(quantizer.scale)
            zeros.append(quantizer.zero)
        g_idx = (torch.arange(in_features) // size)[inv_perm].to(torch.int32)

        linear = torch.nn.Linear(in_features, out_features, bias=False)
        linear.weight.data = q_perm[:, inv_perm].contiguous()
        qlinear = g.TorchLinear(
            bits=bits,
            group_size=group_size,
            sym=sym,
            desc_act=desc_act,
            in_features=in_features,
            out_features=out_features,
            bias=False,
            format=fmt,
        )
        qlinear.pack_block(linear, torch.cat(scales, 1), torch.cat(zeros, 1), g_idx)
        if fmt == g.FORMAT.GPTQ:
            g.convert_gptq_v2_to_v1_format_module(qlinear, qcfg)
        tensors[f"{prefix}.qweight"] = qlinear.qweight.to(torch.int32)
        tensors[f"{prefix}.qzeros"] = qlinear.qzeros.to(torch.int32)
        tensors[f"{prefix}.scales"] = qlinear.scales.to(torch.float16)
        tensors[f"{prefix}.g_idx"] = qlinear.g_idx.to(torch.int32)

    # As GPT-QModel / optimum exports write it (ModelCloud/*-gptqmodel-*; TheBloke/*-GPTQ have the
    # same keys less checkpoint_format, meta and pack_dtype).
    quant_config: dict[str, object] = {
        "quant_method": "gptq",
        "bits": bits,
        "group_size": group_size,
        "desc_act": desc_act,
        "sym": sym,
        "lm_head": False,
        "damp_percent": 0.1,
        "true_sequential": True,
        "static_groups": False,
        "pack_dtype": "int32",
        "meta": {"quantizer": [f"gptqmodel:{GPTQMODEL_VERSION}"], "uri": "esdtool tests"},
    }
    if checkpoint_format is not None:
        quant_config["checkpoint_format"] = checkpoint_format
    config = {**(config_extra or {}), "torch_dtype": "float16", "quantization_config": quant_config}
    return _write(Path(directory), tensors, config)


def build_awq_checkpoint(
    directory: Path,
    weights: Mapping[str, torch.Tensor],
    *,
    bits: int = 4,
    group_size: int = 128,
    zero_point: bool = True,
    config_extra: Mapping[str, object] | None = None,
) -> Path:
    """Write an AWQ GEMM checkpoint of ``weights`` (``{"<module>.weight": [out, in] float}``).

    Each weight is RTN-quantized by GPT-QModel's ``AWQProcessor.pseudo_quantize_tensor`` (AutoAWQ's
    formula; AWQ's activation-aware scale search is skipped) and packed by
    ``AwqTorchLinear.pack`` (AWQ order [0, 2, 4, 6, 1, 3, 5, 7]). ``out`` must be a multiple of 8.
    Only 4 bits: GEMM checkpoints on the hub are 4-bit (GPT-QModel packs other widths as a plain
    bit stream, not the GEMM layout). Returns ``directory``.
    """
    if bits != 4:
        raise ValueError(f"AWQ GEMM checkpoints are 4-bit, not {bits}")
    g = _gptqmodel()
    qcfg = g.AWQConfig(
        bits=bits, group_size=group_size, sym=not zero_point, format="gemm", offload_to_disk=False
    )
    tensors: dict[str, torch.Tensor] = {}
    for name, weight in weights.items():
        prefix = _prefix(name)
        w = weight.detach().to(torch.float32).cpu()
        out_features, in_features = w.shape
        size = _group_size(group_size, in_features)
        # pseudo_quantize_tensor reads only self.qcfg (bits, group_size, sym).
        fake_self = SimpleNamespace(qcfg=SimpleNamespace(bits=bits, group_size=size, sym=qcfg.sym))
        wq, scales, zeros = g.AWQProcessor.pseudo_quantize_tensor(fake_self, w)
        linear = torch.nn.Linear(in_features, out_features, bias=False)
        linear.weight.data = wq.contiguous()
        qlinear = g.AwqTorchLinear(
            bits=bits,
            group_size=size,
            sym=qcfg.sym,
            desc_act=False,
            in_features=in_features,
            out_features=out_features,
            bias=False,
        )
        qlinear.pack(linear, scales, zeros)
        tensors[f"{prefix}.qweight"] = qlinear.qweight.to(torch.int32)
        tensors[f"{prefix}.qzeros"] = qlinear.qzeros.to(torch.int32)
        tensors[f"{prefix}.scales"] = qlinear.scales.to(torch.float16)

    # As AutoAWQ exports write it (TheBloke/*-AWQ, casperhansen/*-awq).
    quant_config = {
        "quant_method": "awq",
        "bits": bits,
        "group_size": group_size,
        "zero_point": zero_point,
        "version": "gemm",
        "modules_to_not_convert": None,
    }
    config = {**(config_extra or {}), "torch_dtype": "float16", "quantization_config": quant_config}
    return _write(Path(directory), tensors, config)


def _is_gptq_v1(quant_config: Mapping[str, object]) -> bool:
    # GPT-QModel's rule (utils/model_dequant.py _uses_gptq_v1_qzeros): absent means v1.
    return str(quant_config.get("checkpoint_format") or "gptq").lower() in ("gptq", "gemm")


def reference_dequantize_gptq(directory: Path, *, via: str = "kernel") -> dict[str, torch.Tensor]:
    """Dense float32 ``{"<module>.weight": [out, in]}`` of a GPTQ checkpoint, by GPT-QModel.

    ``via="kernel"`` (default): the buffers go into ``TorchLinear`` (GPT-QModel's CPU inference
    kernel, the one transformers runs GPTQ with on CPU), v1 zeros are converted by
    ``convert_gptq_v1_to_v2_format_module`` as its loader does, and ``dequantize_weight`` decodes
    them (scales promoted to float32, so each product is exact). ``via="checkpoint"``:
    GPT-QModel's safetensors-level dequantizer ``convert_gptq_file`` (float32), an independent
    decoder in the same library.
    """
    directory = Path(directory)
    g = _gptqmodel()
    tensors, quant_config = _read(directory)
    if via == "checkpoint":
        out = g.convert_gptq_file(
            directory / "model.safetensors", torch.float32, quant_config, "cpu"
        )
        return {f"{p}.weight": out[f"{p}.weight"] for p in _prefixes(tensors)}
    if via != "kernel":
        raise ValueError(f"via must be 'kernel' or 'checkpoint', not {via!r}")
    bits = int(quant_config["bits"])
    v1 = _is_gptq_v1(quant_config)
    result: dict[str, torch.Tensor] = {}
    for prefix in _prefixes(tensors):
        qweight = tensors[f"{prefix}.qweight"]
        g_idx = tensors[f"{prefix}.g_idx"]
        qlinear = g.TorchLinear(
            bits=bits,
            group_size=int(quant_config["group_size"]),
            sym=bool(quant_config.get("sym", True)),
            desc_act=bool(quant_config.get("desc_act", False)),
            in_features=g_idx.numel(),
            out_features=qweight.shape[1],
            bias=False,
            format=g.FORMAT.GPTQ if v1 else g.FORMAT.GPTQ_V2,
        )
        with torch.no_grad():
            for buffer in ("qweight", "qzeros", "scales", "g_idx"):
                getattr(qlinear, buffer).copy_(tensors[f"{prefix}.{buffer}"])
        if v1:
            g.convert_gptq_v1_to_v2_format_module(qlinear, bits, torch.int32)
        qlinear.scales = qlinear.scales.to(torch.float32)
        qlinear.eval()
        with torch.no_grad():
            dense = qlinear.dequantize_weight()  # [in, out]
        result[f"{prefix}.weight"] = dense.to(torch.float32).t().contiguous()
    return result


def reference_dequantize_awq(directory: Path) -> dict[str, torch.Tensor]:
    """Dense float32 ``{"<module>.weight": [out, in]}`` of an AWQ GEMM checkpoint, by GPT-QModel's
    ``dequantize_gemm`` (what ``AwqTorchLinear`` runs on CPU; scales promoted to float32).

    Not ``gptqmodel.utils.model_dequant.convert_awq_file``: in 7.7.0 it decodes AWQ words in plain
    sequential order, ignoring AWQ_ORDER, so output column ``8c + k`` gets the code and zero of
    column ``8c + AWQ_ORDER[k]`` with its own scale (about 124% relative error on random weights).
    """
    directory = Path(directory)
    g = _gptqmodel()
    tensors, quant_config = _read(directory)
    bits = int(quant_config["bits"])
    result: dict[str, torch.Tensor] = {}
    for prefix in _prefixes(tensors):
        qweight = tensors[f"{prefix}.qweight"]
        size = _group_size(int(quant_config["group_size"]), qweight.shape[0])
        with torch.no_grad():
            dense = g.dequantize_gemm(
                qweight,
                tensors[f"{prefix}.qzeros"],
                tensors[f"{prefix}.scales"].to(torch.float32),
                bits,
                size,
            )  # [in, out]
        result[f"{prefix}.weight"] = dense.to(torch.float32).t().contiguous()
    return result


def autoawq_dequantize_awq(directory: Path) -> dict[str, torch.Tensor]:
    """The same as :func:`reference_dequantize_awq` by the deprecated original, AutoAWQ 0.2.9's
    ``awq.utils.packing_utils.dequantize_gemm`` (``pip install --no-deps autoawq==0.2.9``; it
    imports with transformers 5 and torch 2.13 on CPU). For cross-checking only."""
    try:
        from awq.utils.packing_utils import dequantize_gemm
    except ImportError as exc:
        raise ImportError(f"needs pip install --no-deps autoawq=={AUTOAWQ_VERSION}") from exc
    directory = Path(directory)
    tensors, quant_config = _read(directory)
    bits = int(quant_config["bits"])
    result: dict[str, torch.Tensor] = {}
    for prefix in _prefixes(tensors):
        qweight = tensors[f"{prefix}.qweight"]
        size = _group_size(int(quant_config["group_size"]), qweight.shape[0])
        dense = dequantize_gemm(
            qweight,
            tensors[f"{prefix}.qzeros"],
            tensors[f"{prefix}.scales"].to(torch.float32),
            bits,
            size,
        )
        result[f"{prefix}.weight"] = dense.to(torch.float32).t().contiguous()
    return result


def relative_error(original: torch.Tensor, dense: torch.Tensor) -> float:
    """||original - dense||_F / ||original||_F in float64."""
    a, b = original.to(torch.float64), dense.to(torch.float64)
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(a))


__all__ = [
    "REFERENCE",
    "autoawq_dequantize_awq",
    "build_awq_checkpoint",
    "build_gptq_checkpoint",
    "reference_dequantize_awq",
    "reference_dequantize_gptq",
    "relative_error",
]


def _main(argv: list[str]) -> None:
    """Run in a child process, so that GPT-QModel's import-time patches (of transformers and
    safetensors) and PEFT's view of it never reach the test process:

        python qref_gptq_awq.py build-gptq|build-awq WEIGHTS.safetensors OUTDIR KWARGS_JSON
        python qref_gptq_awq.py dequantize-gptq|dequantize-awq DIR OUT.safetensors
        python qref_gptq_awq.py batch JOBS.json   (a list of such argument lists; one import)
    """
    if argv[0] == "batch":
        for job in json.loads(Path(argv[1]).read_text()):
            _main(job)
        return
    action, source, target = argv[:3]
    if action.startswith("build-"):
        build = build_gptq_checkpoint if action == "build-gptq" else build_awq_checkpoint
        build(Path(target), load_file(source), **json.loads(argv[3]))
    else:
        dequantize = (
            reference_dequantize_gptq if action == "dequantize-gptq" else reference_dequantize_awq
        )
        save_file(dequantize(Path(source)), target)


if __name__ == "__main__":
    import sys

    _main(sys.argv[1:])
