"""A trained LoRA adapter's rows: the r x r route esdtool takes vs forming Delta W = s B A and
taking its Gram spectrum (what analysing a merged difference costs), in one run, per module
shape of a Llama-3-8B-sized layer.

For each shape the time of ``lowrank_eigenvalues`` (thin QRs of B and A^T, SVD of the r x r
core) and of ``eigenvalues(s * B @ A)`` (the product formed in float64, its M x M Gram matrix,
eigvalsh) are measured on the same factors; the best of ``--repeat`` is kept, and the two
spectra are checked equal (max |difference| / lambda_max). Target: lowrank / formed <= 0.05 for
every shape (the r x r route is O((out + in) r^2), the formed one O(out in M)).

    python benchmarks/bench_lowrank.py [--rank 16] [--repeat 3] [--scale 0.25]
"""

from __future__ import annotations

import argparse

import torch

from _common import best
from esdtool.spectral.lowrank import lowrank_eigenvalues
from esdtool.spectral.spectra import eigenvalues

TARGET = 0.05
# (name, out, in) of Llama-3-8B's projections; --scale shrinks them for a quick run.
SHAPES = (("q_proj", 4096, 4096), ("k_proj", 1024, 4096), ("up_proj", 14336, 4096),
          ("down_proj", 4096, 14336))  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--scale", type=float, default=0.25)
    args = parser.parse_args()
    torch.manual_seed(0)
    worst = 0.0
    print(f"{'module':10} {'shape':>13} {'r x r (ms)':>11} {'formed (ms)':>12} {'ratio':>7} "
          f"{'max diff':>9}")  # fmt: skip
    for name, out, inner in SHAPES:
        out, inner = int(out * args.scale), int(inner * args.scale)
        A = torch.randn(args.rank, inner) / inner**0.5
        B = torch.randn(out, args.rank) * 0.01
        s = 2.0
        M = min(out, inner)
        fast = best(lambda: lowrank_eigenvalues(B, A, s, M), args.repeat)  # noqa: B023
        slow = best(lambda: eigenvalues(s * B @ A), args.repeat)  # noqa: B023
        a, b = lowrank_eigenvalues(B, A, s, M), eigenvalues(s * B.double() @ A.double())
        diff = float((a - b).abs().max() / b[-1])
        ratio = fast / slow
        worst = max(worst, ratio)
        print(f"{name:10} {out:>6}x{inner:<6} {fast * 1e3:11.2f} {slow * 1e3:12.1f} "
              f"{ratio:7.4f} {diff:9.1e}")  # fmt: skip
    verdict = "meets" if worst <= TARGET else "MISSES"
    print(f"worst ratio {worst:.4f}: {verdict} the target <= {TARGET}")
    return 0 if worst <= TARGET else 1


if __name__ == "__main__":
    raise SystemExit(main())
