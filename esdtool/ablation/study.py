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
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from esdtool.ablation.arms import (
    Arm,
    budget_of,
    build_arms,
    check_budget,
    lora_ar_arm,
    peft_params,
)
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
from esdtool.errors import EsdtoolError, OptionError, OutputError, listed
from esdtool.io.atomic import atomic_write, check_output_dir
from esdtool.io.table import load_metrics
from esdtool.plan.peft_config import CONFIG_NAME, lora_config_dict, write_plan_files
from esdtool.plan.ranks import AllocateSettings
from esdtool.plan.verify import build_meta_model, linear_modules, read_plan
from esdtool.version import __version__

DESIGN = "ablation.json"
LORA_AR_TABLE = "lora-ar-metrics.parquet"
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
    """

    output_dir: Path
    arms: list[Arm]
    budget: int
    runs: list[Run]
    ran: list[Run] = field(default_factory=list)
    skipped: list[Run] = field(default_factory=list)
    summaries: list[ArmSummary] = field(default_factory=list)
    dry_run: bool = False
    estimate_seconds: float | None = None
    page: str | None = None

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
            "estimate_seconds": self.estimate_seconds,
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
    revision: str | None = None,
    progress: GridProgress | None = None,
) -> AblateResult:
    """Run (this shard of) the ablation of ``settings`` on ``model`` and summarise every
    finished run; see the module docstring. ``metrics`` is the model's esdtool table (the esd
    arm's plan comes from it, with ``allocate_settings``). Runs already finished under
    ``output_dir`` are kept; failed ones are run again only with ``retry_failed``."""
    settings = settings or AblateSettings()
    allocate_settings = allocate_settings or AllocateSettings()
    root = Path(output_dir)
    check_output_dir(root, [Path(metrics)])
    _check_ours(root)
    given = (("data", data), ("eval_data", eval_data), ("test_data", test_data),
             ("forgetting_data", forgetting_data))  # fmt: skip
    paths = {k: _absolute(v) for k, v in given if v is not None}
    table = load_metrics(metrics)
    arms, budget, model_dir = _design(model, table, paths, settings, allocate_settings, revision,
                                      root)  # fmt: skip
    design = _design_record(model, metrics, paths, settings, allocate_settings, arms, budget)
    _check_same_design(root, design)

    runs = grid(settings.arm_names, settings.grid_lrs, settings.seed_list)
    mine = shard(runs, *shard_index)
    done = {r: read_result(r.result_path(root)) for r in mine}
    pending = [r for r in mine if done[r] is None or (retry_failed and _failed(done[r]))]
    skipped = [r for r in mine if r not in pending]
    estimate = _estimate(root, runs, len(pending))
    if dry_run:
        return AblateResult(root, arms, budget, runs, skipped=skipped, dry_run=True,
                            estimate_seconds=estimate)  # fmt: skip

    root.mkdir(parents=True, exist_ok=True)
    text = json.dumps(design, indent=2, default=str) + "\n"
    atomic_write(root / DESIGN, lambda tmp: tmp.write_text(text))  # first: it marks root ours
    _write_arms(root, arms, allocate_settings)
    common = {
        "model": str(model) if not Path(model).exists() else str(_absolute(model)),
        "revision": revision, "data": paths["data"], "eval_data": paths["eval_data"],
        "test_data": paths.get("test_data"), "forgetting_data": paths.get("forgetting_data"),
        "metric": settings.metric, "answer_regex": settings.answer_regex,
        "max_new_tokens": settings.max_new_tokens,
        "finetune": _finetune_dict(settings), "meta_info": _meta_info(model_dir),
        "code": code_fingerprint(),
    }  # fmt: skip
    if progress:
        progress.start(len(runs), len(pending))
    ran = _run_all(pending, root, common, settings, progress)
    summary = summarize(root)
    return AblateResult(root, arms, budget, runs, ran, skipped, summary.summaries,
                        estimate_seconds=estimate, page=summary.page)  # fmt: skip


def _read_design(root: Path) -> dict[str, Any]:
    """ablation.json, checked for what summarize reads (a hand-edited or truncated file is one
    line, not a KeyError)."""
    where = root / DESIGN
    try:
        design = json.loads(where.read_text())
        settings = design["settings"]
        ok = (
            isinstance(settings["arms"], list) and isinstance(settings["plans"], dict)
            and isinstance(settings["lrs"], list) and type(settings["seeds"]) is int
            and all(isinstance(a, str) for a in [*settings["arms"], *settings["plans"]])
            and all(isinstance(x, int | float) for x in settings["lrs"])
            and isinstance(design["inputs"], dict) and isinstance(design["arms"], dict)
            and isinstance(design["budget"], int)
        )  # fmt: skip
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as exc:
        raise OptionError(
            f"{root}: no ablation here ({DESIGN} cannot be read: {exc})",
            hint="pass the -o directory of an esdtool ablate run",
        ) from exc
    if not ok:
        raise OptionError(f"{where}: not an ablation design esdtool wrote (fields of other types)")
    return design


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
    design = _read_design(root)
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


def _design(
    model: str | os.PathLike[str],
    table: Any,
    paths: dict[str, str],
    settings: AblateSettings,
    allocate_settings: AllocateSettings,
    revision: str | None,
    root: Path,
) -> tuple[list[Arm], int, Path]:
    """Every arm at the budget, each counted by PEFT on the model, and every input checked
    (the options, the model, the data, each arm): every problem in one error."""
    from esdtool.plan.ranks import candidates
    from esdtool.training.config import prepare

    if (table.attrs.get("esdtool") or {}).get("adapter"):
        raise OptionError("--metrics: the table of a trained adapter; ablate takes the base "
                          "model's table (esdtool analyze MODEL)")  # fmt: skip
    cands, _ = candidates(table, allocate_settings)
    if cands.empty:
        raise OptionError("--metrics: no candidate module (no analysed linear layer)")
    budget = budget_of(cands, settings.budget_rank, settings.budget_params)
    arms = build_arms(table, list(settings.arms), allocate_settings, budget, settings.arm_seed)
    problems: list[str] = []
    with tempfile.TemporaryDirectory(prefix="esdtool-ablate-") as scratch:
        uniform = Path(scratch) / "plan"
        uniform.mkdir()
        write_plan_files(arms[0].allocation, uniform, {}, task_type="CAUSAL_LM")  # type: ignore[arg-type]
        prepared = prepare(
            model, uniform, paths["data"], Path(scratch) / "run", settings.finetune,
            eval_data=paths["eval_data"], test_data=paths.get("test_data"), revision=revision,
        )  # fmt: skip
    problems += _check_scored_data(settings, paths)
    meta = build_meta_model(prepared.model_dir)
    if "lora-ar" in settings.arms:
        try:
            preset_table = _lora_ar_table(table, model, root, revision)
            arms.append(lora_ar_arm(preset_table, linear_modules(meta), budget))
        except EsdtoolError as exc:
            problems.append(f"arm lora-ar: {exc}")
    counted = []
    for arm in arms:
        # counted as planned: EVA's redistribution happens in each run, on its data
        config = lora_config_dict(arm.allocation, task_type="CAUSAL_LM")  # type: ignore[arg-type]
        counted.append(_counted(arm, meta, config, problems))
    for name, plan in settings.plans.items():
        try:
            config = read_plan(plan)[0]
        except EsdtoolError as exc:
            problems.append(f"arm {name}: {exc}")
            continue
        counted.append(_counted(Arm(name, None, f"the plan in {plan}", 0, plan_dir=plan), meta,
                                config, problems))  # fmt: skip
    for arm in counted:
        why = check_budget(arm, budget) if arm.peft_params is not None else None
        if why:
            problems.append(why)
    if problems:
        raise OptionError(f"{len(problems)} problem(s): " + "; ".join(problems))
    return counted, budget, prepared.model_dir


def _lora_ar_table(table: Any, model: object, root: Path, revision: str | None) -> Any:
    """The table the lora-ar plan comes from: the given one when it was analysed with
    ``--preset lora-ar``, else the model analysed now with the preset, kept in
    ``root/lora-ar-metrics.parquet`` for the shards and re-runs that follow."""
    from esdtool.analysis import AnalyzeSettings, analyze

    analysed = (table.attrs.get("esdtool") or {}).get("settings") or {}
    if isinstance(analysed, dict) and analysed.get("preset") == "lora-ar":
        return table
    cached = root / LORA_AR_TABLE
    if cached.is_file():  # an earlier call's: used only if it is this model's, with the preset
        found = load_metrics(cached)
        mine, theirs = table.attrs.get("esdtool") or {}, found.attrs.get("esdtool") or {}
        same = all(mine.get(k) == theirs.get(k) for k in ("source", "revision", "source_path"))
        if same and (theirs.get("settings") or {}).get("preset") == "lora-ar":
            return found
    root.mkdir(parents=True, exist_ok=True)
    settings = AnalyzeSettings.from_preset("lora-ar")
    return analyze(model, cached, settings, revision=revision).table  # type: ignore[arg-type]


def _check_scored_data(settings: AblateSettings, paths: dict[str, str]) -> list[str]:
    """Exact match needs prompts and answers in the eval (and test) data; forgetting data must
    load (any format: its text, or prompt and completion)."""
    from esdtool.training.data import load_training_data

    problems = []
    if settings.metric == "exact-match":
        for key in ("eval_data", "test_data"):
            if key in paths and load_training_data(paths[key])[1] == "text":
                problems.append(f"{paths[key]}: --metric exact-match needs records with a "
                                "prompt and an answer (prompt/completion, instruction/output "
                                "or messages), not plain text")  # fmt: skip
    if "forgetting_data" in paths:
        try:
            load_training_data(paths["forgetting_data"])
        except EsdtoolError as exc:
            problems.append(str(exc))
    return problems


def _counted(arm: Arm, meta: Any, config: dict[str, Any], problems: list[str]) -> Arm:
    from dataclasses import replace

    try:
        count = peft_params(meta, config)
    except EsdtoolError as exc:
        problems.append(f"arm {arm.name}: {exc}")
        return arm
    return replace(arm, peft_params=count, params=arm.params or count)


def _write_arms(root: Path, arms: list[Arm], allocate_settings: AllocateSettings) -> None:
    """Each arm's plan under arms/<name>/ (a given plan directory: its adapter_config.json).
    Every file is written atomically and only when its content differs: the shards of a Slurm
    array start together and write the same plans, while others may be reading them."""
    for arm in arms:
        directory = root / "arms" / arm.name
        if arm.allocation is not None:
            record = {"arm": arm.name, "how": arm.how, "trainable_params": arm.peft_params,
                      "allocate_settings": asdict(allocate_settings)}  # fmt: skip
            with tempfile.TemporaryDirectory(prefix=".arm-", dir=root) as scratch:
                write_plan_files(arm.allocation, Path(scratch), record, task_type="CAUSAL_LM")
                files = {p.name: p.read_bytes() for p in Path(scratch).iterdir()}
            if arm.config:  # fields beyond the plan (the eva arm's initialisation)
                config = {**json.loads(files[CONFIG_NAME]), **arm.config}
                files[CONFIG_NAME] = (json.dumps(config, indent=2) + "\n").encode()
        else:
            assert arm.plan_dir is not None
            files = {CONFIG_NAME: (arm.plan_dir / CONFIG_NAME).read_bytes()}
        directory.mkdir(parents=True, exist_ok=True)
        for name, content in files.items():
            target = directory / name
            if not (target.is_file() and target.read_bytes() == content):
                atomic_write(target, lambda tmp, c=content: tmp.write_bytes(c))


def _design_record(
    model: object, metrics: object, paths: dict[str, str], settings: AblateSettings,
    allocate_settings: AllocateSettings, arms: list[Arm], budget: int,
) -> dict[str, Any]:  # fmt: skip
    return {
        "esdtool_version": __version__,
        "inputs": {"model": os.fspath(model), "metrics": str(_absolute(metrics)), **paths},
        # what the files held: a file changed under the same path is another design
        "fingerprints": {
            k: _fingerprint(v)
            for k, v in {"model": os.fspath(model), "metrics": os.fspath(metrics), **paths}.items()
        },
        "settings": settings.to_dict(),
        "allocate_settings": asdict(allocate_settings),
        "budget": budget,
        "arms": {
            a.name: {
                "how": a.how,
                "params": a.params,
                "peft_params": a.peft_params,
                "ranks": a.ranks,
                "plan_dir": str(a.plan_dir) if a.plan_dir else None,
            }
            for a in arms
        },
    }


def _fingerprint(where: str) -> str | None:
    """sha256 of a local file; of a directory, its safetensors and JSON files' names, sizes
    and modification times (a model's gigabytes are not read again); None for a hub id."""
    import hashlib

    path = Path(where)
    digest = hashlib.sha256()
    if path.is_file():
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        return digest.hexdigest()
    if path.is_dir():
        for child in sorted(path.iterdir()):
            if child.suffix in (".safetensors", ".json") and child.is_file():
                stat = child.stat()
                digest.update(f"{child.name}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
        return digest.hexdigest()
    return None


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


def _check_same_design(root: Path, design: dict[str, Any]) -> None:
    """A re-run (or another shard) must be the same ablation: its runs are kept as results."""
    try:
        before = json.loads((root / DESIGN).read_text())
    except FileNotFoundError:
        return
    except (OSError, ValueError) as exc:
        raise OutputError(f"{root / DESIGN}: cannot be read ({exc})") from exc
    keys = ("inputs", "fingerprints", "settings", "allocate_settings", "budget", "arms")
    changed = [k for k in keys if json.loads(json.dumps(design[k], default=str)) != before.get(k)]
    if changed:
        raise OptionError(
            f"{root}: holds an ablation of another design (its {', '.join(changed)} differ); "
            "its finished runs would be mixed with these",
            hint="run the same command to resume it, or give a new -o directory",
        )


def _failed(result: dict[str, Any] | None) -> bool:
    return result is not None and result["esdtool"]["status"] == "failed"


def _estimate(root: Path, runs: list[Run], pending: int) -> float | None:
    """Seconds the pending runs would take at the mean time of the finished ones."""
    times = [
        r["run_info"]["total_time"]
        for r in (read_result(run.result_path(root)) for run in runs)
        if r is not None and r["esdtool"]["status"] == "ok"
    ]
    return pending * sum(times) / len(times) if times else None


def _finetune_dict(settings: AblateSettings) -> dict[str, Any]:
    data = asdict(settings.finetune)
    data["report_to"] = list(settings.finetune.report_to)
    return data


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


def _absolute(path: str | os.PathLike[str] | object) -> str:
    text = os.fspath(path)  # type: ignore[arg-type]
    return str(Path(text).resolve()) if Path(text).exists() else text


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
