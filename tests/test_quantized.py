"""Quantized checkpoints are analysed as the weights they encode (issue 14).

Real MiniLM weights are quantized by the formats' own quantizers where they run on a CPU
(transformers' fine-grained FP8), or by the format's definition written out in the test
(MXFP4); esdtool's rows are then compared with spectra of the weights the formats' reference
dequantizers give (transformers' ``Fp8Dequantize`` and ``convert_moe_packed_tensors``), and with
a plain float64 numpy dequantizer where the reference refuses a shape (partial FP8 blocks).
GPTQ, AWQ and compressed-tensors live in test_quantized_packed.py.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file, save_file

from esdtool import AnalyzeSettings, analyze, load_metrics
from helpers import assert_matches, assert_no_scale_analysed, assert_same_weight, decoded, run_cli

FP8_CONFIG = {
    "quant_method": "fp8", "weight_block_size": [128, 128], "activation_scheme": "dynamic"
}  # fmt: skip


@pytest.fixture(scope="module")
def minilm_weights(minilm_dir) -> dict[str, torch.Tensor]:
    return load_file(str(minilm_dir / "model.safetensors"))


def _config(minilm_dir: Path, quantization: dict | None) -> dict:
    config = json.loads((minilm_dir / "config.json").read_text())
    if quantization is not None:
        config["quantization_config"] = quantization
    return config


def _save(directory: Path, tensors: dict[str, torch.Tensor], config: dict | None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(directory / "model.safetensors"))
    if config is not None:
        (directory / "config.json").write_text(json.dumps(config))
    return directory


def _fp8_quantizer():
    transformers = pytest.importorskip("transformers")
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize, Fp8Quantize

    class Quantizer:  # what Fp8Quantize reads off transformers' HfQuantizer
        quantization_config = transformers.FineGrainedFP8Config(weight_block_size=(128, 128))

    return Fp8Quantize(Quantizer()), Fp8Dequantize(Quantizer())


def _linear_names(weights: dict[str, torch.Tensor]) -> list[str]:
    return [k for k, v in weights.items() if k.endswith(".weight") and v.ndim == 2
            and k.startswith("encoder.")]  # fmt: skip


@pytest.fixture(scope="module")
def fp8_block(minilm_dir, minilm_weights, tmp_path_factory) -> Path:
    """MiniLM's encoder projections quantized by transformers' own fine-grained FP8 quantizer."""
    quantize, _ = _fp8_quantizer()
    tensors = dict(minilm_weights)
    for name in _linear_names(minilm_weights):
        tensors.update(quantize.convert({name: minilm_weights[name].float()}))
    directory = tmp_path_factory.mktemp("fp8") / "model"
    return _save(directory, tensors, _config(minilm_dir, FP8_CONFIG))


@pytest.fixture(scope="module")
def fp8_table(fp8_block, tmp_path_factory):
    out = tmp_path_factory.mktemp("fp8-out") / "m.parquet"
    return analyze(fp8_block, out), load_metrics(out)


def test_fp8_block_weights_match_transformers_dequantizer(fp8_table, fp8_block):
    result, table = fp8_table
    _, dequantize = _fp8_quantizer()
    stored = load_file(str(fp8_block / "model.safetensors"))
    names = [n for n in stored if n.endswith("_scale_inv")]
    assert len(names) == 36
    rows = table.set_index("name")
    ours = decoded(fp8_block)
    for scale_name in names:
        name = scale_name.removesuffix("_scale_inv")
        weight = dequantize._dequantize_one(stored[name], stored[scale_name], torch.float32)
        assert_same_weight(ours[name], weight, name)
        row = rows.loc[name]
        assert row["status"] == "ok" and row["quantization"] == "fp8_e4m3 block 128x128"
        assert row["dtype"] == "F8_E4M3" and row["module"] == name.removesuffix(".weight")
        assert (row["rows"], row["cols"]) == tuple(weight.shape)
        assert_matches(row, weight.numpy(), name)
        scale_row = rows.loc[scale_name]
        assert scale_row["status"] == "skipped" and name in scale_row["reason"]
    assert result.quantization == ["dequantized 36 fp8_e4m3 block 128x128 weight(s)"]
    assert table.attrs["esdtool"]["quantization_config"] == FP8_CONFIG
    assert len(table) == len(stored)  # every tensor still has its row
    assert_no_scale_analysed(table)


def test_fp8_block_moves_alpha_median_little(fp8_table, minilm_table):
    """Quantization noise is small: alpha_median within 2% of the bf16 table on every matrix
    (the measurement docs/method.md reports)."""
    _, table = fp8_table
    q = table[table.quantization.notna()].set_index("name")
    plain = minilm_table.set_index("name").loc[q.index]
    change = (q.alpha_median / plain.alpha_median - 1).abs()
    assert change.max() < 0.02, change.sort_values().tail(3)


def test_fp8_found_without_a_config_gives_the_same_rows(fp8_block, fp8_table, tmp_path):
    """An F8 weight beside a ``_scale_inv`` of matching block grid is recognised from the
    tensors alone (config.json without quantization_config, or none at all)."""
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(fp8_block / "model.safetensors", bare / "model.safetensors")
    analyze(bare, tmp_path / "m.parquet")
    table = load_metrics(tmp_path / "m.parquet")
    _, expected = fp8_table
    cols = ["name", "status", "quantization", "alpha_ks", "lambda_max", "num_spikes"]
    assert table[cols].equals(expected[cols])
    assert table.attrs["esdtool"]["quantization_config"] is None


def _numpy_block_dequant(codes: torch.Tensor, scale: torch.Tensor, block: int) -> np.ndarray:
    """The format's definition, block by block, in float64."""
    values = codes.to(torch.float64).numpy()
    s = scale.to(torch.float64).numpy()
    out = np.empty_like(values)
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            rows, cols = slice(i * block, (i + 1) * block), slice(j * block, (j + 1) * block)
            out[rows, cols] = values[rows, cols] * s[i, j]
    return out


