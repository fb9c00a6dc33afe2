"""The ``ablate`` stage: rank plans against uniform LoRA at one budget, over learning rates and
seeds, with intervals and paired differences."""

from typing import TYPE_CHECKING

from esdtool._lazy import lazy_getattr

if TYPE_CHECKING:
    from esdtool.ablation.arms import ARMS, DEFAULT_ARMS
    from esdtool.ablation.grid import parse_shard
    from esdtool.ablation.settings import AblateSettings
    from esdtool.ablation.study import AblateResult, ablate, summarize

_WHERE = {"ablate": "study", "summarize": "study", "AblateResult": "study",
          "AblateSettings": "settings", "parse_shard": "grid", "ARMS": "arms",
          "DEFAULT_ARMS": "arms"}  # fmt: skip
__all__ = ["ARMS", "DEFAULT_ARMS", "AblateResult", "AblateSettings", "ablate", "parse_shard",
           "summarize"]  # fmt: skip
__getattr__ = lazy_getattr(__name__, _WHERE)
