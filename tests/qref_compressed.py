"""Reference checkpoints in the compressed-tensors format, written and read by that package.

CI needs::

    pip install "compressed-tensors==0.20.1"

(it adds only ``loguru`` to an environment that already has torch>=2.10, transformers>=4.45 and
pydantic; it does not touch torch or transformers). 0.20.1 cannot express activation-order
checkpoints: from 0.19 on ``QuantizationArgs(actorder="group")`` is a ValidationError and
``weight_g_idx`` is gone, so there :data:`ACTORDER_GROUP_SUPPORTED` is False and
``actorder=True`` raises :class:`ActorderUnsupported` (tests should skip). To cover g_idx, run
the same tests in a second job with ``pip install "compressed-tensors==0.18.0"``, the last
release that reads and writes ``weight_g_idx``. 0.18's compressors call ``dequantize`` without
the scheme and infer the block size from the tensor shapes, which is wrong for FP8 block
weights whose dims are not multiples of the block (scale [3, 2] for a [300, 200] weight is read
as 100x100 blocks); :func:`reference_decompress` then calls the package's ``dequantize`` with
the scheme's args itself.

Nothing in this module quantizes, packs or dequantizes by itself; it only arranges tensors and
calls compressed-tensors:

* :func:`build_compressed_checkpoint` does what llm-compressor does on ``oneshot`` + save: puts
  each dense weight in an ``nn.Linear`` at its dotted path, ``apply_quantization_config`` (the
  package's own initialisation of ``weight_scale`` / ``weight_zero_point`` / ``weight_g_idx``
  with the package's shapes and dtypes), fills the scales from a memoryless min-max observation
  through the package's ``calculate_qparams`` (what llm-compressor's weight observer does), then
  ``ModelCompressor.from_pretrained_model(...).compress_model(model)`` and
  ``ModelCompressor.update_config`` write the tensors and ``quantization_config``.
* :func:`reference_decompress` reads the files back through ``QuantizationConfig`` and the
  registered compressor's ``decompress`` classmethod (the package's model-free pathway, as in
  ``compressed_tensors.entrypoints.convert.converters.CompressedTensorsDequantizer``).

Dequantization in the package happens in the dtype of ``weight_scale`` (bf16 when the model is
bf16, the default here), i.e. ``((q - zp) * scale)`` rounded to bf16. Pass
``upcast_scales=True`` to :func:`reference_decompress` to hand the package float32 copies of
the scales instead: the product of an int4/int8/fp8 value and a bf16 scale is exact in float32,
so that gives the exact mathematical value of the stored checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

import compressed_tensors
import torch
from compressed_tensors.compressors import BaseCompressor, ModelCompressor
from compressed_tensors.compressors.format import infer_module_format
from compressed_tensors.config import CompressionFormat
from compressed_tensors.quantization import (
    QuantizationArgs,
    QuantizationConfig,
    QuantizationScheme,
    QuantizationStatus,
    QuantizationStrategy,
    apply_quantization_config,
)
from compressed_tensors.quantization.lifecycle.forward import dequantize
from compressed_tensors.quantization.utils import (
    calculate_qparams,
    maybe_pad_tensor_for_block_quant,
)
from compressed_tensors.utils.match import match_quantizable_tensors
from packaging.version import Version
from safetensors import safe_open
from safetensors.torch import save_file


def _actorder_group_supported() -> bool:
    try:
        QuantizationArgs(num_bits=4, strategy="group", group_size=128, actorder="group")
    except ValueError:
        return False
    return True


#: Whether the installed compressed-tensors still accepts ``actorder="group"`` (<= 0.18).
ACTORDER_GROUP_SUPPORTED = _actorder_group_supported()

#: <= 0.18: compressors' ``decompress`` calls ``dequantize`` without args (shape inference).
_DECOMPRESS_INFERS_ARGS = Version(compressed_tensors.__version__) < Version("0.19")

REFERENCE = {
    "package": "compressed-tensors",
    "version": compressed_tensors.__version__,
    "pip": 'pip install "compressed-tensors==0.20.1"',
    "pip_actorder_group": 'pip install "compressed-tensors==0.18.0"',
    "functions": {
        "init": "compressed_tensors.quantization.apply_quantization_config",
        "qparams": "compressed_tensors.quantization.utils.calculate_qparams",
        "compress": "compressed_tensors.compressors.ModelCompressor.from_pretrained_model"
        " + .compress_model (-> BaseCompressor registry[format].compress)",
        "config": "compressed_tensors.compressors.ModelCompressor.update_config",
        "decompress": "compressed_tensors.compressors.BaseCompressor"
        ".get_value_from_registry(format).decompress",
        "decompress_block_pre_0_19": "compressed_tensors.quantization.lifecycle.forward"
        ".dequantize(x_q, scale, args=scheme.weights)",
        "config_parse": "compressed_tensors.quantization.QuantizationConfig.model_validate",
        "matching": "compressed_tensors.utils.match.match_quantizable_tensors",
    },
    "actorder_group_supported": ACTORDER_GROUP_SUPPORTED,
}


class ActorderUnsupported(RuntimeError):
    """``actorder=True`` asked of a compressed-tensors release that removed it (>= 0.19)."""


# ----------------------------------------------------------------------------- building


def _scheme(
    format: str,
    num_bits: int,
    type: str,
    strategy: str,
    group_size: int | None,
    block_structure: list[int] | None,
    symmetric: bool,
    actorder: bool,
) -> QuantizationScheme:
    """The weight (and, where the format implies it, activation) scheme of the matching
    llm-compressor preset: FP8_DYNAMIC / FP8_BLOCK for float-quantized, W8A8 for int-quantized,
    W4A16 / W4A16_ASYM / W8A16 (weights only) for pack-quantized and naive-quantized."""
    if actorder and not ACTORDER_GROUP_SUPPORTED:
        raise ActorderUnsupported(
            f"compressed-tensors {compressed_tensors.__version__} removed actorder='group'"
        )
    weights = QuantizationArgs(
        num_bits=num_bits,
        type=type,
        symmetric=symmetric,
        strategy=strategy,
        group_size=group_size if strategy == "group" else None,
        block_structure=block_structure if strategy == "block" else None,
        dynamic=False,
        **({"actorder": "group"} if actorder else {}),
    )
    inputs = None
    if format == CompressionFormat.float_quantized.value:
        if strategy == "block":  # FP8_BLOCK: dynamic per-token-group(128) activations
            inputs = QuantizationArgs(
                num_bits=8,
                type="float",
                strategy="group",
                group_size=128,
                symmetric=True,
                dynamic=True,
            )
        else:  # FP8_DYNAMIC: dynamic per-token activations
            inputs = QuantizationArgs(
                num_bits=8, type="float", strategy="token", symmetric=True, dynamic=True
            )
    elif format == CompressionFormat.int_quantized.value:  # W8A8
        inputs = QuantizationArgs(
            num_bits=8, type="int", strategy="token", symmetric=True, dynamic=True
        )
    elif format not in (
        CompressionFormat.pack_quantized.value,
        CompressionFormat.naive_quantized.value,
    ):
        raise ValueError(f"unsupported format {format!r}")
    return QuantizationScheme(targets=["Linear"], weights=weights, input_activations=inputs)


def _group_of_columns(in_features: int, group_size: int, seed: int) -> torch.Tensor:
    """A GPTQ-style activation-order g_idx: columns are visited in a (seeded) random order
    ``perm`` and the k-th visited column lands in group ``k // group_size``."""
    perm = torch.randperm(in_features, generator=torch.Generator().manual_seed(seed))
    g_idx = torch.empty(in_features, dtype=torch.int32)
    g_idx[perm] = torch.arange(in_features, dtype=torch.int32) // group_size
    return g_idx