def test_fp8_partial_edge_blocks(tmp_path, minilm_weights):
    """DeepSeek's 576-row kv_a_proj with 128x128 blocks has a partial last block row (scale
    grid 5 x ...). transformers' dequantizer refuses such shapes; the float64 definition does
    not."""
    _, dequantize = _fp8_quantizer()
    torch.manual_seed(0)
    base = minilm_weights["encoder.layer.0.intermediate.dense.weight"].float()  # 1536 x 384
    weight = base[:576, :300]
    grid = (math.ceil(576 / 128), math.ceil(300 / 128))
    scale = torch.rand(grid, dtype=torch.float32) * 1e-3 + 1e-4
    full = scale.repeat_interleave(128, 0)[:576].repeat_interleave(128, 1)[:, :300]
    codes = (weight / full).clamp(-448, 448).to(torch.float8_e4m3fn)
    with pytest.raises(ValueError, match="not divisible"):
        dequantize._dequantize_one(codes, scale, torch.float32)
    name = "model.layers.0.self_attn.kv_a_proj_with_mqa.weight"
    _save(tmp_path / "m", {name: codes, name + "_scale_inv": scale},
          {"quantization_config": FP8_CONFIG})  # fmt: skip
    analyze(tmp_path / "m", tmp_path / "m.parquet")
    row = load_metrics(tmp_path / "m.parquet").set_index("name").loc[name]
    assert row["quantization"] == "fp8_e4m3 block 128x128"
    assert_matches(row, _numpy_block_dequant(codes, scale, 128), name)


def test_fp8_per_channel_scale(tmp_path, minilm_weights):
    """fbgemm_fp8 (and compressed-tensors' channel strategy): one scale per output row."""
    name = "model.layers.0.mlp.down_proj.weight"
    weight = minilm_weights["encoder.layer.1.output.dense.weight"].float()  # 384 x 1536
    scale = weight.abs().amax(dim=1, keepdim=True) / 448
    codes = (weight / scale).to(torch.float8_e4m3fn)
    _save(tmp_path / "m", {name: codes, name + "_scale": scale},
          {"quantization_config": {"quant_method": "fbgemm_fp8"}})  # fmt: skip
    analyze(tmp_path / "m", tmp_path / "m.parquet")
    row = load_metrics(tmp_path / "m.parquet").set_index("name").loc[name]
    assert row["quantization"] == "fp8_e4m3 channel"
    assert_matches(row, codes.to(torch.float64).numpy() * scale.double().numpy(), name)


