"""Cost of dequantization: esdtool analyze on a fine-grained FP8 checkpoint vs the same model in
bf16 (synthetic Llama-shaped, made by _common.write_checkpoint).

The FP8 checkpoint is the bf16 one with every layer projection quantized as DeepSeek-V3 and
Qwen3-FP8 store it: F8_E4M3 codes and a F32 ``weight_scale_inv`` per 128x128 block (block
absmax / 448), in the same shard as the weight; embeddings, lm_head and norms stay bf16, and
config.json says ``{"quant_method": "fp8", "weight_block_size": [128, 128]}``. Both run as whole
processes, alternated, on warm page cache; the best of ``--repeat`` runs of each is kept.
Target: fp8 / bf16 <= 1.15 (whole process). Also prints each one's peak RSS.

    python benchmarks/bench_dequant.py [--layers 4] [--hidden 1024] [--repeat 3] [--profile 25]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import run_measured

TARGET = 1.15

# Runs in a child (the measuring process never imports torch: a child's peak RSS counts its
# parent's size at fork time). argv: benchmarks dir, bf16 dir, fp8 dir, layers, hidden, inter.
MAKE = r"""
import json, sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import _common
import torch
from safetensors.torch import load_file, save_file

bf16, fp8 = Path(sys.argv[2]), Path(sys.argv[3])
layers, _common.HIDDEN, _common.INTERMEDIATE = int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
_common.write_checkpoint(bf16, layers)
config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
          "hidden_size": _common.HIDDEN, "intermediate_size": _common.INTERMEDIATE,
          "num_hidden_layers": layers, "vocab_size": _common.VOCAB, "torch_dtype": "bfloat16"}
(bf16 / "config.json").write_text(json.dumps(config))
B = 128

