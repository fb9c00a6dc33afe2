"""Plans other than LoRA ranks from the same alphas: one number per module (method.md "Other
plans").

- **pruning** (AlphaPruning, ``lib/prune.py`` ``ww_sparsity``): ratio s_i = s1 + (s2 - s1)
  (a_i - a_min) / (a_max - a_min), s1 = 1 - epsilon, s2 = 1 + epsilon, then scaled by one
  factor so that the parameter-weighted mean is the target sparsity; with ``mapping`` "block"
  each module's alpha is first its block's mean (their default).
- **lr** (TempBalance, ``tempbalance.py`` ``get_layer_temps``): a factor of the base learning
  rate, from alpha by a linear map (a_min -> 0.5, a_max -> 1.5), sqrt or log2 (mean factor 1),
  or step (by alpha's rank).
- **weight-decay** (AlphaDecay, ``WeightDecayUnbalance.py`` ``get_layer_temps``): a factor of
  the base weight decay, linear (a_min -> 0.6666, a_max -> 3), sqrt or log2 (their +1e-8 in
  the sum), or sigmoid (alpha z-scored within each block, 2 sigmoid(4 z)).

Candidates and min-max normalisation are the LoRA plan's (:func:`esdtool.plan.ranks.candidates`,
``normalise_within``); these functions only map alphas to numbers. Pure: no I/O.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from esdtool.errors import OptionError

PLAN_TARGETS = ("lora", "pruning", "lr", "weight-decay")
MAPS = {"lr": ("linear", "sqrt", "log2", "step"), "weight-decay": ("linear", "sqrt", "log2",
                                                                  "sigmoid")}  # fmt: skip
MAPPINGS = ("block", "module")
DEFAULT_EPSILON = 0.3  # AlphaPruning's main.py
DEFAULT_FACTORS = {"lr": (0.5, 1.5), "weight-decay": (0.6666, 3.0)}  # their defaults, scripts
DEFAULT_MIN_EVALS = 50  # TempBalance's and AlphaDecay's eigs_thresh
SIGMOID_SLOPE = 4.0  # AlphaDecay's sigmoid_alpha
# The column of the plan table holding each target's number.
VALUE_COLUMN = {"pruning": "sparsity", "lr": "lr_factor", "weight-decay": "weight_decay_factor"}


@dataclass(frozen=True)
class ModulePlan:
    """A per-module plan: one number per candidate module, in model order where known.

    table columns: module, layer, rows, cols, alpha (from ``alpha_column``), mapped_alpha (the
    alpha the map used: the block's mean under block mapping) and the target's value column
    (``sparsity``, ``lr_factor`` or ``weight_decay_factor``).
    model_order: True when the rows are in the model's ``named_modules`` order (read off the
    model built from its config.json), False when in the table's order.
    mapping: a pruning plan's "block" or "module" mapping; None for the other targets.
    covers_blocks: the rows are every Linear / Conv2d inside the model's blocks, in model
    order: the plan lines up with lists indexed by position (AlphaPruning's, llm-compressor's).
    """

    target: str
    table: pd.DataFrame
    model_order: bool
    notes: list[str] = field(default_factory=list)
    mapping: str | None = None
    covers_blocks: bool = False

    @property
    def column(self) -> str:
        return VALUE_COLUMN[self.target]

    @property
    def values(self) -> dict[str, float]:
        """module -> value, in the plan's order."""
        return {str(m): float(v) for m, v in zip(self.table.module, self.table[self.column],
                                                 strict=True)}  # fmt: skip

    @property
    def mean_sparsity(self) -> float:
        """Parameter-weighted mean of a pruning plan's ratios (the target sparsity)."""
        numel = (self.table.rows * self.table.cols).to_numpy(float)
        return float((numel * self.table["sparsity"].to_numpy(float)).sum() / numel.sum())


def minmax(values: np.ndarray, within: np.ndarray | None = None, eps: float = 0.0) -> np.ndarray:
    """(v - min) / (max - min + eps) over all values, or inside each group of ``within``; a group
    whose values are all equal (one member, or ties) gets 0.5, the middle."""
    values = np.asarray(values, dtype=float)
    labels = np.zeros(values.size) if within is None else within
    out = np.empty_like(values)
    for label in np.unique(labels):
        mask = labels == label
        part = values[mask]
        span = part.max() - part.min()
        if span > 0:
            out[mask] = (part - part.min()) / (span + eps)
        else:
            out[mask] = 0.5
    return out


def block_means(alpha: np.ndarray, blocks: np.ndarray) -> np.ndarray:
    """Each module's block mean of ``alpha`` (the plain mean over the modules of its block, as
    AlphaPruning's block_wise mapping); ``blocks`` holds each module's block (None: outside
    the blocks, where a module keeps its own alpha)."""
    alpha = np.asarray(alpha, dtype=float)
    out = alpha.copy()
    for block in {b for b in blocks if b is not None}:
        mask = np.array([b == block for b in blocks])
        out[mask] = np.mean(alpha[mask])
    return out


