"""What the reader sees first: the report's title, and the plan at a glance (why each module got
its rank: the score figure, kept counts per module kind, the rule in one sentence, a warning
when the kept set is mostly one shape or one module kind, and the --max-lora-rank vLLM needs)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from esdtool.adapters.serving import serving_check
from esdtool.analysis.roles import block_index, module_kind
from esdtool.render import plots
from esdtool.untrusted import printable

if TYPE_CHECKING:
    from esdtool.plan.ranks import Allocation
    from esdtool.plan.shape import ShapeInfluence

# Directory names that say nothing about the model: the title walks up past them.
_GENERIC = {"model", "models", "checkpoint", "checkpoints", "weights", "snapshots", "main",
            "final", "output", "outputs", "merged", "pretrained", "hf", "safetensors"}  # fmt: skip
_COMMIT = re.compile(r"[0-9a-f]{40}")
_CACHE_REPO = re.compile(r"models--([^/]+)--([^/]+)")
# A kept set with one shape or kind at least this share, and this many times its share among
# the candidates, gets a note.
DOMINANT_SHARE, OVER_REPRESENTED = 0.5, 1.5
# Shape drives the scores when the permutation test says so at this level.
SHAPE_P = 0.01


def title(meta: dict[str, Any]) -> str:
    """The model's name: the hub id, else the directory's name, walking up past generic ones
    ("model", "checkpoint-500", a snapshot's commit hash; a hub cache folder gives its id)."""
    source = meta.get("source")
    if meta.get("source_kind") == "hub" and isinstance(source, str):
        return printable(source)
    where = meta.get("source_path") or source
    if not isinstance(where, str) or not where:
        return "metrics table"
    path = Path(where)
    if meta.get("source_kind") == "file" or path.suffix == ".safetensors":
        path = path.parent
    for part in [path, *path.parents]:
        name = part.name
        cache = _CACHE_REPO.fullmatch(name)
        if cache:
            return printable(f"{cache.group(1)}/{cache.group(2)}")
        generic = (
            name.lower() in _GENERIC or _COMMIT.fullmatch(name) or name.startswith("checkpoint-")
        )
        if name and not generic:
            return printable(name)
    return printable(str(path))


def shape_text(rows: object, cols: object) -> str:
    """ "384 x 1536" for a matrix, "384" for a vector, "" when unknown."""
    if rows is None or pd.isna(rows):
        return ""
    if cols is None or pd.isna(cols):
        return f"{int(rows)}"  # type: ignore[call-overload]
    return f"{int(rows)} x {int(cols)}"  # type: ignore[call-overload]


def glance(allocation: Allocation | None) -> dict[str, Any] | None:
    """The "plan at a glance" section's content, or None without a plan."""
    if allocation is None:
        return None
    plan = allocation.table.copy()
    influence = allocation.shape
    plan["kind"] = [module_kind(str(m)) or str(m) for m in plan.module]
    plan["layer"] = [block_index(str(m)) for m in plan.module]
    kept = plan[plan.selected]
    kinds = (
        plan.groupby("kind", sort=False)
        .agg(candidates=("module", "size"), kept=("selected", "sum"))
        .reset_index()
    )
    s = allocation.settings
    rule = (
        f"Each of the {len(plan)} candidate modules is scored {s.w_hill:g} x its normalised "
        f"{s.alpha_column} + {s.w_mp_spikes:g} x (1 - its normalised {s.spikes_column}); the "
        f"{s.select} {s.top_n_percentile:.0%} ({len(kept)}) get an adapter, ranked "
        f"{s.min_rank}..{s.max_rank} ({s.rank_scaling}) by score; lora_alpha = "
        f"{s.alpha_factor:g} x rank."
    )
    if s.normalise_within != "none":
        rule += (f" Alpha and spikes are normalised within each {s.normalise_within} (modules "
                 "compete with their peers).")  # fmt: skip
    if s.alpha_column != "alpha_ks":
        rule += (
            f" The plan's {s.alpha_column} is not on HTSR's 2-6 scale, which belongs to alpha_ks "
            "(WeightWatcher's alpha, drawn with its band in the overview): read the plan's "
            "scores against each other, not against that band."
        )
    if allocation.budget:
        rule += (
            f" Ranks were scaled to a budget of {allocation.budget:,} trainable parameters "
            f"(the plan has {allocation.total_params:,})."
        )
    figure = None
    blocks = plan.dropna(subset=["layer"])
    if not blocks.empty:
        figure = plots.score_map(blocks, f"plan score ({s.alpha_column}, {s.spikes_column})")
    return {
        "rule": rule,
        "kinds": [
            {"kind": printable(k), "kept": int(n), "candidates": int(c)}
            for k, n, c in zip(kinds.kind, kinds.kept, kinds.candidates, strict=True)
        ],
        "notes": [printable(n) for n in allocation.notes] + dominance_notes(plan, influence),
        "shape": printable(influence.sentence()),
        "figure": figure,
        # The kept ranks are the config's rank_pattern; its default r is their median.
        "serving": serving_check(kept["rank"]).record(),
    }


def dominance_notes(plan: pd.DataFrame, influence: ShapeInfluence) -> list[str]:
    """A sentence for each way the kept set is mostly one thing: one matrix shape (either
    orientation) or one module kind, when that is also well above its share of the candidates;
    and when shape explains the scores beyond chance (plan.shape's permutation test). The
    wording follows the numbers: a concentration the scores do not owe to shape says so.
    ``influence``: the plan's :class:`~esdtool.plan.shape.ShapeInfluence`."""
    kept = plan[plan.selected]
    if len(kept) < 2:
        return []
    notes = []
    explained = (
        f"shape explains {influence.variance_explained:.0%} of the scores' variance (chance "
        f"{influence.chance:.0%}, permutation p = {influence.p_value:.2g})"
        if influence.variance_explained == influence.variance_explained  # not NaN
        else "the scores cannot follow shape (one shape among the candidates, or no spread)"
    )
    driven = influence.p_value < SHAPE_P
    share, base = influence.kept_share, influence.candidate_share
    dominant = share >= DOMINANT_SHARE and share >= OVER_REPRESENTED * base
    what = f"{round(share * len(kept))} of the {len(kept)} kept modules ({share:.0%}) are " \
        f"shape {printable(str(influence.top_shape))} (either orientation), against {base:.0%} " \
        "of the candidates"  # fmt: skip
    if dominant and driven:
        notes.append(f"{what}, and {explained}: the plan may be ranking shapes more than "
                     f"training (alphas depend on a matrix's aspect ratio). {_REMEDY}")  # fmt: skip
    elif driven:
        notes.append(f"{explained[0].upper()}{explained[1:]}: the scores rank shapes as well as "
                     f"training. {_REMEDY}")  # fmt: skip
    elif dominant:
        notes.append(f"{what}, though {explained}: the concentration is not the scores "
                     "following shape. Compare the plan with uniform LoRA at equal cost before "
                     "trusting it (esdtool ablate).")  # fmt: skip
    counts = plan.kind[plan.selected].value_counts()
    top, n = str(counts.index[0]), int(counts.iloc[0])
    share = n / len(kept)
    base = float((plan.kind == top).mean())
    if share >= DOMINANT_SHARE and share >= OVER_REPRESENTED * base:
        notes.append(
            f"{n} of the {len(kept)} kept modules ({share:.0%}) are kind {printable(top)}, "
            f"against {base:.0%} of the candidates: the plan may be ranking module kinds more "
            "than training. Compare it with uniform LoRA at equal cost before trusting it "
            "(esdtool ablate; docs/tutorial.md shows how)."
        )
    return notes


_REMEDY = (
    "Shape-fair plans: esdtool analyze --estimator farms, then allocate --alpha-column "
    "alpha_median_farms --spikes-column spikes_farms; or allocate --normalise-within shape. "
    "Compare any plan with uniform LoRA at equal cost before trusting it (esdtool ablate)."
)
