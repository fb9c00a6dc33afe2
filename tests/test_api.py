"""The library's public surface: one verb per command at the top, each stage's names at its
package root, imported lazily."""

from __future__ import annotations

import importlib
import pkgutil
import subprocess
import sys
import types

import esdtool

STAGES = ("esdtool", "esdtool.analysis", "esdtool.plan", "esdtool.render", "esdtool.training")


def test_public_names_are_what_they_say_even_after_every_module_is_imported():
    """A submodule named like a public function would replace it on its package once imported
    (``esdtool.plan.allocate`` the module shadowing ``allocate`` the function): import them all,
    then every public name must still be a function, class or constant, never a module."""
    for info in pkgutil.walk_packages(esdtool.__path__, "esdtool."):
        if not info.name.startswith("esdtool.training") or importlib.util.find_spec("trl"):
            importlib.import_module(info.name)
    for stage in STAGES:
        package = importlib.import_module(stage)
        for name in package.__all__:
            value = getattr(package, name)
            assert not isinstance(value, types.ModuleType), f"{stage}.{name} is a module"
    assert esdtool.allocate.__module__ == "esdtool.plan.directory"
    assert esdtool.analyze.__module__ == "esdtool.analysis.run"


def test_importing_the_package_imports_no_heavy_library():
    """``import esdtool`` and the stage roots are cheap: torch, pandas and matplotlib load only
    when a function that needs them is called."""
    code = (
        "import sys, esdtool, esdtool.analysis, esdtool.plan, esdtool.render, esdtool.training\n"
        "from esdtool.analysis import AnalyzeSettings\n"
        "print(sorted(m for m in ('torch', 'pandas', 'matplotlib') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_the_report_names_only_schema_columns_and_the_plans_own():
    """The report's row table spells no column of its own: each is a schema column or one the
    plan adds (a misspelt name would be an always-blank column)."""
    from esdtool.io.table import COLUMN_NAMES
    from esdtool.render.page import _PLAN_COLUMNS, _TABLE

    shown = {column for column, *_ in _TABLE}
    assert shown - set(_PLAN_COLUMNS) <= set(COLUMN_NAMES)
    assert set(_PLAN_COLUMNS) <= shown
