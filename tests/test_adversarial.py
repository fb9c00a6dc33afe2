"""What an adversarial pass over the commands found, each now one line and exit 2 (or a true
number): a finetune output directory holding the user's files, junk or mismatched checkpoints to
resume from, ranks above what a matrix can hold, a stale final loss, empty data, crafted tables,
an all-zero FP8 matrix, and noise on stderr under --quiet."""

from __future__ import annotations

import json
import os
import signal
import time

import numpy as np
import pandas as pd
import pytest

from esdtool import analyze, load_metrics
from helpers import ARITHMETIC, run_cli, run_subprocess, write_jsonl, write_tensors


def _one_error(code: int, stderr: str, message: str) -> None:
    assert code == 2 and message in stderr, stderr
    assert stderr.count("Error:") == 1 and "unexpected" not in stderr, stderr


@pytest.fixture(scope="module")
def loop(tiny_causal_lm, tmp_path_factory):
    """The tiny LM analysed and planned (every block linear kept), and a data file."""
    work = tmp_path_factory.mktemp("adversarial")
    table = analyze(tiny_causal_lm, work / "m.parquet").output
    for name, extra in (("plan", []), ("plan8", ["--max-rank", "8"])):
        proc = run_subprocess(["allocate", table, "-o", work / name, "-q", "--no-report", *extra])
        assert proc.returncode == 0, proc.stderr
    data = write_jsonl(work / "train.jsonl", ARITHMETIC, repeat=2)
    return {"model": tiny_causal_lm, "table": table, "data": data, "work": work}


def _finetune(loop, *args: object) -> list[str]:
    return ["finetune", loop["model"], "--adapter-config", loop["work"] / "plan",
            "--data", loop["data"], *args]  # fmt: skip


def test_finetune_never_writes_among_the_users_files(loop, tmp_path, capsys):
    pytest.importorskip("trl")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "README.md").write_text("my notes")
    (mine / "adapter_config.json").write_text("{}")
    code, _, stderr = run_cli(_finetune(loop, "-o", mine, "--max-steps", "1"), capsys)
    _one_error(code, stderr, "holds files a fine-tuning run did not write")
    assert (mine / "README.md").read_text() == "my notes"


def test_resume_from_junk_or_another_plan_is_refused_before_loading(loop, tmp_path, capsys):
    """A path that is no Trainer checkpoint gave "unexpected ValueError"; resuming a run with
    a plan of other ranks gave "unexpected RuntimeError: size mismatch" after loading."""
    pytest.importorskip("trl")
    out = tmp_path / "run"
    code, _, stderr = run_cli(
        _finetune(loop, "-o", out, "--resume-from-checkpoint", tmp_path / "nowhere"), capsys
    )
    _one_error(code, stderr, "not a training checkpoint")
    assert not out.exists()

    code, _, stderr = run_cli(
        _finetune(loop, "-o", out, "--max-steps", "2", "--save-steps", "1", "-q"), capsys
    )
    assert code == 0, stderr
    other = [a if a != loop["work"] / "plan" else loop["work"] / "plan8" for a in _finetune(loop)]
    code, _, stderr = run_cli(
        [*other, "-o", out, "--max-steps", "4", "--resume-from-checkpoint", "last"], capsys
    )
    _one_error(code, stderr, "was trained with other r, rank_pattern")


def test_the_final_loss_is_the_last_steps(loop, tmp_path, capsys):
    """With 2 steps and logging every 10, the "final" loss was the first step's."""
    pytest.importorskip("trl")
    code, stdout, stderr = run_cli(
        _finetune(loop, "-o", tmp_path / "run", "--max-steps", "2", "--json"), capsys
    )
    assert code == 0, stderr
    result = json.loads(stdout)
    assert [step for step, _ in result["losses"]] == [1, 2]
    assert result["final_loss"] == result["losses"][-1][1]


def test_bf16_without_a_bf16_gpu_is_an_option_error(loop, tmp_path, capsys):
    import torch

    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        pytest.skip("this machine trains in bf16")
    pytest.importorskip("trl")
    code, _, stderr = run_cli(_finetune(loop, "-o", tmp_path / "run", "--bf16"), capsys)
    _one_error(code, stderr, "--bf16 needs a GPU with bfloat16 support")


@pytest.mark.parametrize(
    ("records", "message"),
    [([], "no records"), ([{"text": ""}, {"text": "  "}], "nothing to train on")],
)
def test_data_with_nothing_to_train_on(loop, tmp_path, capsys, records, message):
    """Empty text records trained to "loss 0.0" with exit 0; an empty file said
    "(StopIteration: )"."""
    pytest.importorskip("trl")
    data = write_jsonl(tmp_path / "d.jsonl", records)
    args = ["finetune", loop["model"], "--adapter-config", loop["work"] / "plan", "--data", data]
    code, _, stderr = run_cli([*args, "-o", tmp_path / "run"], capsys)
    _one_error(code, stderr, message)


def test_ranks_never_exceed_what_the_matrix_can_hold(loop, tmp_path, capsys):
    """A LoRA update of an m x n matrix has rank <= min(m, n): larger ranks (32 x 64 k_proj
    given 46; --max-rank 100000 counted as 98M parameters) are capped, with a note."""
    out = tmp_path / "plan"
    code, _, stderr = run_cli(
        ["allocate", loop["table"], "-o", out, "--top-n-percentile", "1", "--max-rank", "100000"],
        capsys,
    )
    assert code == 0, stderr
    plan = pd.read_csv(out / "allocation.csv")
    kept = plan[plan.selected]
    assert (kept["rank"] <= np.minimum(kept.rows, kept.cols)).all()
    assert (kept["rank"] == np.minimum(kept.rows, kept.cols)).any()
    assert (plan.params == plan["rank"] * (plan.rows + plan.cols)).all()
    assert "capped at min(rows, cols)" in stderr