def _mxfp4_quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """OCP MXFP4 of ``weight`` [..., out, in]: blocks [..., out, in/32, 16] bytes (two E2M1
    codes each, low nibble first) and scales [..., out, in/32] (E8M0, bias 127)."""
    values = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
    groups = weight.reshape(*weight.shape[:-1], -1, 32).double()
    amax = groups.abs().amax(-1, keepdim=True).clamp_min(1e-30)
    exponent = torch.floor(torch.log2(amax)) - 2  # E2M1's largest power is 2^2
    scaled = (groups / torch.exp2(exponent)).clamp(-6, 6)
    index = (scaled.abs().unsqueeze(-1) - values.double()).abs().argmin(-1)
    codes = (index + 8 * (scaled < 0)).to(torch.uint8)
    blocks = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return blocks, (exponent.squeeze(-1) + 127).to(torch.uint8)


def test_mxfp4_experts_match_transformers_dequantizer(tmp_path, minilm_weights):
    """gpt-oss: ``*_blocks`` [E, out, G, 16] and ``*_scales`` [E, out, G], one row per expert,
    each the spectrum of transformers' dequantized expert ([E, in, out], as bf16 gpt-oss)."""
    mxfp4 = pytest.importorskip("transformers.integrations.mxfp4")
    experts = torch.stack([
        minilm_weights[f"encoder.layer.{i}.intermediate.dense.weight"].float() for i in range(3)
    ])  # [3, 1536, 384]: out x in  # fmt: skip
    blocks, scales = _mxfp4_quantize(experts)
    prefix = "model.layers.0.mlp.experts.gate_up_proj"
    tensors = {prefix + "_blocks": blocks, prefix + "_scales": scales,
               prefix + "_bias": torch.zeros(3, 1536)}  # fmt: skip
    _save(tmp_path / "m", tensors, {"quantization_config": {"quant_method": "mxfp4"}})
    analyze(tmp_path / "m", tmp_path / "m.parquet")
    table = load_metrics(tmp_path / "m.parquet")
    reference = mxfp4.convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)
    assert reference.shape == (3, 384, 1536)
    assert_same_weight(decoded(tmp_path / "m")[prefix + "_blocks"], reference, "mxfp4")
    rows = table[table.name == prefix + "_blocks"].sort_values("slice")
    assert list(rows.slice) == [0, 1, 2] and set(rows.quantization) == {"mxfp4"}
    assert set(rows.module) == {prefix} and set(rows.role) == {"expert"}
    for (_, row), expert in zip(rows.iterrows(), reference, strict=True):
        assert (row["rows"], row["cols"]) == (384, 1536)
        assert_matches(row, expert.numpy(), f"expert {row['slice']}")
    scale_row = table.set_index("name").loc[prefix + "_scales"]
    assert scale_row["status"] == "skipped" and prefix + "_blocks" in scale_row["reason"]
    # The quantizer is close: the dequantized expert is the weight to MXFP4's precision.
    error = (reference.transpose(1, 2) - experts).norm() / experts.norm()
    assert 0.01 < error < 0.2


