"""Quantized checkpoints whose parts do not fit together, or are crafted: each is an error row
(or a skipped one) naming the problem, never a weight decoded with the wrong scale, zero point
or shape, and never a scale analysed as a weight. Found by an adversarial pass over issue 14."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from esdtool import AnalyzeSettings, analyze, load_metrics
from helpers import decoded, run_cli

W = "model.layers.0.mlp.up_proj"
PLAIN = "model.layers.0.mlp.down_proj.weight"


def _build(directory: Path, tensors: dict[str, torch.Tensor], quantization=None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {**tensors, PLAIN: torch.randn(64, 64, generator=torch.Generator().manual_seed(1))}
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(directory / "model.safetensors"))
    config = {"model_type": "llama"}
    if quantization is not None:
        config["quantization_config"] = quantization
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def _table(directory: Path, **settings):
    out = directory.parent / (directory.name + ".parquet")
    result = analyze(directory, out, AnalyzeSettings(**settings), resume=False)
    return result, load_metrics(out).set_index("name")


def _fp8(rows: int = 256, cols: int = 256) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return (torch.randn(rows, cols, generator=generator) * 50).to(torch.float8_e4m3fn)


FP8 = {"quant_method": "fp8", "weight_block_size": [128, 128]}
CT_FP8 = {"quant_method": "compressed-tensors", "format": "float-quantized",
          "config_groups": {"g": {"weights": {"num_bits": 8, "type": "float",
                                              "strategy": "channel"}}}}  # fmt: skip
GPTQ = {"quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": False}


def _gptq_parts(**dtypes) -> dict[str, torch.Tensor]:
    """64 inputs x 96 outputs at 4 bits, group 32: qweight [8, 96], qzeros [2, 12]."""
    parts = {
        ".qweight": torch.zeros(8, 96, dtype=torch.int32),
        ".qzeros": torch.full((2, 12), 0x77777777, dtype=torch.int32),
        ".scales": torch.ones(2, 96, dtype=torch.float16),
        ".g_idx": (torch.arange(64) // 32).to(torch.int32),
    }
    for suffix, dtype in dtypes.items():
        parts["." + suffix] = parts["." + suffix].to(dtype)
    return {W + k: v for k, v in parts.items()}


@pytest.mark.parametrize(
    ("tensors", "quantization", "message"),
    [
        ({W + ".weight": _fp8(), W + ".weight_scale_inv": torch.ones(2, 2, dtype=torch.uint8)},
         FP8, "is U8, not a float scale"),
        ({**_gptq_parts(scales=torch.uint8)}, GPTQ, "do not fit gptq int4"),
        ({**_gptq_parts(qzeros=torch.float32)}, GPTQ, "do not fit gptq int4"),
        ({**_gptq_parts(g_idx=torch.float32)}, GPTQ, "do not fit gptq int4"),
        ({W + ".weight": _fp8(), W + ".weight_scale": torch.ones(256, 1),
          W + ".weight_zero_point": torch.zeros(512, 1, dtype=torch.int8)},
         CT_FP8, "does not match its scales"),
        ({W + ".weight": _fp8(), W + ".weight_scale": torch.ones(256, 1)},
         FP8, "with the config's 128x128 blocks"),
        ({W + ".weight": _fp8(256, 512), W + ".weight_scale_inv": torch.ones(4, 2)},
         None, "per tensor, channel, group or block"),
    ],
    ids=["fp8-u8-scale", "gptq-u8-scales", "gptq-f32-qzeros", "gptq-f32-g_idx",
         "zero-point-shape", "channel-scale-under-block-config", "transposed-grid-no-config"],
)  # fmt: skip
def test_parts_that_do_not_fit_are_error_rows(tmp_path, tensors, quantization, message):
    _, table = _table(_build(tmp_path / "m", tensors, quantization))
    codes = next(n for n in tensors if n.endswith((".weight", ".qweight")))
    assert table.loc[codes, "status"] == "error", table.loc[codes, "reason"]
    assert message in table.loc[codes, "reason"]
    assert (table.drop(index=PLAIN).status != "ok").all()  # nothing of it analysed
    assert table.loc[PLAIN, "status"] == "ok"


def test_mxfp4_scales_stored_as_e8m0_decode_as_their_bytes(tmp_path):
    """The same exponents stored as U8 or as F8_E8M0 (both valid MXFP4 scale dtypes) give the
    same weight: the E8M0 value 2**(b - 127) is not the exponent."""
    generator = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 256, (2, 64, 4, 16), dtype=torch.uint8, generator=generator)
    scales = torch.randint(120, 130, (2, 64, 4), dtype=torch.uint8, generator=generator)
    name = "model.layers.0.mlp.experts.down_proj"
    q = {"quant_method": "mxfp4"}
    a = _build(tmp_path / "u8", {name + "_blocks": blocks, name + "_scales": scales}, q)
    e8m0 = {name + "_blocks": blocks, name + "_scales": scales.view(torch.float8_e8m0fnu)}
    b = _build(tmp_path / "e8m0", e8m0, q)
    torch.testing.assert_close(decoded(a)[name + "_blocks"], decoded(b)[name + "_blocks"])
    _, ta = _table(a)
    _, tb = _table(b)
    assert (ta.lambda_max.dropna() == tb.lambda_max.dropna()).all()


def test_a_scale_is_never_a_weight(tmp_path):
    """``a.weight_scale`` (F8, 2-D) with its own ``_scale`` is a part of ``a.weight``, not a
    quantized weight of its own."""
    tensors = {W + ".weight": _fp8(), W + ".weight_scale_scale": torch.ones(1),
               W + ".weight_scale": torch.ones(256, 1).to(torch.float8_e4m3fn)}  # fmt: skip
    for quantization in (None, CT_FP8):
        _, table = _table(_build(tmp_path / str(quantization is None), tensors, quantization))
        assert table.loc[W + ".weight_scale", "status"] != "ok"
        assert table.loc[W + ".weight_scale_scale", "status"] != "ok"


def test_quantized_tensors_without_a_config_are_not_analysed(tmp_path):
    """GPTQ tensors whose config lives elsewhere (old AutoGPTQ's quantize_config.json): the fp16
    scales [groups, out] look like a matrix but get no spectrum."""
    _, table = _table(_build(tmp_path / "m", _gptq_parts()))
    assert table.loc[W + ".scales", "status"] == "skipped"
    assert "quantization tensor" in table.loc[W + ".scales", "reason"]
    assert "does not declare" in table.loc[W + ".qweight", "reason"]
    assert set(table.index[table.status == "ok"]) == {PLAIN}


def test_awq_without_zero_points_is_not_guessed(tmp_path):
    awq = {"quant_method": "awq", "bits": 4, "group_size": 32, "zero_point": False}
    parts = {W + ".qweight": torch.zeros(64, 12, dtype=torch.int32),
             W + ".qzeros": torch.zeros(2, 12, dtype=torch.int32),
             W + ".scales": torch.ones(2, 96, dtype=torch.float16)}  # fmt: skip
    result, table = _table(_build(tmp_path / "m", parts, awq))
    assert table.loc[W + ".qweight", "status"] == "skipped"
    assert "AWQ without zero points" in table.loc[W + ".qweight", "reason"]
    assert any("cannot dequantize" in line for line in result.quantization)


@pytest.mark.parametrize(
    ("shape_tensor", "message"),
    [(None, "without its weight_shape"),
     (torch.zeros(1_000_000, dtype=torch.int64), "is not [rows, cols]"),
     (torch.tensor([64, 300]), "does not hold [64, 300]")],
    ids=["missing", "huge", "wrong"],
)  # fmt: skip
def test_packed_weight_shape_is_checked(tmp_path, shape_tensor, message):
    ct = {"quant_method": "compressed-tensors", "format": "pack-quantized",
          "config_groups": {"g": {"weights": {"num_bits": 4, "type": "int",
                                              "strategy": "channel"}}}}  # fmt: skip
    parts = {W + ".weight_packed": torch.zeros(64, 13, dtype=torch.int32),
             W + ".weight_scale": torch.ones(64, 1)}  # fmt: skip
    if shape_tensor is not None:
        parts[W + ".weight_shape"] = shape_tensor
    _, table = _table(_build(tmp_path / "m", parts, ct))
    row = table.loc[W + ".weight_packed"]
    assert row["status"] == "error" and message in row["reason"]
    assert len(row["reason"]) < 300


def test_resume_does_not_mix_two_decodings(tmp_path):
    """The resume fingerprint covers quantization_config: after an interrupted run, a changed
    checkpoint_format makes the next run start afresh instead of keeping rows decoded the
    other way."""
    from test_resume import StopAfter

    from esdtool.errors import AnalysisInterrupted

    tensors = {}
    for i in range(3):
        module = f"model.layers.{i}.mlp.up_proj"
        tensors |= {k.replace(W, module): v for k, v in _gptq_parts().items()}
        generator = torch.Generator().manual_seed(i)
        tensors[module + ".qweight"] = torch.randint(
            -(2**31), 2**31 - 1, (8, 96), dtype=torch.int32, generator=generator
        )
    directory = _build(tmp_path / "m", tensors, GPTQ)
    out = tmp_path / "m.parquet"
    with pytest.raises(AnalysisInterrupted):  # header-only rows first, then 2 of 4 computed
        analyze(directory, out, progress=StopAfter(len(tensors) - 2))
    config = json.loads((directory / "config.json").read_text())
    config["quantization_config"]["checkpoint_format"] = "gptq_v2"
    (directory / "config.json").write_text(json.dumps(config))
    hook = StopAfter(10**9)
    result = analyze(directory, out, progress=hook)
    assert result.resumed == 0 and any("starting afresh" in n for n in hook.notes)
    fresh = tmp_path / "fresh.parquet"
    analyze(directory, fresh, resume=False)
    a, b = load_metrics(out), load_metrics(fresh)
    assert a.lambda_max.equals(b.lambda_max)


def test_raw_codes_are_not_called_dequantized(tmp_path, capsys):
    tensors = {W + ".weight": _fp8(), W + ".weight_scale_inv": torch.ones(2, 2)}
    directory = _build(tmp_path / "m", tensors, FP8)
    out = tmp_path / "m.parquet"
    code, stdout, err = run_cli(["analyze", directory, "-o", out, "--raw-codes", "--json"], capsys)
    assert code == 0, err
    summary = json.loads(stdout)["quantization"]
    assert summary == ["analysed as raw codes 1 fp8_e4m3 block 128x128 weight(s)"]
    code, _, err = run_cli(["report", out, "-o", tmp_path / "r.html", "--quiet"], capsys)
    html = (tmp_path / "r.html").read_text()
    assert "analysed as stored codes (--raw-codes)" in html and "dequantized before" not in html


def test_mxfp4_linear_weight_belongs_to_its_module(tmp_path):
    """A Linear stored as ``X.weight_blocks`` / ``X.weight_scales`` (gpt-oss names a parameter
    P's parts P_blocks, P_scales) is module X, PEFT's key, not X.weight."""
    generator = torch.Generator().manual_seed(0)
    tensors = {W + ".weight_blocks": torch.randint(0, 256, (64, 4, 16), dtype=torch.uint8,
                                                   generator=generator),
               W + ".weight_scales": torch.full((64, 4), 127, dtype=torch.uint8)}  # fmt: skip
    _, table = _table(_build(tmp_path / "m", tensors, {"quant_method": "mxfp4"}))
    row = table.loc[W + ".weight_blocks"]
    assert row["status"] == "ok" and row["module"] == W and row["role"] == "linear"
    assert (row["rows"], row["cols"]) == (64, 128)


def test_invisible_format_characters_are_escaped():
    """A quant_method (or tensor name) with a right-to-left override cannot reorder what the
    terminal or the report shows."""
    from esdtool.untrusted import printable

    assert printable("fp8\u202eexe.txt\u200b\x1b") == "fp8\\u202eexe.txt\\u200b\\x1b"
