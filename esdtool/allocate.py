"""``allocate``: a metrics table in, a PEFT LoRA config directory out (the CLI's twin)."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

from esdtool import __version__
from esdtool.allocation import AllocateSettings, Allocation, allocate_ranks
from esdtool.peft_config import write_peft_dir
from esdtool.settings import MAX_PLOTS
from esdtool.source import resolve_source
from esdtool.table import load_metrics

REPORT_NAME = "report.html"


@dataclass(frozen=True)
class AllocateResult:
    """The plan and where it was written."""

    allocation: Allocation
    config: Path
    csv: Path
    report: Path | None = None

    def summary(self) -> dict[str, object]:
        """Modules adapted, rank histogram, trainable parameters vs uniform LoRA."""
        kept = self.allocation.kept
        return {
            "config": str(self.config),
            "csv": str(self.csv),
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
        }


def allocate(
    metrics: str | os.PathLike[str],
    outdir: str | os.PathLike[str],
    settings: AllocateSettings | None = None,
    *,
    task_type: str | None = "CAUSAL_LM",
    lora_dropout: float = 0.05,
    use_rslora: bool = False,
    use_dora: bool = False,
    verify: bool = False,
    report: bool = True,
    max_plots: int = MAX_PLOTS,
) -> AllocateResult:
    """Read ``metrics`` (an esdtool table), plan ranks, write adapter_config.json,
    allocation.csv and (``report``) report.html into ``outdir``.

    ``verify``: build the analysed model from its config.json on the meta device, apply the
    config with PEFT, and raise if any module would get another rank or alpha than planned.
    """
    table = load_metrics(metrics)
    allocation = allocate_ranks(table, settings)
    meta = table.attrs["esdtool"]
    record = {
        "metrics": str(Path(metrics).resolve()),
        "source": meta.get("source"),
        "revision": meta.get("revision"),
        "allocate_settings": asdict(allocation.settings),
        "budget_params": allocation.budget,
        "trainable_params": allocation.total_params,
        "esdtool_version": __version__,
    }
    files = write_peft_dir(
        allocation,
        Path(outdir),
        record,
        task_type=task_type,
        lora_dropout=lora_dropout,
        use_rslora=use_rslora,
        use_dora=use_dora,
        base_model=table.attrs["esdtool"].get("source"),
    )
    if verify:
        from esdtool.verify import check_plan

        check_plan(Path(outdir), model_directory(table.attrs["esdtool"]))
    html = None
    if report:
        from esdtool.report import report as write_report

        html = write_report(
            table, Path(outdir) / REPORT_NAME, allocation=allocation, max_plots=max_plots
        ).output
    return AllocateResult(allocation, files["config"], files["csv"], html)


def model_directory(meta: dict[str, object]) -> Path:
    """The directory holding the analysed model's config.json (hub ids from the cache)."""
    source = str(meta.get("source"))
    revision = meta.get("revision") if meta.get("source_kind") == "hub" else None
    resolved = resolve_source(source, revision=revision if isinstance(revision, str) else None)
    return resolved.files[0].parent
