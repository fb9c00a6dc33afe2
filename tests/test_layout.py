"""The package layering holds: the import-linter contracts in pyproject.toml (stages import only
the stages below them, the spectral math stays pure, the shared leaves import no stage, the CLI
uses only public entry points, no import cycles) pass, and they cover every stage package and
shared module, so a new one cannot slip past them. docs/architecture.md describes the layout."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from helpers import ROOT

PACKAGE = ROOT / "esdtool"


def _config() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]


def _contract(contract_id: str) -> dict:
    return next(c for c in _config()["contracts"] if c["id"] == contract_id)


def test_import_contracts_are_kept():
    """The same check as `make lint`, so a stray import fails the tests even without it."""
    pytest.importorskip("importlinter", reason="pip install 'esdtool[test]'")
    lint_imports = Path(sys.executable).parent / "lint-imports"
    proc = subprocess.run(
        [str(lint_imports), "--no-cache", "--no-logo"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]


def test_every_stage_package_is_a_layer():
    stages = {
        f"esdtool.{p.name}"
        for p in PACKAGE.iterdir()
        if (p / "__init__.py").is_file() and p.name != "templates"
    }
    assert set(_contract("layers")["layers"]) == stages
    assert set(_contract("leaves")["forbidden_modules"]) == stages
    pure = {m for m in _contract("pure-math")["forbidden_modules"] if m.startswith("esdtool.")}
    assert pure == stages - {"esdtool.spectral"}


def test_every_shared_module_is_a_leaf():
    """A top-level module is the lazy facade, `python -m esdtool`, or a leaf importing no stage."""
    modules = {f"esdtool.{p.stem}" for p in PACKAGE.glob("*.py")}
    leaves = set(_contract("leaves")["source_modules"])
    assert modules - leaves == {"esdtool.__init__", "esdtool.__main__"}
