"""`allocate`: a metrics table in, a PEFT LoRA plan directory out, written whole (CLI twin)."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import pandas as pd

from esdtool.adapters.serving import ServingCheck, config_serving
from esdtool.analysis.settings import PRESETS as ANALYSIS_PRESETS
from esdtool.errors import EsdtoolError, OptionError
from esdtool.extras import require
from esdtool.io.atomic import atomic_dir, check_output_dir
from esdtool.io.source import resolve_source
from esdtool.io.table_read import check_frame, load_metrics
from esdtool.plan.layerwise import ModulePlan
from esdtool.plan.module_plan import TARGET_FILES, plan_modules, write_module_plan
from esdtool.plan.peft_config import (
    CONFIG_NAME,
    CSV_NAME,
    PLAN_FILES,
    PLAN_RECORD,
    REPORT_NAME,
    check_peft_options,
    lora_config_dict,
    write_plan_files,
)
from esdtool.plan.ranks import PRESETS as ALLOCATION_PRESETS
from esdtool.plan.ranks import AllocateSettings, Allocation, allocate_ranks
from esdtool.plan.verify import build_meta_model, linear_modules, raise_problems, verify_plan
from esdtool.render import MAX_PLOTS
from esdtool.render.page import check_options as check_report_options
from esdtool.render.page import render
from esdtool.version import __version__


@dataclass(frozen=True)
class AllocateResult:
    """The plan, and where it was written (None when nothing was).

    allocation:  every candidate's score, selection and rank (:class:`Allocation`); None for
                 the other targets, whose plan is ``modules``.
    modules:     the pruning / lr / weight-decay plan (:class:`ModulePlan`: one number per
                 module); None for a LoRA plan. ``files``: the plan files written
                 (sparsity.json, lr_factors.json, ...; ``config`` is None for these targets).
    lora_config: the adapter_config.json content; ``rank_pattern`` / ``alpha_pattern`` are its
                 per-module ranks and alphas, ``to_lora_config()`` PEFT's ``LoraConfig``.
    serving:     the ``--max-lora-rank`` a vLLM server needs to load the trained adapter
                 (:class:`~esdtool.adapters.serving.ServingCheck`; ``fits`` False: none can).
    """

    allocation: Allocation | None
    config: Path | None
    csv: Path | None
    report: Path | None = None
    lora_config: dict[str, Any] = field(default_factory=dict, repr=False)
    _save: Callable[[Path], AllocateResult] | None = field(default=None, repr=False, compare=False)
    modules: ModulePlan | None = None
    files: tuple[Path, ...] = ()

    @property
    def rank_pattern(self) -> dict[str, int]:
        return dict(self.lora_config.get("rank_pattern", {}))

    @property
    def alpha_pattern(self) -> dict[str, float]:
        return dict(self.lora_config.get("alpha_pattern", {}))

    @property
    def serving(self) -> ServingCheck:
        return config_serving(self.lora_config)

    def to_lora_config(self) -> Any:
        """The plan as PEFT's own ``LoraConfig``, for ``get_peft_model(model, config)``."""
        peft = require("a LoraConfig", "peft")["peft"]
        known = {f.name for f in fields(peft.LoraConfig)}
        return peft.LoraConfig(**{k: v for k, v in self.lora_config.items() if k in known})

    def save(self, outdir: str | os.PathLike[str]) -> AllocateResult:
        """Write the plan directory (adapter_config.json, allocation.csv, esdtool_plan.json,
        report.html) to ``outdir``, as :func:`allocate` with ``outdir`` does."""
        assert self._save is not None
        return self._save(Path(outdir))

    def summary(self) -> dict[str, object]:
        """Modules adapted, rank histogram, trainable parameters vs uniform LoRA; for the other
        targets, the range of the plan's numbers."""
        if self.modules is not None:
            return self._module_summary(self.modules)
        assert self.allocation is not None
        kept = self.allocation.kept
        return {
            "config": str(self.config) if self.config else None,
            "csv": str(self.csv) if self.csv else None,
            "report": str(self.report) if self.report else None,
            "candidates": len(self.allocation.table),
            "adapted": len(kept),
            "rank_min": int(kept["rank"].min()),
            "rank_max": int(kept["rank"].max()),
            "rank_histogram": {
                int(r): int(n) for r, n in kept["rank"].value_counts().sort_index().items()
            },
            "trainable_params": self.allocation.total_params,
            "equal_cost_rank": round(self.allocation.equal_cost_rank, 2),
            "budget_params": self.allocation.budget,
            "notes": list(self.allocation.notes),
            "serving": self.serving.record(),
            "shape": self.allocation.shape.to_dict(),
        }

    def _module_summary(self, plan: ModulePlan) -> dict[str, object]:
        values = plan.table[plan.column]
        summary: dict[str, object] = {
            "target": plan.target,
            "csv": str(self.csv) if self.csv else None,
            "report": str(self.report) if self.report else None,
            "files": [str(f) for f in self.files],
            "modules": len(plan.table),
            "model_order": plan.model_order,
            f"{plan.column}_min": float(values.min()),
            f"{plan.column}_max": float(values.max()),
            "notes": list(plan.notes),
        }
        if plan.target == "pruning":
            summary["sparsity_weighted_mean"] = plan.mean_sparsity
        return summary


