"""An ablation's design: the arms at one budget, each counted by PEFT on the model, every input
checked at once, and the record (``ablation.json``) that makes a re-run or another shard the same
ablation: its settings, its arms and what its files held."""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from esdtool.ablation.arms import Arm, budget_of, build_arms, check_budget, lora_ar_arm, peft_params
from esdtool.ablation.settings import AblateSettings
from esdtool.errors import EsdtoolError, OptionError, OutputError
from esdtool.io.atomic import atomic_write
from esdtool.io.table_read import load_metrics
from esdtool.plan.peft_config import CONFIG_NAME, lora_config_dict, write_plan_files
from esdtool.plan.ranks import AllocateSettings
from esdtool.plan.verify import build_meta_model, linear_modules, read_plan
from esdtool.version import __version__

DESIGN = "ablation.json"
LORA_AR_TABLE = "lora-ar-metrics.parquet"


def read_design(root: Path) -> dict[str, Any]:
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


def build_design(
    model: str | os.PathLike[str],
    table: Any,
    paths: dict[str, str],
    settings: AblateSettings,
    allocate_settings: AllocateSettings,
    revision: str | None,
    root: Path,
) -> tuple[list[Arm], int, Path, int]:
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
    return counted, budget, prepared.model_dir, len(prepared.train)


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

    try:
        count = peft_params(meta, config)
    except EsdtoolError as exc:
        problems.append(f"arm {arm.name}: {exc}")
        return arm
    return replace(arm, peft_params=count, params=arm.params or count)


def write_arms(root: Path, arms: list[Arm], allocate_settings: AllocateSettings) -> None:
    """Each arm's plan under arms/<name>/ (a given plan directory: its adapter_config.json).
    Every file is written atomically and only when its content differs: the shards of a Slurm
    array start together and write the same plans, while others may be reading them."""
    for arm in arms:
        directory = root / "arms" / arm.name
        if arm.allocation is not None:
            record = {"arm": arm.name, "how": arm.how, "trainable_params": arm.peft_params,
                      # the arm's own (a shape-fair variant's differ from the design's)
                      "allocate_settings": asdict(arm.allocation.settings)}  # fmt: skip
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


def design_record(
    model: object, metrics: object, paths: dict[str, str], settings: AblateSettings,
    allocate_settings: AllocateSettings, arms: list[Arm], budget: int,
) -> dict[str, Any]:  # fmt: skip
    return {
        "esdtool_version": __version__,
        "inputs": {"model": os.fspath(model), "metrics": str(absolute(metrics)), **paths},
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


def check_same_design(root: Path, design: dict[str, Any]) -> None:
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


def absolute(path: str | os.PathLike[str] | object) -> str:
    text = os.fspath(path)  # type: ignore[arg-type]
    return str(Path(text).resolve()) if Path(text).exists() else text
