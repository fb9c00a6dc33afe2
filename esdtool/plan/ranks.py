"""Rank allocation: a metrics table in, one LoRA rank per module out (method.md section 6).

Pure functions on a pandas DataFrame (the table :func:`esdtool.load_metrics` returns). Writing
the PEFT files is :mod:`esdtool.plan.peft_config`'s job.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from functools import cached_property

import numpy as np
import pandas as pd

from esdtool.errors import OptionError
from esdtool.plan.layerwise import target_problems
from esdtool.plan.shape import WITHIN, ShapeInfluence, groups, shape_influence
from esdtool.plan.targets import TARGET_PRESETS, model_params, pick_targets, round_to_multiple
from esdtool.spectral import FARMS_ALPHA_COLUMNS, TABLE_ALPHA_COLUMNS
from esdtool.untrusted import user_regex

EPS = 1e-8
SPIKE_COLUMNS = ("num_spikes", "num_spikes_bulk", "spikes_farms")
SCALINGS = {"linear": lambda s: s, "log": np.log1p, "sqrt": np.sqrt}
# Presets: the allocation of a published method (docs/method.md). "lora-ar": Adaptive Rank
# LoRA's code (src/adaptive_rank_assignment.py): every Linear/Conv2d in model order (L73-79),
# KS alpha (L176-225) and its spikes weighted 0.7/0.3 (L306-328), the lowest half kept with ties
# to the earlier module (L331-334), ranks 4-64 linear, rounded half to even, no cap (L337-359),
# lora_alpha = 2r (L363).
PRESETS: dict[str, dict[str, object]] = {
    "lora-ar": {"alpha_column": "alpha_ks", "spikes_column": "num_spikes", "select": "lowest",
                "candidates": "model", "rank_cap": False, "w_hill": 0.7, "w_mp_spikes": 0.3,
                "top_n_percentile": 0.5, "min_rank": 4, "max_rank": 64,
                "rank_scaling": "linear", "alpha_factor": 2.0, "normalise_within": "none",
                "rank_multiple": 1},
    # "alphapruning": AlphaPruning's main.py defaults (epsilon 0.3, block_wise mapping) on its
    # alpha_peak (analyze --preset alphapruning); every Linear of the blocks, in model order.
    "alphapruning": {"target": "pruning", "alpha_column": "alpha_peak", "epsilon": 0.3,
                     "mapping": "block", "normalise_within": "none"},
}  # fmt: skip


@dataclass(frozen=True)
class AllocateSettings:
    """How scores become ranks (defaults are the seed method's).

    targets:           regex searched in module names that picks the candidates, or a preset
                       (attention, mlp, all-linear: plan.targets); default: rows whose role is
                       ``linear`` (projections inside transformer blocks).
    alpha_column:      which alpha feeds the score (alpha_median, alpha_fix_finger, alpha_ks).
    spikes_column:     which spike count feeds the score (num_spikes, num_spikes_bulk, or
                       spikes_farms: FARMS' per-window count, with --estimator farms).
    w_hill, w_mp_spikes: weights of the normalised alpha and of the inverted spike count.
    top_n_percentile:  fraction p of candidates kept, k = max(1, floor(p n)).
    select:            "highest" keeps the top scores (the method as written); "lowest" keeps
                       the bottom ones (what the seed's published code does).
    min_rank, max_rank, rank_scaling, alpha_factor: rank range, interpolation, lora_alpha = f r.
    budget_params / match_rank / budget_percent: rescale the kept ranks so sum r (rows + cols)
                       ~ the budget (given, uniform match_rank's cost, or a percentage of the
                       analysed model's parameters).
    rank_multiple:     every rank a multiple of it (after the budget, which it still meets).
    normalise_within:  "none" (alpha and spikes min-max normalised over all candidates), "shape"
                       or "kind": within each group of equal shape (either orientation) or
                       module kind, so modules compete with their peers (plan.shape).
    candidates:        "role" (rows picked by role or ``targets``, in the table's order) or
                       "model" (every nn.Linear / nn.Conv2d of the analysed model, in its
                       ``named_modules`` order, a tied lm_head read from the tensor it shares:
                       what Adaptive Rank LoRA adapts); ties go to the earlier candidate.
    rank_cap:          cap each rank at min(rows, cols), the most rank a LoRA update of that
                       matrix can have (the lora-ar preset does not).
    preset:            the preset these settings came from (recorded in the plan), or None.
    target:            what the plan sets per module: "lora" (ranks, the fields above), or
                       "pruning" / "lr" / "weight-decay" (plan.layerwise): sparsity (the
                       model's target share of pruned weights), epsilon (0.3) and mapping
                       ("block") for pruning; lr_map / wd_map ("linear"), min_factor /
                       max_factor (0.5 / 1.5 for lr, 0.6666 / 3 for weight decay) and
                       min_evals (50: fewer eigenvalues, no factor) for the others. None: the
                       target's default; an option of another target is refused.
    """

    targets: str | None = None
    alpha_column: str = "alpha_median"
    spikes_column: str = "num_spikes"
    w_hill: float = 0.7
    w_mp_spikes: float = 0.3
    top_n_percentile: float = 0.5
    select: str = "highest"
    min_rank: int = 4
    max_rank: int = 64
    rank_scaling: str = "linear"
    alpha_factor: float = 2.0
    budget_params: int | None = None
    match_rank: int | None = None
    budget_percent: float | None = None
    rank_multiple: int = 1
    candidates: str = "role"
    rank_cap: bool = True
    normalise_within: str = "none"
    preset: str | None = None
    target: str = "lora"
    sparsity: float | None = None
    epsilon: float | None = None
    mapping: str | None = None
    lr_map: str | None = None
    wd_map: str | None = None
    min_factor: float | None = None
    max_factor: float | None = None
    min_evals: int | None = None

    @classmethod
    def from_preset(cls, preset: str | None, **overrides: object) -> AllocateSettings:
        """The settings of ``preset`` (None: the defaults), with ``overrides`` on top: an
        explicit option always wins over the preset."""
        if preset is not None and preset not in PRESETS:
            raise OptionError(f"--preset must be one of {', '.join(PRESETS)}, not {preset!r}")
        base = PRESETS[preset] if preset else {}
        target = overrides.get("target")
        if preset is not None and target is not None and target != base.get("target", "lora"):
            raise OptionError(f"--preset {preset} plans --target {base.get('target', 'lora')}, "
                              f"not {target}")  # fmt: skip
        return cls(**{**base, **overrides, "preset": preset})  # type: ignore[arg-type]

    def __post_init__(self) -> None:
        problems = []
        if not 0 < self.top_n_percentile <= 1:
            problems.append(f"--top-n-percentile must lie in (0, 1], not {self.top_n_percentile}")
        if self.min_rank < 1:
            problems.append(f"--min-rank must be at least 1, not {self.min_rank}")
        if self.min_rank > self.max_rank:
            problems.append(f"--min-rank {self.min_rank} is larger than --max-rank {self.max_rank}")
        if self.rank_scaling not in SCALINGS:
            problems.append(f"--rank-scaling must be one of {', '.join(SCALINGS)}")
        if self.select not in ("highest", "lowest"):
            problems.append(f"--select must be highest or lowest, not {self.select!r}")
        for flag, value in (
            ("--budget-params", self.budget_params),
            ("--match-rank", self.match_rank),
        ):
            if value is not None and value < 1:
                problems.append(f"{flag} must be at least 1, not {value}")
        pct = self.budget_percent
        if pct is not None and not (isinstance(pct, int | float) and math.isfinite(pct)
                                    and 0 < pct <= 100):  # fmt: skip
            problems.append(f"--budget-percent must lie in (0, 100], not {pct!r}")
        given = [f for f, v in (("--budget-params", self.budget_params),
                                ("--match-rank", self.match_rank),
                                ("--budget-percent", pct)) if v is not None]  # fmt: skip
        if len(given) > 1:
            problems.append(f"{' and '.join(given)} are exclusive: give one")
        if isinstance(self.rank_multiple, bool) or not isinstance(self.rank_multiple, int) \
                or not 1 <= self.rank_multiple <= 1024:  # fmt: skip
            problems.append(f"--rank-multiple must be an integer in 1..1024, "
                            f"not {self.rank_multiple!r}")  # fmt: skip
        elif self.rank_multiple > self.max_rank:
            problems.append(f"--rank-multiple {self.rank_multiple} is above --max-rank "
                            f"{self.max_rank}: no rank could be a multiple")  # fmt: skip
        if not (math.isfinite(self.alpha_factor) and self.alpha_factor > 0):
            problems.append(f"--alpha-factor must be a finite number > 0, not {self.alpha_factor}")
        weights = (("--w-hill", self.w_hill), ("--w-mp-spikes", self.w_mp_spikes))
        for flag, weight in weights:
            if not (math.isfinite(weight) and weight >= 0):
                problems.append(f"{flag} must be a finite number >= 0, not {weight}")
        if all(weight == 0 for _, weight in weights):
            problems.append("--w-hill and --w-mp-spikes are both 0: every score would tie")
        if self.alpha_column not in TABLE_ALPHA_COLUMNS:
            problems.append(
                f"--alpha-column must be one of {', '.join(TABLE_ALPHA_COLUMNS)}"
                f", not {self.alpha_column!r}"
            )
        if self.spikes_column not in SPIKE_COLUMNS:
            problems.append(
                f"--spikes-column must be one of {', '.join(SPIKE_COLUMNS)}, "
                f"not {self.spikes_column!r}"
            )
        if self.normalise_within not in WITHIN:
            problems.append(f"--normalise-within must be one of {', '.join(WITHIN)}, "
                            f"not {self.normalise_within!r}")  # fmt: skip
        if self.candidates not in ("role", "model"):
            problems.append(f"candidates must be role or model, not {self.candidates!r}")
        if self.candidates == "model" and self.targets is not None:
            problems.append("--targets picks candidates by name, and --preset lora-ar takes "
                            "every Linear of the model: drop one of them")  # fmt: skip
        if self.preset is not None and self.preset not in PRESETS:
            problems.append(f"--preset must be one of {', '.join(PRESETS)}, not {self.preset!r}")
        if self.targets is not None and self.targets not in TARGET_PRESETS:
            try:
                user_regex(self.targets, "--targets")
            except ValueError as exc:
                problems.append(str(exc))
        defaults = {f.name: f.default for f in fields(self)}
        problems += target_problems(self, defaults)
        if problems:
            raise OptionError("; ".join(problems))


@dataclass(frozen=True)
class Allocation:
    """The plan: one row per candidate module (``table``) and its totals.

    table columns: module, rows, cols, alpha, spikes, score, selected, rank, lora_alpha,
    params (trainable parameters r (rows + cols), 0 when not selected).
    """

    table: pd.DataFrame
    settings: AllocateSettings
    budget: int | None = None
    notes: list[str] = field(default_factory=list)

    @cached_property
    def shape(self) -> ShapeInfluence:
        """How much of the plan is matrix shape (plan.shape; computed once)."""
        return shape_influence(self.table)

    @property
    def kept(self) -> pd.DataFrame:
        return self.table[self.table.selected]

    @property
    def total_params(self) -> int:
        return int(self.table.params.sum())

    @property
    def equal_cost_rank(self) -> float:
        """The rank at which uniform LoRA on every candidate costs what this plan costs: the
        like-for-like way to say how big the plan is."""
        return self.total_params / max(int((self.table.rows + self.table.cols).sum()), 1)


def candidates(
    metrics: pd.DataFrame,
    settings: AllocateSettings,
    modules: list[tuple[str, str]] | None = None,
) -> tuple[pd.DataFrame, list[str]]:
    """Rows eligible for an adapter (analysed 2-D matrices picked by role or --targets, or the
    model's ``modules``), and the modules left out because their alpha or spike count is
    missing."""
    df = metrics[(metrics.status == "ok") & metrics["slice"].isna()]
    for flag, column in (("--alpha-column", settings.alpha_column),
                         ("--spikes-column", settings.spikes_column)):  # fmt: skip
        farms = column in FARMS_ALPHA_COLUMNS or column == "spikes_farms"
        if farms and (column not in df.columns or not df[column].notna().any()):
            raise OptionError(
                f"{flag} {column}: the table has no FARMS columns (it was analysed without "
                "--estimator farms)",
                hint="esdtool analyze MODEL --estimator farms -o metrics.parquet",
            )
    if settings.candidates == "model":
        return _model_candidates(metrics, df, settings, modules)
    if settings.alpha_column == "alpha_peak" and (
        "alpha_peak" not in df.columns or not df["alpha_peak"].notna().any()
    ):
        raise OptionError(
            "--alpha-column alpha_peak: the table has no alpha_peak (AlphaPruning's alpha; it "
            "was analysed without --preset alphapruning)",
            hint="esdtool analyze MODEL --preset alphapruning -o metrics.parquet",
        )
    df = pick_targets(df, settings.targets)
    usable = np.isfinite(df[settings.alpha_column].astype(float))
    if settings.target == "lora":  # the other plans read alpha alone
        usable &= df[settings.spikes_column].notna()
    twice = df.module[df.module.duplicated()].unique()
    if len(twice):  # e.g. tensors "x.weight" and "x": one PEFT module, two plans
        raise OptionError(
            f"module {twice[0]!r} comes from two tensors ("
            + ", ".join(repr(n) for n in df.name[df.module == twice[0]])
            + "); pick one with --targets"
        )
    return df[usable], list(df.module[~usable])


def _model_candidates(
    metrics: pd.DataFrame,
    ok: pd.DataFrame,
    settings: AllocateSettings,
    modules: list[tuple[str, str]] | None,
) -> tuple[pd.DataFrame, list[str]]:
    """One row per (module, tensor) of the model, in its order; the row of the tensor holding
    the module's weight (a tied lm_head's is the embedding's) under the module's name."""
    if modules is None:
        raise OptionError("candidates from the model need the model's Linear/Conv2d modules")
    by_name = ok.drop_duplicates("name").set_index("name")
    missing = [(m, t) for m, t in modules if t not in by_name.index]
    if missing:
        module, tensor = missing[0]
        more = f"; {len(missing) - 1} more like it" if len(missing) > 1 else ""
        row = metrics[metrics.name == tensor]
        if row.empty:  # the model names its weights otherwise than the checkpoint does
            raise OptionError(
                f"module {module!r}: the table has no tensor {tensor!r}{more}",
                hint="the model's parameter names differ from the checkpoint's tensor names "
                "(transformers renames some architectures' modules on loading); the preset "
                "cannot pair them. Analysed with --include/--exclude? Analyse every tensor.",
            )
        reason = row.reason.iloc[0]
        if row.M.iloc[0] is not pd.NA and row.M.iloc[0] == 1 and row.N.iloc[0] is not pd.NA:
            raise OptionError(
                f"module {module!r} has one eigenvalue (a {row.rows.iloc[0]} x "
                f"{row.cols.iloc[0]} weight){more}: Adaptive Rank LoRA's code crashes on such a "
                "module (argmin of an empty KS search), so there is no plan of its to reproduce",
                hint="plan without --preset (pick the modules with --targets)",
            )
        raise OptionError(
            f"module {module!r}: its weight {tensor!r} has no spectrum ({reason}){more}"
        )
    rows = by_name.loc[[t for _, t in modules]].reset_index()
    rows["module"] = [m for m, _ in modules]
    usable = (
        np.isfinite(rows[settings.alpha_column].astype(float))
        & rows[settings.spikes_column].notna()
    )
    if not usable.all():
        bad = rows[~usable].iloc[0]
        raise OptionError(
            f"module {bad.module!r} has no {settings.alpha_column} or {settings.spikes_column} "
            f"(fit status {bad.fit_status}; e.g. all its eigenvalues are equal, as for an "
            "identity or orthogonal matrix): the preset's scores need every Linear"
        )
    return rows, []


def scores(
    alpha: np.ndarray,
    spikes: np.ndarray,
    w_hill: float,
    w_spikes: float,
    within: np.ndarray | None = None,
) -> np.ndarray:
    """w_hill * normalised alpha + w_spikes * (1 - normalised spike count), min-max normalised
    over every candidate, or inside each group of ``within`` (one label per candidate). A group
    whose values are all equal (one member, or ties) has no order of its own: its normalised
    values are 0.5, the middle, so it neither leads nor trails its peers."""
    if within is None:
        a = (alpha - alpha.min()) / (alpha.max() - alpha.min() + EPS)
        s = 1 - (spikes - spikes.min()) / (spikes.max() - spikes.min() + EPS)
        return w_hill * a + w_spikes * s
    a, s = np.empty_like(alpha, dtype=float), np.empty_like(spikes, dtype=float)
    for label in np.unique(within):
        mask = within == label
        for out, values, flip in ((a, alpha[mask], False), (s, spikes[mask], True)):
            span = values.max() - values.min()
            part = (values - values.min()) / (span + EPS) if span > 0 else np.full(values.size, 0.5)
            out[mask] = 1 - part if flip else part
    return w_hill * a + w_spikes * s


def interpolate_ranks(score: np.ndarray, settings: AllocateSettings) -> np.ndarray:
    """Ranks from kept scores: rmin + (rmax - rmin) (f(s) - f(smin)) / (f(smax) - f(smin) + eps),
    f the scaling, rounded half to even (within [rmin, rmax] by construction)."""
    f = SCALINGS[settings.rank_scaling](score)
    lo, hi = settings.min_rank, settings.max_rank
    raw = lo + (hi - lo) * (f - f.min()) / (f.max() - f.min() + EPS)
    return np.rint(raw).astype(int)  # in [lo, hi]: the fraction lies in [0, 1)


def fit_budget(
    ranks: np.ndarray,
    sizes: np.ndarray,
    budget: int,
    lo: int,
    hi: int | np.ndarray,
    multiple: int = 1,
) -> np.ndarray:
    """Scale ``ranks`` by one factor c (then round and clip to [lo, hi], ``hi`` per module or
    one for all, and to a multiple of ``multiple``) so that sum ranks * sizes comes closest to
    ``budget``, the lower of two totals as close (a budget is a ceiling before it is a target);
    one factor for all keeps the ranks' order."""
    his = np.broadcast_to(np.asarray(hi), ranks.shape)

    def total(c: float) -> tuple[int, np.ndarray]:
        r = np.clip(np.rint(ranks * c), lo, hi).astype(int)
        r = round_to_multiple(r, multiple, lo, his)[0]
        return int((r * sizes).sum()), r

    c_lo, c_hi = 0.0, float(np.max(hi)) / max(1, ranks.min()) + 1.0
    best = total(1.0)
    for _ in range(100):  # the total is monotone in c: bisect, remembering the closest
        mid = (c_lo + c_hi) / 2
        t, r = total(mid)
        if (abs(t - budget), t) < (abs(best[0] - budget), best[0]):
            best = (t, r)
        if t < budget:
            c_lo = mid
        else:
            c_hi = mid
    return best[1]


def allocate_ranks(
    metrics: pd.DataFrame,
    settings: AllocateSettings | None = None,
    modules: list[tuple[str, str]] | None = None,
) -> Allocation:
    """Score every candidate, keep the top (or bottom) fraction and give each kept one a rank.
    ``modules``: (module name, tensor holding its weight) of every nn.Linear / nn.Conv2d of the
    model in its order, needed when ``settings.candidates`` is "model"
    (:func:`esdtool.plan.verify.linear_modules` reads them off the model)."""
    settings = settings or AllocateSettings()
    df, dropped = candidates(metrics, settings, modules)
    if df.empty:
        if settings.candidates == "model":
            raise OptionError("no candidate modules: the model has no nn.Linear or nn.Conv2d")
        what = f"--targets {settings.targets!r}" if settings.targets else "role 'linear'"
        raise OptionError(f"no candidate modules: no analysed matrix matches {what}")
    alpha = df[settings.alpha_column].to_numpy(float)
    spikes = df[settings.spikes_column].to_numpy(float)
    within = groups(df.module, df.rows, df.cols, settings.normalise_within)
    score = scores(alpha, spikes, settings.w_hill, settings.w_mp_spikes, within)
    n = len(df)
    k = math.floor(settings.top_n_percentile * n)
    if settings.candidates == "role":
        k = max(1, k)
    elif k == 0:  # the origin's int(p n) (L331): a model with one Linear gets no adapter
        raise OptionError(
            f"the plan adapts nothing: {n} candidate module(s) x --top-n-percentile "
            f"{settings.top_n_percentile:g} rounds down to 0, as in Adaptive Rank LoRA's code"
        )
    order = np.argsort(-score if settings.select == "highest" else score, kind="stable")
    selected = np.zeros(n, dtype=bool)
    selected[order[:k]] = True

    rows, cols = df.rows.to_numpy(int), df.cols.to_numpy(int)
    # A LoRA update B A has rank <= min(rows, cols): a larger r adds parameters, not rank.
    cap = np.minimum(settings.max_rank, np.minimum(rows, cols))
    if not settings.rank_cap:
        cap = np.full(n, settings.max_rank)
    rank = np.zeros(n, dtype=int)
    rank[selected] = np.minimum(interpolate_ranks(score[selected], settings), cap[selected])
    sizes = rows + cols
    budget = settings.budget_params
    if settings.match_rank is not None:
        budget = settings.match_rank * int(sizes.sum())
    if settings.budget_percent is not None:
        budget = max(1, round(settings.budget_percent / 100 * model_params(metrics)))
    K = settings.rank_multiple
    if budget is not None:
        rank[selected] = fit_budget(
            rank[selected], sizes[selected], budget, settings.min_rank, cap[selected], K
        )
    else:
        rank[selected] = round_to_multiple(rank[selected], K, settings.min_rank, cap[selected])[0]
    stuck = round_to_multiple(rank[selected], K, settings.min_rank, cap[selected])[1]
    table = pd.DataFrame({
        "module": df.module.to_numpy(),
        "rows": rows,
        "cols": cols,
        "alpha": alpha,
        "spikes": spikes if settings.spikes_column == "spikes_farms" else spikes.astype(int),
        "score": score,
        "selected": selected,
        "rank": rank,
        "lora_alpha": rank * settings.alpha_factor,
        "params": rank * sizes,
    })  # fmt: skip
    notes = [f"{m}: no {settings.alpha_column} or {settings.spikes_column}; not a candidate"
             for m in dropped]  # fmt: skip
    if stuck:
        notes.append(f"{stuck} module(s) cannot take a rank that is a multiple of {K} within "
                     f"{settings.min_rank}..min(rows, cols, {settings.max_rank}): they keep "
                     "the largest rank they can")  # fmt: skip
    capped = selected & (cap < settings.max_rank) & (rank == cap)
    if capped.any():
        notes.append(
            f"{int(capped.sum())} module(s) capped at min(rows, cols), the most rank a LoRA "
            f"update of that matrix can have (e.g. {df.module.iloc[np.argmax(capped)]})"
        )
    total = int(table.params.sum())
    if budget and abs(total / budget - 1) > 0.01:
        notes.append(
            f"budget {budget:,} missed: the plan has {total:,} ({total / budget - 1:+.0%}) "
            f"because ranks stay within {settings.min_rank}..{settings.max_rank}"
            + (f" on multiples of {K}" if K > 1 else "")
            + "; widen --min-rank / --max-rank or keep more modules (--top-n-percentile)"
        )
    return Allocation(table=table, settings=settings, budget=budget, notes=notes)