def _observe_min_max(
    weight: torch.Tensor, args: QuantizationArgs, g_idx: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Memoryless min/max of ``weight`` reduced the way the strategy shares a scale (the
    statistic llm-compressor's MinMax weight observer feeds to ``calculate_qparams``)."""
    strategy = args.strategy
    if strategy == QuantizationStrategy.TENSOR:
        return weight.amin(), weight.amax()
    if strategy == QuantizationStrategy.CHANNEL:
        return weight.amin(dim=-1, keepdim=True), weight.amax(dim=-1, keepdim=True)
    if strategy == QuantizationStrategy.GROUP:
        if g_idx is not None:  # gather each group's columns together
            weight = weight.index_select(-1, torch.argsort(g_idx.to(torch.long), stable=True))
        grouped = weight.unflatten(-1, (weight.shape[-1] // args.group_size, args.group_size))
        return grouped.amin(dim=-1), grouped.amax(dim=-1)
    if strategy == QuantizationStrategy.BLOCK:
        bh, bw = args.block_structure
        padded = maybe_pad_tensor_for_block_quant(weight, tuple(args.block_structure))
        rows, cols = padded.shape
        blocks = padded.reshape(rows // bh, bh, cols // bw, bw)
        return blocks.amin(dim=(1, 3)), blocks.amax(dim=(1, 3))
    raise ValueError(f"unsupported weight strategy {strategy!r}")


def _module_tree(linears: dict[str, torch.Tensor], dtype: torch.dtype) -> torch.nn.Module:
    root = torch.nn.Module()
    for module_name, weight in linears.items():
        parent = root
        *path, leaf = module_name.split(".")
        for part in path:
            if not hasattr(parent, part):
                parent.add_module(part, torch.nn.Module())
            parent = getattr(parent, part)
        out_features, in_features = weight.shape
        linear = torch.nn.Linear(in_features, out_features, bias=False, dtype=dtype)
        linear.weight.data.copy_(weight.to(dtype))
        parent.add_module(leaf, linear)
    return root


def build_compressed_checkpoint(
    directory: Path,
    weights: dict[str, torch.Tensor],
    *,
    format: str,
    num_bits: int,
    type: str,
    strategy: str,
    group_size: int | None = None,
    block_structure: list[int] | None = None,
    symmetric: bool = True,
    actorder: bool = False,
    dtype: torch.dtype = torch.bfloat16,
    ignore: list[str] = (),
    config: dict | None = None,
    seed: int = 0,
) -> Path:
    """Quantize and compress ``weights`` with compressed-tensors; write ``model.safetensors``
    and ``config.json`` (with ``quantization_config``) into ``directory`` and return it.

    Every 2-D ``<module>.weight`` becomes an ``nn.Linear`` in a model of ``dtype`` (bf16 like a
    real export, so scales come out bf16); it is quantized unless ``<module>`` is in
    ``ignore``, in which case it is written dense (in ``dtype``) and listed in the config's
    ``ignore``. Every other tensor (biases, norms, 1-D ...) is written exactly as passed.
    ``actorder=True`` is GPTQ's ``actorder: "group"``: a seeded column order, scales taken over
    each group's (scattered) columns, ``weight_g_idx`` I32 [in] stored (compressed-tensors <=
    0.18 only). ``config`` is merged into config.json (e.g. a model config).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    scheme = _scheme(
        format, num_bits, type, strategy, group_size, block_structure, symmetric, actorder
    )

    linears = {
        name[: -len(".weight")]: tensor
        for name, tensor in weights.items()
        if name.endswith(".weight") and tensor.ndim == 2
    }
    passthrough = {
        name: tensor
        for name, tensor in weights.items()
        if name[: -len(".weight")] not in linears or not name.endswith(".weight")
    }
    model = _module_tree(linears, dtype)
    quiet = {"show_progress": False} if _accepts_show_progress() else {}
    apply_quantization_config(
        model, QuantizationConfig(config_groups={"group_0": scheme}, ignore=list(ignore)), **quiet
    )

    for index, module_name in enumerate(linears):
        module = model.get_submodule(module_name)
        if getattr(module, "quantization_scheme", None) is None:
            continue  # ignored: stays dense
        args = module.quantization_scheme.weights
        g_idx = None
        if actorder:
            g_idx = _group_of_columns(module.in_features, args.group_size, seed + index)
            module.weight_g_idx.data.copy_(g_idx)
        with torch.no_grad():
            lo, hi = _observe_min_max(module.weight.data, args, g_idx)
            scale, zero_point = calculate_qparams(lo, hi, args)
            module.weight_scale.data.copy_(scale.reshape(module.weight_scale.shape))
            if hasattr(module, "weight_zero_point"):
                module.weight_zero_point.data.copy_(
                    zero_point.reshape(module.weight_zero_point.shape)
                )
        module.quantization_status = QuantizationStatus.FROZEN  # calibrated, as llm-compressor

    compressor = ModelCompressor.from_pretrained_model(model, quantization_format=format)
    compressor.compress_model(model)

    tensors = {name: t.detach().contiguous() for name, t in model.state_dict().items()}
    tensors.update({name: t.contiguous() for name, t in passthrough.items()})
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(dict(config or {}), indent=2))
    compressor.update_config(str(directory))
    return directory


def _accepts_show_progress() -> bool:
    import inspect

    return "show_progress" in inspect.signature(apply_quantization_config).parameters


# ----------------------------------------------------------------------------- reading


def _load_quantization_config(directory: Path) -> QuantizationConfig:
    data = json.loads((Path(directory) / "config.json").read_text())
    return QuantizationConfig.model_validate(data["quantization_config"])


def _scheme_format(config: QuantizationConfig, scheme: QuantizationScheme) -> str:
    """Format for a config group as the package resolves it when decompressing: the scheme's
    own ``format``, else a single global ``format``, else inferred from the scheme."""
    if scheme.format is not None:
        return CompressionFormat(scheme.format).value
    if config.format not in (None, CompressionFormat.mixed_precision.value):
        return CompressionFormat(config.format).value
    return infer_module_format(torch.nn.Linear, scheme).value


def reference_decompress(
    directory: Path, *, upcast_scales: bool = False
) -> dict[str, torch.Tensor]:
    """Dense float32 weights ``{"<module>.weight": [out, in]}`` of every quantized module in
    ``directory``, computed by compressed-tensors' registered compressor ``decompress``.

    ``upcast_scales`` passes float32 copies of ``weight_scale`` so the package dequantizes in
    float32 (exact) rather than in the stored scale dtype (bf16 rounding of the product).
    """
    directory = Path(directory)
    config = _load_quantization_config(directory)
    with safe_open(str(directory / "model.safetensors"), framework="pt") as handle:
        names = handle.keys()
        tensors = {name: handle.get_tensor(name) for name in names}

    out: dict[str, torch.Tensor] = {}
    for scheme in config.config_groups.values():
        compressor = BaseCompressor.get_value_from_registry(_scheme_format(config, scheme))
        param_names = compressor.compression_param_names(scheme)
        for module_name, _ in match_quantizable_tensors(
            tensors,
            ignore=config.ignore or [],
            targets=scheme.targets,
            param_targets=[param_names[0]],
        ):
            if f"{module_name}.weight_scale" not in tensors:
                # name-only matching also hits e.g. "...LayerNorm.weight" for formats whose
                # root param is "weight"; a module without a scale was not quantized
                continue
            state = {p: tensors[f"{module_name}.{p}"] for p in param_names}
            if upcast_scales:
                state["weight_scale"] = state["weight_scale"].to(torch.float32)
            if _DECOMPRESS_INFERS_ARGS and scheme.weights.strategy == "block":
                dense = dequantize(state["weight"], state["weight_scale"], args=scheme.weights)
            else:
                dense = compressor.decompress(state, scheme)["weight"]
            out[f"{module_name}.weight"] = dense.to(torch.float32)
    return out