def _spread(alpha: np.ndarray, within: np.ndarray | None, what: str) -> np.ndarray:
    if within is None and not np.ptp(alpha) > 0:
        raise OptionError(f"every candidate module has the same alpha ({alpha[0]:g}): {what} "
                          "has no range to map it onto")  # fmt: skip
    return minmax(alpha, within)


def pruning_ratios(
    alpha: np.ndarray,
    numel: np.ndarray,
    sparsity: float,
    epsilon: float,
    within: np.ndarray | None = None,
) -> np.ndarray:
    """AlphaPruning's ratios: alpha min-max onto [1 - epsilon, 1 + epsilon] (higher alpha,
    more pruning), scaled so sum(numel * ratio) / sum(numel) is ``sparsity`` exactly (float64;
    their code forms sparsity * sum(numel) in float32, a common factor off by up to 7e-8)."""
    u = _spread(alpha, within, "the pruning map")
    s1, s2 = 1.0 - epsilon, 1.0 + epsilon
    ratios = u * (s2 - s1) + s1
    numel = np.asarray(numel, dtype=float)
    return ratios * (numel.sum() * sparsity / (numel * ratios).sum())


def largest_epsilon(
    alpha: np.ndarray, numel: np.ndarray, sparsity: float, within: np.ndarray | None = None
) -> float:
    """The epsilon at which the largest ratio reaches 1 (every epsilon below it keeps every
    ratio in [0, 1)), or 1 when none in (0, 1) makes it.

    With u the normalised alpha, T = sum numel and B = sum numel (2u - 1), the largest ratio is
    (1 + e) S T / (T + e B), which is 1 at e = T (1 - S) / (S T - B)."""
    u = minmax(alpha, within)
    numel = np.asarray(numel, dtype=float)
    T, B = numel.sum(), (numel * (2 * u - 1)).sum()
    top = 2 * u.max() - 1  # the largest ratio's normalised offset (1 unless groups tie at 0.5)
    # largest ratio (1 + e top) S T / (T + e B) = 1  <=>  e (S T top - B) = T (1 - S)
    slope = sparsity * T * top - B
    return 1.0 if slope <= 0 else min(1.0, T * (1 - sparsity) / slope)


def factors(
    alpha: np.ndarray,
    how: str,
    low: float,
    high: float,
    target: str,
    within: np.ndarray | None = None,
    blocks: np.ndarray | None = None,
) -> np.ndarray:
    """Factors of the base learning rate (``target`` "lr") or weight decay ("weight-decay").

    linear: low + (high - low) u, u alpha min-max normalised (np.interp onto [low, high]);
    sqrt / log2: n f(a_i) / sum f(a) (mean 1; AlphaDecay adds 1e-8 to each term of the sum);
    step: the k-th smallest alpha (stable order, k from 0) gets low + (high - low) k / n;
    sigmoid: 2 / (1 + exp(-4 z)), z alpha's z-score within its block (``blocks``: each
    module's block, None outside the blocks: a group of its own, z 0, factor 1)."""
    alpha = np.asarray(alpha, dtype=float)
    n = alpha.size
    pad = 1e-8 if target == "weight-decay" else 0.0
    if how == "linear":
        return low + (high - low) * _spread(alpha, within, "the linear map")
    if how == "sqrt":
        root = np.sqrt(alpha)
        return root / np.sum(root + pad) * n
    if how == "log2":
        if not (alpha > 1).all():
            raise OptionError(f"the log2 map needs every alpha above 1 (log2 of the smallest, "
                              f"{alpha.min():g}, is not positive)")  # fmt: skip
        logs = np.log2(alpha)
        return logs / np.sum(logs + pad) * n
    if how == "step":
        out = np.empty(n)
        out[np.argsort(alpha, kind="stable")] = low + (high - low) * np.arange(n) / n
        return out
    if how == "sigmoid":
        labels = [None] * n if blocks is None else list(blocks)
        labels = [f"\0{i}" if b is None else b for i, b in enumerate(labels)]  # alone
        z = np.zeros(n)
        for label in set(labels):
            mask = np.array([b == label for b in labels])
            part = alpha[mask]
            z[mask] = (part - part.mean()) / (part.std() + 1e-8)
        return 2 / (1 + np.exp(-SIGMOID_SLOPE * z))
    raise OptionError(f"unknown map {how!r}")


def check_ratios(plan: pd.DataFrame, alpha: np.ndarray, numel: np.ndarray, sparsity: float,
                 epsilon: float, within: np.ndarray | None) -> None:  # fmt: skip
    """Refuse ratios outside [0, 1): name the modules and the largest epsilon that fits."""
    bad = plan[(plan.sparsity >= 1) | (plan.sparsity < 0)]
    if bad.empty:
        return
    limit = largest_epsilon(alpha, numel, sparsity, within)
    names = ", ".join(repr(str(m)) for m in bad.module[:3])
    more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
    digits = 4
    while math.floor(limit * 10**digits) == 0 and digits < 12:
        digits += 1
    fits = math.floor(limit * 10**digits) / 10**digits  # rounded down: it still fits
    raise OptionError(
        f"--sparsity {sparsity!r} with --epsilon {epsilon!r} gives {len(bad)} module(s) a ratio "
        f"of 1 or more (largest {float(bad.sparsity.max()):.4f}): {names}{more}; the largest "
        f"epsilon that fits is just below {limit:.6g} (e.g. {fits:g})",
    )


