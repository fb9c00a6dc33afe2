"""How long a grid's pending runs will take, before they run.

From the finished runs' mean time when there are any; else from a **probe**: the grid's first
run, trained for a few steps in a scratch directory, in its own process exactly as the grid runs
it (start-up, model load, evaluation and scoring included). Its time outside training is taken
as each run's fixed cost; its training time, less the evaluations run during it, per step is
scaled to the steps a run plans, and its evaluation time to the evaluations a run makes (every
--eval-steps, else --save-steps, and at the last step). The first steps carry one-off costs
(allocations, kernel selection), which a long run spreads out: the estimate tends long. An eva
arm's initialisation is counted only when the probe is an eva run.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from esdtool.ablation.grid import Run, execute, read_result

PROBE_STEPS = 3


@dataclass(frozen=True)
class Estimate:
    """seconds: the pending runs' wall time on the grid's devices (None: unknown).
    basis: what it rests on, said in words (or why there is none)."""

    seconds: float | None
    basis: str


def planned_steps(finetune: dict[str, Any], examples: int, world_size: int = 1) -> int:
    """Optimizer steps one run takes, as transformers' Trainer counts them: --max-steps when set,
    else epochs x (batches per process / gradient accumulation, rounded up), rounded up.
    (transformers 4.x rounded the accumulation down: one step per epoch less at most.)"""
    if finetune["max_steps"] > 0:
        return int(finetune["max_steps"])
    per_process = math.ceil(examples / world_size)
    batches = math.ceil(per_process / finetune["batch_size"])
    per_epoch = max(math.ceil(batches / finetune["grad_accum"]), 1)
    return math.ceil(finetune["epochs"] * per_epoch)


def from_finished(root: Path, runs: list[Run], pending: int, slots: int) -> Estimate | None:
    """At the finished runs' mean time (None when no run has finished)."""
    times = [
        r["run_info"]["total_time"]
        for r in (read_result(run.result_path(root)) for run in runs)
        if r is not None and r["esdtool"]["status"] == "ok"
    ]
    if not times:
        return None
    mean = sum(times) / len(times)
    return Estimate(pending * mean / slots, f"the {len(times)} finished runs' mean of {mean:.0f} s")


def probe(
    run: Run,
    common: dict[str, Any],
    write_arms: Callable[[Path], None],
    steps: int,
    planned: int,
    pending: int,
    slots: int,
    *,
    environ: dict[str, str] | None = None,
    nproc: int = 1,
) -> Estimate:
    """Train ``run`` for ``steps`` steps in a scratch directory (``write_arms`` puts the arms'
    plans under the root it is given) and scale it to ``pending`` runs of ``planned`` steps on
    ``slots`` devices at once. Nothing is left behind."""
    steps = min(steps, planned)
    finetune = {**common["finetune"], "max_steps": steps, "warmup_steps": 0, "warmup_ratio": 0.0}
    with tempfile.TemporaryDirectory(prefix="esdtool-probe-") as scratch:
        root = Path(scratch)
        write_arms(root)
        result = execute(run, root, {**common, "finetune": finetune}, environ=environ,
                         nproc=nproc)  # fmt: skip
    block = result["esdtool"]
    if block["status"] != "ok":
        return Estimate(None, f"the probe run ({run.name}, {steps} steps) failed: "
                              f"{block['reason']}")  # fmt: skip
    total = float(result["run_info"]["total_time"])
    info = result["train_info"]
    training = float(info.get("train_time") or 0.0)
    evaluations, eval_time = int(info.get("evaluations") or 0), float(info.get("eval_time") or 0)
    done = max(int(block.get("steps") or steps), 1)
    per_step = max(training - eval_time, 0.0) / done
    per_eval = eval_time / evaluations if evaluations else 0.0
    fixed = max(total - training, 0.0)
    every = finetune.get("eval_steps") or finetune["save_steps"]
    final = 1 if evaluations > done // every else 0  # an evaluation at the last step too
    runs_evals = planned // every + (final if planned % every else 0)
    per_run = fixed + per_step * planned + per_eval * runs_evals
    basis = (f"a probe run of {done} steps: {per_run:.0f} s per run of {planned} steps "
             f"({fixed:.0f} s start-up and final evaluation, {per_step:.2f} s per step, "
             f"{runs_evals} evaluation(s) of {per_eval:.0f} s)")  # fmt: skip
    return Estimate(pending * per_run / slots, basis)