def allocate(
    metrics: str | os.PathLike[str] | pd.DataFrame,
    outdir: str | os.PathLike[str] | None = None,
    settings: AllocateSettings | None = None,
    *,
    target: str | None = None,
    task_type: str | None = "CAUSAL_LM",
    lora_dropout: float = 0.05,
    use_rslora: bool = False,
    use_dora: bool = False,
    verify: bool = False,
    report: bool = True,
    max_plots: int = MAX_PLOTS,
) -> AllocateResult:
    """Plan ranks from ``metrics`` (an esdtool table: a parquet path, or the DataFrame
    ``analyze(...).table`` or ``load_metrics`` gives) and, when ``outdir`` is given, write
    adapter_config.json, allocation.csv, esdtool_plan.json and (``report``) report.html there
    (``result.save(outdir)`` writes them later).

    Everything is validated and computed before anything is written, and the directory is
    built beside ``outdir`` and swapped in whole: a failure or a kill leaves the old plan or the
    new one, never a mix. ``verify``: build the analysed model from its config.json on the meta
    device, apply the config with PEFT, and raise (writing nothing) if any module would get
    another rank or alpha than planned.

    ``target`` (or ``settings.target``): "lora" (the default), or "pruning", "lr",
    "weight-decay": a per-module sparsity, learning-rate or weight-decay plan from the same
    alphas (:mod:`esdtool.plan.layerwise`), written as sparsity.json (and, in model order,
    sparsity_list.json and an llm-compressor recipe.yaml), lr_factors.json or
    weight_decay_factors.json beside allocation.csv, esdtool_plan.json and report.html.
    """
    if isinstance(outdir, AllocateSettings):  # allocate(table, AllocateSettings(...))
        if settings is not None:
            raise OptionError("allocate: two settings given (the second argument is the output "
                              "directory)", hint="allocate(table, outdir, settings)")  # fmt: skip
        outdir, settings = None, outdir
    settings = settings or AllocateSettings()
    if target is not None and target != settings.target:
        if settings.target != "lora":
            raise OptionError(f"allocate: target {target!r} and settings.target "
                              f"{settings.target!r} differ; give one")  # fmt: skip
        settings = replace(settings, target=target)
    lora_only = [flag for flag, given in (("--verify", verify), ("--use-rslora", use_rslora),
                                          ("--use-dora", use_dora)) if given]  # fmt: skip
    if lora_only and settings.target != "lora":
        raise OptionError(f"{', '.join(lora_only)} applies to --target lora, not "
                          f"{settings.target}")  # fmt: skip
    in_memory = isinstance(metrics, pd.DataFrame)
    where = Path("<table>") if in_memory else Path(metrics)  # type: ignore[arg-type]
    if outdir is not None:
        check_output_dir(outdir, [] if in_memory else [where])
    check_peft_options(task_type, lora_dropout)
    check_report_options(settings.alpha_column, max_plots)  # even with --no-report: -1 is no count
    table = metrics if in_memory else load_metrics(where)  # type: ignore[assignment]
    check_frame(table)
    meta = table.attrs.get("esdtool") or {}
    if meta.get("adapter"):
        raise OptionError(
            f"{where}: is the table of a trained LoRA adapter (its weight changes), not of a "
            "model; ranks are planned from the base model's table",
            hint="esdtool analyze BASE_MODEL -o metrics.parquet, then allocate that table; "
            "esdtool report shows how this adapter used its ranks",
        )
    overrides = _check_preset(where, settings, meta)
    if settings.target != "lora":
        return _allocate_modules(table, where, outdir, settings, meta, overrides,
                                 report=report, max_plots=max_plots)  # fmt: skip
    needs_model = verify or settings.candidates == "model"
    model_dir = model_directory(meta) if needs_model else None
    modules = None
    if settings.candidates == "model":
        assert model_dir is not None
        modules = linear_modules(build_meta_model(model_dir))
    try:
        allocation = allocate_ranks(table, settings, modules)
    except OptionError as exc:  # what the table lacks: name it
        raise OptionError(f"{where}: {exc}", hint=exc.hint) from None
    if overrides:
        allocation.notes.append(
            f"not {settings.preset}'s own plan: options override the preset: "
            + ", ".join(overrides)
        )
    html = (
        render(table, allocation, settings.alpha_column, max_plots)[0].encode("utf-8")
        if report
        else None
    )
    base_model = None if meta.get("source_kind") == "memory" else meta.get("source")
    config = lora_config_dict(
        allocation, task_type=task_type, lora_dropout=lora_dropout, use_rslora=use_rslora,
        use_dora=use_dora, base_model=base_model,
    )  # fmt: skip
    record = {
        "target": "lora",
        "metric": settings.alpha_column,
        "table_fingerprint": table_fingerprint(table, None if in_memory else where),
        "metrics": None if in_memory else str(where.resolve()),
        "source": meta.get("source"),
        "revision": meta.get("revision"),
        "allocate_settings": asdict(allocation.settings),
        "preset_overrides": overrides,
        "budget_params": allocation.budget,
        "trainable_params": allocation.total_params,
        "shape": allocation.shape.to_dict(),
        "serving": config_serving(config).record(),
        "esdtool_version": __version__,
    }

    def save(out: Path) -> AllocateResult:
        def build(directory: Path) -> None:
            write_plan_files(
                allocation, directory, record, task_type=task_type, lora_dropout=lora_dropout,
                use_rslora=use_rslora, use_dora=use_dora, base_model=base_model,
            )  # fmt: skip
            if verify and model_dir is not None:  # checked in the new directory, first
                problems = verify_plan(directory, model_dir)
                raise_problems(problems, out, model_dir)
            if html is not None:
                (directory / REPORT_NAME).write_bytes(html)

        check_output_dir(out, [] if in_memory else [where])
        atomic_dir(out, build, PLAN_FILES + TARGET_FILES, marker=PLAN_RECORD)
        return AllocateResult(
            allocation, out / CONFIG_NAME, out / CSV_NAME, out / REPORT_NAME if report else None,
            config, save,
        )  # fmt: skip

    if outdir is None:
        return AllocateResult(allocation, None, None, None, config, save)
    return save(Path(outdir))


