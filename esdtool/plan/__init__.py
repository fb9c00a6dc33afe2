"""The ``allocate`` stage: a metrics table in, a PEFT LoRA plan (ranks per module) out."""

from typing import TYPE_CHECKING

from esdtool._lazy import lazy_getattr

if TYPE_CHECKING:
    from esdtool.plan.directory import AllocateResult, allocate
    from esdtool.plan.ranks import AllocateSettings, Allocation

_WHERE = {"AllocateResult": "directory", "allocate": "directory", "AllocateSettings": "ranks",
          "Allocation": "ranks"}  # fmt: skip
__all__ = ["AllocateResult", "AllocateSettings", "Allocation", "allocate"]
__getattr__ = lazy_getattr(__name__, _WHERE)
