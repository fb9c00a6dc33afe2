"""Checking a written LoRA plan against the model it was made for, with PEFT's own matching.

The model is built from its config.json on the meta device (no weights, no memory), the
adapter config is applied with ``peft.get_peft_model``, and every planned module must end up
with exactly its planned r and lora_alpha, and no other module with an adapter.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path
from typing import Any

import pandas as pd

from esdtool.errors import EsdtoolError, SettingsError
from esdtool.peft_config import CONFIG_NAME, CSV_NAME


class PlanMismatchError(EsdtoolError):
    """PEFT would not apply the plan as written."""


def _import_peft_stack():
    try:
        import peft
        import transformers
    except ImportError as exc:
        raise SettingsError(
            f"--verify needs transformers and peft ({exc.name} is missing)",
            hint="pip install 'esdtool[finetune]', or pip install -e '.[finetune]' in a clone",
        ) from exc
    return peft, transformers


def build_meta_model(model_dir: Path):
    """The model of ``model_dir``/config.json, instantiated on the meta device."""
    import torch

    _, transformers = _import_peft_stack()
    config = transformers.AutoConfig.from_pretrained(str(model_dir))
    architectures = getattr(config, "architectures", None) or []
    cls = next(
        (getattr(transformers, a) for a in architectures if hasattr(transformers, a)),
        transformers.AutoModel,
    )
    with torch.device("meta"):
        return cls.from_config(config) if cls is transformers.AutoModel else cls(config)


def adapted_modules(peft_model: Any) -> dict[str, Any]:
    """The modules that got the default LoRA adapter, by their name in the base model."""
    return {
        name.removeprefix("base_model.model."): module
        for name, module in peft_model.named_modules()
        if hasattr(module, "lora_A") and "default" in module.lora_A
    }


def matches_key(key: str, name: str) -> bool:
    """PEFT's rule for a rank_pattern / alpha_pattern key: it matches the end of the module
    name at a dot boundary (our keys start with ^, so only the whole name)."""
    return re.match(rf"(.*\.)?({key})$", name) is not None


def verify_plan(plan_dir: Path, model_dir: Path) -> list[str]:
    """Problems found applying ``plan_dir``'s adapter_config.json to the model in ``model_dir``
    (empty when the plan applies exactly). Every problem is listed, not just the first."""
    peft, _ = _import_peft_stack()
    plan_dir = Path(plan_dir)
    if not (Path(model_dir) / "config.json").is_file():
        raise SettingsError(f"{model_dir}: no config.json to build the model from")
    plan = pd.read_csv(plan_dir / CSV_NAME)
    kept = plan[plan.selected]
    config = peft.LoraConfig.from_pretrained(str(plan_dir))
    config.task_type = None  # matching does not depend on the task head; any model will do
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        model = peft.get_peft_model(build_meta_model(Path(model_dir)), config)
    adapted = adapted_modules(model)
    raw = json.loads((plan_dir / CONFIG_NAME).read_text())
    problems = []
    for row in kept.itertuples():
        if row.module not in adapted:
            problems.append(f"{row.module}: planned, but no such module gets an adapter")
            continue
        module = adapted[row.module]
        keys = [k for k in raw["rank_pattern"] if matches_key(k, row.module)]
        if len(keys) != 1:
            problems.append(f"{row.module}: matched by {len(keys)} rank_pattern keys")
        if module.r["default"] != row.rank:
            problems.append(f"{row.module}: r = {module.r['default']}, planned {row.rank}")
        if module.lora_alpha["default"] != row.lora_alpha:
            problems.append(
                f"{row.module}: lora_alpha = {module.lora_alpha['default']}, "
                f"planned {row.lora_alpha}"
            )
    for name in sorted(set(adapted) - set(kept.module)):
        problems.append(f"{name}: gets an adapter but is not in the plan")
    return problems


def check_plan(plan_dir: Path, model_dir: Path) -> None:
    """:func:`verify_plan`, raising :class:`PlanMismatchError` listing every problem."""
    problems = verify_plan(plan_dir, model_dir)
    if problems:
        raise PlanMismatchError(
            f"{plan_dir / CONFIG_NAME}: {len(problems)} problem(s): " + "; ".join(problems)
        )
