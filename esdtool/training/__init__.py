"""The ``finetune`` stage: a model, a plan and data in, trained LoRA adapters out."""

from typing import TYPE_CHECKING

from esdtool._lazy import lazy_getattr

if TYPE_CHECKING:
    from esdtool.training.recipe import FinetuneResult, FinetuneSettings, finetune

_WHERE = {"FinetuneResult": "recipe", "FinetuneSettings": "recipe", "finetune": "recipe"}
__all__ = ["FinetuneResult", "FinetuneSettings", "finetune"]
__getattr__ = lazy_getattr(__name__, _WHERE)
