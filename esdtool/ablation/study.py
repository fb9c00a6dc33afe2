"""``ablate``: does a rank plan beat uniform LoRA at the same cost, on this model and this data?

A validated design, then a short recipe: **arms** are built over the metrics table's candidates
at one budget and counted again by PEFT on the model (every arm within 1%); **every input** is
checked before the first run (the options, each arm's budget, the model, the data files, each
plan against the model); the **grid** (arm x learning rate x seed) runs one process per run,
skipping the runs a previous call finished, so killing and re-running the same command resumes
it, and a shard of it can run on each node of a Slurm array; the **summary** (``summarize``)
reads every finished run, of every shard, into runs.csv, summary.csv and ablation.html.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from esdtool.ablation.arms import (
    Arm,
)
from esdtool.ablation.design import (
    DESIGN,
    LORA_AR_TABLE,
    absolute,
    build_design,
    check_same_design,
    design_record,
    read_design,
    write_arms,
)
from esdtool.ablation.estimate import PROBE_STEPS, Estimate, from_finished, planned_steps, probe
from esdtool.ablation.grid import Run, execute, grid, read_result, shard
from esdtool.ablation.settings import AblateSettings
from esdtool.ablation.summary import (
    RUN_COLUMNS,
    SUMMARY_COLUMNS,
    ArmSummary,
    run_rows,
    summarise,
    summary_rows,
    to_csv,
)
from esdtool.ablation.worker import code_fingerprint
from esdtool.errors import OutputError, listed
from esdtool.io.atomic import atomic_write, check_output_dir
from esdtool.io.table_read import load_metrics
from esdtool.plan.ranks import AllocateSettings

RUNS_CSV, SUMMARY_CSV, PAGE = "runs.csv", "summary.csv", "ablation.html"
_OURS = {DESIGN, RUNS_CSV, SUMMARY_CSV, PAGE, LORA_AR_TABLE, "arms", "runs"}


class GridProgress(Protocol):
    """Receives the grid's progress (the CLI draws a line per run with the ETA from it)."""

    def start(self, total: int, pending: int) -> None: ...

    def finished(self, run: Run, result: dict[str, Any], seconds: float) -> None: ...


@dataclass(frozen=True)
class AblateResult:
    """What an ablation call did and found.

    arms: every arm with its cost (``peft_params``: counted by PEFT on the model).
    budget: the trainable-parameter budget. runs: the grid (every shard's runs).
    ran / skipped: this call's runs that ran, and those a previous call finished.
    summaries: per arm its chosen learning rate, final numbers and verdict (from every
    finished run on disk). page: ablation.html's text (shown inline in a notebook).
    estimate: how long this call's pending runs take (a dry run: from the finished runs, else
    from a probe run).
    """

    output_dir: Path
    arms: list[Arm]
    budget: int
    runs: list[Run]
    ran: list[Run] = field(default_factory=list)
    skipped: list[Run] = field(default_factory=list)
    summaries: list[ArmSummary] = field(default_factory=list)
    dry_run: bool = False
    estimate: Estimate | None = None
    page: str | None = None

    @property
    def estimate_seconds(self) -> float | None:
        """``estimate.seconds`` (None without an estimate)."""
        return self.estimate.seconds if self.estimate else None

    @property
    def table(self) -> Any:
        """summary.csv as a DataFrame."""
        import pandas as pd

        has_test, metric = _has_test(self.output_dir), _metric(self.output_dir)
        return pd.DataFrame(summary_rows(self.summaries, has_test, metric),
                            columns=list(SUMMARY_COLUMNS))  # fmt: skip

    @property
    def warnings(self) -> list[str]:
        """What weakens the answer: arms whose best rate is at the grid's edge."""
        from esdtool.ablation.page import edge_warnings

        return edge_warnings(self.summaries, sorted({r.lr for r in self.runs}))

    def _repr_html_(self) -> str:
        return self.page or ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "output_dir": str(self.output_dir),
            "budget": self.budget,
            "arms": [
                {"arm": a.name, "how": a.how, "params": a.params, "peft_params": a.peft_params}
                for a in self.arms
            ],
            "runs": len(self.runs),
            "ran": [r.name for r in self.ran],
            "skipped": len(self.skipped),
            "dry_run": self.dry_run,
            "estimate_seconds": self.estimate.seconds if self.estimate else None,
            "estimate_basis": self.estimate.basis if self.estimate else None,
            "summary": summary_rows(
                self.summaries, _has_test(self.output_dir), _metric(self.output_dir)
            ),
        }


