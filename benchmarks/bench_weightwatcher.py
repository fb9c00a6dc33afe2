"""esdtool analyze vs WeightWatcher analyze() on all-MiniLM-L6-v2, whole process, one machine.

Prints the wall times (each a fresh interpreter: imports, loading and analysis included), their
ratios, WeightWatcher's own analyze() time, and the largest relative difference between
esdtool's alpha_ks and WeightWatcher's alpha (its default power-law fit) over shared layers.
WeightWatcher runs two ways: on the model directory (it reads the safetensors itself, its
fastest route and the fair peer) and on a transformers model (the way most notebooks call it).

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
import weightwatcher as ww
if sys.argv[3] == "transformers":
    from transformers import AutoModel
    model = AutoModel.from_pretrained(sys.argv[1])
else:
    model = sys.argv[1]  # the directory: WeightWatcher reads its safetensors shards itself
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
        ww = {}
        for route in ("directory", "transformers"):
            seconds, mib, output = run_measured(
                [sys.executable, "-c", WW_SCRIPT, model, str(ww_csv), route], env
            )
            ww[route] = seconds, mib, json.loads(output.strip().splitlines()[-1])

        from esdtool import load_metrics

        ours = load_metrics(out)
        ours = ours[ours.status == "ok"].set_index("module").alpha_ks
        theirs = pd.read_csv(ww_csv).set_index("longname").alpha
        shared = ours.index.intersection(theirs.index)
        rel = ((ours[shared] - theirs[shared]).abs() / theirs[shared]).sort_values()

    print("all-MiniLM-L6-v2, whole process (imports + load + analysis), this machine")
    print(f"{'':34}{'wall time (s)':>14}{'peak RSS (MiB)':>16}{'time ratio':>12}")
    print(f"{'esdtool analyze DIR':34}{esd_s:14.2f}{esd_mb:16.0f}{'1.0x':>12}")
    for route, (seconds, mib, inner) in ww.items():
        label = f"WeightWatcher ({route})"
        print(f"{label:34}{seconds:14.2f}{mib:16.0f}{seconds / esd_s:11.1f}x")
        print(f"{'  of which analyze()':34}{inner['analyze_seconds']:14.2f}")
    print(
        f"alpha_ks vs WW alpha over {len(shared)} shared layers: "
        f"max rel diff {rel.max():.2e} ({rel.index[-1]}), median {rel.median():.2e}"
    )


if __name__ == "__main__":
    main()
