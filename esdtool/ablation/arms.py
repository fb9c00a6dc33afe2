"""The arms of an ablation: rank plans over the same candidate modules, each at one budget of
trainable parameters, so that what differs between arms is where the rank goes, not how much.

Every arm is an :class:`~esdtool.plan.ranks.Allocation` over esdtool's candidates (the rows
``allocate`` scores). Its cost is sum r (rows + cols) over its modules, which is what PEFT counts
for a LoRA on a linear layer; :func:`peft_params` counts it again on the model built by PEFT,
and an arm more than 1% off the budget is refused.

- ``uniform``: every candidate at one rank (the budget's rank).
- ``esd``: esdtool's plan (``allocate`` with the budget), ranks matched to the budget.
- ``shuffled``: esd's modules and esd's ranks, the ranks permuted (seeded) among modules of one
  size (rows + cols): the cost stays esd's exactly, and what moves is which module of a kind
  gets which rank. A control for "these ranks in these places".
- ``placement``: esd's modules, one rank for all. A control for "these modules, any ranks".
- ``complement``: the candidates esd leaves out, one rank for all: is the choice better than
  its opposite?
- ``random``: as many modules as esd keeps, drawn at random (seeded), with esd's ranks in random
  order, matched to the budget.
- ``eva``: uniform's plan with PEFT's data-driven EVA initialisation: each module's A from the
  SVD of its inputs on the training batches, and the ranks redistributed by explained variance
  (rho 2: up to 2 r each). EVA keeps the total rank, not the parameter count: the count after
  redistribution is each run's ``trainable_params``, and the page flags a run more than 1%
  off the budget.
- ``lora-ar``: Adaptive Rank LoRA's own plan (``allocate --preset lora-ar`` on a table analysed
  with that preset, every Linear of the model a candidate), ranks matched to the budget
  (:func:`lora_ar_arm`).

"One rank" means r on every module and r + 1 on the fewest needed to meet the budget when
r (rows + cols) alone cannot come within 1% of it (:func:`one_rank`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from esdtool.errors import OptionError
from esdtool.plan.ranks import AllocateSettings, Allocation, allocate_ranks, fit_budget

ARMS = ("uniform", "esd", "shuffled", "placement", "complement", "random", "lora-ar", "eva",
        "esd-farms", "esd-within-shape", "esd-within-kind")  # fmt: skip
# Shape-fair variants of the esd plan (docs/method.md, FARMS): the allocate settings each
# changes. esd-farms needs a table analysed with --estimator farms.
VARIANTS: dict[str, dict[str, str]] = {
    "esd-farms": {"alpha_column": "_farms", "spikes_column": "spikes_farms"},
    "esd-within-shape": {"normalise_within": "shape"},
    "esd-within-kind": {"normalise_within": "kind"},
}
# The eva arm's adapter_config.json fields beyond the plan: PEFT's EVA initialisation with its
# default redistribution (a module's rank up to 2 r, the total rank kept).
EVA_CONFIG = {"init_lora_weights": "eva", "eva_config": {"rho": 2.0}}
DEFAULT_ARMS = ("uniform", "esd", "shuffled", "placement")
TOLERANCE = 0.01  # every arm within 1% of the budget


@dataclass(frozen=True)
class Arm:
    """One arm: its plan over the candidates (``allocation.table``: selected, rank), how it was
    made, and its cost (``params``: sum r (rows + cols); ``peft_params`` once counted by PEFT).
    ``plan_dir``: a plan directory given with ``--arm NAME=DIR`` (no allocation then)."""

    name: str
    allocation: Allocation | None
    how: str
    params: int
    peft_params: int | None = None
    plan_dir: Path | None = None
    config: dict[str, Any] = field(default_factory=dict)  # adapter_config.json fields added

    @property
    def ranks(self) -> dict[str, int]:
        """Adapted module -> rank."""
        if self.allocation is None:
            return {}
        kept = self.allocation.kept
        return dict(zip(kept.module, (int(r) for r in kept["rank"]), strict=True))


def budget_of(candidates: pd.DataFrame, budget_rank: int | None, budget_params: int | None) -> int:
    """The budget in trainable parameters: ``budget_params``, or uniform ``budget_rank`` on
    every candidate (default 8)."""
    if budget_params is not None:
        return int(budget_params)
    sizes = (candidates.rows + candidates.cols).to_numpy(int)
    return int((budget_rank or 8) * sizes.sum())


def match_budget(
    ranks: np.ndarray, sizes: np.ndarray, budget: int, lo: int, hi: np.ndarray
) -> np.ndarray:
    """``ranks`` scaled by one factor (:func:`~esdtool.plan.ranks.fit_budget`, which keeps their
    order), then moved one at a time by +-1, each time on the module that brings sum r x size
    closest to ``budget``, until no such move helps. Ranks stay within [lo, hi]."""
    r = fit_budget(ranks, sizes, budget, lo, hi).astype(np.int64)
    while True:
        gap = budget - int((r * sizes).sum())
        best, move = abs(gap), None
        for step in (1, -1):
            allowed = (r + step >= lo) & (r + step <= hi)
            after = np.where(allowed, np.abs(gap - step * sizes), np.iinfo(np.int64).max)
            i = int(np.argmin(after))
            if after[i] < best:
                best, move = int(after[i]), (i, step)
        if move is None:
            return r
        r[move[0]] += move[1]


def one_rank(sizes: np.ndarray, budget: int, hi: np.ndarray) -> np.ndarray:
    """One rank r = floor(budget / sum sizes) for every module, and r + 1 on the fewest modules
    (largest first) needed to come closest to the budget."""
    total = int(sizes.sum())
    r = max(1, budget // total)
    ranks = np.minimum(np.full(len(sizes), r, dtype=np.int64), hi)
    for i in np.argsort(-sizes, kind="stable"):
        gap = budget - int((ranks * sizes).sum())
        if abs(gap - sizes[i]) < abs(gap) and ranks[i] + 1 <= hi[i]:
            ranks[i] += 1
    return ranks


def build_arms(
    metrics: pd.DataFrame,
    names: list[str],
    settings: AllocateSettings,
    budget: int,
    seed: int,
) -> list[Arm]:
    """The arms ``names`` (of :data:`ARMS`) over the candidates of ``metrics`` at ``budget``
    trainable parameters; random choices from ``seed``."""
    esd = allocate_ranks(metrics, replace(settings, budget_params=budget, match_rank=None))
    table = esd.table
    sizes = (table.rows + table.cols).to_numpy(np.int64)
    cap = np.minimum(table.rows, table.cols).to_numpy(np.int64)  # a LoRA's most useful rank
    selected = table.selected.to_numpy(bool)
    esd_ranks = match_budget(table["rank"].to_numpy(np.int64)[selected], sizes[selected], budget,
                             settings.min_rank, cap[selected])  # fmt: skip
    rng = np.random.default_rng(seed)
    arms = []
    for name in names:
        rank = np.zeros(len(table), dtype=np.int64)
        if name in ("uniform", "eva"):
            rank[:] = one_rank(sizes, budget, cap)
            how = "every candidate at one rank"
            if name == "eva":
                how += ", PEFT's EVA initialisation and rank redistribution (rho 2)"
        elif name == "esd":
            rank[selected] = esd_ranks
            how = "esdtool's plan (allocate), ranks matched to the budget"
        elif name == "shuffled":
            rank[selected] = _shuffle_within_sizes(esd_ranks, sizes[selected], rng)
            how = "esd's modules and ranks, ranks permuted among modules of one size"
        elif name == "placement":
            rank[selected] = one_rank(sizes[selected], budget, cap[selected])
            how = "esd's modules at one rank"
        elif name == "complement":
            if selected.all():
                raise OptionError("arm complement: esd keeps every candidate; none is left out")
            rank[~selected] = one_rank(sizes[~selected], budget, cap[~selected])
            how = "the candidates esd leaves out, at one rank"
        elif name == "random":
            chosen = rng.choice(len(table), size=int(selected.sum()), replace=False)
            drawn = rng.permutation(esd_ranks)
            rank[chosen] = match_budget(drawn, sizes[chosen], budget, 1, cap[chosen])
            how = "as many modules as esd keeps, drawn at random, esd's ranks matched to the budget"
        elif name in VARIANTS:
            arms.append(_variant(metrics, name, settings, budget))
            continue
        elif name == "lora-ar":
            continue  # its own candidates and table: lora_ar_arm
        else:
            raise OptionError(f"--arms: no arm {name!r} (arms: {', '.join(ARMS)})")
        arm = _arm(name, esd, rank, sizes, settings, how)
        arms.append(replace(arm, config=dict(EVA_CONFIG)) if name == "eva" else arm)
    return arms


def lora_ar_arm(metrics: pd.DataFrame, modules: list[tuple[str, str]], budget: int) -> Arm:
    """Adaptive Rank LoRA's plan from ``metrics`` (analysed with ``--preset lora-ar``) over
    the model's Linear ``modules``, its kept ranks matched to ``budget`` within the preset's
    4..64 (the preset caps no rank at min(rows, cols), nor does this)."""
    settings = AllocateSettings.from_preset("lora-ar")
    plan = allocate_ranks(metrics, replace(settings, budget_params=budget), modules)
    table = plan.table
    sizes = (table.rows + table.cols).to_numpy(np.int64)
    selected = table.selected.to_numpy(bool)
    hi = np.full(int(selected.sum()), settings.max_rank, dtype=np.int64)
    rank = np.zeros(len(table), dtype=np.int64)
    rank[selected] = match_budget(table["rank"].to_numpy(np.int64)[selected], sizes[selected],
                                  budget, settings.min_rank, hi)  # fmt: skip
    how = "Adaptive Rank LoRA's plan (--preset lora-ar), ranks matched to the budget"
    return _arm("lora-ar", plan, rank, sizes, settings, how)


def _variant(metrics: pd.DataFrame, name: str, settings: AllocateSettings, budget: int) -> Arm:
    """A shape-fair esd plan (:data:`VARIANTS`), its kept ranks matched to the budget."""
    change = dict(VARIANTS[name])
    if change.get("alpha_column") == "_farms":
        change["alpha_column"] = settings.alpha_column.removesuffix("_farms") + "_farms"
    try:
        plan = allocate_ranks(metrics, replace(settings, budget_params=budget, match_rank=None,
                                               **change))  # type: ignore[arg-type]  # fmt: skip
    except OptionError as exc:
        raise OptionError(f"arm {name}: {exc}", hint=exc.hint) from None
    table = plan.table
    sizes = (table.rows + table.cols).to_numpy(np.int64)
    cap = np.minimum(table.rows, table.cols).to_numpy(np.int64)
    selected = table.selected.to_numpy(bool)
    rank = np.zeros(len(table), dtype=np.int64)
    rank[selected] = match_budget(table["rank"].to_numpy(np.int64)[selected], sizes[selected],
                                  budget, settings.min_rank, cap[selected])  # fmt: skip
    how = {"esd-farms": "esdtool's plan on FARMS alphas and spikes (shape-fair)",
           "esd-within-shape": "esdtool's plan, alpha and spikes normalised within each shape",
           "esd-within-kind": "esdtool's plan, alpha and spikes normalised within each module "
                              "kind"}[name]  # fmt: skip
    return _arm(name, plan, rank, sizes, settings, how + ", ranks matched to the budget")


def _arm(
    name: str,
    esd: Allocation,
    rank: np.ndarray,
    sizes: np.ndarray,
    settings: AllocateSettings,
    how: str,
) -> Arm:
    table = esd.table.copy()
    table["selected"] = rank > 0
    table["rank"] = rank
    table["lora_alpha"] = rank * settings.alpha_factor
    table["params"] = rank * sizes
    allocation = Allocation(table=table, settings=esd.settings, budget=esd.budget, notes=[])
    return Arm(name, allocation, how, int(table.params.sum()))


def _shuffle_within_sizes(
    ranks: np.ndarray, sizes: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """``ranks`` permuted among the modules of each size: the multiset and the cost unchanged."""
    out = ranks.copy()
    for size in np.unique(sizes):
        where = np.flatnonzero(sizes == size)
        out[where] = ranks[rng.permutation(where)]
    return out


def check_budget(arm: Arm, budget: int) -> str | None:
    """Why ``arm`` misses the budget by more than 1% (counted by PEFT where counted), or None."""
    count = arm.peft_params if arm.peft_params is not None else arm.params
    off = count / budget - 1 if budget else math.inf
    if abs(off) <= TOLERANCE:
        return None
    return (
        f"arm {arm.name}: {count:,} trainable parameters, {off:+.1%} off the budget of "
        f"{budget:,} (more than 1%): its ranks cannot come closer on these modules"
    )


def peft_params(model: Any, config: dict[str, Any]) -> int:
    """Trainable parameters PEFT gives ``model`` (on the meta device) under the adapter config
    ``config`` (adapter_config.json's content)."""
    import copy

    from esdtool.extras import require
    from esdtool.plan.verify import apply_plan

    peft = require("counting an arm's parameters", "transformers", "peft")["peft"]
    fields = {k: v for k, v in config.items() if k not in ("peft_type", "base_model_name_or_path")}
    lora = peft.LoraConfig(**fields)
    wrapped = apply_plan(copy.deepcopy(model), lora)
    return int(wrapped.get_nb_trainable_parameters()[0])