def _allocate_modules(
    table: pd.DataFrame,
    where: Path,
    outdir: str | os.PathLike[str] | None,
    settings: AllocateSettings,
    meta: dict[str, Any],
    overrides: list[str],
    *,
    report: bool,
    max_plots: int,
) -> AllocateResult:
    """A pruning / lr / weight-decay plan: computed whole, then written as allocate writes a
    LoRA plan (one directory swapped in whole)."""
    in_memory = str(where) == "<table>"
    order, why = model_order(meta, settings.target)
    try:
        plan = plan_modules(table, settings, order)
    except OptionError as exc:
        raise OptionError(f"{where}: {exc}", hint=exc.hint) from None
    if why:
        plan.notes.append(why)
    if overrides:
        plan.notes.append(f"not {settings.preset}'s own plan: options override the preset: "
                          + ", ".join(overrides))  # fmt: skip
    html = (
        render(table, None, settings.alpha_column, max_plots, modules=plan)[0].encode("utf-8")
        if report
        else None
    )
    record = {
        "target": settings.target,
        "metric": settings.alpha_column,
        "table_fingerprint": table_fingerprint(table, None if in_memory else where),
        "metrics": None if in_memory else str(where.resolve()),
        "source": meta.get("source"),
        "revision": meta.get("revision"),
        "allocate_settings": asdict(settings),
        "preset_overrides": overrides,
        "model_order": plan.model_order,
        "notes": plan.notes,
        "esdtool_version": __version__,
    }

    def save(out: Path) -> AllocateResult:
        written: list[str] = []

        def build(directory: Path) -> None:
            written.extend(write_module_plan(plan, directory, CSV_NAME))
            text = json.dumps(record, indent=2, default=str) + "\n"
            (directory / PLAN_RECORD).write_text(text, encoding="utf-8")
            if html is not None:
                (directory / REPORT_NAME).write_bytes(html)

        check_output_dir(out, [] if in_memory else [where])
        atomic_dir(out, build, PLAN_FILES + TARGET_FILES, marker=PLAN_RECORD)
        return AllocateResult(
            None, None, out / CSV_NAME, out / REPORT_NAME if report else None, {}, save, plan,
            tuple(out / name for name in written),
        )  # fmt: skip

    if outdir is None:
        return AllocateResult(None, None, None, None, {}, save, plan)
    return save(Path(outdir))