def quantize(w):
    rows, cols = w.shape
    gr, gc = -(-rows // B), -(-cols // B)
    padded = torch.zeros(gr * B, gc * B)
    padded[:rows, :cols] = w.float()
    blocks = padded.reshape(gr, B, gc, B)
    scale = blocks.abs().amax(dim=(1, 3)).clamp_min(1e-12) / 448
    codes = (blocks / scale[:, None, :, None]).clamp(-448, 448).reshape(gr * B, gc * B)
    return codes[:rows, :cols].to(torch.float8_e4m3fn).contiguous(), scale

index = json.loads((bf16 / "model.safetensors.index.json").read_text())
weight_map, total = {}, 0
for shard in sorted(set(index["weight_map"].values())):
    tensors = {}
    for name, w in load_file(str(bf16 / shard)).items():
        if name.endswith("_proj.weight"):
            tensors[name], tensors[name + "_scale_inv"] = quantize(w)
        else:
            tensors[name] = w
    save_file(tensors, str(fp8 / shard))
    for name, t in tensors.items():
        weight_map[name] = shard
        total += t.numel() * t.element_size()
(fp8 / "model.safetensors.index.json").write_text(
    json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
config["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [B, B],
                                 "activation_scheme": "dynamic"}
(fp8 / "config.json").write_text(json.dumps(config))
"""


# Decoding alone, in a child: every quantized weight's parts read and decoded as analyze does
# (esdtool.dequant's layout and QuantizedWeight.decode), timed apart from the reading.
DECODE = r"""
import json, sys, time
from pathlib import Path
from esdtool.dequant import layout_of, read_scheme
from esdtool.io.checkpoint import open_checkpoint
d = Path(sys.argv[1])
ckpt = open_checkpoint(sorted(d.glob("*.safetensors")))
layout = layout_of({n: ckpt.info(n) for n in ckpt.keys()},
                   read_scheme(json.loads((d / "config.json").read_text()), "config"))
read = decode = 0.0
for weight in layout.weights.values():
    t0 = time.perf_counter()
    parts = {role: ckpt.get_tensor(n) for role, n in weight.parts}
    t1 = time.perf_counter()
    weight.decode(parts)
    t2 = time.perf_counter()
    read, decode = read + t1 - t0, decode + t2 - t1
print(json.dumps({"weights": len(layout.weights), "read": read, "decode": decode}))
"""


def analyze(directory: Path, out: Path) -> tuple[float, float, dict]:
    """(wall seconds, peak RSS MiB, --json summary + the process's CPU seconds)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    seconds, peak, stdout = run_measured(
        [sys.executable, "-m", "esdtool", "analyze", str(directory), "-o", str(out), "--json"]
    )
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    info = json.loads(stdout)
    info["cpu"] = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return seconds, peak, info


def spectra_seconds(table: Path) -> float:
    """The table's summed per-row seconds: Gram, eigvalsh and fits, after the tensor is in
    memory (dequantization excluded)."""
    import pyarrow.parquet as pq  # only once every process has been measured

    return float(sum(x for x in pq.read_table(table, columns=["seconds"])[0].to_pylist() if x))


def profile(directory: Path, out: Path, top: int) -> None:
    """cProfile of one fp8 analyze, in its own process: the top functions by cumulative time."""
    stats = out.with_suffix(".prof")
    subprocess.check_call(
        [sys.executable, "-m", "cProfile", "-o", str(stats), "-m", "esdtool", "analyze",
         str(directory), "-o", str(out), "--quiet"]
    )  # fmt: skip
    code = (
        "import pstats, sys; s = pstats.Stats(sys.argv[1]); s.sort_stats('cumulative')"
        ".print_stats(int(sys.argv[2])); s.sort_stats('tottime').print_stats(int(sys.argv[2]))"
    )
    subprocess.check_call([sys.executable, "-c", code, str(stats), str(top)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4, help="layers of the synthetic model")
    parser.add_argument("--hidden", type=int, default=1024, help="hidden size (Llama: 2048+)")
    parser.add_argument("--intermediate", type=int, help="MLP width (default: 2.75 x hidden)")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each; the best is kept")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="also cProfile one fp8 run and print its top N functions")  # fmt: skip
    args = parser.parse_args()
    inter = args.intermediate or int(2.75 * args.hidden)
    with tempfile.TemporaryDirectory() as tmp:
        bf16, fp8 = Path(tmp) / "bf16", Path(tmp) / "fp8"
        bf16.mkdir()
        fp8.mkdir()
        here = str(Path(__file__).parent)
        subprocess.check_call([sys.executable, "-c", MAKE, here, str(bf16), str(fp8),
                               str(args.layers), str(args.hidden), str(inter)])  # fmt: skip
        sizes = {d.name: sum(p.stat().st_size for p in d.glob("*.safetensors"))
                 for d in (bf16, fp8)}  # fmt: skip
        for p in [*bf16.glob("*.safetensors"), *fp8.glob("*.safetensors")]:
            p.read_bytes()  # warm the page cache for both contenders
        runs: dict[str, list[tuple[float, float, dict]]] = {"bf16": [], "fp8": []}
        for _ in range(args.repeat):
            for d in (bf16, fp8):
                runs[d.name].append(analyze(d, Path(tmp) / f"{d.name}.parquet"))
        _, _, out = run_measured([sys.executable, "-c", DECODE, str(fp8)])
        decoding = json.loads(out)
        if args.profile:
            profile(fp8, Path(tmp) / "profiled.parquet", args.profile)
        spectra = {d.name: spectra_seconds(Path(tmp) / f"{d.name}.parquet") for d in (bf16, fp8)}
    best = {k: min(v, key=lambda r: r[0]) for k, v in runs.items()}
    cpu = {k: min(r[2]["cpu"] for r in v) for k, v in runs.items()}
    for name, (seconds, peak, info) in best.items():
        print(json.dumps({
            "checkpoint": name, "layers": args.layers, "hidden": args.hidden,
            "intermediate": inter, "bytes": sizes[name], "seconds": round(seconds, 3),
            "analysis_seconds": round(info["seconds"], 3), "cpu_seconds": round(cpu[name], 3),
            "spectra_seconds_last_run": round(spectra[name], 3), "peak_rss_mib": round(peak),
            "all_seconds": [round(r[0], 3) for r in runs[name]],
        }))  # fmt: skip
    print(json.dumps({"fp8_decode_only": {k: round(v, 3) if isinstance(v, float) else v
                                          for k, v in decoding.items()}}))  # fmt: skip
    ratio = best["fp8"][0] / best["bf16"][0]
    print(json.dumps({"ratio_fp8_over_bf16": round(ratio, 3),
                      "ratio_analysis_only": round(best["fp8"][2]["seconds"]
                                                   / best["bf16"][2]["seconds"], 3),
                      "ratio_cpu": round(cpu["fp8"] / cpu["bf16"], 3),
                      "decode_share_of_bf16": round(decoding["decode"] / best["bf16"][0], 4),
                      "peak_rss_ratio": round(best["fp8"][1] / best["bf16"][1], 3),
                      "target": TARGET, "ok": ratio <= TARGET}))  # fmt: skip


if __name__ == "__main__":
    main()
