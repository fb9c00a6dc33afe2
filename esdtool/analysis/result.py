"""What :func:`~esdtool.analysis.run.analyze` hands back: the progress hook it reports to, and
the :class:`AnalyzeResult` summarising a run's rows."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from esdtool.io.table import MatrixRow

__all__ = ["AnalyzeResult", "ProgressHook", "summarise"]


class ProgressHook(Protocol):
    """Receives progress from :func:`analyze` (the CLI draws a rich bar from it)."""

    def start(self, total_tensors: int, total_bytes: int) -> None: ...

    def advance(self, name: str, nbytes: int) -> None: ...

    def note(self, message: str) -> None:
        """Something the user should know now (e.g. that a run resumes)."""

    # Optional: ``fetched(nbytes)``, bytes received from the hub (called from a reader or
    # download thread); hooks without it draw no fetch progress. ``waiting(seconds)``, after
    # each tensor of a hub id read as it downloads: the seconds the analysis has waited for
    # bytes so far (a share of the wall time near 1 means the download bounds the run).


@dataclass(frozen=True)
class AnalyzeResult:
    """What one analysis produced.

    output:   the parquet file written.
    rows:     rows in the table (every selected tensor, or matrix of a 3-D tensor).
    analysed: rows with a spectrum (status ok or zero).
    skipped:  rows skipped with a reason.
    errors:   one line per row that failed to be read or computed (status error).
    warnings: one line per matrix with NaN/Inf entries (status nonfinite).
    seconds:  wall time of the whole analysis.
    slowest:  (name, seconds) of the slowest row, or None.
    device:   where spectra were computed.
    quantization: one line per kind of quantized weight dequantized (or skipped because its
              format cannot be decoded); empty for plain checkpoints.
    rank_use: of a LoRA adapter, (modules, planned rank, used rank): the analysed updates, the
              sum of their min(lora_rank, M) and of their effective_rank; None for a model.
    merged_adapter: the adapter merged into the model's weights (``adapter=``), as the table's
              metadata records it (path, config, modules); None without one.
    notes:    what the user should know about the run (an adapter whose config names another
              base model); a progress hook hears them as they happen.
    table:    (property) the metrics table itself: the DataFrame :func:`~esdtool.load_metrics`
              gives for the parquet file (the same columns, dtypes and ``attrs["esdtool"]``),
              also when no file was written.
    """

    output: Path | None
    rows: int
    analysed: int
    skipped: int
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0
    slowest: tuple[str, float] | None = None
    device: str = "cpu"
    source: str = ""
    revision: str | None = None
    resumed: int = 0
    quantization: list[str] = field(default_factory=list)
    rank_use: tuple[int, int, int] | None = None
    merged_adapter: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)
    _table: Any = field(default=None, repr=False, compare=False)

    @property
    def table(self) -> Any:
        """The table as a pandas DataFrame (built on first use: the CLI never needs pandas)."""
        if callable(self._table):
            object.__setattr__(self, "_table", self._table())
        return self._table

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (the CLI's ``--json`` output)."""
        return {
            "output": None if self.output is None else str(self.output),
            "source": self.source,
            "revision": self.revision,
            "rows": self.rows,
            "analysed": self.analysed,
            "skipped": self.skipped,
            "errors": self.errors,
            "warnings": self.warnings,
            "seconds": round(self.seconds, 3),
            "slowest": (
                {"name": self.slowest[0], "seconds": round(self.slowest[1], 4)}
                if self.slowest
                else None
            ),
            "device": self.device,
            "resumed_rows": self.resumed,
            "quantization": self.quantization,
            "lora": None
            if self.rank_use is None
            else dict(zip(("modules", "planned_rank", "used_rank"), self.rank_use, strict=True)),
            "merged_adapter": None
            if self.merged_adapter is None
            else {k: self.merged_adapter.get(k) for k in ("path", "modules", "modules_to_save")},
            "notes": self.notes,
        }


def summarise(
    rows: list[MatrixRow], output: Path | None, seconds: float, device: torch.device
) -> AnalyzeResult:
    """The summary of ``rows``: counts, the error and non-finite lines, the slowest row, and
    of an adapter the rank its updates use."""

    def lines(status: str) -> list[str]:
        return [f"{r.shard}: tensor {r.name!r}: {r.reason}" for r in rows if r.status == status]

    timed = [r for r in rows if r.status == "ok" and not math.isnan(r.seconds)]
    updates = [r for r in rows if r.lora_rank is not None and r.status in ("ok", "zero")]
    rank_use = (
        (len(updates), sum(min(r.lora_rank or 0, r.M or 0) for r in updates),
         sum(r.metrics.effective_rank if r.metrics else 0 for r in updates))
        if updates else None
    )  # fmt: skip
    slowest = max(timed, key=lambda r: r.seconds, default=None)
    return AnalyzeResult(
        output=output,
        rows=len(rows),
        analysed=sum(r.status in ("ok", "zero") for r in rows),
        skipped=sum(r.status == "skipped" for r in rows),
        errors=lines("error"),
        warnings=lines("nonfinite"),
        seconds=seconds,
        slowest=(slowest.name, slowest.seconds) if slowest else None,
        device=str(device),
        rank_use=rank_use,
    )
