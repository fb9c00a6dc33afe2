"""The ``analyze`` stage: a checkpoint in, one record per matrix, a metrics table out."""

from typing import TYPE_CHECKING

from esdtool._lazy import lazy_getattr

if TYPE_CHECKING:
    from esdtool.analysis.result import AnalyzeResult, ProgressHook
    from esdtool.analysis.run import analyze
    from esdtool.analysis.settings import AnalyzeSettings

_WHERE = {"AnalyzeResult": "result", "ProgressHook": "result", "analyze": "run",
          "AnalyzeSettings": "settings"}  # fmt: skip
__all__ = ["AnalyzeResult", "AnalyzeSettings", "ProgressHook", "analyze"]
__getattr__ = lazy_getattr(__name__, _WHERE)
