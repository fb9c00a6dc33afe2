"""What a new user stumbled on (issue 28, item 5), each fixed with a test that failed before:
`python -m esdtool.training.tiny --help` made a directory named --help; a successful
`allocate --verify` said nothing; with --json an error left stdout empty; plot_esd's figure did
not name its matrix; a 2-layer model's layer axes read 0.0, 0.2, ... 1.0."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pandas as pd

from helpers import ROOT, run_cli


def test_tiny_model_help_prints_usage_and_makes_nothing(tmp_path):
    for flag, code in (("--help", 0), ("-h", 0), ("--force", 1)):
        proc = subprocess.run([sys.executable, "-m", "esdtool.training.tiny", flag], cwd=tmp_path,
                              capture_output=True, text=True,
                              env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})  # fmt: skip
        assert proc.returncode == code, proc.stderr
        assert "usage: python -m esdtool.training.tiny DIRECTORY" in proc.stdout + proc.stderr
        assert list(tmp_path.iterdir()) == []  # no directory named after the flag


def test_a_successful_verify_says_so(minilm_metrics, tmp_path, capsys):
    args = ["allocate", minilm_metrics, "--task-type", "FEATURE_EXTRACTION", "--verify",
            "--no-report"]  # fmt: skip
    code, stdout, stderr = run_cli([*args, "-o", tmp_path / "a"], capsys)
    assert code == 0, stderr
    assert "verified" in stdout and "PEFT gives every module its planned rank" in stdout
    code, stdout, _ = run_cli([*args, "-o", tmp_path / "b", "--json"], capsys)
    assert code == 0 and json.loads(stdout)["verified"] is True
    code, stdout, _ = run_cli([*args[:-2], "--no-report", "-o", tmp_path / "c", "--json"], capsys)
    assert json.loads(stdout)["verified"] is False


def test_an_error_with_json_is_a_json_object_on_stdout_too(tmp_path, capsys):
    code, stdout, stderr = run_cli(
        ["allocate", tmp_path / "missing.parquet", "-o", tmp_path / "plan", "--json"], capsys
    )
    assert code == 2 and stderr.startswith("Error:")
    error = json.loads(stdout)
    assert error["exit_code"] == 2 and "missing.parquet" in error["error"]
    assert set(error) == {"error", "hint", "exit_code"}
    code, stdout, _ = run_cli(["allocate", tmp_path / "missing.parquet", "-o", tmp_path / "p"],
                              capsys)  # fmt: skip
    assert code == 2 and stdout == ""  # without --json, stdout stays empty


def test_plot_esd_names_its_matrix(minilm_metrics):
    from esdtool import load_metrics, plot_esd

    table = load_metrics(minilm_metrics)
    name = table[table.status == "ok"].name.iloc[0]
    title = plot_esd(table, name).axes[0].get_title(loc="left")
    assert title.splitlines()[0] == name and "α =" in title.splitlines()[1]


def test_layer_axes_count_layers_in_whole_numbers():
    from esdtool.render.plots import by_depth

    table = pd.DataFrame({"layer": [0, 0, 1, 1], "kind": ["q", "v", "q", "v"],
                          "alpha": [2.0, 3.0, 2.5, 3.5]})  # fmt: skip
    svg = by_depth(table, "alpha", "alpha by depth", "alpha", None).decode()
    ticks = set(re.findall(r">\s*(-?\d+(?:\.\d+)?)\s*</text>", svg))
    assert "0.2" not in ticks and "0.5" not in ticks
    assert {"0", "1"} <= ticks, ticks
