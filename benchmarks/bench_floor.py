"""esdtool analyze vs the floor on a synthetic Llama-shaped bf16 checkpoint (about 1 GB).

The floor is the least any tool must do: a bare loop that reads each matrix and runs
torch.linalg.eigvalsh on its float64 Gram matrix (the same precision esdtool's default uses on a
CPU), nothing else: no fits, no checks, no table. Both run as whole processes on the same files
(page cache warm for both: the checkpoint is read once before timing). Target: esdtool / floor
<= 1.2.

    python benchmarks/bench_floor.py [--layers 8] [--dir DIR] [--repeat 2]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import generate_checkpoint, run_measured

FLOOR = r"""
import json, sys, time
t0 = time.perf_counter()
import torch
from safetensors import safe_open
from pathlib import Path
t1 = time.perf_counter()
index = json.loads((Path(sys.argv[1]) / "model.safetensors.index.json").read_text())
count = 0
for shard in sorted(set(index["weight_map"].values())):
    with safe_open(str(Path(sys.argv[1]) / shard), framework="pt") as f:
        for name in f.keys():
            w = f.get_tensor(name)
            if w.ndim != 2:
                continue
            w = w.double()
            g = w.T @ w if w.shape[0] > w.shape[1] else w @ w.T
            torch.linalg.eigvalsh(g)
            count += 1
t2 = time.perf_counter()
print(json.dumps({"imports": t1 - t0, "work": t2 - t1, "matrices": count}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8, help="8 layers = about 1.1 GB")
    parser.add_argument("--dir", type=Path, help="keep the checkpoint here (default: a temp dir)")
    parser.add_argument("--repeat", type=int, default=2, help="runs of each; the best is kept")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        directory = args.dir or Path(tmp) / "ckpt"
        directory.mkdir(parents=True, exist_ok=True)
        if not (directory / "model.safetensors.index.json").is_file():
            generate_checkpoint(directory, args.layers)
        size = sum(p.stat().st_size for p in directory.glob("*.safetensors"))
        for p in directory.glob("*.safetensors"):  # warm the page cache for both contenders
            p.read_bytes()
        floor, ours = [], []
        for _ in range(args.repeat):
            seconds, _, out = run_measured([sys.executable, "-c", FLOOR, str(directory)])
            floor.append((seconds, json.loads(out)))
            seconds, _, out = run_measured(
                [sys.executable, "-m", "esdtool", "analyze", str(directory),
                 "-o", str(Path(tmp) / "m.parquet"), "--json"]
            )  # fmt: skip
            ours.append((seconds, json.loads(out)))
    floor_s, floor_info = min(floor, key=lambda r: r[0])
    ours_s, ours_info = min(ours, key=lambda r: r[0])
    print(f"synthetic Llama-shaped checkpoint: {args.layers} layers, {size / 2**30:.2f} GiB bf16, "
          f"{floor_info['matrices']} matrices (best of {args.repeat})")  # fmt: skip
    print(f"{'':34}{'esdtool':>10}{'floor':>10}{'ratio':>9}")
    print(f"{'whole process (s)':34}{ours_s:10.2f}{floor_s:10.2f}{ours_s / floor_s:8.2f}x")
    print(
        f"{'analysis only (s)':34}{ours_info['seconds']:10.2f}{floor_info['work']:10.2f}"
        f"{ours_info['seconds'] / floor_info['work']:8.2f}x"
    )
    print(f"{'throughput (GB/s, whole process)':34}{size / 1e9 / ours_s:10.3f}"
          f"{size / 1e9 / floor_s:10.3f}")  # fmt: skip
    print("target: esdtool / floor <= 1.2 (whole process)")


if __name__ == "__main__":
    main()
