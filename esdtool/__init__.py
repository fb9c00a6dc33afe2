"""esdtool: eigenvalue spectra of weight matrices, turned into LoRA rank plans.

The library surface, one verb per command (each is the CLI command's twin):

- :func:`analyze` reads a checkpoint tensor by tensor and writes a parquet metrics table;
- :func:`load_metrics` reads such a table back, validated;
- :func:`load_trajectory` reads a training trajectory (spectra_trajectory.parquet), validated;
- :func:`allocate` turns a table into a PEFT LoRA plan directory;
- :func:`report` writes the self-contained HTML report of a table;
- :func:`finetune` trains the planned adapters (needs the ``finetune`` extra);
- :func:`ablate` trains the plan against uniform LoRA and its controls at one budget, over
  learning rates and seeds, and says whether the difference is real;
- :class:`SpectralCallback` and :class:`SystemMonitorCallback` watch any transformers Trainer:
  the adapter's spectra, and what the run costs.

Names are imported on first use, so ``import esdtool`` (and ``esdtool --help``) stays fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from esdtool._lazy import lazy_getattr
from esdtool.version import __version__

if TYPE_CHECKING:
    from esdtool.ablation import AblateResult, AblateSettings, ablate
    from esdtool.analysis import AnalyzeResult, AnalyzeSettings, analyze
    from esdtool.comparison import CompareResult, compare
    from esdtool.io.table import SCHEMA_VERSION
    from esdtool.io.table_read import load_metrics
    from esdtool.io.trajectory import load_trajectory
    from esdtool.plan import AllocateResult, AllocateSettings, allocate
    from esdtool.render import ReportResult, plot_esd, report
    from esdtool.training import (
        FinetuneResult,
        FinetuneSettings,
        SpectralCallback,
        SystemMonitorCallback,
        finetune,
    )
    from esdtool.training.groups import param_groups

__all__ = [
    "SCHEMA_VERSION",
    "AblateResult",
    "AblateSettings",
    "AllocateResult",
    "AllocateSettings",
    "AnalyzeResult",
    "AnalyzeSettings",
    "CompareResult",
    "FinetuneResult",
    "FinetuneSettings",
    "ReportResult",
    "SpectralCallback",
    "SystemMonitorCallback",
    "__version__",
    "ablate",
    "allocate",
    "analyze",
    "compare",
    "finetune",
    "load_metrics",
    "load_trajectory",
    "param_groups",
    "plot_esd",
    "report",
]


_WHERE = {
    "ablate": "ablation.study", "AblateResult": "ablation.study",
    "AblateSettings": "ablation.settings",
    "analyze": "analysis.run", "AnalyzeResult": "analysis.result",
    "AnalyzeSettings": "analysis.settings", "load_metrics": "io.table_read",
    "load_trajectory": "io.trajectory",
    "SCHEMA_VERSION": "io.table", "allocate": "plan.directory", "AllocateResult": "plan.directory",
    "AllocateSettings": "plan.ranks", "report": "render.page", "ReportResult": "render.page",
    "plot_esd": "render.page", "compare": "comparison.diff", "CompareResult": "comparison.diff",
    "finetune": "training.recipe", "FinetuneResult": "training.recipe",
    "FinetuneSettings": "training.recipe", "SpectralCallback": "training.spectral",
    "SystemMonitorCallback": "training.monitor", "param_groups": "training.groups",
}  # fmt: skip
__getattr__ = lazy_getattr(__name__, _WHERE)
