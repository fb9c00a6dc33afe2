"""Lazy package attributes (PEP 562), so that importing a stage's public names costs only what
is used: ``esdtool --help`` and ``from esdtool.analysis import AnalyzeSettings`` import neither
torch nor pandas."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def lazy_getattr(package: str, where: dict[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` that imports ``package.where[name]`` on first access."""

    def __getattr__(name: str) -> Any:
        module = where.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(f"{package}.{module}"), name)

    return __getattr__