# Options of the LoRA plan alone, and the option each other target's field belongs to.
LORA_OPTIONS = {
    "spikes_column": "--spikes-column", "w_hill": "--w-hill", "w_mp_spikes": "--w-mp-spikes",
    "top_n_percentile": "--top-n-percentile", "select": "--select", "min_rank": "--min-rank",
    "max_rank": "--max-rank", "rank_scaling": "--rank-scaling", "alpha_factor": "--alpha-factor",
    "budget_params": "--budget-params", "match_rank": "--match-rank",
    "budget_percent": "--budget-percent", "rank_multiple": "--rank-multiple",
    "candidates": "candidates", "rank_cap": "rank_cap",
}  # fmt: skip
TARGET_OPTIONS = {
    "sparsity": ("--sparsity", ("pruning",)), "epsilon": ("--epsilon", ("pruning",)),
    "mapping": ("--mapping", ("pruning",)), "lr_map": ("--lr-map", ("lr",)),
    "wd_map": ("--wd-map", ("weight-decay",)),
    "min_factor": ("--min-factor", ("lr", "weight-decay")),
    "max_factor": ("--max-factor", ("lr", "weight-decay")),
    "min_evals": ("--min-evals", ("lr", "weight-decay")),
}  # fmt: skip


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def target_problems(settings: object, defaults: dict[str, object]) -> list[str]:
    """Every problem of ``settings``' target options (AllocateSettings; ``defaults`` its field
    defaults), listed at once: an unknown target, an option of another target, a value out of
    range."""
    target = settings.target
    if target not in PLAN_TARGETS:
        return [f"--target must be one of {', '.join(PLAN_TARGETS)}, not {target!r}"]
    problems = []
    for name, (flag, targets) in TARGET_OPTIONS.items():
        if getattr(settings, name) is not None and target not in targets:
            problems.append(f"{flag} applies to --target {' or '.join(targets)}, not {target}")
    if target != "lora":
        problems += [f"{flag} applies to --target lora, not {target}"
                     for name, flag in LORA_OPTIONS.items()
                     if getattr(settings, name) != defaults[name]]  # fmt: skip
    if target == "pruning":
        sparsity, epsilon = settings.sparsity, settings.epsilon
        if sparsity is None:
            problems.append("--target pruning needs --sparsity S (the model's share of weights "
                            "to prune, e.g. 0.7)")  # fmt: skip
        elif not (_number(sparsity) and 0 < sparsity < 1):
            problems.append(f"--sparsity must lie in (0, 1), not {sparsity!r}")
        if epsilon is not None and not (_number(epsilon) and 0 < epsilon < 1):
            problems.append(f"--epsilon must lie in (0, 1), not {epsilon!r}")
        mapping = settings.mapping
        if mapping is not None and mapping not in MAPPINGS:
            problems.append(f"--mapping must be block or module, not {mapping!r}")
    if target in MAPS:
        flag, how = ("--lr-map", "lr_map") if target == "lr" else ("--wd-map", "wd_map")
        how = getattr(settings, how)
        if how is not None and how not in MAPS[target]:
            problems.append(f"{flag} must be one of {', '.join(MAPS[target])} (the maps "
                            f"--target {target} has), not {how!r}")  # fmt: skip
        low, high = settings.min_factor, settings.max_factor
        for f, v in (("--min-factor", low), ("--max-factor", high)):
            if v is not None and not (_number(v) and v > 0):
                problems.append(f"{f} must be a finite number > 0, not {v!r}")
        lo, hi = resolved_factors(target, low, high)
        if _number(lo) and _number(hi) and lo > hi:
            problems.append(f"--min-factor {lo:g} is above --max-factor {hi:g}")
        ranged = [f for f, v in (("--min-factor", low), ("--max-factor", high)) if v is not None]
        if how in ("sqrt", "log2", "sigmoid") and ranged:
            verb = "set" if len(ranged) > 1 else "sets"
            problems.append(f"{' and '.join(ranged)} {verb} the linear and step maps' range; "
                            f"the {how} map has none")  # fmt: skip
        within = settings.normalise_within
        if how not in (None, "linear") and within != "none":
            problems.append(f"--normalise-within {within} applies to the linear map (min-max), "
                            f"not to {how}")  # fmt: skip
        min_evals = settings.min_evals
        if min_evals is not None and (isinstance(min_evals, bool) or not isinstance(min_evals, int)
                                      or min_evals < 1):  # fmt: skip
            problems.append(f"--min-evals must be an integer >= 1, not {min_evals!r}")
    return problems


def resolved_factors(target: str, low: object, high: object) -> tuple[object, object]:
    """The factor range of ``target`` ("lr" or "weight-decay"; its reference's default where
    not given)."""
    default_low, default_high = DEFAULT_FACTORS[target]
    return (default_low if low is None else low, default_high if high is None else high)