@pytest.mark.parametrize(
    ("quantization", "tensors", "codes"),
    [
        (  # bitsandbytes 4-bit: packed bytes and their absmax / quant_map / quant_state
            {"quant_method": "bitsandbytes", "load_in_4bit": True},
            {".weight": ("U8", (64 * 32, 1)), ".weight.absmax": ("F32", (64,)),
             ".weight.quant_map": ("F32", (16,)),
             ".weight.quant_state.bitsandbytes__nf4": ("U8", (100,))},
            ".weight",
        ),
        (  # NVFP4 (compressed-tensors): its FP8 block scales form a matrix
            {"quant_method": "compressed-tensors", "format": "nvfp4-pack-quantized",
             "config_groups": {"group_0": {"weights": {"num_bits": 4, "type": "float",
                                                       "group_size": 16}}}},
            {".weight_packed": ("U8", (64, 64)), ".weight_scale": ("F8_E4M3", (64, 8)),
             ".weight_global_scale": ("F32", (1,)), ".input_global_scale": ("F32", (1,))},
            ".weight_packed",
        ),
        (  # an unknown method over FP8 weights with their scales
            {"quant_method": "someday-fp8"},
            {".weight": ("F8_E4M3", (64, 128)), ".weight_scale": ("F32", (64, 1))},
            ".weight",
        ),
        (  # GPTQ in Marlin's repacked layout (not supported): fp16 scales [groups, out]
            {"quant_method": "gptq", "bits": 4, "group_size": 32, "checkpoint_format": "marlin"},
            {".qweight": ("I32", (16, 64)), ".qzeros": ("I32", (4, 8)),
             ".scales": ("F16", (4, 64)), ".g_idx": ("I32", (128,))},
            ".qweight",
        ),
    ],
    ids=["bitsandbytes", "nvfp4", "unknown-method", "gptq-marlin"],
)  # fmt: skip
def test_unsupported_formats_are_skipped_with_the_format_named(
    tmp_path, capsys, quantization, tensors, codes
):
    """Nothing computed from raw codes, no scale analysed as a weight; one summary line."""
    dtypes = {"U8": torch.uint8, "F32": torch.float32, "F16": torch.float16, "I32": torch.int32,
              "F8_E4M3": torch.float8_e4m3fn}  # fmt: skip
    module = "model.layers.0.self_attn.q_proj"
    stored = {
        module + suffix: torch.ones(shape, dtype=torch.float32).to(dtypes[dtype])
        for suffix, (dtype, shape) in tensors.items()
    }
    plain = torch.randn(64, 64, generator=torch.Generator().manual_seed(0))
    stored["model.layers.0.self_attn.o_proj.weight"] = plain  # a weight left unquantized
    _save(tmp_path / "m", stored, {"quantization_config": quantization})
    code, out, err = run_cli(["analyze", tmp_path / "m", "-o", tmp_path / "m.parquet"], capsys)
    assert code == 0, err
    table = load_metrics(tmp_path / "m.parquet").set_index("name")
    assert list(table.index[table.status == "ok"]) == ["model.layers.0.self_attn.o_proj.weight"]
    method = quantization["quant_method"]
    reason = table.loc[module + codes, "reason"]
    assert "cannot dequantize" in reason and method in reason, reason
    for suffix in tensors:
        assert table.loc[module + suffix, "status"] == "skipped", suffix
    assert "cannot dequantize" in out and method in out
    assert len(table) == len(stored)


def test_raw_codes_only_when_asked(fp8_block, fp8_table, tmp_path, capsys):
    """--raw-codes analyses the stored FP8 codes (the old, wrong-by-default behaviour), marked
    as such; scales stay skipped."""
    code, _, err = run_cli(
        ["analyze", fp8_block, "-o", tmp_path / "raw.parquet", "--raw-codes", "--quiet"], capsys
    )
    assert code == 0, err
    raw = load_metrics(tmp_path / "raw.parquet").set_index("name")
    name = "encoder.layer.0.attention.self.query.weight"
    assert raw.loc[name, "quantization"] == "raw codes (fp8_e4m3 block 128x128)"
    stored = load_file(str(fp8_block / "model.safetensors"))
    assert_matches(raw.loc[name], stored[name].to(torch.float64).numpy(), name)
    assert raw.loc[name + "_scale_inv", "status"] == "skipped"
    dequantized = fp8_table[1].set_index("name").loc[name, "lambda_max"]
    assert raw.loc[name, "lambda_max"] > 1e3 * dequantized  # codes are not weights


def test_scale_in_another_shard(fp8_block, fp8_table, tmp_path):
    """A sharded checkpoint whose index puts a weight's scale in another shard."""
    stored = load_file(str(fp8_block / "model.safetensors"))
    scales = {k: v for k, v in stored.items() if k.endswith("_scale_inv")}
    rest = {k: v for k, v in stored.items() if k not in scales}
    directory = tmp_path / "sharded"
    directory.mkdir()
    save_file(rest, str(directory / "model-00001-of-00002.safetensors"))
    save_file(scales, str(directory / "model-00002-of-00002.safetensors"))
    weight_map = {k: "model-00001-of-00002.safetensors" for k in rest}
    weight_map |= {k: "model-00002-of-00002.safetensors" for k in scales}
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )
    shutil.copy(fp8_block / "config.json", directory / "config.json")
    analyze(directory, tmp_path / "m.parquet")
    table = load_metrics(tmp_path / "m.parquet").sort_values("name", kind="stable")
    expected = fp8_table[1].sort_values("name", kind="stable")
    cols = ["name", "status", "quantization", "alpha_ks", "lambda_max"]
    assert table[cols].reset_index(drop=True).equals(expected[cols].reset_index(drop=True))


