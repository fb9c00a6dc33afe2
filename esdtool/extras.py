"""Optional dependencies, checked in one place: a feature that needs an extra says which
packages are missing and how to install them."""

from __future__ import annotations

import importlib
from types import ModuleType

from esdtool.errors import MissingExtraError

FINETUNE = ("transformers", "peft", "trl", "accelerate", "datasets")
_HINT = "pip install 'esdtool[finetune]', or pip install -e '.[finetune]' in a clone"


def require(feature: str, *modules: str) -> dict[str, ModuleType]:
    """Import ``modules`` (default: the finetune extra) for ``feature`` ("--verify",
    "finetune", ...), raising :class:`MissingExtraError` naming every one that is missing."""
    found: dict[str, ModuleType] = {}
    missing = []
    for name in modules or FINETUNE:
        try:
            found[name] = importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise MissingExtraError(
            f"{feature} needs {', '.join(modules or FINETUNE)} ({', '.join(missing)} missing)",
            hint=_HINT,
        )
    return found
