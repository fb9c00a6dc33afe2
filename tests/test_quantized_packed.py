"""compressed-tensors, GPTQ and AWQ checkpoints against the formats' own reference code.

Real MiniLM weights are quantized and packed by compressed-tensors itself (tests/qref_compressed.py)
and by GPTQModel / AutoAWQ's packing (tests/qref_gptq_awq.py); esdtool's rows must hold the
spectra of the weights the same packages' decompressors return.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from esdtool import analyze, load_metrics
from helpers import assert_matches, assert_no_scale_analysed, assert_same_weight, decoded

LAYER = "encoder.layer.0."
NAMES = ("attention.self.query.weight", "intermediate.dense.weight", "output.dense.weight")


@pytest.fixture(scope="module")
def minilm_linears(minilm_dir) -> dict[str, torch.Tensor]:
    weights = load_file(str(minilm_dir / "model.safetensors"))
    out = {LAYER + n: weights[LAYER + n].float() for n in NAMES}
    out["encoder.layer.1.attention.self.key.weight"] = out[LAYER + NAMES[1]][:300, :200].clone()
    return out


def _analysed(directory: Path, out: Path):
    result = analyze(directory, out)
    return result, load_metrics(out)


def _check(
    table, reference: dict[str, torch.Tensor], label: str, codes_suffix: str, directory: Path
) -> None:
    """Every weight the reference dequantized is esdtool's dequantized weight, element by
    element, and its row holds that weight's spectrum."""
    rows = table.set_index("name")
    assert reference, "the reference dequantized nothing"
    ours = decoded(directory)
    for name, weight in reference.items():
        stored = name.removesuffix(".weight") + codes_suffix
        assert_same_weight(ours[stored], weight, stored)
        row = rows.loc[stored]
        assert row["status"] == "ok", (stored, row["reason"])
        assert row["quantization"] == label, (stored, row["quantization"])
        assert row["module"] == name.removesuffix(".weight")
        assert row["role"] == "linear"
        assert (row["rows"], row["cols"]) == tuple(weight.shape)
        assert_matches(row, weight.double().numpy(), stored)
    assert_no_scale_analysed(table)


