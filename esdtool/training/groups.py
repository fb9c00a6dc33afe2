"""Optimizer parameter groups from lr and weight-decay plans (TempBalance, AlphaDecay): each
planned module's trainable parameters get base lr x its factor and base weight decay x its
factor; every other trainable parameter gets the base values.

``param_groups(model, plans, lr)`` returns what ``torch.optim.AdamW(groups)`` (or any torch
optimizer) takes, and HF's Trainer through ``optimizers=(optimizer, None)``: the scheduler then
scales every group's lr alike, so the factors hold at every step. A parameter belongs to the
deepest planned module whose name ends its module path (``base_model.model.`` prefixes and
PEFT's ``lora_A.default`` suffixes fall away), so the same plan serves a PEFT model (its LoRA
parameters), a fully trainable model, or a model under DDP (``module.``).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from esdtool.errors import OptionError
from esdtool.plan.layerwise import ModulePlan
from esdtool.plan.module_plan import load_factors, plan_target

PlanLike = str | os.PathLike[str] | ModulePlan | Any  # a directory, a ModulePlan or a result


def _factors(plan: PlanLike) -> tuple[str, dict[str, float]]:
    """(target, module -> factor) of a plan directory, ModulePlan or AllocateResult."""
    if hasattr(plan, "modules") and hasattr(plan, "allocation"):  # an AllocateResult
        if plan.modules is None:
            raise OptionError(
                "a LoRA plan (allocate's default target) sets ranks, not optimizer values; "
                "param_groups takes --target lr and weight-decay plans"
            )
        plan = plan.modules
    if isinstance(plan, ModulePlan):
        if plan.target not in ("lr", "weight-decay"):
            raise OptionError(f"a --target {plan.target} plan sets no optimizer values; "
                              "param_groups takes lr and weight-decay plans")  # fmt: skip
        return plan.target, plan.values
    if isinstance(plan, str | os.PathLike):
        directory = Path(plan)
        target = plan_target(directory)
        if target not in ("lr", "weight-decay"):
            raise OptionError(
                f"{directory}: not an lr or weight-decay plan directory (its esdtool_plan.json "
                f"says target {target!r})" if target else
                f"{directory}: not an esdtool plan directory (no readable esdtool_plan.json)",
                hint="esdtool allocate METRICS --target lr -o PLAN_DIR",
            )  # fmt: skip
        return target, load_factors(directory, target)
    raise OptionError(f"param_groups: a plan directory, ModulePlan or allocate result expected, "
                      f"not {type(plan).__name__}")  # fmt: skip


def _owner(name: str, planned: dict[str, int]) -> int | None:
    """Index of the deepest planned module whose name ends the module path of parameter
    ``name`` (a suffix at a dot boundary), or None."""
    parts = name.split(".")[:-1]  # the module path
    for end in range(len(parts), 0, -1):
        for start in range(end):
            index = planned.get(".".join(parts[start:end]))
            if index is not None:
                return index
    return None


def param_groups(
    model: Any,
    plans: PlanLike | Sequence[PlanLike],
    lr: float,
    weight_decay: float = 0.0,
) -> list[dict[str, Any]]:
    """Parameter groups for a torch optimizer: one per planned module holding trainable
    parameters (``lr`` x its lr factor, ``weight_decay`` x its weight-decay factor; a module in
    one plan only keeps the other base value), then one with every other trainable parameter
    at ``lr`` and ``weight_decay``. Each group also names its ``module`` (None for the rest).

    ``plans``: an lr plan, a weight-decay plan, or both (directories ``esdtool allocate
    --target lr|weight-decay`` wrote, or their results). Refused: two plans of one target, and
    plans none of whose modules hold a trainable parameter of ``model`` (another model's plan).
    """
    many = isinstance(plans, Sequence) and not isinstance(plans, str | bytes)
    given: Iterable[PlanLike] = plans if many else [plans]  # type: ignore[assignment]
    by_target: dict[str, dict[str, float]] = {}
    for plan in given:
        target, factors = _factors(plan)
        if target in by_target:
            raise OptionError(f"two {target} plans given; give one lr and one weight-decay plan")
        by_target[target] = factors
    if not by_target:
        raise OptionError("param_groups: no plan given")
    names = list(dict.fromkeys(m for f in by_target.values() for m in f))
    planned = {m: i for i, m in enumerate(names)}
    members: list[list[Any]] = [[] for _ in names]
    rest: list[Any] = []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        owner = _owner(name, planned)
        (rest if owner is None else members[owner]).append(param)
    if not any(members):
        example = names[0]
        raise OptionError(
            f"no planned module holds a trainable parameter of this model (e.g. {example!r}): "
            "the plan was made for another model, or its modules are frozen",
            hint="plan from this model's metrics table",
        )
    lr_factors = by_target.get("lr", {})
    wd_factors = by_target.get("weight-decay", {})
    groups = [
        {"params": params, "lr": lr * lr_factors.get(m, 1.0),
         "weight_decay": weight_decay * wd_factors.get(m, 1.0), "module": m}
        for m, params in zip(names, members, strict=True) if params
    ]  # fmt: skip
    if rest:
        groups.append({"params": rest, "lr": lr, "weight_decay": weight_decay, "module": None})
    return groups
