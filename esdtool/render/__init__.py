"""The ``report`` stage: a metrics table (and a plan) in, one self-contained HTML page out."""

from typing import TYPE_CHECKING

from esdtool._lazy import lazy_getattr

if TYPE_CHECKING:
    from esdtool.render.page import ReportResult, plot_esd, report

# Most ESD plots one report draws (the rest are counted): enough for a 70B dense model.
MAX_PLOTS = 1000

_WHERE = {"ReportResult": "page", "report": "page", "plot_esd": "page"}
__all__ = ["MAX_PLOTS", "ReportResult", "plot_esd", "report"]
__getattr__ = lazy_getattr(__name__, _WHERE)
