"""GPU throughput at 7B scale: every matrix of a Llama-2-7B-shaped model, generated on the
device (no disk), through esdtool's per-tensor path and through the floor (float64 Gram +
eigvalsh and nothing else). Prints tensors/s and GB/s (bf16 bytes) for both and the ratio.

    python benchmarks/bench_gpu.py                     # CUDA, 32 layers (224 + 2 matrices)
    python benchmarks/bench_gpu.py --device cpu --layers 1 --hidden 512   # a smoke run
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from esdtool.analysis.rows import analyze_tensor
from esdtool.analysis.settings import AnalyzeSettings
from esdtool.io.checkpoint import TensorInfo
from esdtool.spectral.spectra import auto_dtype, gram


def shapes(layers: int, hidden: int, intermediate: int, vocab: int) -> list[tuple[str, tuple]]:
    out = [("model.embed_tokens.weight", (vocab, hidden)), ("lm_head.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        out += [(p + f"self_attn.{x}_proj.weight", (hidden, hidden)) for x in "qkvo"]
        out += [(p + "mlp.gate_proj.weight", (intermediate, hidden)),
                (p + "mlp.up_proj.weight", (intermediate, hidden)),
                (p + "mlp.down_proj.weight", (hidden, intermediate))]  # fmt: skip
    return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--intermediate", type=int, default=None, help="default 2.6875 x hidden")
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--dtype", default="auto", help="auto, float32 or float64")
    args = parser.parse_args()
    device = torch.device(args.device)
    intermediate = args.intermediate or int(args.hidden * 2.6875)
    settings = AnalyzeSettings(device=args.device, dtype=args.dtype)
    dtype = auto_dtype(device) if args.dtype == "auto" else getattr(torch, args.dtype)
    gen = torch.Generator(device=device).manual_seed(0)
    plan = shapes(args.layers, args.hidden, intermediate, args.vocab)
    total_bytes = sum(2 * r * c for _, (r, c) in plan)

    def tensor(shape: tuple) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen, device=device) * 0.02).to(torch.bfloat16)

    # Warm-up: kernels, cuSOLVER handles, the TW constants.
    warm = tensor((256, 512))
    analyze_tensor(TensorInfo("warm", "BF16", (256, 512), Path("-"), 0, 1), warm, settings, device)

    timings = {"esdtool": 0.0, "floor": 0.0}
    alphas = []
    for name, shape in plan:
        w = tensor(shape)
        info = TensorInfo(name, "BF16", shape, Path("synthetic"), 0, 2 * shape[0] * shape[1])
        sync(device)
        t = time.perf_counter()
        rows = analyze_tensor(info, w, settings, device)
        sync(device)
        timings["esdtool"] += time.perf_counter() - t
        alphas.append(rows[0].metrics.ks.alpha)
        t = time.perf_counter()
        if dtype == torch.float64:
            torch.linalg.eigvalsh(gram(w, torch.float64))
        else:
            torch.linalg.svdvals(w.float())
        sync(device)
        timings["floor"] += time.perf_counter() - t
        del w

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"{name}: {len(plan)} matrices of a {args.layers}-layer, hidden-{args.hidden} Llama, "
          f"{total_bytes / 1e9:.1f} GB bf16, eigenvalues in {str(dtype)[6:]}")  # fmt: skip
    print(f"{'':14}{'seconds':>10}{'tensors/s':>12}{'GB/s':>9}")
    for label, seconds in timings.items():
        rate = total_bytes / 1e9 / seconds
        print(f"{label:14}{seconds:10.2f}{len(plan) / seconds:12.1f}{rate:9.2f}")
    print(f"esdtool / floor: {timings['esdtool'] / timings['floor']:.2f}x "
          f"(fits, MP/TW and metrics on top of the eigensolver)")  # fmt: skip
    print(f"alpha_ks range: {min(alphas):.2f} .. {max(alphas):.2f} (random weights: large alphas)")


if __name__ == "__main__":
    main()
