"""How much a plan is matrix shape: the groups scores can be normalised within, and two numbers.

Hill alphas and spike counts depend on a matrix's aspect ratio, so a plan can keep modules for
their shape alone. Two measures say how much it does:

- **concentration**: the share of the kept set taken by its most common shape (either
  orientation) against that shape's share of the candidates;
- **variance explained**: the share of the scores' variance between shape groups (eta squared,
  between-group sum of squares over total), with a permutation p-value: the fraction of
  random relabellings of the candidates' shapes (seeded) that explain at least as much. With G
  shapes among n candidates, chance alone explains about (G - 1) / (n - 1).

``normalise_within`` ("shape" or "kind") min-max normalises alpha and spikes inside each group
before the composite score, so modules compete with their peers (plan.ranks.scores).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pandas as pd

from esdtool.analysis.roles import module_kind

WITHIN = ("none", "shape", "kind")
PERMUTATIONS = 2000


def shape_of(rows: int, cols: int) -> str:
    """A matrix's shape in either orientation: "384 x 1536" for 384 x 1536 and 1536 x 384."""
    return f"{min(rows, cols)} x {max(rows, cols)}"


def groups(modules: pd.Series, rows: pd.Series, cols: pd.Series, within: str) -> np.ndarray | None:
    """Each candidate's group for ``within`` (None for "none"): its shape, or its module kind
    (the name after the block index; a module outside the blocks is a group of its own)."""
    if within == "none":
        return None
    if within == "shape":
        return np.array([shape_of(int(r), int(c)) for r, c in zip(rows, cols, strict=True)])
    return np.array([module_kind(str(m)) or str(m) for m in modules])


@dataclass(frozen=True)
class ShapeInfluence:
    """How much of a plan is shape (see the module docstring).

    top_shape: the kept set's most common shape; kept_share / candidate_share: its share of
    the kept modules and of the candidates. shapes: distinct shapes among the candidates.
    variance_explained: eta squared of the scores by shape (NaN with one shape or equal
    scores); chance: its mean under random relabelling; p_value: the permutation p-value.
    """

    top_shape: str | None
    kept_share: float
    candidate_share: float
    shapes: int
    variance_explained: float
    chance: float
    p_value: float

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: an undefined number is null, not NaN (which JSON has no word for)."""
        return {k: None if isinstance(v, float) and np.isnan(v) else v
                for k, v in asdict(self).items()}  # fmt: skip

    def sentence(self) -> str:
        """The numbers in words (the allocate summary, the report)."""
        if self.top_shape is None:
            return "no module kept"
        text = (
            f"{self.kept_share:.0%} of the kept modules are {self.top_shape} (against "
            f"{self.candidate_share:.0%} of the candidates)"
        )
        if self.shapes == 1:
            return text + "; one shape among the candidates, so shape cannot drive the scores"
        if np.isnan(self.variance_explained):
            return text + "; the scores do not vary, so shape cannot drive them"
        return text + (
            f"; shape explains {self.variance_explained:.0%} of the scores' variance across "
            f"{self.shapes} shapes (chance {self.chance:.0%}, permutation p = {self.p_value:.3g})"
        )


def eta_squared(values: np.ndarray, labels: np.ndarray) -> float:
    """Between-group sum of squares over total (NaN when the values do not vary or there is
    one group)."""
    return _eta_squared(values, np.unique(labels, return_inverse=True)[1])


def _eta_squared(values: np.ndarray, codes: np.ndarray) -> float:
    """:func:`eta_squared` of integer group codes (0..G-1, each with a member)."""
    if codes.size == 0 or codes.max() < 1:  # no group, or one
        return math.nan
    centred = values - values.mean()
    total = float((centred**2).sum())
    if total <= 0:
        return math.nan
    counts = np.bincount(codes)
    sums = np.bincount(codes, weights=centred)
    return float((sums**2 / counts).sum() / total)


def shape_influence(table: pd.DataFrame, seed: int = 0) -> ShapeInfluence:
    """The measures of an allocation's table (rows, cols, score, selected per candidate)."""
    shapes = np.array([shape_of(int(r), int(c)) for r, c in zip(table.rows, table.cols,
                                                                    strict=True)])  # fmt: skip
    kept = shapes[table.selected.to_numpy(bool)]
    top, kept_share, base = None, math.nan, math.nan
    if kept.size:
        names, counts = np.unique(kept, return_counts=True)
        top = str(names[np.argmax(counts)])
        kept_share, base = counts.max() / kept.size, float((shapes == top).mean())
    scores = table.score.to_numpy(float)
    codes = np.unique(shapes, return_inverse=True)[1]  # once: the permutations move codes
    observed = _eta_squared(scores, codes)
    chance, p = math.nan, math.nan
    if not np.isnan(observed):
        rng = np.random.default_rng(seed)
        null = np.array([_eta_squared(scores, rng.permutation(codes))
                         for _ in range(PERMUTATIONS)])  # fmt: skip
        chance = float(np.nanmean(null))
        p = float((1 + np.sum(null >= observed - 1e-12)) / (1 + PERMUTATIONS))
    return ShapeInfluence(top, float(kept_share), base, len(np.unique(shapes)), observed, chance,
                          p)  # fmt: skip