def ablate(
    model: str | os.PathLike[str],
    metrics: str | os.PathLike[str],
    data: str | os.PathLike[str],
    eval_data: str | os.PathLike[str],
    output_dir: str | os.PathLike[str],
    settings: AblateSettings | None = None,
    *,
    test_data: str | os.PathLike[str] | None = None,
    forgetting_data: str | os.PathLike[str] | None = None,
    allocate_settings: AllocateSettings | None = None,
    shard_index: tuple[int, int] = (1, 1),
    retry_failed: bool = False,
    dry_run: bool = False,
    probe_steps: int = PROBE_STEPS,
    revision: str | None = None,
    progress: GridProgress | None = None,
) -> AblateResult:
    """Run (this shard of) the ablation of ``settings`` on ``model`` and summarise every
    finished run; see the module docstring. ``metrics`` is the model's esdtool table (the esd
    arm's plan comes from it, with ``allocate_settings``). Runs already finished under
    ``output_dir`` are kept; failed ones are run again only with ``retry_failed``. A
    ``dry_run`` checks everything and runs nothing of the grid; it estimates the time from the
    finished runs, else by training the first pending run for ``probe_steps`` steps in a scratch
    directory (0: no probe, no estimate)."""
    settings = settings or AblateSettings()
    allocate_settings = allocate_settings or AllocateSettings()
    root = Path(output_dir)
    check_output_dir(root, [Path(metrics)])
    _check_ours(root)
    given = (("data", data), ("eval_data", eval_data), ("test_data", test_data),
             ("forgetting_data", forgetting_data))  # fmt: skip
    paths = {k: absolute(v) for k, v in given if v is not None}
    table = load_metrics(metrics)
    arms, budget, model_dir, examples = build_design(model, table, paths, settings,
                                                allocate_settings, revision, root)  # fmt: skip
    design = design_record(model, metrics, paths, settings, allocate_settings, arms, budget)
    check_same_design(root, design)

    runs = grid(settings.arm_names, settings.grid_lrs, settings.seed_list)
    mine = shard(runs, *shard_index)
    done = {r: read_result(r.result_path(root)) for r in mine}
    pending = [r for r in mine if done[r] is None or (retry_failed and _failed(done[r]))]
    skipped = [r for r in mine if r not in pending]
    common = {
        "model": str(model) if not Path(model).exists() else str(absolute(model)),
        "revision": revision, "data": paths["data"], "eval_data": paths["eval_data"],
        "test_data": paths.get("test_data"), "forgetting_data": paths.get("forgetting_data"),
        "metric": settings.metric, "answer_regex": settings.answer_regex,
        "max_new_tokens": settings.max_new_tokens,
        "finetune": _finetune_dict(settings), "meta_info": _meta_info(model_dir),
        "code": code_fingerprint(),
    }  # fmt: skip
    if dry_run:
        estimate = None
        if pending:
            estimate = _dry_estimate(root, runs, pending, common, settings, arms,
                                     allocate_settings, examples, probe_steps)  # fmt: skip
        return AblateResult(root, arms, budget, runs, skipped=skipped, dry_run=True,
                            estimate=estimate)  # fmt: skip

    root.mkdir(parents=True, exist_ok=True)
    text = json.dumps(design, indent=2, default=str) + "\n"
    atomic_write(root / DESIGN, lambda tmp: tmp.write_text(text))  # first: it marks root ours
    write_arms(root, arms, allocate_settings)
    if progress:
        progress.start(len(runs), len(pending))
    ran = _run_all(pending, root, common, settings, progress)
    summary = summarize(root)
    return AblateResult(
        root, arms, budget, runs, ran, skipped, summary.summaries, page=summary.page
    )


def _run_all(
    pending: list[Run],
    root: Path,
    common: dict[str, Any],
    settings: AblateSettings,
    progress: GridProgress | None,
) -> list[Run]:
    """The pending runs, one per device group at a time (one at a time without --gpus), in
    the grid's order; a run's failure is its own."""
    import queue
    import threading

    free: queue.Queue[str | None] = queue.Queue()
    for group in settings.device_groups:
        free.put(group)
    lock, ran, running = threading.Lock(), [], set()

    def one(run: Run) -> None:
        group = free.get()
        try:
            started = time.perf_counter()
            environ = {"CUDA_VISIBLE_DEVICES": group} if group is not None else None
            result = execute(run, root, common, environ=environ, nproc=settings.nproc_per_run,
                             started=running.add)  # fmt: skip
            with lock:
                ran.append(run)
                if progress:
                    progress.finished(run, result, time.perf_counter() - started)
        finally:
            free.put(group)

    slots = len(settings.device_groups)
    if slots == 1:
        for run in pending:
            one(run)
        return ran
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(max_workers=slots)
    futures = [pool.submit(one, run) for run in pending]
    try:
        for future in futures:
            future.result()
    except BaseException:  # Ctrl-C or SIGTERM reach this thread only: stop every run's process
        for future in futures:
            future.cancel()
        for process in list(running):
            if process.poll() is None:
                process.terminate()
        raise
    finally:
        pool.shutdown(wait=True)
    return ran


