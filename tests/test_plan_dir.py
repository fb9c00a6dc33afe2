"""A plan directory is written whole or not at all: everything is validated first, the files are
built in a temporary sibling and swapped in, and a directory holding files esdtool did not write
is never replaced."""

from __future__ import annotations

import json

import pytest

from esdtool import allocate
from esdtool.errors import OptionError, OutputError
from esdtool.io.atomic import atomic_dir
from esdtool.plan import AllocateSettings

PLAN = {"adapter_config.json", "allocation.csv", "esdtool_plan.json", "report.html"}


def _snapshot(directory):
    return {p.name: p.read_bytes() for p in directory.iterdir()}


def _siblings(directory):
    return sorted(p.name for p in directory.parent.iterdir() if p.name != directory.name)


@pytest.fixture()
def old_plan(minilm_metrics, tmp_path):
    """A plan written with the defaults: what a later, failing run must leave as it was."""
    out = tmp_path / "plan"
    allocate(minilm_metrics, out)
    assert {p.name for p in out.iterdir()} == PLAN
    return out


def test_rerun_replaces_the_whole_plan(minilm_metrics, old_plan):
    before = json.loads((old_plan / "adapter_config.json").read_text())
    allocate(minilm_metrics, old_plan, AllocateSettings(max_rank=16), report=False)
    after = json.loads((old_plan / "adapter_config.json").read_text())
    assert max(after["rank_pattern"].values()) == 16 < max(before["rank_pattern"].values())
    # No stale report from the previous run beside the new config, and no temporary left.
    assert {p.name for p in old_plan.iterdir()} == PLAN - {"report.html"}
    assert _siblings(old_plan) == []


def test_a_late_option_error_writes_nothing(minilm_metrics, old_plan, capsys):
    """The report's options are checked before the plan is written (it used to reject a
    non-alpha --alpha-column after writing adapter_config.json and allocation.csv)."""
    from helpers import run_cli

    before = _snapshot(old_plan)
    code, _, stderr = run_cli(
        ["allocate", minilm_metrics, "-o", old_plan, "--alpha-column", "lambda_max"], capsys
    )
    assert code == 2 and "--alpha-column must be one of" in stderr and stderr.count("\n") == 1
    with pytest.raises(OptionError, match="--max-plots must be >= 0"):
        allocate(minilm_metrics, old_plan, max_plots=-1)
    assert _snapshot(old_plan) == before and _siblings(old_plan) == []


def test_a_failure_while_building_leaves_the_old_plan(minilm_metrics, old_plan, monkeypatch):
    """A crash (here: the disk fills while allocation.csv is written) mid-way through the new
    directory: the old plan is still whole, and the half-built one is gone."""
    import pandas as pd

    before = _snapshot(old_plan)

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pd.DataFrame, "to_csv", full_disk)
    with pytest.raises(OutputError, match="No space left on device"):
        allocate(minilm_metrics, old_plan, AllocateSettings(max_rank=16))
    assert _snapshot(old_plan) == before and _siblings(old_plan) == []


def test_a_directory_with_other_files_is_never_replaced(minilm_metrics, tmp_path):
    """`-o` pointing at a model directory (or anything else of the user's) is refused whole."""
    model = tmp_path / "my-model"
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"weights")
    with pytest.raises(OutputError, match="holds files esdtool did not write"):
        allocate(minilm_metrics, model)
    assert _snapshot(model) == {"model.safetensors": b"weights"}
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="not a directory"):
        allocate(minilm_metrics, tmp_path / "file")


def test_atomic_dir_swaps_whole_directories(tmp_path):
    """The swap itself: the new files replace the old ones as a set, both when the target
    exists (one atomic exchange on Linux) and when it does not."""
    target = tmp_path / "out"
    atomic_dir(target, lambda d: (d / "a").write_text("1"), ours=("a", "b"))
    assert _snapshot(target) == {"a": b"1"}
    atomic_dir(target, lambda d: (d / "b").write_text("2"), ours=("a", "b"))
    assert _snapshot(target) == {"b": b"2"} and _siblings(target) == []
