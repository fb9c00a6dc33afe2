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

# Directory names that say nothing about the model: the title walks up past them.
_GENERIC = {"model", "models", "checkpoint", "checkpoints", "weights", "snapshots", "main",
            "final", "output", "outputs", "merged", "pretrained", "hf", "safetensors"}  # fmt: skip
_COMMIT = re.compile(r"[0-9a-f]{40}")
_CACHE_REPO = re.compile(r"models--([^/]+)--([^/]+)")
# A kept set with one shape or kind at least this share, and this many times its share among
# the candidates, gets a note.
DOMINANT_SHARE, OVER_REPRESENTED = 0.5, 1.5


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
        "notes": [printable(n) for n in allocation.notes] + dominance_notes(plan),
        "figure": figure,
        # The kept ranks are the config's rank_pattern; its default r is their median.
        "serving": serving_check(kept["rank"]).record(),
    }


def dominance_notes(plan: pd.DataFrame) -> list[str]:
    """A sentence for each way the kept set is mostly one thing: one matrix shape (either
    orientation) or one module kind, when that is also well above its share of the candidates."""
    kept = plan[plan.selected]
    if len(kept) < 2:
        return []
    notes = []
    shape = [f"{min(r, c)} x {max(r, c)}" for r, c in zip(plan.rows, plan.cols, strict=True)]
    for label, values in (
        ("shape", pd.Series(shape, index=plan.index)),
        ("module kind", plan.kind),
    ):
        counts = values[plan.selected].value_counts()
        top, n = str(counts.index[0]), int(counts.iloc[0])
        share = n / len(kept)
        base = float((values == top).mean())
        if share >= DOMINANT_SHARE and share >= OVER_REPRESENTED * base:
            what = f"shape {top} (either orientation)" if label == "shape" else f"kind {top}"
            notes.append(
                f"{n} of the {len(kept)} kept modules ({share:.0%}) are {printable(what)}, "
                f"against {base:.0%} of the candidates: the plan may be ranking {label}s more "
                "than training (alphas depend on a matrix's aspect ratio). Compare it with "
                "uniform LoRA at equal cost before trusting it (docs/tutorial.md shows how)."
            )
    return notes