def summarize(output_dir: str | os.PathLike[str]) -> AblateResult:
    """runs.csv, summary.csv and ablation.html of ``output_dir`` from every finished run on
    disk (every shard's), without running anything."""
    from esdtool.ablation.page import render

    root = Path(output_dir)
    design = read_design(root)
    arms_order = tuple(design["settings"]["arms"]) + tuple(design["settings"]["plans"])
    lrs, seeds = design["settings"]["lrs"], range(1, design["settings"]["seeds"] + 1)
    runs = grid(arms_order, tuple(lrs), tuple(seeds))
    results = [r for r in (read_result(run.result_path(root)) for run in runs) if r is not None]
    rows = run_rows(results)
    has_test = design["inputs"].get("test_data") is not None
    metric = design["settings"].get("metric", "loss")
    summaries = summarise(rows, arms_order, has_test, metric)
    atomic_write(root / RUNS_CSV, lambda tmp: tmp.write_text(to_csv(rows, RUN_COLUMNS)))
    text = to_csv(summary_rows(summaries, has_test, metric), SUMMARY_COLUMNS)
    atomic_write(root / SUMMARY_CSV, lambda tmp: tmp.write_text(text))
    page = render(design, rows, summaries, total_runs=len(runs))
    atomic_write(root / PAGE, lambda tmp: tmp.write_text(page, encoding="utf-8"))
    arms = [Arm(name, None, info["how"], info["params"], info["peft_params"])
            for name, info in design["arms"].items()]  # fmt: skip
    return AblateResult(root, arms, design["budget"], runs, summaries=summaries, page=page)


def _check_ours(root: Path) -> None:
    """``root`` is new, empty, or an earlier ablation's (nothing else is written among)."""
    if not root.is_dir():
        return
    names = sorted(p.name for p in root.iterdir())
    foreign = [n for n in names if n not in _OURS]
    if foreign or (names and DESIGN not in names and set(names) != {LORA_AR_TABLE}):
        raise OutputError(
            f"{root}: holds files an ablation did not write ({listed(foreign or names, 3)})",
            hint="give ablate a new or empty -o directory",
        )


def _failed(result: dict[str, Any] | None) -> bool:
    return result is not None and result["esdtool"]["status"] == "failed"


def _dry_estimate(
    root: Path, runs: list[Run], pending: list[Run], common: dict[str, Any],
    settings: AblateSettings, arms: list[Arm], allocate_settings: AllocateSettings,
    examples: int, probe_steps: int,
) -> Estimate | None:  # fmt: skip
    """From the finished runs, else from a probe of the first pending run (on the first device
    group, as the grid would run it)."""
    slots = len(settings.device_groups)
    found = from_finished(root, runs, len(pending), slots)
    if found is not None or probe_steps <= 0:
        return found
    planned = planned_steps(common["finetune"], examples, settings.nproc_per_run)
    group = settings.device_groups[0]
    return probe(
        pending[0], common, lambda scratch: write_arms(scratch, arms, allocate_settings),
        probe_steps, planned, len(pending), slots,
        environ={"CUDA_VISIBLE_DEVICES": group} if group is not None else None,
        nproc=settings.nproc_per_run,
    )  # fmt: skip


def _finetune_dict(settings: AblateSettings) -> dict[str, Any]:
    """The runs' shared finetune settings (each run's spec sets its own rate and seed)."""
    return settings.to_dict()["finetune"]


def _meta_info(model_dir: Path) -> dict[str, Any]:
    """Package versions and the model's commit (a hub snapshot's folder name), as PEFT's
    method-comparison results carry them."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    packages = {}
    for name in ("esdtool", "torch", "transformers", "peft", "trl", "datasets", "accelerate"):
        try:
            packages[f"{name}-version"] = version(name)
        except PackageNotFoundError:
            packages[f"{name}-version"] = None
    commit = model_dir.name if model_dir.parent.name == "snapshots" else None
    return {
        "model_info": {"sha": commit, "path": str(model_dir)},
        "package_info": packages,
        "system_info": {
            "system": platform.system(),
            "machine": platform.machine(),
            "python": platform.python_version(),
        },
    }


def _metric(root: Path) -> str:
    try:
        return str(json.loads((root / DESIGN).read_text())["settings"].get("metric", "loss"))
    except (OSError, ValueError, KeyError):
        return "loss"


def _has_test(root: Path) -> bool:
    try:
        return json.loads((root / DESIGN).read_text())["inputs"].get("test_data") is not None
    except (OSError, ValueError, KeyError):
        return False
