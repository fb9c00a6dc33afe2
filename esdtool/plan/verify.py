"""Checking a LoRA plan against a model with PEFT's own matching: the one checker that
``allocate --verify`` and ``finetune`` both use.

:func:`plan_problems` compares a PEFT-wrapped model (weights loaded or on the meta device) with
the plan directory: every planned module must get an adapter with exactly its planned r and
lora_alpha and the shape allocation.csv recorded, matched by exactly one rank_pattern key, and
no other module may get one. :func:`verify_plan` builds the model from its config.json on the
meta device (no weights, no memory) and runs that check, so a plan can be checked in seconds
before anything heavy is loaded.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path
from typing import Any

import pandas as pd

from esdtool.errors import ModelLoadError, PlanMismatchError
from esdtool.extras import require
from esdtool.plan.peft_config import CONFIG_NAME, CSV_NAME


def build_meta_model(model_dir: Path) -> Any:
    """The model of ``model_dir``/config.json, instantiated on the meta device."""
    import torch

    transformers = require("checking a plan", "transformers", "peft")["transformers"]
    try:
        config = transformers.AutoConfig.from_pretrained(str(model_dir))
    except Exception as exc:  # transformers raises OSError, ValueError, KeyError...
        raise ModelLoadError(f"{model_dir}: cannot read its config.json ({exc})") from exc
    architectures = getattr(config, "architectures", None) or []
    cls = next(
        (getattr(transformers, a) for a in architectures if hasattr(transformers, a)),
        transformers.AutoModel,
    )
    with torch.device("meta"):
        return cls.from_config(config) if cls is transformers.AutoModel else cls(config)


def adapted_modules(peft_model: Any) -> dict[str, Any]:
    """The modules that got the default LoRA adapter, by their name in the base model."""
    return {
        name.removeprefix("base_model.model."): module
        for name, module in peft_model.named_modules()
        if hasattr(module, "lora_A") and "default" in module.lora_A
    }


def matches_key(key: str, name: str) -> bool:
    """PEFT's rule for a rank_pattern / alpha_pattern key: it matches the end of the module
    name at a dot boundary (our keys start with ^, so only the whole name)."""
    return re.match(rf"(.*\.)?({key})$", name) is not None


def _shape(module: Any) -> tuple[int, ...]:
    """(out, in) of an adapted layer: its features (also right for 4-bit packed weights), else
    its weight's shape (e.g. GPT-2's Conv1D)."""
    layer = getattr(module, "base_layer", module)
    if hasattr(layer, "in_features") and hasattr(layer, "out_features"):
        return (layer.out_features, layer.in_features)
    return tuple(getattr(getattr(layer, "weight", None), "shape", ()))


def plan_problems(peft_model: Any, plan_dir: Path) -> list[str]:
    """Every way ``peft_model`` departs from the plan in ``plan_dir`` (empty when exact).

    Every rank_pattern key must reach a module and give it its rank. With allocation.csv each
    kept module is also checked for presence, r, lora_alpha, shape and a unique key, and
    unplanned adapters are reported (a hand-written config without it: keys only).
    """
    plan_dir = Path(plan_dir)
    adapted = adapted_modules(peft_model)
    raw = json.loads((plan_dir / CONFIG_NAME).read_text(encoding="utf-8"))
    rank_pattern: dict[str, int] = raw.get("rank_pattern") or {}
    problems: list[str] = []
    for key, rank in rank_pattern.items():  # every key must reach a module, with its rank
        hits = [n for n in adapted if matches_key(key, n)]
        if not hits:
            problems.append(f"{key}: planned, but no such module gets an adapter")
        for name in hits:
            if adapted[name].r["default"] != rank:
                problems.append(f"{name}: r = {adapted[name].r['default']}, planned {rank}")
    if not (plan_dir / CSV_NAME).is_file():
        return problems  # a hand-written config: names and ranks were all it could say

    plan = pd.read_csv(plan_dir / CSV_NAME)
    kept = plan[plan.selected]
    for row in kept.itertuples():
        if row.module not in adapted:
            problems.append(f"{row.module}: planned, but no such module gets an adapter")
            continue
        module = adapted[row.module]
        keys = [k for k in rank_pattern if matches_key(k, row.module)]
        if len(keys) != 1:
            problems.append(f"{row.module}: matched by {len(keys)} rank_pattern keys")
        if module.r["default"] != row.rank:
            problems.append(f"{row.module}: r = {module.r['default']}, planned {row.rank}")
        if module.lora_alpha["default"] != row.lora_alpha:
            problems.append(
                f"{row.module}: lora_alpha = {module.lora_alpha['default']}, "
                f"planned {row.lora_alpha}"
            )
        shape = _shape(module)
        if len(shape) == 2 and sorted(shape) != sorted((row.rows, row.cols)):
            problems.append(
                f"{row.module}: is {shape[0]}x{shape[1]}, planned {row.rows}x{row.cols} "
                "(a plan for another model)"
            )
    for name in sorted(set(adapted) - set(kept.module)):
        problems.append(f"{name}: gets an adapter but is not in the plan")
    return list(dict.fromkeys(problems))  # a rank wrong in both files is one problem


def apply_plan(model: Any, config: Any) -> Any:
    """``peft.get_peft_model(model, config)``, with PEFT's "no target module found" turned
    into a :class:`PlanMismatchError`."""
    peft = require("applying a plan", "transformers", "peft")["peft"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        try:
            return peft.get_peft_model(model, config)
        except ValueError as exc:  # PEFT: "Target modules ... not found in the base model"
            raise PlanMismatchError(
                "none of its target_modules exist in the model"
                if "not found" in str(exc)
                else str(exc)
            ) from exc


def verify_plan(plan_dir: Path, model_dir: Path) -> list[str]:
    """Problems found applying ``plan_dir``'s adapter_config.json to the model in ``model_dir``
    (empty when the plan applies exactly), checked on the meta device. Every problem is listed,
    not just the first."""
    peft = require("checking a plan", "transformers", "peft")["peft"]
    plan_dir = Path(plan_dir)
    if not (Path(model_dir) / "config.json").is_file():
        raise ModelLoadError(f"{model_dir}: no config.json to build the model from")
    config = peft.LoraConfig.from_pretrained(str(plan_dir))
    config.task_type = None  # matching does not depend on the task head; any model will do
    try:
        model = apply_plan(build_meta_model(Path(model_dir)), config)
    except PlanMismatchError as exc:
        return [str(exc)]
    return plan_problems(model, plan_dir)


def raise_problems(problems: list[str], plan_dir: Path, model: object) -> None:
    """Raise :class:`PlanMismatchError` listing every problem, if there is any."""
    if problems:
        raise PlanMismatchError(
            f"{Path(plan_dir) / CONFIG_NAME}: does not fit {model}: {len(problems)} problem(s): "
            + "; ".join(problems),
            hint="re-run esdtool analyze and allocate on this model",
        )


def check_plan(plan_dir: Path, model_dir: Path) -> None:
    """:func:`verify_plan`, raising :class:`PlanMismatchError` listing every problem."""
    raise_problems(verify_plan(plan_dir, model_dir), plan_dir, model_dir)
