"""compressed-tensors, GPTQ and AWQ checkpoints against the formats' own reference code.

Real MiniLM weights are quantized and packed by compressed-tensors itself (tests/qref_compressed.py)
and by GPTQModel / AutoAWQ's packing (tests/qref_gptq_awq.py); esdtool's rows must hold the
spectra of the weights the same packages' decompressors return.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from esdtool import analyze, load_metrics
from helpers import ROOT, assert_matches, assert_no_scale_analysed, assert_same_weight, decoded

LAYER = "encoder.layer.0."
# GPT-QModel lives apart from the test environment (make install puts it here) and runs in a
# child process: importing it patches transformers and safetensors, and PEFT refuses to add LoRA
# layers anywhere once gptqmodel is importable without optimum.
# `make mutation` runs the tests from a copy in ./mutants, below the repo that holds .venv.
REFERENCE_FORMATS = next(
    (p for r in (ROOT, ROOT.parent) if (p := r / ".venv" / "reference-formats").is_dir()),
    ROOT / ".venv" / "reference-formats",
)


NAMES = ("attention.self.query.weight", "intermediate.dense.weight", "output.dense.weight")


@pytest.fixture(scope="module")
def minilm_linears(minilm_dir) -> dict[str, torch.Tensor]:
    weights = load_file(str(minilm_dir / "model.safetensors"))
    out = {LAYER + n: weights[LAYER + n].float() for n in NAMES}
    out["encoder.layer.1.attention.self.key.weight"] = out[LAYER + NAMES[1]][:300, :200].clone()
    return out


GPTQ = [(4, 128, False, "gptq"), (4, 32, True, "gptq"), (8, 128, False, "gptq_v2"),
        (2, 64, True, "gptq_v2"), (4, -1, False, "gptq"), (3, 128, False, "gptq"),
        (3, 64, True, "gptq_v2")]  # fmt: skip
AWQ = [128, 64]


@pytest.fixture(scope="module")
def gptq_awq(minilm_linears, tmp_path_factory) -> dict[str, tuple[Path, dict[str, torch.Tensor]]]:
    """Every GPTQ and AWQ checkpoint of the tests, built and dequantized by GPT-QModel in one
    child process: {case: (checkpoint directory, reference weights)}."""
    if not (REFERENCE_FORMATS / "gptqmodel").is_dir():
        pytest.fail(f"the GPTQ/AWQ reference is not installed in {REFERENCE_FORMATS}: make install")
    # `make mutation` sets this: GPT-QModel's checkpoints do not depend on esdtool's code, so
    # they are built once for the whole run (in its ./mutants), not once per mutant (6 s each).
    cache = os.environ.get("ESDTOOL_REFERENCE_CACHE")
    built = Path(cache) / "gptq-awq" if cache else None
    if built is not None and (built / "jobs.json").is_file():
        return {case: (built / case, load_file(str(built / f"{case}.safetensors")))
                for case in _gptq_awq_cases()}  # fmt: skip
    root = tmp_path_factory.mktemp("gptq-awq")
    linears = {k: v for k, v in minilm_linears.items() if v.shape[1] % 32 == 0}
    positive = {k: v.abs() for k, v in linears.items()}
    save_file({k: v.contiguous() for k, v in linears.items()}, str(root / "dense.safetensors"))
    save_file({k: v.contiguous() for k, v in positive.items()}, str(root / "positive.safetensors"))
    cases = _gptq_awq_cases()
    jobs = []
    for case, (kind, source, kwargs) in cases.items():
        directory = root / case
        jobs.append([f"build-{kind}", str(root / f"{source}.safetensors"), str(directory),
                     json.dumps(kwargs)])  # fmt: skip
        jobs.append([f"dequantize-{kind}", str(directory), str(root / f"{case}.safetensors")])
    (root / "jobs.json").write_text(json.dumps(jobs))
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), str(REFERENCE_FORMATS)]),
    }
    script = str(ROOT / "tests" / "qref_gptq_awq.py")
    proc = subprocess.run([sys.executable, script, "batch", str(root / "jobs.json")], env=env,
                          capture_output=True, text=True, timeout=900, cwd=root)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    if built is not None:  # a copy, then one rename: a parallel mutant sees all of it or none
        staged = built.with_name(f"gptq-awq.{os.getpid()}")
        shutil.copytree(root, staged)
        try:
            staged.rename(built)
        except OSError:  # another mutant's copy got there first: the same files
            shutil.rmtree(staged, ignore_errors=True)
    return {case: (root / case, load_file(str(root / f"{case}.safetensors"))) for case in cases}


def _gptq_awq_cases() -> dict[str, tuple[str, str, dict]]:
    """{case: (format, source weights, arguments)} of the gptq_awq fixture."""
    cases: dict[str, tuple[str, str, dict]] = {}
    for bits, group, desc_act, fmt in GPTQ:
        kwargs = {"bits": bits, "group_size": group, "desc_act": desc_act, "checkpoint_format": fmt}
        cases[f"gptq-{bits}-{group}-{desc_act}-{fmt}"] = ("gptq", "dense", kwargs)
    for group in AWQ:
        cases[f"awq-{group}"] = ("awq", "dense", {"group_size": group})
    cases["gptq-v1-asym-positive"] = ("gptq", "positive",
                                      {"bits": 4, "group_size": 128, "sym": False,
                                       "checkpoint_format": "gptq"})  # fmt: skip
    return cases


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
    stored[name] = torch.tensor([384, 300], dtype=stored[name].dtype)
    save_file(stored, str(directory / "model.safetensors"))
    _, table = _analysed(directory, tmp_path / "m.parquet")
    row = table.set_index("name").loc[LAYER + "attention.self.query.weight_packed"]
    assert row["status"] == "error" and "does not hold [384, 300] at 4 bits" in row["reason"]


def test_compressed_padded_columns_are_cropped(tmp_path, minilm_linears):
    """100 input columns at 4 bits fill 12.5 words: the last word is padded, and weight_shape
    (data, read at layout time) says where the weight ends; the padding is no column."""
    pytest.importorskip("compressed_tensors", reason="pip install 'esdtool[test]'")
    import qref_compressed as ct

    weights = {"model.layers.0.mlp.up_proj.weight": minilm_linears[LAYER + NAMES[1]][:96, :100]}
    directory = ct.build_compressed_checkpoint(
        tmp_path / "m", weights, format="pack-quantized", num_bits=4, type="int",
        strategy="channel",
    )  # fmt: skip
    stored = load_file(str(directory / "model.safetensors"))
    assert stored["model.layers.0.mlp.up_proj.weight_packed"].shape == (96, 13)
    _, table = _analysed(directory, tmp_path / "m.parquet")
    reference = ct.reference_decompress(directory, upcast_scales=True)
    _check(table, reference, "int4 channel", ".weight_packed", directory)


@pytest.mark.parametrize(("bits", "group_size", "desc_act", "checkpoint_format"), GPTQ)
def test_gptq_matches_the_reference(
    tmp_path, minilm_linears, gptq_awq, bits, group_size, desc_act, checkpoint_format
):
    directory, reference = gptq_awq[f"gptq-{bits}-{group_size}-{desc_act}-{checkpoint_format}"]
    _, table = _analysed(directory, tmp_path / "m.parquet")
    for name, weight in reference.items():
        label = f"gptq int{bits} g{group_size if group_size != -1 else weight.shape[1]}"
        label += " act-order" if desc_act else ""
        _check(table, {name: weight}, label, ".qweight", directory)
    original = minilm_linears[LAYER + NAMES[0]]
    rel = (reference[LAYER + NAMES[0]] - original).norm() / original.norm()
    assert rel < {2: 0.7, 3: 0.3}.get(bits, 0.15)


@pytest.mark.parametrize("group_size", AWQ)
def test_awq_matches_the_reference(tmp_path, minilm_linears, gptq_awq, group_size):
    directory, reference = gptq_awq[f"awq-{group_size}"]
    _, table = _analysed(directory, tmp_path / "m.parquet")
    _check(table, reference, f"awq int4 g{group_size}", ".qweight", directory)
    np.testing.assert_array_less(
        [(reference[n] - minilm_linears[n]).norm() / minilm_linears[n].norm() for n in reference],
        0.15,
    )


def test_gptq_v1_zero_points_of_zero(tmp_path, gptq_awq):
    """Asymmetric v1 with all-positive groups: a zero point of 0 is stored as -1 and borrows
    from its neighbour under GPTQModel's whole-word subtraction; decoding field by field (+1
    each) would shift those rows. esdtool reads them as GPTQModel's kernel does."""
    directory, reference = gptq_awq["gptq-v1-asym-positive"]
    stored = load_file(str(directory / "model.safetensors"))
    assert any((v < 0).any() for k, v in stored.items() if "qzeros" in k)
    _, table = _analysed(directory, tmp_path / "m.parquet")
    _check(table, reference, "gptq int4 g128", ".qweight", directory)


