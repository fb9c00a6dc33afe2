"""Scaling: esdtool analyze on 1x, 2x and 4x the layers of a synthetic Llama-shaped checkpoint.

Time should grow linearly with the work (the ratio column follows the size ratio) and the peak
RSS should stay flat: analyze holds one tensor (plus one read ahead) at a time, and the rows it
keeps are small.

    python benchmarks/bench_scaling.py [--layers 2] [--dir DIR]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import generate_checkpoint, run_measured


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=2, help="layers of the 1x checkpoint")
    parser.add_argument("--dir", type=Path, help="keep the checkpoints here (default: temp)")
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        root = args.dir or Path(tmp)
        for factor in (1, 2, 4):
            directory = root / f"x{factor}"
            directory.mkdir(parents=True, exist_ok=True)
            if not (directory / "model.safetensors.index.json").is_file():
                generate_checkpoint(directory, args.layers * factor)
            size = sum(p.stat().st_size for p in directory.glob("*.safetensors"))
            for p in directory.glob("*.safetensors"):
                p.read_bytes()  # page cache warm, as for every run
            seconds, peak_mb, _ = run_measured(
                [sys.executable, "-m", "esdtool", "analyze", str(directory),
                 "-o", str(Path(tmp) / f"m{factor}.parquet"), "--quiet"]
            )  # fmt: skip
            results.append((factor, size, seconds, peak_mb))
    _, size1, s1, rss1 = results[0]
    print("synthetic Llama-shaped checkpoints (bf16; embeddings + lm_head in every size)")
    print(f"{'size':>6}{'GiB':>8}{'seconds':>10}{'x 1x time':>11}{'x 1x size':>11}"
          f"{'peak RSS MiB':>14}{'x 1x RSS':>10}")  # fmt: skip
    for factor, size, seconds, peak_mb in results:
        print(f"{factor:>5}x{size / 2**30:8.2f}{seconds:10.1f}{seconds / s1:11.2f}"
              f"{size / size1:11.2f}{peak_mb:14.0f}{peak_mb / rss1:10.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