# (format, num_bits, type, strategy, extra arguments, label, codes tensor suffix)
COMPRESSED = [
    ("float-quantized", 8, "float", "tensor", {}, "fp8_e4m3 tensor", ".weight"),
    ("float-quantized", 8, "float", "channel", {}, "fp8_e4m3 channel", ".weight"),
    ("float-quantized", 8, "float", "block", {"block_structure": [128, 128]},
     "fp8_e4m3 block 128x128", ".weight"),
    ("int-quantized", 8, "int", "channel", {}, "int8 channel", ".weight"),
    ("pack-quantized", 4, "int", "group", {"group_size": 128}, "int4 group 128",
     ".weight_packed"),
    ("pack-quantized", 4, "int", "group", {"group_size": 32, "symmetric": False},
     "int4 group 32", ".weight_packed"),
    ("pack-quantized", 8, "int", "channel", {}, "int8 channel", ".weight_packed"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("fmt", "bits", "kind", "strategy", "extra", "label", "suffix"),
    COMPRESSED,
    ids=[f"{c[0]}-{c[2]}{c[1]}-{c[3]}{'-asym' if 'symmetric' in c[4] else ''}" for c in COMPRESSED],
)
def test_compressed_tensors_match_its_decompressor(
    tmp_path, minilm_linears, fmt, bits, kind, strategy, extra, label, suffix
):
    pytest.importorskip("compressed_tensors", reason="pip install 'esdtool[test]'")
    import qref_compressed as ct

    linears = dict(minilm_linears)
    if strategy == "group":  # compressed-tensors needs groups to divide the columns
        linears = {k: v for k, v in linears.items() if v.shape[1] % extra["group_size"] == 0}
    directory = ct.build_compressed_checkpoint(
        tmp_path / "m", linears, format=fmt, num_bits=bits, type=kind, strategy=strategy, **extra
    )
    result, table = _analysed(directory, tmp_path / "m.parquet")
    reference = ct.reference_decompress(directory, upcast_scales=True)
    _check(table, reference, label, suffix, directory)
    assert result.quantization == [f"dequantized {len(reference)} {label} weight(s)"]
    assert table.attrs["esdtool"]["quantization_config"]["quant_method"] == "compressed-tensors"
    # The dequantized weight is close to the original, so the spectra are the model's.
    original = minilm_linears[LAYER + NAMES[0]]
    rel = (reference[LAYER + NAMES[0]] - original).norm() / original.norm()
    assert rel < 0.15


def test_compressed_activation_order(tmp_path, minilm_linears):
    minilm_linears = {k: v for k, v in minilm_linears.items() if v.shape[1] % 128 == 0}
    """``weight_g_idx`` (GPTQ's act-order in compressed-tensors <= 0.18): column j takes the
    scale of group g_idx[j]. compressed-tensors >= 0.19 no longer reads it, so the expected
    weight is derived from the package's own decompression of the same codes without g_idx:
    W'[:, j] = W[:, j] * s[:, g_idx[j]] / s[:, j // 128]."""
    pytest.importorskip("compressed_tensors", reason="pip install 'esdtool[test]'")
    import qref_compressed as ct

    directory = ct.build_compressed_checkpoint(
        tmp_path / "m", minilm_linears, format="pack-quantized", num_bits=4, type="int",
        strategy="group", group_size=128,
    )  # fmt: skip
    plain = ct.reference_decompress(directory, upcast_scales=True)
    stored = load_file(str(directory / "model.safetensors"))
    expected = {}
    generator = torch.Generator().manual_seed(0)
    for name, weight in plain.items():
        module = name.removesuffix(".weight")
        scale = stored[module + ".weight_scale"].double()
        cols = weight.shape[1]
        g_idx = torch.randint(0, scale.shape[1], (cols,), generator=generator, dtype=torch.int32)
        stored[module + ".weight_g_idx"] = g_idx
        own = torch.arange(cols) // 128
        expected[name] = weight.double() * scale[:, g_idx.long()] / scale[:, own]
    save_file(stored, str(directory / "model.safetensors"))
    _, table = _analysed(directory, tmp_path / "m.parquet")
    _check(table, expected, "int4 group 128 act-order", ".weight_packed", directory)


def test_compressed_weight_shape_disagreeing_is_an_error_row(tmp_path, minilm_linears):
    minilm_linears = {k: v for k, v in minilm_linears.items() if v.shape[1] % 128 == 0}
    """weight_shape is data; when it contradicts the packed codes the row is an error, not a
    spectrum of a guessed shape."""
    pytest.importorskip("compressed_tensors", reason="pip install 'esdtool[test]'")
    import qref_compressed as ct

    directory = ct.build_compressed_checkpoint(
        tmp_path / "m", minilm_linears, format="pack-quantized", num_bits=4, type="int",
        strategy="group", group_size=128,
    )  # fmt: skip
    stored = load_file(str(directory / "model.safetensors"))
    name = LAYER + "attention.self.query.weight_shape"
    stored[name] = torch.tensor([384, 380], dtype=stored[name].dtype)
    save_file(stored, str(directory / "model.safetensors"))
    _, table = _analysed(directory, tmp_path / "m.parquet")
    row = table.set_index("name").loc[LAYER + "attention.self.query.weight_packed"]
    assert row["status"] == "error" and "weight_shape says [384, 380]" in row["reason"]


@pytest.mark.parametrize(
    ("bits", "group_size", "desc_act", "checkpoint_format"),
    [(4, 128, False, "gptq"), (4, 32, True, "gptq"), (8, 128, False, "gptq_v2"),
     (2, 64, True, "gptq_v2"), (4, -1, False, "gptq")],
)  # fmt: skip
def test_gptq_matches_the_reference(
    tmp_path, minilm_linears, bits, group_size, desc_act, checkpoint_format
):
    ref = pytest.importorskip("qref_gptq_awq")
    linears = {k: v for k, v in minilm_linears.items() if v.shape[1] % 32 == 0}
    directory = ref.build_gptq_checkpoint(
        tmp_path / "m", linears, bits=bits, group_size=group_size, desc_act=desc_act,
        checkpoint_format=checkpoint_format,
    )  # fmt: skip
    _, table = _analysed(directory, tmp_path / "m.parquet")
    reference = ref.reference_dequantize_gptq(directory)
    group = "g" + str(group_size if group_size != -1 else "{cols}")
    for name, weight in reference.items():
        label = f"gptq int{bits} " + group.format(cols=weight.shape[1])
        label += " act-order" if desc_act else ""
        _check(table, {name: weight}, label, ".qweight", directory)
    original = linears[LAYER + NAMES[0]]
    rel = (reference[LAYER + NAMES[0]] - original).norm() / original.norm()
    assert rel < (0.7 if bits == 2 else 0.15)


@pytest.mark.parametrize("group_size", [128, 64])
def test_awq_matches_the_reference(tmp_path, minilm_linears, group_size):
    ref = pytest.importorskip("qref_gptq_awq")
    linears = {k: v for k, v in minilm_linears.items() if v.shape[1] % 32 == 0}
    directory = ref.build_awq_checkpoint(tmp_path / "m", linears, group_size=group_size)
    _, table = _analysed(directory, tmp_path / "m.parquet")
    reference = ref.reference_dequantize_awq(directory)
    _check(table, reference, f"awq int4 g{group_size}", ".qweight", directory)
    np.testing.assert_array_less(
        [(reference[n] - linears[n]).norm() / linears[n].norm() for n in reference], 0.15
    )


def test_gptq_v1_zero_points_of_zero(tmp_path, minilm_linears):
    """Asymmetric v1 with all-positive groups: a zero point of 0 is stored as -1 and borrows
    from its neighbour under GPTQModel's whole-word subtraction; decoding field by field (+1
    each) would shift those rows. esdtool reads them as GPTQModel's kernel does."""
    ref = pytest.importorskip("qref_gptq_awq")
    linears = {k: v.abs() for k, v in minilm_linears.items() if v.shape[1] % 32 == 0}
    directory = ref.build_gptq_checkpoint(
        tmp_path / "m", linears, bits=4, group_size=128, sym=False, checkpoint_format="gptq"
    )
    stored = load_file(str(directory / "model.safetensors"))
    assert any((v == -1).any() or (v < 0).any() for k, v in stored.items() if "qzeros" in k)
    _, table = _analysed(directory, tmp_path / "m.parquet")
    reference = ref.reference_dequantize_gptq(directory)
    _check(table, reference, "gptq int4 g128", ".qweight", directory)
