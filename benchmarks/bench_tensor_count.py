"""Cost per tensor against the number of tensors in one file (issue 30, item 0).

A safetensors file of N small matrices (32 x 16, float32) is analysed in one process for N in
{1000, 4000}; the analysis time (``analyze`` alone, start-up and imports excluded) is divided
by N. A reader that parses the whole header again for every tensor makes the time per tensor
grow with N (quadratic in all); one parse per shard keeps it flat. Then a PEFT-layout adapter
of 18,000 modules (lora_A / lora_B pairs, r 4) is read, as an MoE adapter's would be.

Target, as a ratio in one run: time per tensor at 4000 <= 1.3 x time per tensor at 1000; the
18,000-module adapter in under a minute on 2 cores.

    python benchmarks/bench_tensor_count.py
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file


def _file(path: Path, n: int) -> Path:
    rng = np.random.default_rng(0)
    save_file({f"blocks.{i}.proj.weight": rng.standard_normal((32, 16), dtype=np.float32)
               for i in range(n)}, str(path))  # fmt: skip
    return path


def _adapter(directory: Path, n: int) -> Path:
    rng = np.random.default_rng(0)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for i in range(n):
        prefix = f"base_model.model.model.layers.{i // 128}.mlp.experts.{i % 128}.up_proj"
        tensors[f"{prefix}.lora_A.weight"] = rng.standard_normal((4, 16), dtype=np.float32)
        tensors[f"{prefix}.lora_B.weight"] = rng.standard_normal((32, 4), dtype=np.float32)
    save_file(tensors, str(directory / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["up_proj"],
              "task_type": "CAUSAL_LM"}  # fmt: skip
    (directory / "adapter_config.json").write_text(json.dumps(config))
    return directory


def _seconds(source: Path) -> float:
    from esdtool import AnalyzeSettings, analyze

    settings = AnalyzeSettings(device="cpu", min_evals=2)
    started = time.perf_counter()
    analyze(source, settings=settings, resume=False)
    return time.perf_counter() - started


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        _seconds(_file(root / "warm.safetensors", 50))  # imports and first-call costs
        files = {n: _file(root / f"n{n}.safetensors", n) for n in (1000, 4000)}
        best = {n: min(_seconds(files[n]) for _ in range(2)) for n in files}  # best of 2
        per = {}
        for n, seconds in best.items():
            per[n] = seconds / n
            print(f"{n:>5} tensors: {seconds:6.2f} s, {1e3 * per[n]:.2f} ms per tensor")
        ratio = per[4000] / per[1000]
        print(f"time per tensor, 4000 / 1000: {ratio:.2f} (target <= 1.3)")
        seconds = _seconds(_adapter(root / "adapter", 18_000))
        print(f"18,000-module adapter: {seconds:.1f} s (target < 60)")
    return 0 if ratio <= 1.3 and seconds < 60 else 1


if __name__ == "__main__":
    sys.exit(main())
