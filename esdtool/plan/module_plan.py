"""The per-module plans (pruning, lr, weight-decay): candidates in, one number per module out,
and the files each plan is read from (plan.layerwise holds the maps)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from esdtool.analysis.roles import block_key
from esdtool.errors import OptionError
from esdtool.plan.layerwise import (
    DEFAULT_EPSILON,
    DEFAULT_MIN_EVALS,
    VALUE_COLUMN,
    ModulePlan,
    block_means,
    check_ratios,
    factors,
    pruning_ratios,
    resolved_factors,
)
from esdtool.plan.ranks import AllocateSettings, candidates
from esdtool.plan.shape import groups
from esdtool.untrusted import read_json_file, spreadsheet_frame

SPARSITY_NAME = "sparsity.json"  # module -> ratio, in model order
SPARSITY_LIST = "sparsity_list.json"  # the ratios alone, in model order (AlphaPruning's list)
RECIPE_NAME = "recipe.yaml"  # an llm-compressor recipe with per-layer sparsity
FACTORS_NAME = {"lr": "lr_factors.json", "weight-decay": "weight_decay_factors.json"}
TARGET_FILES = (SPARSITY_NAME, SPARSITY_LIST, RECIPE_NAME, *FACTORS_NAME.values())


def plan_modules(
    metrics: pd.DataFrame, settings: AllocateSettings, order: list[str] | None = None
) -> ModulePlan:
    """The plan of ``settings.target`` (not "lora") over the same candidates a LoRA plan has.
    ``order``: the model's module names in ``named_modules`` order (rows follow it when it
    holds every candidate), or None (the table's order)."""
    target = settings.target
    df, dropped = candidates(metrics, settings)
    notes = [f"{m}: no {settings.alpha_column}; not a candidate" for m in dropped]
    if target != "pruning":
        least = settings.min_evals or DEFAULT_MIN_EVALS
        few = np.minimum(df.rows, df.cols).to_numpy(int) < least
        if few.any():
            notes.append(f"{int(few.sum())} module(s) with fewer than {least} eigenvalues keep "
                         f"the base value (e.g. {df.module.iloc[int(np.argmax(few))]}), as "
                         "TempBalance and AlphaDecay leave them (--min-evals)")  # fmt: skip
            df = df[~few]
    if df.empty:
        what = f"--targets {settings.targets!r}" if settings.targets else "role 'linear'"
        raise OptionError(f"no candidate modules: no analysed matrix matches {what}")
    model_order = covers = False
    if order is not None:
        where = {name: i for i, name in enumerate(order)}
        missing = [m for m in df.module if m not in where]
        if missing:
            notes.append(f"rows in the table's order: the model has no module {missing[0]!r}")
        else:
            df = df.iloc[np.argsort([where[m] for m in df.module], kind="stable")]
            model_order = True
            inside = [m for m in order if block_key(m) is not None]
            covers = list(df.module) == inside
            if target == "pruning" and not covers:
                notes.append(
                    f"no sparsity_list.json / recipe.yaml: the plan holds {len(df)} of the "
                    f"{len(inside)} Linear modules inside the model's blocks, and AlphaPruning's "
                    "list and llm-compressor's recipe give values by position over all of them"
                )
    alpha = df[settings.alpha_column].to_numpy(float)
    within = groups(df.module, df.rows, df.cols, settings.normalise_within)
    blocks = np.array([block_key(str(m)) for m in df.module], dtype=object)
    rows, cols = df.rows.to_numpy(int), df.cols.to_numpy(int)
    table = pd.DataFrame({"module": df.module.to_numpy(), "layer": df.layer.to_numpy(),
                          "rows": rows, "cols": cols, "alpha": alpha})  # fmt: skip
    if target == "pruning":
        assert settings.sparsity is not None
        epsilon = settings.epsilon or DEFAULT_EPSILON
        block = (settings.mapping or "block") == "block"
        if block and all(b is None for b in blocks):
            notes.append("no module is inside a block: --mapping block maps each on its own")
        mapped = block_means(alpha, blocks) if block else alpha
        numel = rows.astype(float) * cols
        table["mapped_alpha"] = mapped
        try:
            ratios = pruning_ratios(mapped, numel, settings.sparsity, epsilon, within)
        except OptionError as exc:
            if not block:
                raise
            raise OptionError(
                f"every block has the same mean alpha ({mapped[0]:g}): the pruning map has no "
                "range",
                hint="--mapping module",
            ) from exc
        table["sparsity"] = ratios
        check_ratios(table, mapped, numel, settings.sparsity, epsilon, within)
    else:
        how = (settings.lr_map if target == "lr" else settings.wd_map) or "linear"
        low, high = resolved_factors(target, settings.min_factor, settings.max_factor)
        table["mapped_alpha"] = alpha
        values = factors(alpha, how, float(low), float(high), target, within, blocks)  # type: ignore[arg-type]
        bad = ~(np.isfinite(values) & (values > 0))
        if bad.any():  # e.g. alpha_peak's 0 ("no fit") under sqrt: an lr of 0 trains nothing
            i = int(np.argmax(bad))
            raise OptionError(
                f"the {how} map gives module {df.module.iloc[i]!r} a factor of {values[i]:g} "
                f"(its {settings.alpha_column} is {alpha[i]:g}); factors must be finite and > 0",
                hint="the linear map, or another --alpha-column",
            )
        table[VALUE_COLUMN[target]] = values
    mapping = (settings.mapping or "block") if target == "pruning" else None
    return ModulePlan(target, table.reset_index(drop=True), model_order, notes, mapping, covers)


def write_module_plan(plan: ModulePlan, directory: Path, csv_name: str) -> list[str]:
    """Write the plan's own files and its table (``csv_name``) into ``directory``; returns the
    names of the plan files written (the table and record are the caller's to list)."""
    spreadsheet_frame(plan.table).to_csv(directory / csv_name, index=False)
    written = []
    if plan.target == "pruning":
        _json(directory / SPARSITY_NAME, plan.values)
        written.append(SPARSITY_NAME)
        if plan.covers_blocks:
            _json(directory / SPARSITY_LIST, list(plan.values.values()))
            written.append(SPARSITY_LIST)
            text = recipe(plan)
            if text is not None:
                (directory / RECIPE_NAME).write_text(text, encoding="utf-8")
                written.append(RECIPE_NAME)
    else:
        _json(directory / FACTORS_NAME[plan.target], plan.values)
        written.append(FACTORS_NAME[plan.target])
    return written


def _json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def recipe(plan: ModulePlan) -> str | None:
    """An llm-compressor recipe (SparseGPTModifier; WandaPruningModifier takes the same fields)
    with the plan's ratios, or None where llm-compressor cannot take them.

    llm-compressor's ``sparsity`` list gives its i-th value to the i-th module ``targets``
    matches, in model order, and to every Linear inside it: one value per decoder layer, so the
    recipe exists when every layer's modules share one ratio (block mapping) and the plan
    holds every layer 0..L-1 under one prefix (``model.layers``)."""
    layers = plan.table.layer.astype("Float64")
    if layers.isna().any():
        return None
    prefixes = {str(m).rsplit(f".{int(n)}.", 1)[0] for m, n in zip(plan.table.module, layers,
                                                                 strict=True)}  # fmt: skip
    per_layer = plan.table.groupby(layers.astype(int), sort=True)["sparsity"]
    if len(prefixes) != 1 or (per_layer.max() - per_layer.min()).max() > 0:
        return None
    index = per_layer.first().index.to_numpy()
    if not np.array_equal(index, np.arange(len(index))):
        return None
    prefix = prefixes.pop()
    targets = json.dumps(f"re:^{re.escape(prefix)}\\.[0-9]+$")
    ratios = ", ".join(repr(float(v)) for v in per_layer.first())
    return (
        "# esdtool pruning plan: one sparsity per decoder layer, in order (llm-compressor's\n"
        "# list form). For Wanda, rename the modifier WandaPruningModifier.\n"
        "oneshot_stage:\n"
        "  pruning_modifiers:\n"
        "    SparseGPTModifier:\n"
        f"      sparsity: [{ratios}]\n"
        f"      targets: [{targets}]\n"
    )


def load_factors(plan_dir: str | Path, target: str) -> dict[str, float]:
    """module -> factor of an lr or weight-decay plan directory, checked: its record says
    ``target``, every key is a module name (printable, at most 1000 characters) and every
    factor a finite number > 0. Each file is read as untrusted JSON (read_json_file)."""
    directory = Path(plan_dir)
    flag = "--lr-plan" if target == "lr" else "--wd-plan"
    path = directory / FACTORS_NAME[target]
    try:
        record = read_json_file(directory / "esdtool_plan.json")
        made = record.get("target") if isinstance(record, dict) else None
    except (OSError, ValueError):
        made = None
    if made != target:
        raise OptionError(
            f"{flag} {directory}: not a --target {target} plan directory (no {path.name} with "
            f"an esdtool_plan.json saying target {target})",
            hint=f"esdtool allocate METRICS --target {target} -o PLAN_DIR",
        )
    try:
        data = read_json_file(path)
    except OSError as exc:
        raise OptionError(f"{path}: cannot read ({exc.strerror or exc})") from None
    except ValueError as exc:
        raise OptionError(f"{path}: {exc}") from None
    if not isinstance(data, dict) or not data:
        raise OptionError(f"{path}: expected an object of module name -> factor")
    factors = {}
    for key, value in data.items():
        number = isinstance(value, int | float) and not isinstance(value, bool)
        try:
            factor = float(value) if number else math.nan
        except OverflowError:  # an integer of 400 digits
            factor = math.nan
        if not (math.isfinite(factor) and factor > 0) or not (0 < len(key) <= 1000
                                                               and key.isprintable()):  # fmt: skip
            raise OptionError(f"{path}: entry {key[:80]!r}: a module name and a finite factor "
                              f"> 0 expected, not {str(value)[:40]!r}")  # fmt: skip
        factors[key] = factor
    return factors


def plan_target(plan_dir: str | Path) -> str | None:
    """The target an esdtool plan directory's record names, or None."""
    try:
        record = read_json_file(Path(plan_dir) / "esdtool_plan.json")
    except (OSError, ValueError):
        return None
    target = record.get("target") if isinstance(record, dict) else None
    return target if isinstance(target, str) else None