def test_scale_grid_that_fits_no_block_is_an_error_row(tmp_path, capsys):
    name = "model.layers.0.mlp.up_proj.weight"
    codes = torch.ones(256, 256).to(torch.float8_e4m3fn)
    _save(tmp_path / "m", {name: codes, name + "_scale_inv": torch.ones(3, 2),
                           "model.layers.0.mlp.down_proj.weight": torch.randn(64, 64)},
          {"quantization_config": FP8_CONFIG})  # fmt: skip
    code, _, _ = run_cli(["analyze", tmp_path / "m", "-o", tmp_path / "m.parquet"], capsys)
    assert code == 2
    table = load_metrics(tmp_path / "m.parquet").set_index("name")
    assert table.loc[name, "status"] == "error"
    assert "[3, 2] does not fit" in table.loc[name, "reason"]
    assert table.loc["model.layers.0.mlp.down_proj.weight", "status"] == "ok"  # kept


@pytest.mark.parametrize(
    ("quantization", "message"),
    [
        ({"quant_method": "fp8", "weight_block_size": "128"}, "weight_block_size is '128'"),
        ({"quant_method": 7}, "quant_method is 7"),
        ({"quant_method": "gptq", "bits": 5, "group_size": 0}, "bits is 5"),
        ("fp8", "not a JSON object"),
    ],
)
def test_malformed_quantization_config_is_one_line(tmp_path, capsys, quantization, message):
    _save(tmp_path / "m", {"w.weight": torch.randn(32, 32)},
          {"quantization_config": quantization})  # fmt: skip
    code, _, err = run_cli(["analyze", tmp_path / "m", "-o", tmp_path / "m.parquet"], capsys)
    assert code == 2
    assert message in err and "config.json" in err and "Traceback" not in err
    assert not (tmp_path / "m.parquet").exists()


def test_memory_budget_counts_the_dequantized_weight(fp8_block, tmp_path):
    """A quantized weight is budgeted as its float32 weight plus its stored parts, not as its
    one-byte codes."""
    settings = AnalyzeSettings(max_tensor_gb=0.004, include=r"intermediate\.dense")
    analyze(fp8_block, tmp_path / "m.parquet", settings)
    table = load_metrics(tmp_path / "m.parquet")
    weights = table[table.name.str.endswith("dense.weight")]
    assert (weights.status == "skipped").all()
    assert weights.reason.str.contains("budget").all()


def test_version_1_tables_still_load(minilm_metrics, tmp_path):
    """Tables written before the quantization column read with it null."""
    import pyarrow.parquet as pq

    table = pq.read_table(minilm_metrics)
    meta = json.loads(table.schema.metadata[b"esdtool"])
    meta["schema_version"] = 1
    old = table.drop_columns(["quantization"]).replace_schema_metadata(
        {b"esdtool": json.dumps(meta).encode()}
    )
    pq.write_table(old, tmp_path / "v1.parquet")
    df = load_metrics(tmp_path / "v1.parquet")
    assert list(df.columns) == list(load_metrics(minilm_metrics).columns)
    assert df.quantization.isna().all()


def test_report_says_what_was_dequantized(fp8_table, tmp_path, capsys):
    result, _ = fp8_table
    code, _, err = run_cli(["report", result.output, "-o", tmp_path / "r.html", "--quiet"], capsys)
    assert code == 0, err
    html = (tmp_path / "r.html").read_text()
    assert "dequantized before analysis: 36 fp8_e4m3 block 128x128." in html


def test_hostile_quantized_parts_fail_their_row_only(tmp_path, capsys):
    """A block size far past the matrix (one block; no 2**31-row expansion) decodes; a group
    index outside the scales is an error row, not a silently wrapped index."""
    name = "model.layers.0.mlp.up_proj.weight"
    codes = torch.full((64, 96), 0.5).to(torch.float8_e4m3fn)
    huge = {"quant_method": "fp8", "weight_block_size": [2**31 - 1, 2**31 - 1]}
    _save(tmp_path / "a", {name: codes, name + "_scale_inv": torch.full((1, 1), 2.0)},
          {"quantization_config": huge})  # fmt: skip
    analyze(tmp_path / "a", tmp_path / "a.parquet")
    row = load_metrics(tmp_path / "a.parquet").set_index("name").loc[name]
    assert row["status"] == "ok" and row["lambda_max"] == pytest.approx(64 * 96)  # all ones
    module = "model.layers.0.mlp.down_proj"
    tensors = {  # 64 inputs x 96 outputs at 4 bits: qweight [64/8, 96], qzeros [2, 96/8]
        module + ".qweight": torch.zeros(8, 96, dtype=torch.int32),
        module + ".qzeros": torch.zeros(2, 12, dtype=torch.int32),
        module + ".scales": torch.ones(2, 96, dtype=torch.float16),
        module + ".g_idx": torch.full((64,), -1, dtype=torch.int32),
        "model.layers.0.mlp.gate_proj.weight": torch.randn(64, 64),
    }
    gptq = {"quant_method": "gptq", "bits": 4, "group_size": 32}
    _save(tmp_path / "b", tensors, {"quantization_config": gptq})
    code, _, err = run_cli(["analyze", tmp_path / "b", "-o", tmp_path / "b.parquet"], capsys)
    assert code == 2 and "g_idx holds group -1" in err
    table = load_metrics(tmp_path / "b.parquet").set_index("name")
    assert table.loc[module + ".qweight", "status"] == "error"
    assert table.loc["model.layers.0.mlp.gate_proj.weight", "status"] == "ok"