def test_verify_on_a_config_transformers_cannot_build(tmp_path, capsys):
    rng = np.random.default_rng(2)
    (tmp_path / "m").mkdir()
    weights = {
        f"model.layers.{i}.mlp.up_proj.weight": rng.standard_normal((16, 32)) for i in (0, 1)
    }
    write_tensors(
        tmp_path / "m" / "model.safetensors", {k: v.astype(np.float32) for k, v in weights.items()}
    )
    table = analyze(tmp_path / "m", tmp_path / "t.parquet").output
    (tmp_path / "m" / "config.json").write_text('{"model_type": "bert", "hidden_size": 64}')
    code, _, stderr = run_cli(["allocate", table, "-o", tmp_path / "p", "--verify"], capsys)
    _one_error(code, stderr, "cannot build the model from its config.json")


def test_an_all_zero_fp8_matrix_is_a_zero_row(tmp_path):
    """The float64 amax of the rare path did not exist for float8: the row became an error."""
    import torch
    from safetensors.torch import save_file

    path = tmp_path / "f8.safetensors"
    save_file({"layers.0.w.weight": torch.zeros(32, 64, dtype=torch.float8_e4m3fn)}, str(path))
    row = load_metrics(analyze(path, tmp_path / "m.parquet").output).iloc[0]
    assert row.status == "zero" and row.lambda_max == 0


def _tampered(table, out, column, values):
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = pq.read_table(table)
    data = data.set_column(data.column_names.index(column), column, pa.array(values))
    pq.write_table(data, out)
    return out


@pytest.mark.parametrize(
    ("column", "value", "message"),
    [("alpha_median", 1.0, "alpha_median holds"), ("rows", 2**62, "rows of an analysed row")],
)
def test_crafted_tables_with_impossible_values(loop, tmp_path, capsys, column, value, message):
    """rows = 2**62 overflowed the parameter count (params -9223372036854771008); alpha = 1.0
    is no fit's result (a fitted alpha is > 1)."""
    n = len(load_metrics(loop["table"]))
    bad = _tampered(loop["table"], tmp_path / "bad.parquet", column, [value] * n)
    code, _, stderr = run_cli(["allocate", bad, "-o", tmp_path / "p"], capsys)
    _one_error(code, stderr, message)


def test_plan_and_report_outputs_spare_what_esdtool_did_not_write(loop, tmp_path, capsys):
    """A directory holding only a report.html of the user's is not a plan directory; a report
    written over the table's own model would destroy it."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "report.html").write_text("my report")
    code, _, stderr = run_cli(["allocate", loop["table"], "-o", mine], capsys)
    _one_error(code, stderr, "holds files esdtool did not write")
    assert (mine / "report.html").read_text() == "my report"
    weights = loop["model"] / "model.safetensors"
    before = weights.stat().st_size
    code, _, stderr = run_cli(["report", loop["table"], "-o", weights], capsys)
    _one_error(code, stderr, "is also an input")
    assert weights.stat().st_size == before


def test_a_hub_table_never_verifies_a_local_path(loop, tmp_path, capsys):
    """A table claiming source_kind "hub" with source "../../etc" made --verify read /etc."""
    import pyarrow.parquet as pq

    data = pq.read_table(loop["table"])
    meta = json.loads(data.schema.metadata[b"esdtool"])
    meta.update(source="../..", source_kind="hub")
    crafted = data.replace_schema_metadata({b"esdtool": json.dumps(meta).encode()})
    pq.write_table(crafted, tmp_path / "hub.parquet")
    code, _, stderr = run_cli(["allocate", tmp_path / "hub.parquet", "-o", tmp_path / "p",
                               "--verify"], capsys)  # fmt: skip
    _one_error(code, stderr, "not a hub id")


def test_quiet_prints_nothing_but_errors(tmp_path, capsys):
    """--quiet printed the non-finite rows' warnings (they are in the table)."""
    rng = np.random.default_rng(0)
    bad = rng.standard_normal((16, 32)).astype(np.float32)
    bad[0, 0] = np.nan
    good = rng.standard_normal((16, 32)).astype(np.float32)
    path = write_tensors(
        tmp_path / "x.safetensors", {"layers.0.a.weight": bad, "layers.0.b.weight": good}
    )
    code, stdout, stderr = run_cli(["analyze", path, "-o", tmp_path / "m.parquet", "-q"], capsys)
    assert code == 0 and stdout == "" and stderr == "", stderr


def test_sigterm_keeps_the_finished_rows_like_ctrl_c(tmp_path):
    """A scheduler's SIGTERM ended the run abruptly; now it is an interrupt: exit 130, the
    finished rows kept in the sidecar, and a rerun resumes from them."""
    import subprocess
    import sys

    from esdtool.analysis.resume import sidecar_path

    rng = np.random.default_rng(1)
    path = write_tensors(
        tmp_path / "x.safetensors",
        {f"model.layers.{i}.w.weight": rng.standard_normal((400, 800)).astype(np.float32)
         for i in range(40)},
    )  # fmt: skip
    out = tmp_path / "m.parquet"
    side = sidecar_path(out)
    proc = subprocess.Popen(
        [sys.executable, "-m", "esdtool", "analyze", str(path), "-o", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while not (side.is_file() and side.read_text().count("\n") >= 3):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "interrupted" in stderr, stderr
    assert side.is_file() and not out.exists()
    code = run_subprocess(["analyze", path, "-o", out, "-q"]).returncode
    assert code == 0 and len(load_metrics(out)) == 40
