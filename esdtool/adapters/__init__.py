"""The ``adapters`` stage: trained PEFT LoRA adapters read as the weight changes they make.

:func:`~esdtool.adapters.config.read_adapter_config` checks adapter_config.json and resolves each
module's r and lora_alpha as PEFT does; :func:`~esdtool.adapters.layout.adapter_layout` pairs,
from headers alone, every ``lora_A`` with its ``lora_B`` (and DoRA magnitude) into one
:class:`~esdtool.adapters.layout.LowRankUpdate`, whose spectrum comes from an r x r problem
(:mod:`esdtool.spectral.lowrank`). :func:`~esdtool.adapters.serving.config_serving` says which
``--max-lora-rank`` a vLLM server needs to load an adapter (:class:`ServingCheck`).
:func:`~esdtool.adapters.merge.merged_weight` merges one module's update into its base weight
as PEFT's ``merge_and_unload`` does (:class:`Merge`: ``analyze MODEL --adapter ADAPTER``).
"""

from typing import TYPE_CHECKING

from esdtool._lazy import lazy_getattr

if TYPE_CHECKING:
    from esdtool.adapters.config import AdapterConfig, read_adapter_config
    from esdtool.adapters.layout import AdapterLayout, LowRankUpdate, adapter_layout
    from esdtool.adapters.merge import Merge, merged_weight
    from esdtool.adapters.serving import ServingCheck, config_serving, serving_check

_WHERE = {"AdapterConfig": "config", "read_adapter_config": "config",
          "AdapterLayout": "layout", "LowRankUpdate": "layout",
          "adapter_layout": "layout", "Merge": "merge", "merged_weight": "merge",
          "ServingCheck": "serving",
          "config_serving": "serving", "serving_check": "serving"}  # fmt: skip
__all__ = ["AdapterConfig", "AdapterLayout", "LowRankUpdate", "Merge", "ServingCheck",
           "adapter_layout", "config_serving", "merged_weight", "read_adapter_config",
           "serving_check"]  # fmt: skip
__getattr__ = lazy_getattr(__name__, _WHERE)
