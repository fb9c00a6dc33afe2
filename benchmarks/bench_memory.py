"""Peak memory of `esdtool analyze` on a synthetic ~2 GB bf16 Llama-shaped checkpoint.

Prints the checkpoint size, the peak RSS of a bare interpreter that imports esdtool (the
baseline), the peak RSS of the whole analyze process, and the difference; the goal is a
difference under 1 GB: analyze holds one tensor at a time, never the model.

    python benchmarks/bench_memory.py [--layers 18] [--dir DIR]
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
    parser.add_argument("--layers", type=int, default=18, help="18 layers = about 2.1 GB")
    parser.add_argument("--dir", type=Path, help="keep the checkpoint here (default: a temp dir)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        directory = args.dir or Path(tmp)
        directory.mkdir(parents=True, exist_ok=True)
        size = generate_checkpoint(directory, args.layers)
        _, base_mb, _ = run_measured(
            [sys.executable, "-c", "import esdtool.cli.app, pandas, pyarrow.parquet"]
        )
        seconds, peak_mb, _ = run_measured(
            [sys.executable, "-m", "esdtool", "analyze", str(directory),
             "-o", str(Path(tmp) / "m.parquet"), "--quiet"]
        )  # fmt: skip
    print(f"synthetic Llama-shaped checkpoint: {args.layers} layers, {size / 2**30:.2f} GiB bf16")
    print(f"{'baseline (imports only)':28}{base_mb:10.0f} MiB")
    print(f"{'esdtool analyze peak':28}{peak_mb:10.0f} MiB   ({seconds:.0f} s)")
    print(
        f"{'above baseline':28}{peak_mb - base_mb:10.0f} MiB   "
        f"= {(peak_mb - base_mb) / (size / 2**20):.2f} x the checkpoint (goal: < 1024 MiB)"
    )


if __name__ == "__main__":
    main()
