"""The ``finetune`` stage: a model, a plan and data in, trained LoRA adapters out."""

from typing import TYPE_CHECKING

from esdtool._lazy import lazy_getattr

if TYPE_CHECKING:
    from esdtool.training.monitor import SystemMonitorCallback, SystemSummary
    from esdtool.training.recipe import FinetuneResult, FinetuneSettings, finetune
    from esdtool.training.spectral import SpectralCallback

_WHERE = {"FinetuneResult": "recipe", "FinetuneSettings": "recipe", "finetune": "recipe",
          "SpectralCallback": "spectral", "SystemMonitorCallback": "monitor",
          "SystemSummary": "monitor"}  # fmt: skip
__all__ = ["FinetuneResult", "FinetuneSettings", "SpectralCallback", "SystemMonitorCallback",
           "SystemSummary", "finetune"]  # fmt: skip
__getattr__ = lazy_getattr(__name__, _WHERE)
