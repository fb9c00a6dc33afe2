"""What quantization does to each metric: MiniLM's 36 encoder projections quantized in every
format esdtool dequantizes, each table compared with the plain (float32) MiniLM table.

Each format is made by its own reference code where it runs on a CPU: transformers'
``Fp8Quantize`` (FP8 128x128 blocks), compressed-tensors (FP8 channel / tensor, int8 channel,
int4 groups, through tests/qref_compressed.py, bf16 model as llm-compressor exports), GPT-QModel
(GPTQ and AWQ packing, through tests/qref_gptq_awq.py: round-to-nearest only, the GPTQ Hessian
updates and AWQ's scale search are skipped, so the weights are plain RTN int4) and the test
suite's MXFP4 quantizer (2-D blocks [out, in/32, 16], ``quant_method`` mxfp4). Every checkpoint
is analysed by ``esdtool.analyze`` with default settings and planned by ``allocate_ranks`` with
default settings; per metric the median and largest relative change over the 36 matrices are
reported, and how many of the 36 keep/drop decisions of the plan flip. There is no pass/fail
target: the numbers say which columns a user can read on a quantized checkpoint.

    python benchmarks/quantization_effect.py --out quant_effect.md [--formats fp8-block,gptq]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))
from _common import minilm_dir

METRICS = (
    "alpha_median", "alpha_fix_finger", "alpha_ks", "num_spikes", "stable_rank", "lambda_max",
    "frobenius_norm", "entropy",
)  # fmt: skip
FP8_CONFIG = {"quant_method": "fp8", "weight_block_size": [128, 128],
              "activation_scheme": "dynamic"}  # fmt: skip

Weights = dict[str, torch.Tensor]


def _save(directory: Path, tensors: Weights, config: dict) -> Path:
    directory.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def _add_rest(directory: Path, rest: Weights) -> Path:
    """Put MiniLM's other tensors (embeddings, norms, biases) beside the quantized ones, as a
    whole-model export would have them."""
    path = directory / "model.safetensors"
    tensors = load_file(str(path))
    save_file({**rest, **tensors}, str(path), metadata={"format": "pt"})
    return directory


def fp8_block(d: Path, linears: Weights, rest: Weights, config: dict) -> Path:
    from test_quantized import _fp8_quantizer  # transformers' Fp8Quantize, 128x128 blocks

    quantize, _ = _fp8_quantizer()
    tensors = dict(rest)
    for name, w in linears.items():
        tensors.update(quantize.convert({name: w.float()}))
    return _save(d, tensors, {**config, "quantization_config": FP8_CONFIG})


def compressed(**scheme: object) -> Callable[[Path, Weights, Weights, dict], Path]:
    def build(d: Path, linears: Weights, rest: Weights, config: dict) -> Path:
        from qref_compressed import build_compressed_checkpoint

        # rest's 2-D weights (embeddings, pooler) are listed in ignore: written dense (bf16)
        ignore = [n.removesuffix(".weight") for n, t in rest.items()
                  if n.endswith(".weight") and t.ndim == 2]  # fmt: skip
        return build_compressed_checkpoint(
            d, {**rest, **linears}, ignore=ignore, config=config, **scheme
        )

    return build


def _gptq_awq(kind: str, **kwargs: object) -> Callable[[Path, Weights, Weights, dict], Path]:
    """GPT-QModel's packers, run in a child as the tests run them (importing gptqmodel patches
    transformers and safetensors); it lives in .venv/reference-formats (make install)."""

    def build(d: Path, linears: Weights, rest: Weights, config: dict) -> Path:
        dense = d.with_suffix(".dense.safetensors")
        save_file({k: v.float().contiguous() for k, v in linears.items()}, str(dense))
        tests = Path(__file__).parent.parent / "tests"
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            [str(tests), str(tests.parent / ".venv" / "reference-formats")])}  # fmt: skip
        job = json.dumps({**kwargs, "config_extra": config})
        subprocess.run([sys.executable, str(tests / "qref_gptq_awq.py"), f"build-{kind}",
                        str(dense), str(d), job], env=env, check=True, cwd=d.parent,
                       capture_output=True)  # fmt: skip
        return _add_rest(d, rest)

    return build


def mxfp4(d: Path, linears: Weights, rest: Weights, config: dict) -> Path:
    """2-D MXFP4 as gpt-oss names its parts: parameter P stored as P_blocks and P_scales."""
    from test_quantized import _mxfp4_quantize

    tensors = dict(rest)
    for name, w in linears.items():
        tensors[name + "_blocks"], tensors[name + "_scales"] = _mxfp4_quantize(w.float())
    return _save(d, tensors, {**config, "quantization_config": {"quant_method": "mxfp4"}})


FORMATS: dict[str, tuple[str, Callable[[Path, Weights, Weights, dict], Path]]] = {
    "fp8-block": ("FP8 E4M3 block 128x128 (transformers Fp8Quantize)", fp8_block),
    "fp8-channel": ("FP8 E4M3 per channel (compressed-tensors)", compressed(
        format="float-quantized", num_bits=8, type="float", strategy="channel")),
    "fp8-tensor": ("FP8 E4M3 per tensor (compressed-tensors)", compressed(
        format="float-quantized", num_bits=8, type="float", strategy="tensor")),
    "int8-channel": ("int8 per channel, symmetric (compressed-tensors)", compressed(
        format="int-quantized", num_bits=8, type="int", strategy="channel")),
    "int4-g128": ("int4 group 128, symmetric (compressed-tensors pack)", compressed(
        format="pack-quantized", num_bits=4, type="int", strategy="group", group_size=128)),
    "int4-g32-asym": ("int4 group 32, asymmetric (compressed-tensors pack)", compressed(
        format="pack-quantized", num_bits=4, type="int", strategy="group", group_size=32,
        symmetric=False)),
    "gptq": ("GPTQ int4 g128 sym, v1 (GPT-QModel pack; RTN, no Hessian updates)",
             _gptq_awq("gptq", bits=4, group_size=128)),
    "awq": ("AWQ int4 g128 zero point, GEMM (GPT-QModel pack; RTN, no scale search)",
            _gptq_awq("awq", group_size=128)),
    "mxfp4": ("MXFP4, 2-D blocks [out, in/32, 16] (test quantizer)", mxfp4),
}  # fmt: skip


def _key(module: str, plain: set[str]) -> str:
    """The plain module a quantized row stands for (a module name that keeps the parameter's
    ``.weight`` is counted in ``module_names_ok``, not hidden)."""
    return module if module in plain else module.removesuffix(".weight")


def compare(plain: pd.DataFrame, quant: pd.DataFrame, weight_error: list[float]) -> dict:
    """Per metric: median and max |quantized / plain - 1| over the matrices; plan flips."""
    from esdtool.plan.ranks import allocate_ranks

    p = plain[plain.role == "linear"].set_index("module")
    q = quant[quant.quantization.notna() & (quant.status == "ok")].copy()
    modules = set(p.index)
    names_ok = int(q.module.isin(modules).sum())
    q["key"] = [_key(m, modules) for m in q.module]
    q = q.set_index("key").loc[p.index]
    result: dict = {"matrices": len(q), "module_names_ok": names_ok,
                    "label": sorted(set(q.quantization)),
                    "weight_error_median": float(np.median(weight_error)),
                    "weight_error_max": float(np.max(weight_error))}  # fmt: skip
    for metric in METRICS:
        change = (q[metric].astype(float) / p[metric].astype(float) - 1).abs()
        result[metric] = {"median": float(change.median()), "max": float(change.max()),
                          "worst": str(change.idxmax())}  # fmt: skip
    plan_p = allocate_ranks(plain).table.set_index("module")
    plan_q = allocate_ranks(quant).table
    plan_q = plan_q.set_index(pd.Index([_key(m, modules) for m in plan_q.module])).loc[plan_p.index]
    both = plan_p.selected & plan_q.selected
    result["plan"] = {
        "candidates": len(plan_p),
        "kept": int(plan_p.selected.sum()),
        "flipped": int((plan_p.selected != plan_q.selected).sum()),
        "rank_changed": int((both & (plan_p["rank"] != plan_q["rank"])).sum()),
        "rank_change_max": int((plan_p["rank"] - plan_q["rank"])[both].abs().max()),
    }
    return result


def weight_errors(directory: Path, plain: Weights) -> list[float]:
    """||W_q - W|| / ||W|| of each matrix, W_q as esdtool dequantizes it."""
    from helpers import decoded

    errors = []
    for name, w in decoded(directory).items():
        if name.endswith(".qweight"):
            name = name.removesuffix(".qweight") + ".weight"
        original = plain[name.removesuffix("_blocks").removesuffix("_packed")]
        errors.append(float((w.double() - original.double()).norm() / original.double().norm()))
    return errors


def markdown(results: dict[str, dict], seconds: float) -> str:
    lines = [
        "# What quantization does to esdtool's metrics (MiniLM-L6, 36 encoder projections)",
        "",
        "`python benchmarks/quantization_effect.py --out ...`; each cell: median / max of "
        "|quantized / plain − 1| over the 36 matrices, in %. Plain = the float32 checkpoint. "
        f"Plan: default `allocate` (keep 18 of 36). Run took {seconds:.0f} s.",
        "",
        f"| format | weight err. med / max | {' | '.join(METRICS)} "
        "| plan flips / 36 | kept ranks changed |",
        "|" + "---|" * (len(METRICS) + 4),
    ]
    for key, r in results.items():
        cells = [f"{100 * r[m]['median']:.2f} / {100 * r[m]['max']:.2f}" for m in METRICS]
        plan = r["plan"]
        lines.append(
            f"| {key} | {100 * r['weight_error_median']:.1f} / {100 * r['weight_error_max']:.1f}"
            f" | " + " | ".join(cells) + f" | {plan['flipped']} | {plan['rank_changed']} of "
            f"{plan['kept']} (max Δ{plan['rank_change_max']}) |"
        )
    lines += ["", "Formats:", ""]
    lines += [f"- **{key}**: {FORMATS[key][0]}; esdtool label `{', '.join(r['label'])}`"
              + ("" if r["module_names_ok"] == r["matrices"] else
                 f"; **module names: {r['module_names_ok']}/{r['matrices']} match the plain "
                 f"table** (rows keep the parameter suffix)")
              for key, r in results.items()]  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="markdown table written here")
    parser.add_argument("--formats", default=",".join(FORMATS),
                        help=f"comma-separated subset of {', '.join(FORMATS)}")  # fmt: skip
    args = parser.parse_args()
    chosen = [f.strip() for f in args.formats.split(",") if f.strip()]
    unknown = [f for f in chosen if f not in FORMATS]
    if unknown:
        parser.error(f"unknown format(s) {', '.join(unknown)}; choose from {', '.join(FORMATS)}")

    import esdtool

    started = time.perf_counter()
    source = Path(minilm_dir())
    weights = load_file(str(source / "model.safetensors"))
    config = json.loads((source / "config.json").read_text())
    linears = {
        k: v
        for k, v in weights.items()
        if k.startswith("encoder.layer.") and k.endswith(".weight") and v.ndim == 2
    }
    assert len(linears) == 36, len(linears)
    rest = {k: v for k, v in weights.items() if k not in linears}
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        esdtool.analyze(source, Path(tmp) / "plain.parquet")
        plain = esdtool.load_metrics(Path(tmp) / "plain.parquet")
        for key in chosen:
            t0 = time.perf_counter()
            directory = FORMATS[key][1](Path(tmp) / key, linears, rest, config)
            out = Path(tmp) / f"{key}.parquet"
            esdtool.analyze(directory, out)
            results[key] = compare(plain, esdtool.load_metrics(out),
                                   weight_errors(directory, weights))  # fmt: skip
            results[key]["seconds"] = time.perf_counter() - t0
            print(json.dumps({"format": key, **results[key]}), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(markdown(results, time.perf_counter() - started))


if __name__ == "__main__":
    main()