def test_an_fp8_state_dict_in_memory_gives_the_files_rows(fp8_block, fp8_table):
    """The in-memory road plans tasks as files do: the FP8 checkpoint's state dict analysed
    in memory gives every row the file gives (the weights dequantized with their scales, the
    scales noted), not the raw codes' spectra (alpha_median 1.142 against 1.679 before)."""
    _, expected = fp8_table
    table = analyze(load_file(str(fp8_block / "model.safetensors"))).table
    by_name = expected.set_index("name")
    ours = table.set_index("name").loc[by_name.index]
    cols = ["status", "reason", "quantization", "rows", "cols", "alpha_median", "alpha_ks",
            "lambda_max", "num_spikes", "stable_rank"]  # fmt: skip
    pd.testing.assert_frame_equal(ours[cols], by_name[cols])
    for name in by_name.index[by_name.status == "ok"]:
        assert np.array_equal(ours.loc[name, "eigenvalues"], by_name.loc[name, "eigenvalues"])


def test_tensors_without_a_readable_matrix_get_a_reason_for_people():
    """Sparse, nested, complex and meta tensors of a state dict: a skipped row each, saying
    what it is and what to do, beside the plain tensor's ok row."""
    weight = torch.randn(32, 16)
    state = {
        "dense.weight": weight,
        "sparse.weight": weight.to_sparse(),
        "nested.weight": torch.nested.nested_tensor([torch.randn(3, 4), torch.randn(5, 4)]),
        "complex.weight": torch.randn(32, 16, dtype=torch.complex64),
        "meta.weight": torch.empty(32, 16, device="meta"),
    }
    rows = analyze(state, settings=AnalyzeSettings(min_evals=2)).table.set_index("name")
    assert rows.loc["dense.weight", "status"] == "ok"
    reasons = {"sparse.weight": "sparse tensor (sparse_coo)", "nested.weight": "nested tensor",
               "complex.weight": "complex values", "meta.weight": "meta device"}  # fmt: skip
    for name, words in reasons.items():
        assert rows.loc[name, "status"] == "skipped" and words in rows.loc[name, "reason"], name


def test_packed_parts_of_a_state_dict_without_its_format_are_not_measured():
    """A GPTQ-packed module in a bare state dict (no quantization_config to say bits, groups,
    order): its scales were an ok "linear" row a plan could adapt; planned as files are, every
    part is skipped, saying what it is (the test fails on the unplanned road)."""
    state = {
        "layers.0.q_proj.qweight": torch.zeros(8, 64, dtype=torch.int32),
        "layers.0.q_proj.scales": torch.rand(4, 64, dtype=torch.float16) + 0.1,
        "layers.0.q_proj.qzeros": torch.zeros(4, 8, dtype=torch.int32),
        "layers.0.q_proj.g_idx": torch.arange(64, dtype=torch.int32) // 16,
        "layers.0.k_proj.weight": torch.randn(64, 64),
    }
    rows = analyze(state, settings=AnalyzeSettings(min_evals=2)).table.set_index("name")
    assert rows.loc["layers.0.k_proj.weight", "status"] == "ok"
    assert rows.loc["layers.0.q_proj.qweight", "status"] == "skipped"  # integer codes
    for part in ("scales", "qzeros", "g_idx"):
        row = rows.loc[f"layers.0.q_proj.{part}"]
        assert row["status"] == "skipped" and f"({part}), not a weight" in row["reason"]
