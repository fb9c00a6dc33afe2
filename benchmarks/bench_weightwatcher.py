"""esdtool analyze vs WeightWatcher analyze() on all-MiniLM-L6-v2, whole process, one machine.

Prints both wall times (each a fresh interpreter: imports, loading and analysis included),
their ratio, WeightWatcher's own analyze() time, and the largest relative difference between
esdtool's alpha_ks and WeightWatcher's alpha (its default power-law fit) over shared layers.

    python benchmarks/bench_weightwatcher.py          # needs: pip install weightwatcher
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).parent))
from _common import minilm_dir, run_measured

WW_SCRIPT = r"""
import json, sys, time, warnings, logging
warnings.filterwarnings("ignore"); logging.disable(logging.WARNING)
from transformers import AutoModel
import weightwatcher as ww
model = AutoModel.from_pretrained(sys.argv[1])
t = time.perf_counter()
details = ww.WeightWatcher(model=model).analyze()
seconds = time.perf_counter() - t
details[["longname", "alpha"]].to_csv(sys.argv[2], index=False)
print(json.dumps({"analyze_seconds": seconds}))
"""


def main() -> None:
    model = minilm_dir()
    with tempfile.TemporaryDirectory() as tmp:
        out, ww_csv = Path(tmp) / "m.parquet", Path(tmp) / "ww.csv"
        env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
        esd_s, esd_mb, _ = run_measured(
            [sys.executable, "-m", "esdtool", "analyze", model, "-o", str(out), "--quiet"], env
        )
        ww_s, ww_mb, ww_out = run_measured(
            [sys.executable, "-c", WW_SCRIPT, model, str(ww_csv)], env
        )
        ww_analyze = json.loads(ww_out.strip().splitlines()[-1])["analyze_seconds"]

        from esdtool import load_metrics

        ours = load_metrics(out)
        ours = ours[ours.status == "ok"].set_index("module").alpha_ks
        theirs = pd.read_csv(ww_csv).set_index("longname").alpha
        shared = ours.index.intersection(theirs.index)
        rel = ((ours[shared] - theirs[shared]).abs() / theirs[shared]).sort_values()

    print("all-MiniLM-L6-v2, whole process (imports + load + analysis), this machine")
    print(f"{'':24}{'esdtool':>12}{'WeightWatcher':>16}{'ratio':>10}")
    print(f"{'wall time (s)':24}{esd_s:12.2f}{ww_s:16.2f}{ww_s / esd_s:9.1f}x")
    print(f"{'peak RSS (MiB)':24}{esd_mb:12.0f}{ww_mb:16.0f}{ww_mb / esd_mb:9.1f}x")
    print(f"WeightWatcher analyze() alone: {ww_analyze:.2f} s")
    print(
        f"alpha_ks vs WW alpha over {len(shared)} shared layers: "
        f"max rel diff {rel.max():.2e} ({rel.index[-1]}), median {rel.median():.2e}"
    )


if __name__ == "__main__":
    main()
