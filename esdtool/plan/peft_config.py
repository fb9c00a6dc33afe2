"""Writing an :class:`~esdtool.plan.ranks.Allocation` as files PEFT and people read.

``adapter_config.json`` loads with ``peft.LoraConfig.from_pretrained(outdir)``: target_modules is
one regex that fullmatches exactly the kept module names, and rank_pattern / alpha_pattern keys
are ``"^" + re.escape(module)`` so that PEFT's suffix matching cannot reach another module.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

from esdtool.errors import OptionError
from esdtool.plan.ranks import Allocation
from esdtool.untrusted import spreadsheet_frame

CONFIG_NAME = "adapter_config.json"
CSV_NAME = "allocation.csv"
PLAN_RECORD = "esdtool_plan.json"  # which table and settings made the plan (finetune copies it)
REPORT_NAME = "report.html"
# peft.TaskType's values (a test holds them equal), so a plan never names a task PEFT lacks.
TASK_TYPES = (
    "SEQ_CLS", "SEQ_2_SEQ_LM", "CAUSAL_LM", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION",
)  # fmt: skip
PLAN_FILES = (CONFIG_NAME, CSV_NAME, PLAN_RECORD, REPORT_NAME)  # all a plan directory holds


def _number(x: float) -> int | float:
    return int(x) if float(x).is_integer() else float(x)


def check_peft_options(task_type: str | None, lora_dropout: float) -> None:
    """Refuse a task type PEFT does not know and a dropout outside [0, 1), both at once."""
    problems = []
    if task_type is not None and task_type not in TASK_TYPES:
        problems.append(f"--task-type must be one of {', '.join(TASK_TYPES)}, not {task_type!r}")
    if not (math.isfinite(lora_dropout) and 0 <= lora_dropout < 1):
        problems.append(f"--lora-dropout must lie in [0, 1), not {lora_dropout}")
    if problems:
        raise OptionError("; ".join(problems))


def lora_config_dict(
    allocation: Allocation,
    *,
    task_type: str | None = "CAUSAL_LM",
    lora_dropout: float = 0.05,
    use_rslora: bool = False,
    use_dora: bool = False,
    base_model: str | None = None,
) -> dict[str, Any]:
    """The adapter_config.json content: PEFT's LoraConfig fields, ranks per module."""
    kept = allocation.kept
    modules = list(kept.module)
    ranks = [int(r) for r in kept["rank"]]
    alphas = [_number(a) for a in kept.lora_alpha]
    default_r = int(sorted(ranks)[len(ranks) // 2])  # the median kept rank, for any stray match
    return {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model,
        "target_modules": "^(?:" + "|".join(re.escape(m) for m in modules) + ")$",
        "r": default_r,
        "lora_alpha": _number(allocation.settings.alpha_factor * default_r),
        "rank_pattern": {"^" + re.escape(m): r for m, r in zip(modules, ranks, strict=True)},
        "alpha_pattern": {"^" + re.escape(m): a for m, a in zip(modules, alphas, strict=True)},
        "lora_dropout": lora_dropout,
        "bias": "none",
        "use_rslora": use_rslora,
        "use_dora": use_dora,
        "inference_mode": False,
    }


def write_plan_files(
    allocation: Allocation, directory: Path, record: dict[str, Any], **config: Any
) -> None:
    """Write adapter_config.json, allocation.csv and esdtool_plan.json into ``directory`` (a
    fresh directory that :func:`esdtool.io.atomic.atomic_dir` swaps in whole)."""
    content = json.dumps(lora_config_dict(allocation, **config), indent=2) + "\n"
    (directory / CONFIG_NAME).write_text(content, encoding="utf-8")
    spreadsheet_frame(allocation.table).to_csv(directory / CSV_NAME, index=False)
    text = json.dumps(record, indent=2, default=str) + "\n"
    (directory / PLAN_RECORD).write_text(text, encoding="utf-8")
