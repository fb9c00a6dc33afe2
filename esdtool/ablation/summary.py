"""From the runs' results to the ablation's answer: ``runs.csv`` (one row per run),
``summary.csv`` (per arm its learning rate chosen on the eval data, its mean and 95% t interval
over seeds, and its paired difference to uniform) and the verdicts.

The learning rate of each arm is the one with the lowest mean eval loss over its seeds (runs
that failed are left out, and counted). The arm's final numbers are measured at that rate on
the test data when there is some, else on the eval data, which then chose the rate too (an
optimistic number: the page says so). A paired difference pairs the arm's run and uniform's of
the same seed (same adapter initialisation and data order), each at its own chosen rate.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass
from typing import Any

from esdtool.ablation.stats import Interval, t_interval, verdict
from esdtool.untrusted import spreadsheet_cell

RUN_COLUMNS = (
    "arm", "lr", "seed", "status", "reason", "eval_loss", "test_loss", "final_train_loss",
    "steps", "trainable_params", "train_seconds", "tokens_per_second", "peak_memory_bytes",
    "adapter_bytes", "planned_rank", "used_rank", "eval_exact_match", "test_exact_match",
    "forgetting",
)  # fmt: skip


def run_rows(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One flat row per result, in :data:`RUN_COLUMNS`."""
    rows = []
    for data in results:
        mine, train = data["esdtool"], data.get("train_info", {})
        rank_use = mine.get("rank_use") or [None, None, None]
        rows.append({
            "arm": mine["arm"], "lr": mine["lr"], "seed": mine["seed"],
            "status": mine["status"], "reason": mine.get("reason"),
            "eval_loss": mine.get("eval_loss"), "test_loss": mine.get("test_loss"),
            "final_train_loss": mine.get("final_train_loss"), "steps": mine.get("steps"),
            "trainable_params": train.get("num_trainable_params"),
            "train_seconds": train.get("train_time"),
            "tokens_per_second": train.get("tokens_per_second"),
            "peak_memory_bytes": train.get("accelerator_memory_max") or train.get("peak_rss_bytes"),
            "adapter_bytes": train.get("file_size"),
            "planned_rank": rank_use[1], "used_rank": rank_use[2],
            "eval_exact_match": mine.get("eval_exact_match"),
            "test_exact_match": mine.get("test_exact_match"),
            "forgetting": mine.get("forgetting"),
        })  # fmt: skip
    rows.sort(key=lambda r: (str(r["arm"]), float(r["lr"]), int(r["seed"])))
    return rows


def to_csv(rows: list[dict[str, Any]], columns: tuple[str, ...]) -> str:
    """``rows`` as CSV text, every cell spreadsheet-safe (untrusted.spreadsheet_cell)."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: spreadsheet_cell(row.get(k)) for k in columns})
    return out.getvalue()


@dataclass(frozen=True)
class ArmSummary:
    """One arm's answer: its chosen learning rate, the final metric over seeds at that rate,
    the paired difference to uniform (None for uniform itself), and the runs behind it."""

    arm: str
    lr: float | None
    eval_by_lr: dict[float, Interval]
    final: Interval
    diff: Interval | None
    verdict: str
    failed: int
    runs: int


SUMMARY_COLUMNS = (
    "arm", "chosen_lr", "metric", "n", "mean", "ci_low", "ci_high", "diff_to_uniform",
    "diff_ci_low", "diff_ci_high", "diff_n", "verdict", "failed_runs", "runs",
)  # fmt: skip


def summarise(
    rows: list[dict[str, Any]], arms: tuple[str, ...], has_test: bool, metric: str = "loss"
) -> list[ArmSummary]:
    """Per arm (in ``arms``' order) its :class:`ArmSummary` from the runs' ``rows``: the rate
    with the best mean eval ``metric`` (lowest loss, highest exact match), and the final
    ``metric`` on test (else eval) at that rate."""
    key = "loss" if metric == "loss" else "exact_match"
    sign = 1.0 if metric == "loss" else -1.0  # what "best" means: lowest loss, highest match
    final_key = f"{'test' if has_test else 'eval'}_{key}"
    ok = [r for r in rows if r["status"] == "ok" and _finite(r.get(f"eval_{key}"))]
    chosen: dict[str, float | None] = {}
    by_lr: dict[str, dict[float, Interval]] = {}
    for arm in arms:
        mine = [r for r in ok if r["arm"] == arm]
        lrs = sorted({float(r["lr"]) for r in mine})
        by_lr[arm] = {lr: t_interval([r[f"eval_{key}"] for r in mine if r["lr"] == lr])
                      for lr in lrs}  # fmt: skip
        chosen[arm] = min(lrs, key=lambda lr: (sign * by_lr[arm][lr].mean, lr)) if lrs else None

    def final_values(arm: str) -> dict[int, float]:
        lr = chosen[arm]
        return {
            int(r["seed"]): float(r[final_key])
            for r in ok
            if r["arm"] == arm
            and lr is not None
            and float(r["lr"]) == lr
            and _finite(r.get(final_key))
        }

    reference = final_values("uniform") if "uniform" in arms else {}
    summaries = []
    for arm in arms:
        values = final_values(arm)
        final = t_interval(list(values.values()))
        diff = None
        text = f"{arm}: the reference every arm is paired with"
        if arm != "uniform":
            seeds = sorted(set(values) & set(reference))
            diff = t_interval([values[s] - reference[s] for s in seeds])
            text = verdict(arm, diff, final_key.replace("_", " "),
                           lower_is_better=metric == "loss")  # fmt: skip
        summaries.append(ArmSummary(
            arm, chosen[arm], by_lr[arm], final, diff, text,
            failed=sum(r["arm"] == arm and r["status"] != "ok" for r in rows),
            runs=sum(r["arm"] == arm for r in rows),
        ))  # fmt: skip
    return summaries


def summary_rows(
    summaries: list[ArmSummary], has_test: bool, metric: str = "loss"
) -> list[dict[str, Any]]:
    """The rows of summary.csv."""
    key = "loss" if metric == "loss" else "exact_match"
    name = f"{'test' if has_test else 'eval'}_{key}"
    rows = []
    for s in summaries:
        rows.append({
            "arm": s.arm, "chosen_lr": s.lr, "metric": name, "n": s.final.n,
            "mean": s.final.mean, "ci_low": s.final.low, "ci_high": s.final.high,
            "diff_to_uniform": s.diff.mean if s.diff else None,
            "diff_ci_low": s.diff.low if s.diff else None,
            "diff_ci_high": s.diff.high if s.diff else None,
            "diff_n": s.diff.n if s.diff else None, "verdict": s.verdict,
            "failed_runs": s.failed, "runs": s.runs,
        })  # fmt: skip
    return rows


def _finite(value: object) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)
