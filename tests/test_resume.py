"""Resume: a run killed with SIGKILL, interrupted with Ctrl-C, or left with a torn sidecar ends
with the table an uninterrupted run writes; a sidecar from other settings is not reused."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from esdtool import AnalyzeSettings, analyze, load_metrics
from esdtool.analysis.resume import sidecar_path
from helpers import run_cli, write_tensors

# Columns that legitimately differ between two runs of the same analysis.
RUN_COLUMNS = ["seconds", "device"]


def checkpoint(directory: Path, count: int = 16, shape: tuple[int, int] = (500, 1000)) -> Path:
    rng = np.random.default_rng(11)
    tensors = {
        f"model.layers.{i}.mlp.w.weight": (rng.standard_t(4, size=shape) * 0.02).astype(np.float32)
        for i in range(count)
    }
    tensors["model.norm.weight"] = np.ones(shape[1], np.float32)
    return write_tensors(directory / "model.safetensors", tensors)


def same_table(a: pd.DataFrame, b: pd.DataFrame) -> None:
    assert list(a.name) == list(b.name)
    left, right = a.drop(columns=RUN_COLUMNS), b.drop(columns=RUN_COLUMNS)
    for col in left.columns:
        if col == "eigenvalues":
            for x, y in zip(left[col], right[col], strict=True):
                np.testing.assert_array_equal(x, y)
        else:
            pd.testing.assert_series_equal(left[col], right[col], check_exact=True, obj=col)


def lines(path: Path) -> int:
    try:
        return path.read_text().count("\n")
    except FileNotFoundError:
        return 0


def start(args: list[str]) -> subprocess.Popen:
    env = dict(os.environ)
    return subprocess.Popen(
        [sys.executable, "-m", "esdtool", *map(str, args)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip


def wait_for_rows(proc: subprocess.Popen, side: Path, tensors: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while lines(side) < 1 + tensors:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no progress"
        time.sleep(0.02)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The checkpoint and its table from one uninterrupted run."""
    work = tmp_path_factory.mktemp("resume")
    path = checkpoint(work)
    table = load_metrics(analyze(path, work / "reference.parquet").output)
    return path, table


def test_sigkill_then_rerun_gives_the_uninterrupted_table(reference, tmp_path):
    path, expected = reference
    out = tmp_path / "m.parquet"
    side = sidecar_path(out)
    proc = start(["analyze", path, "-o", out, "-q"])
    wait_for_rows(proc, side, tensors=4)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    kept = lines(side) - 1
    assert 4 <= kept < 16

    proc = subprocess.run(
        [sys.executable, "-m", "esdtool", "analyze", str(path), "-o", str(out), "--json"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert f'"resumed_rows": {kept}' in proc.stdout
    same_table(load_metrics(out), expected)
    assert not side.exists()


def test_ctrl_c_keeps_rows_and_says_how_to_resume(reference, tmp_path):
    path, expected = reference
    out = tmp_path / "m.parquet"
    side = sidecar_path(out)
    proc = start(["analyze", path, "-o", out])
    wait_for_rows(proc, side, tensors=2)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130
    error = [line for line in stderr.splitlines() if line.startswith("Error:")]
    assert len(error) == 1 and "interrupted;" in error[0] and str(side) in error[0]
    assert "run the same command again to resume" in error[0]
    assert "Traceback" not in stderr
    kept = lines(side) - 1
    assert kept >= 2

    proc = subprocess.run(
        [sys.executable, "-m", "esdtool", "analyze", str(path), "-o", str(out)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert f"resuming: keeping {kept} finished row(s)" in proc.stderr
    same_table(load_metrics(out), expected)


class StopAfter:
    """A progress hook that presses Ctrl-C after some tensors (in-process interruption)."""

    def __init__(self, count: int) -> None:
        self.count, self.notes = count, []

    def start(self, total_tensors, total_bytes):
        pass

    def advance(self, name, nbytes):
        self.count -= 1
        if self.count == 0:
            raise KeyboardInterrupt

    def note(self, message):
        self.notes.append(message)


def test_other_settings_torn_lines_and_no_resume(reference, tmp_path):
    from esdtool.errors import AnalysisInterrupted

    path, expected = reference
    out = tmp_path / "m.parquet"
    side = sidecar_path(out)
    other = AnalyzeSettings(eig_threshold=1e-3)
    with pytest.raises(AnalysisInterrupted) as info:
        analyze(path, out, other, progress=StopAfter(5))
    assert info.value.exit_code == 130 and lines(side) == 1 + 4  # 1 skipped row + 4 tensors

    # Different settings: the sidecar is not reused, and the user is told.
    hook = StopAfter(10**9)
    result = analyze(path, out, progress=hook)
    assert result.resumed == 0 and any("starting afresh" in n for n in hook.notes)
    same_table(load_metrics(out), expected)
    assert not side.exists()

    # A torn last line (killed mid-write) costs only that line.
    with pytest.raises(AnalysisInterrupted):
        analyze(path, out, progress=StopAfter(4))
    with side.open("a") as f:
        f.write('{"rows": [{"name": "model.lay')
    hook = StopAfter(10**9)
    assert analyze(path, out, progress=hook).resumed == 3
    assert any("keeping 3 finished row(s)" in n for n in hook.notes)
    same_table(load_metrics(out), expected)

    # --no-resume starts over even when the sidecar would match.
    with pytest.raises(AnalysisInterrupted):
        analyze(path, out, progress=StopAfter(4))
    assert analyze(path, out, resume=False).resumed == 0
    same_table(load_metrics(out), expected)


def test_nothing_analysable_is_one_clear_error(tmp_path, capsys):
    path = write_tensors(
        tmp_path / "vectors.safetensors",
        {"a.bias": np.ones(8, np.float32), "ids": np.arange(64, dtype=np.int64).reshape(8, 8)},
    )
    code, _, stderr = run_cli(["analyze", path, "-o", tmp_path / "m.parquet"], capsys)
    assert code == 2 and stderr.count("\n") == 1
    assert "nothing to analyse" in stderr and "vectors.safetensors" in stderr
    assert "1-D tensor" in stderr
    assert not (tmp_path / "m.parquet").exists()


def test_two_runs_writing_one_output_leave_a_complete_table(reference, tmp_path):
    """Concurrent runs race on the output and its sidecar; whichever renames last wins, and
    the file is always a whole table."""
    path, expected = reference
    out = tmp_path / "m.parquet"
    first, second = (
        start(["analyze", path, "-o", out, "-q"]),
        start(["analyze", path, "-o", out, "-q"]),
    )
    for proc in (first, second):
        _, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr
    same_table(load_metrics(out), expected)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.parquet"]


def test_a_farms_run_resumes_to_the_uninterrupted_table(reference, tmp_path):
    """With --estimator farms the finished rows carry their FARMS numbers through the sidecar:
    Ctrl-C after 4 tensors, then the same call, gives the table of one uninterrupted farms run
    (the sidecar used to hand back the FARMS record as a plain dict, and writing the table
    failed)."""
    from esdtool.errors import AnalysisInterrupted

    path, _ = reference
    settings = AnalyzeSettings(estimator="farms", farms_rows=16, farms_q=1.0, farms_grid=3)
    whole = load_metrics(analyze(path, tmp_path / "whole.parquet", settings).output)
    out = tmp_path / "m.parquet"
    with pytest.raises(AnalysisInterrupted):
        analyze(path, out, settings, progress=StopAfter(4))
    assert lines(sidecar_path(out)) >= 4
    again = load_metrics(analyze(path, out, settings).output)
    same_table(again, whole)
    assert again.alpha_median_farms.notna().sum() >= 4
