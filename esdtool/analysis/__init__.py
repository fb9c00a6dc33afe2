"""The ``analyze`` stage: a checkpoint in, one record per matrix, a metrics table out."""

from typing import TYPE_CHECKING

from esdtool._lazy import lazy_getattr

if TYPE_CHECKING:
    from esdtool.analysis.run import AnalyzeResult, ProgressHook, analyze
    from esdtool.analysis.settings import AnalyzeSettings

_WHERE = {"AnalyzeResult": "run", "ProgressHook": "run", "analyze": "run",
          "AnalyzeSettings": "settings"}  # fmt: skip
__all__ = ["AnalyzeResult", "AnalyzeSettings", "ProgressHook", "analyze"]
__getattr__ = lazy_getattr(__name__, _WHERE)