def model_order(meta: dict[str, Any], target: str) -> tuple[list[str] | None, str | None]:
    """The analysed model's Linear/Conv2d module names in ``named_modules`` order, built on
    the meta device from its config.json, or None and why not (the plan then keeps the
    table's order, and a pruning plan writes no list: a list is only as good as its order).
    A hub model's config.json is read from the HF cache only: a plan never downloads."""
    what = ("rows in the table's order" + (", and no sparsity_list.json / recipe.yaml"
                                           if target == "pruning" else ""))  # fmt: skip
    try:
        if meta.get("source_kind") in ("file", "directory"):
            directory = model_directory(meta)
        elif meta.get("source_kind") == "hub" and isinstance(meta.get("source"), str):
            from huggingface_hub import try_to_load_from_cache

            revision = meta.get("revision")
            found = try_to_load_from_cache(
                str(meta["source"]), "config.json",
                revision=revision if isinstance(revision, str) else None,
            )  # fmt: skip
            if not isinstance(found, str):
                return None, f"{what}: the model's config.json is not in the HF cache"
            directory = Path(found).parent
        else:
            return None, f"{what}: the table names no model files to read the order from"
        return [name for name, _ in linear_modules(build_meta_model(directory))], None
    except (EsdtoolError, ValueError) as exc:  # huggingface_hub's validation errors too
        return None, f"{what}: the model's module order is unknown ({exc})"


def table_fingerprint(table: pd.DataFrame, path: Path | None) -> str:
    """sha256 of the table file, or (a table in memory) of its rows' identities and alphas."""
    digest = hashlib.sha256()
    if path is not None:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        return "sha256:" + digest.hexdigest()
    columns = [c for c in table.columns if c != "eigenvalues"]
    digest.update(table[columns].to_csv(index=False).encode("utf-8"))
    return "sha256:" + digest.hexdigest()


def _check_preset(metrics: Path, settings: AllocateSettings, meta: dict[str, object]) -> list[str]:
    """A preset's plan needs the preset's analysis: the origin's plan cannot come out of
    spikes counted another way. Returns the options that override the preset, in the table's
    analysis or in ``settings`` ("sigma_fit=median"), for the plan's notes and record."""
    if settings.preset is None:
        return []
    analysed = meta.get("settings")
    analysed = analysed if isinstance(analysed, dict) else {}
    table_preset = analysed.get("preset")
    if table_preset != settings.preset:
        raise OptionError(
            f"{metrics}: --preset {settings.preset} plans from a table analysed with --preset "
            f"{settings.preset}; this one was analysed with "
            + (f"--preset {table_preset}" if isinstance(table_preset, str) else "no preset"),
            hint=f"esdtool analyze SOURCE -o TABLE --preset {settings.preset}, then allocate",
        )
    overrides = [
        f"{key}={analysed.get(key)!r} (analyze)"
        for key, value in ANALYSIS_PRESETS[settings.preset].items()
        if analysed.get(key) != value
    ]
    overrides += [
        f"{key}={getattr(settings, key)!r}"
        for key, value in ALLOCATION_PRESETS[settings.preset].items()
        if getattr(settings, key) != value
    ]
    return overrides


def model_directory(meta: dict[str, object]) -> Path:
    """The directory holding the analysed model's config.json: the absolute ``source_path`` the
    table recorded for a local model (never the source re-read against today's current
    directory), the hub cache's snapshot at the recorded commit for a hub id."""
    if meta.get("source_kind") == "memory":
        raise OptionError(
            "the plan needs the analysed model's files (--verify, --preset lora-ar), and this "
            "table was made from a model in memory",
            hint="save the model (save_pretrained) and analyse that directory",
        )
    if meta.get("source_kind") in ("file", "directory"):
        path = meta.get("source_path")
        if not isinstance(path, str) or not os.path.isabs(path):
            raise OptionError(
                f"the plan needs the analysed model (--verify, --preset lora-ar), and the table "
                f"records no absolute path of it "
                f"(source {meta.get('source')!r})",
                hint="re-run esdtool analyze with this version",
            )
        resolved = resolve_source(path)
    else:
        revision = meta.get("revision")
        resolved = resolve_source(  # from the hub cache, never a local path of that name
            str(meta.get("source")),
            revision=revision if isinstance(revision, str) else None,
            hub_only=True,
        )
    return resolved.files[0].parent