@pytest.mark.parametrize("case", ["gptq-4-128-False-gptq", "gptq-3-64-True-gptq_v2", "awq-128",
                                  "compressed-int4-group-asym"])  # fmt: skip
def test_a_state_dict_with_its_quantization_config_gives_the_files_rows(
    tmp_path, minilm_linears, gptq_awq, case
):
    """The checkpoint's tensors loaded into a state dict and analysed in memory with its
    config.json's quantization_config give every row the files give (the codes decoded with
    their scales and zero points, the parts noted), eigenvalues equal to the last bit; without
    it the packed parts are skipped, never measured as stored."""
    import pandas as pd

    from esdtool.errors import CheckpointError, OptionError

    if case.startswith("compressed"):
        pytest.importorskip("compressed_tensors", reason="pip install 'esdtool[test]'")
        import qref_compressed as ct

        linears = {k: v for k, v in minilm_linears.items() if v.shape[1] % 32 == 0}
        directory = ct.build_compressed_checkpoint(
            tmp_path / "m", linears, format="pack-quantized", num_bits=4, type="int",
            strategy="group", group_size=32, symmetric=False,
        )  # fmt: skip
    else:
        directory = gptq_awq[case][0]
    _, files = _analysed(directory, tmp_path / "f.parquet")
    state: dict[str, torch.Tensor] = {}
    for path in sorted(directory.glob("*.safetensors")):
        state.update(load_file(str(path)))
    config = json.loads((directory / "config.json").read_text())["quantization_config"]
    ours = analyze(state, quantization_config=config).table.set_index("name")
    expected = files.set_index("name")
    assert sorted(ours.index) == sorted(expected.index)
    ours = ours.loc[expected.index]
    cols = ["status", "reason", "quantization", "module", "role", "rows", "cols",
            "alpha_median", "alpha_ks", "lambda_max", "num_spikes", "stable_rank"]  # fmt: skip
    pd.testing.assert_frame_equal(ours[cols], expected[cols])
    decoded_rows = expected.index[expected.quantization.notna() & (expected.status == "ok")]
    assert len(decoded_rows) >= 3
    for name in decoded_rows:
        assert np.array_equal(ours.loc[name, "eigenvalues"], expected.loc[name, "eigenvalues"])

    bare = analyze(state).table.set_index("name")
    assert (bare.loc[decoded_rows, "status"] == "skipped").all()
    with pytest.raises(OptionError, match="quantization_config= is for tensors in memory"):
        analyze(directory, quantization_config=config)
    with pytest.raises(CheckpointError, match="in-memory quantization_config"):
        analyze(state, quantization_config={"quant_method": 3})
