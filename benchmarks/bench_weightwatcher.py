"""esdtool analyze vs WeightWatcher analyze() on all-MiniLM-L6-v2, whole process, one machine.

Prints the wall times (each a fresh interpreter: imports, loading and analysis included), their
ratios, WeightWatcher's own analyze() time, and the largest relative difference between
esdtool's alpha_ks and WeightWatcher's alpha (its default power-law fit) over shared layers.
WeightWatcher runs two ways: on the model directory (it reads the safetensors itself, its
fastest route and the fair peer) and on a transformers model (the way most notebooks call it).

    python benchmarks/bench_weightwatcher.py          # needs: pip install weightwatcher

Then the same on a synthetic Llama-shaped checkpoint (random bf16 weights, the 2048-wide shapes of
bench_floor.py; --layers N), where the eigensolver and the fits dominate instead of imports.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).parent))
from _common import HIDDEN, INTERMEDIATE, VOCAB, generate_checkpoint, minilm_dir, run_measured

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


def compare(model: str, routes: tuple[str, ...], tmp: Path) -> None:
    """Time esdtool and WeightWatcher (each route) on ``model``; print the table and how far
    alpha_ks is from WeightWatcher's alpha."""
    out, ww_csv = tmp / "m.parquet", tmp / "ww.csv"
    env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    esd_s, esd_mb, summary = run_measured(
        [sys.executable, "-m", "esdtool", "analyze", model, "-o", str(out), "--json"], env
    )
    ww = {}
    for route in routes:
        seconds, mib, output = run_measured(
            [sys.executable, "-c", WW_SCRIPT, model, str(ww_csv), route], env
        )
        ww[route] = seconds, mib, json.loads(output.strip().splitlines()[-1])

    # pandas reads the table: importing esdtool (and torch) here would inflate the next
    # children's peak RSS, which counts this process's size at fork time
    ours = pd.read_parquet(out, columns=["module", "status", "alpha_ks"])
    ours = ours[ours.status == "ok"].set_index("module").alpha_ks
    theirs = pd.read_csv(ww_csv).set_index("longname").alpha
    shared = ours.index.intersection(theirs.index)
    rel = ((ours[shared] - theirs[shared]).abs() / theirs[shared]).sort_values()

    print(f"{'':34}{'wall time (s)':>14}{'peak RSS (MiB)':>16}{'time ratio':>12}")
    print(f"{'esdtool analyze DIR':34}{esd_s:14.2f}{esd_mb:16.0f}{'1.0x':>12}")
    print(f"{'  of which the analysis':34}{json.loads(summary)['seconds']:14.2f}")
    for route, (seconds, mib, inner) in ww.items():
        label = f"WeightWatcher ({route})"
        print(f"{label:34}{seconds:14.2f}{mib:16.0f}{seconds / esd_s:11.1f}x")
        print(f"{'  of which analyze()':34}{inner['analyze_seconds']:14.2f}")
    print(
        f"alpha_ks vs WW alpha over {len(shared)} shared layers: "
        f"max rel diff {rel.max():.2e} ({rel.index[-1]}), median {rel.median():.2e}\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--layers", type=int, default=1,
        help="layers of the synthetic Llama-shaped checkpoint (1 = 0.36 GB; 0 skips it)",
    )  # fmt: skip
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        print("all-MiniLM-L6-v2 (22M parameters), whole process, this machine")
        compare(minilm_dir(), ("directory", "transformers"), Path(tmp))
        if args.layers:
            directory = Path(tmp) / "llama"
            directory.mkdir()
            size = generate_checkpoint(directory, args.layers)
            print(f"synthetic Llama shapes (hidden {HIDDEN}, MLP {INTERMEDIATE}, vocabulary "
                  f"{VOCAB}, {args.layers} layer(s), bf16, {size / 2**30:.2f} GiB)")  # fmt: skip
            compare(str(directory), ("directory",), Path(tmp))


if __name__ == "__main__":
    main()
