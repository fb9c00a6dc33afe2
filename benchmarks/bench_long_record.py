"""Peak memory of a fine-tuning run against the length of its longest record (issue 29, item 5).

The tiny causal LM (tests/helpers.py) trains one step with --max-length 1024 on one record of
8 kB and, in another process, on one of 8 MB (text); each process's peak resident
memory (ru_maxrss) is read. TRL tokenizes a record whole before truncating it: without the cut
(esdtool/training/bounded.py) the 8 MB record took 2.7 GB against 572 MB.

Target, as a ratio in one run: peak with the 8 MB record <= 1.2 x peak with the 8 kB record.

    python benchmarks/bench_long_record.py
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
CHILD = """
import resource, sys
from esdtool import finetune
from esdtool.training import FinetuneSettings
finetune(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4],
         FinetuneSettings(max_steps=1, batch_size=1, max_length=1024), progress=False,
         adapter_report=False)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def _peak(model: Path, plan: Path, data: Path, out: Path) -> int:
    proc = subprocess.run([sys.executable, "-c", CHILD, str(model), str(plan), str(data),
                           str(out)], capture_output=True, text=True)  # fmt: skip
    if proc.returncode:
        raise SystemExit(proc.stderr[-3000:])
    return int(proc.stdout.strip().splitlines()[-1]) * 1024  # kB on Linux


def main() -> int:
    sys.path.insert(0, str(HERE.parent / "tests"))
    from esdtool import allocate, analyze
    from helpers import build_tiny_causal_lm

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = build_tiny_causal_lm(root / "lm")
        analyze(model, root / "m.parquet", progress=False)
        allocate(root / "m.parquet", root / "plan", report=False)
        peaks = {}
        for label, size in (("8 kB", 8 << 10), ("8 MB", 8 << 20)):
            data = root / f"{size}.jsonl"
            words = ("def f(x): return x + 1\n" * (size // 23 + 1))[:size]
            data.write_text(json.dumps({"text": words}) + "\n")
            peaks[label] = _peak(model, root / "plan", data, root / f"run-{size}")
            print(f"{label:>5} record: peak {peaks[label] / 2**20:7.0f} MB")
    ratio = peaks["8 MB"] / peaks["8 kB"]
    print(f"peak, 8 MB record / 8 kB record: {ratio:.2f} (target <= 1.2)")
    return 0 if ratio <= 1.2 else 1


if __name__ == "__main__":
    sys.exit(main())
