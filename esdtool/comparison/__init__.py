"""The ``compare`` stage: several metrics tables of one model family in (base and fine-tuned,
checkpoints over training), per-module changes out, as a CSV and one offline page."""

from typing import TYPE_CHECKING

from esdtool._lazy import lazy_getattr

if TYPE_CHECKING:
    from esdtool.comparison.diff import CompareResult, compare

_WHERE = {"CompareResult": "diff", "compare": "diff"}
__all__ = ["CompareResult", "compare"]
__getattr__ = lazy_getattr(__name__, _WHERE)
