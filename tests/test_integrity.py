"""Integrity: a rerun never reuses rows of another model, outputs never destroy what they
point at, and every option is checked before any work (issue 13, classes 1-5)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from esdtool import analyze, load_metrics
from esdtool.analysis.resume import sidecar_path
from esdtool.errors import AnalysisInterrupted
from helpers import run_cli, write_tensors

SHAPE = (48, 96)


def model(path, seed: int):
    """Four seeded matrices and a norm vector: the same names and shapes for every seed."""
    rng = np.random.default_rng(seed)
    tensors = {
        f"model.layers.{i}.mlp.up_proj.weight": rng.standard_t(4, size=SHAPE).astype(np.float32)
        for i in range(4)
    }
    tensors["model.norm.weight"] = np.ones(SHAPE[1], np.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_tensors(path, tensors)


class StopAfter:
    """A progress hook that presses Ctrl-C after ``n`` tensors are recorded (as a kill would
    leave them in the sidecar)."""

    def __init__(self, n: int) -> None:
        self.n, self.seen = n, 0

    def start(self, total_tensors: int, total_bytes: int) -> None:
        pass

    def advance(self, name: str, nbytes: int) -> None:
        self.seen += 1
        if self.seen == self.n:
            raise KeyboardInterrupt

    def note(self, message: str) -> None:
        pass


def interrupted(source, output) -> None:
    with pytest.raises(AnalysisInterrupted):
        analyze(source, output, progress=StopAfter(3))
    assert sidecar_path(output).is_file()


def alphas(path):
    table = load_metrics(path)
    return table.set_index("name")["alpha_ks"].dropna()


def test_a_resave_in_place_is_not_resumed_with_old_rows(tmp_path):
    """Kill a run, re-save the checkpoint with new weights of the same names and shapes (the
    header is byte-for-byte the same), rerun: every row is of the new weights."""
    weights = model(tmp_path / "m" / "model.safetensors", seed=1)
    out = tmp_path / "metrics.parquet"
    interrupted(weights, out)
    model(weights, seed=2)  # same file, same header, new data
    fresh = alphas(analyze(weights, tmp_path / "fresh.parquet", resume=False).output)
    rerun = alphas(analyze(weights, out).output)
    assert rerun.equals(fresh)


def test_another_model_at_the_same_output_is_not_resumed(tmp_path, capsys):
    """A sibling fine-tune of the same base (same file name, shapes and header) at the same -o:
    the rerun says it starts afresh and writes the sibling's rows only."""
    base = model(tmp_path / "base" / "model.safetensors", seed=1)
    tuned = model(tmp_path / "tuned" / "model.safetensors", seed=3)
    out = tmp_path / "metrics.parquet"
    interrupted(base, out)
    code, _, stderr = run_cli(["analyze", tuned.parent, "-o", out], capsys)
    assert code == 0, stderr
    assert "starting afresh" in stderr
    fresh = alphas(analyze(tuned, tmp_path / "fresh.parquet").output)
    assert alphas(out).equals(fresh)


def _special_outputs(tmp_path):
    """Outputs that are not regular files, all inside tmp_path: a FIFO, a symlink to it, and
    (as root) a character device like /dev/null."""
    import os
    import stat

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    link = tmp_path / "link-to-fifo"
    link.symlink_to(fifo)
    found = [fifo, link]
    if os.geteuid() == 0:
        null = tmp_path / "null"
        os.mknod(null, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
        found.append(null)
    return found


@pytest.mark.parametrize("command", ["analyze", "report"])
def test_outputs_that_are_not_regular_files_are_refused_and_kept(command, tmp_path, capsys):
    """Renaming over a device, FIFO or a link to one would replace it (`-o /dev/null` as root
    broke a machine's /dev/null): refused in one line, before any work, the node intact."""
    import stat

    weights = model(tmp_path / "m" / "model.safetensors", seed=1)
    source = weights if command == "analyze" else analyze(weights, tmp_path / "t.parquet").output
    for out in _special_outputs(tmp_path):
        mode = out.lstat().st_mode
        code, _, stderr = run_cli([command, source, "-o", out], capsys)
        assert code == 2 and "not a regular file" in stderr and stderr.count("\n") == 1, stderr
        assert out.lstat().st_mode == mode and not stat.S_ISREG(mode)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_an_output_that_is_the_input_is_refused(tmp_path, capsys):
    weights = model(tmp_path / "m" / "model.safetensors", seed=1)
    before = weights.read_bytes()
    code, _, stderr = run_cli(["analyze", weights, "-o", weights], capsys)
    assert code == 2 and "is also an input" in stderr and weights.read_bytes() == before
    table = analyze(weights, tmp_path / "t.parquet").output
    kept = table.read_bytes()
    code, _, stderr = run_cli(["report", table, "-o", table], capsys)
    assert code == 2 and "is also an input" in stderr and table.read_bytes() == kept
    code, _, stderr = run_cli(["allocate", table, "-o", tmp_path], capsys)
    assert code == 2 and "holds the input" in stderr and table.read_bytes() == kept


@pytest.mark.parametrize("bad", ["", "/", "somedir", "newdir/"])
def test_outputs_naming_directories_fail_before_any_work(bad, tmp_path, capsys, monkeypatch):
    """`-o` that names a directory (an existing one, '', '/', or 'name/') fails in one line
    before anything is computed or created; `newdir/` does not become a file."""
    monkeypatch.chdir(tmp_path)
    weights = model(tmp_path / "m" / "model.safetensors", seed=1)
    (tmp_path / "somedir").mkdir()
    listing = sorted(p.name for p in tmp_path.iterdir())
    code, _, stderr = run_cli(["analyze", weights, "-o", bad], capsys)
    assert code == 2 and "directory" in stderr and stderr.count("\n") == 1, stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == listing


@pytest.mark.parametrize("bad", ["", "/", "."])
def test_plan_outputs_need_a_directory_name(bad, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    table = analyze(model(tmp_path / "m" / "model.safetensors", seed=1), tmp_path / "t.parquet")
    listing = sorted(p.name for p in tmp_path.iterdir())
    code, _, stderr = run_cli(["allocate", table.output, "-o", bad], capsys)
    assert code == 2 and "give a directory name" in stderr and stderr.count("\n") == 1, stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == listing


def test_verify_checks_the_model_the_table_was_made_from(tmp_path, capsys, monkeypatch):
    """A table made from a relative path, a plan verified from another directory holding a
    wider model at that same relative path: --verify builds the analysed model (the table
    records its absolute path), not whatever the path names from here."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("peft")

    def llama(directory, hidden):
        config = transformers.LlamaConfig(
            hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
            num_attention_heads=4, num_key_value_heads=2, vocab_size=64,
        )  # fmt: skip
        transformers.LlamaForCausalLM(config).save_pretrained(directory)

    llama(tmp_path / "a" / "model", 64)
    llama(tmp_path / "b" / "model", 96)  # same module names, other shapes
    monkeypatch.chdir(tmp_path / "a")
    table = analyze("model", tmp_path / "m.parquet").output
    assert load_metrics(table).attrs["esdtool"]["source_path"] == str(tmp_path / "a" / "model")
    monkeypatch.chdir(tmp_path / "b")
    code, _, stderr = run_cli(
        ["allocate", table, "-o", tmp_path / "plan", "--verify", "-q"], capsys
    )
    assert code == 0, stderr


def test_statuses_say_what_is_true_for_extreme_float64_entries(tmp_path):
    """Finite float64 weights of 1e-150 and 1e150 are analysed exactly (eigenvalues = the unit
    matrix's times s^2, alphas unchanged: the power-law exponent is scale-free); at 1e-170 and
    1e160 the eigenvalues leave float64's range and the row says so. They used to read
    status "zero" and "NaN or Inf entries"."""
    import oracle

    rng = np.random.default_rng(5)
    unit = rng.standard_t(4, size=(40, 80))
    scales = {"tiny": 1e-150, "huge": 1e150, "under": 1e-170, "over": 1e160, "unit": 1.0}
    path = write_tensors(
        tmp_path / "x.safetensors",
        {f"layers.0.{k}.weight": (unit * s).astype(np.float64) for k, s in scales.items()},
    )
    table = load_metrics(analyze(path, tmp_path / "m.parquet").output).set_index("name")
    rows = {k: table.loc[f"layers.0.{k}.weight"] for k in scales}
    expected = oracle.evals(unit)
    for key in ("tiny", "huge", "unit"):
        row, s = rows[key], scales[key]
        assert row.status == "ok", (key, row.reason)
        np.testing.assert_allclose(row.lambda_max, expected[-1] * s * s, rtol=1e-12)
        for column in ("alpha_median", "alpha_fix_finger", "alpha_ks"):
            assert row[column] == pytest.approx(rows["unit"][column], rel=1e-9), (key, column)
    assert rows["under"].status == "skipped" and "underflow float64" in rows["under"].reason
    assert rows["over"].status == "skipped" and "overflow float64" in rows["over"].reason


def test_every_selected_tensor_gets_a_row(tmp_path):
    """A 3-D tensor with no experts and a block index too large for int64 used to vanish from
    the table or fail the whole run at the end."""
    rng = np.random.default_rng(6)
    path = write_tensors(
        tmp_path / "x.safetensors",
        {
            "model.layers.0.mlp.experts.weight": np.zeros((0, 32, 64), np.float32),
            "model.layers.99999999999999999999.mlp.up.weight": rng.standard_normal((32, 64)).astype(
                np.float32
            ),
            "model.layers.1.mlp.up.weight": rng.standard_normal((32, 64)).astype(np.float32),
        },
    )
    table = load_metrics(analyze(path, tmp_path / "m.parquet").output).set_index("name")
    assert len(table) == 3
    empty = table.loc["model.layers.0.mlp.experts.weight"]
    assert empty.status == "skipped" and "empty tensor" in empty.reason
    odd = table.loc["model.layers.99999999999999999999.mlp.up.weight"]
    assert odd.status == "ok" and pd.isna(odd.layer)


@pytest.fixture()
def table(tmp_path):
    return analyze(
        model(tmp_path / "m" / "model.safetensors", seed=1), tmp_path / "t.parquet"
    ).output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--alpha-factor", "nan"], "--alpha-factor must be a finite number > 0"),
        (["--w-hill", "nan"], "--w-hill must be a finite number >= 0"),
        (["--w-mp-spikes", "-1"], "--w-mp-spikes must be a finite number >= 0"),
        (["--w-hill", "0", "--w-mp-spikes", "0"], "every score would tie"),
        (["--lora-dropout", "-3"], "--lora-dropout must lie in [0, 1)"),
        (["--task-type", "NOT_A_TASK"], "--task-type must be one of"),
        (["--targets", r"(a)\1"], "RE2 syntax"),
        (["--alpha-column", "lambda_max"], "--alpha-column must be one of"),
        (["--spikes-column", "alpha_ks"], "--spikes-column must be one of"),
    ],
)
def test_allocate_options_that_would_poison_a_plan(args, message, table, tmp_path, capsys):
    """NaN factors wrote `lora_alpha: NaN` (finetune then trained NaN adapters), NaN weights
    gave rank -9223372036854775808: every option is checked before anything is written."""
    out = tmp_path / "plan"
    code, _, stderr = run_cli(["allocate", table, "-o", out, *args], capsys)
    assert code == 2 and message in stderr and stderr.count("\n") == 1, stderr
    assert "unexpected" not in stderr and not out.exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--max-tensor-gb", "inf"], "--max-tensor-gb must be a finite number"),
        (["--max-tensor-gb", "nan"], "--max-tensor-gb must be a finite number"),
        (["--device", "cuda:99999999999999999999"], "--device must be auto, cpu, cuda or cuda:N"),
        (["--include", r"(?=a)"], "RE2 syntax"),
    ],
)
def test_analyze_options_are_checked_before_any_work(args, message, tmp_path, capsys):
    weights = model(tmp_path / "m" / "model.safetensors", seed=1)
    code, _, stderr = run_cli(["analyze", weights, "-o", tmp_path / "t.parquet", *args], capsys)
    assert code == 2 and message in stderr and stderr.count("\n") == 1, stderr
    assert not (tmp_path / "t.parquet").exists()


def test_user_regexes_run_in_linear_time_on_hostile_names(tmp_path):
    """`--include '(a+)+$'` on a long name took exponential time with Python's re; RE2 answers
    at once. run_subprocess's timeout is only a guard: it would not finish at all before."""
    from helpers import run_subprocess

    rng = np.random.default_rng(7)
    name = "layers.0." + "a" * 64 + "!.weight"
    path = write_tensors(
        tmp_path / "x.safetensors",
        {name: rng.standard_normal((16, 32)).astype(np.float32),
         "layers.0.aaaa.weight": rng.standard_normal((16, 32)).astype(np.float32)},
    )  # fmt: skip
    proc = run_subprocess(
        ["analyze", path, "-o", tmp_path / "m.parquet", "--include", "(a+)+$", "-q"]
    )
    assert proc.returncode == 2 and "no tensor names pass" in proc.stderr, proc.stderr
    proc = run_subprocess(
        ["analyze", path, "-o", tmp_path / "m.parquet", "--include", r"\.(a+)+\.", "-q"]
    )
    assert proc.returncode == 0, proc.stderr
    assert list(load_metrics(tmp_path / "m.parquet").name) == ["layers.0.aaaa.weight"]


def _tampered(table, tmp_path, column, values):
    """A copy of ``table`` with ``column`` replaced by ``values`` (same metadata)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = pq.read_table(table)
    index = data.column_names.index(column)
    data = data.set_column(index, column, pa.array(values))
    out = tmp_path / f"tampered-{column}.parquet"
    pq.write_table(data, out)
    return out


@pytest.mark.parametrize(
    ("column", "make", "message"),
    [
        ("alpha_median", lambda n: [1e308] * (n - 1) + [-1e308], "alpha_median holds"),
        ("alpha_ks", lambda n: ["2.5"] * n, "column types differ from the schema"),
        ("num_spikes", lambda n: [-4] * n, "num_spikes holds negative values"),
        ("status", lambda n: ["fine"] * n, "status 'fine' is none of"),
    ],
)
def test_tables_are_checked_for_types_and_ranges(table, tmp_path, capsys, column, make, message):
    """String-typed or +-1e308 alphas in a table crashed allocate ("unexpected"); a crafted
    table is refused in one line by every command that reads one."""
    rows = len(load_metrics(table))
    bad = _tampered(table, tmp_path, column, make(rows))
    for command in (
        ["allocate", bad, "-o", tmp_path / "plan"],
        ["report", bad, "-o", tmp_path / "r.html"],
    ):
        code, _, stderr = run_cli(command, capsys)
        assert code == 2 and message in stderr and stderr.count("\n") == 1, stderr
    assert not (tmp_path / "plan").exists() and not (tmp_path / "r.html").exists()


def test_task_types_are_peft_s():
    """allocate checks --task-type without importing PEFT: its list must be PEFT's own."""
    peft = pytest.importorskip("peft")
    from esdtool.plan.peft_config import TASK_TYPES

    assert set(TASK_TYPES) == {t.value for t in peft.TaskType}


def test_a_100k_row_table_gives_a_small_report_saying_what_it_left_out(table, tmp_path, capsys):
    """A 100k-row table made report take 88 s, 1.8 GB and a 79 MB page even with --max-plots
    0: the page lists at most MAX_TABLE_ROWS rows (analysed ones first) and counts the rest."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from esdtool.render.page import MAX_TABLE_ROWS

    small = pq.read_table(table)
    copies = -(-100_000 // small.num_rows)
    big = pa.concat_tables([small] * copies).replace_schema_metadata(small.schema.metadata)
    pq.write_table(big, tmp_path / "big.parquet")
    out = tmp_path / "big.html"
    code, _, stderr = run_cli(
        ["report", tmp_path / "big.parquet", "-o", out, "--max-plots", "0", "--json"], capsys
    )
    assert code == 0, stderr
    html = out.read_text()
    assert html.count('<tr id="row-') == MAX_TABLE_ROWS
    skipped = copies  # the model's norm vector, once per copy; the rest are analysed
    analysed = big.num_rows - skipped
    assert analysed > MAX_TABLE_ROWS and 'class="status-skipped' not in html  # analysed first
    hidden = f"{big.num_rows - MAX_TABLE_ROWS:,} more rows ({analysed - MAX_TABLE_ROWS:,} ok, "
    assert hidden + f"{skipped:,} skipped)" in html
    assert len(html) < 5_000_000


def test_finetune_never_writes_into_its_inputs(tiny_causal_lm, tmp_path, capsys):
    """The Trainer writes adapter_config.json and the tokenizer's files into --output-dir: the
    plan's directory or the model's own would lose their files. Refused before any loading."""
    pytest.importorskip("trl")
    from helpers import ARITHMETIC, write_jsonl

    table = analyze(tiny_causal_lm, tmp_path / "m.parquet").output
    plan = tmp_path / "plan"
    assert run_cli(["allocate", table, "-o", plan, "--no-report", "-q"], capsys)[0] == 0
    data = write_jsonl(tmp_path / "d.jsonl", ARITHMETIC)
    before = {p: p.read_bytes() for d in (plan, tiny_causal_lm) for p in d.iterdir() if p.is_file()}
    for out in (plan, tiny_causal_lm):
        code, _, stderr = run_cli(
            ["finetune", tiny_causal_lm, "--adapter-config", plan, "--data", data, "-o", out],
            capsys,
        )
        assert code == 2 and "is also an input" in stderr and stderr.count("Error:") == 1, stderr
    assert {p: p.read_bytes() for p in before} == before


def test_the_float32_path_never_calls_float64_range_weights_out_of_range(tmp_path):
    """F32 weights of 1e19 square past float32 in the SVD path; float64 holds them, so the
    float32 setting must give the float64 answer, not "eigenvalues overflow float64"."""
    from esdtool import AnalyzeSettings

    rng = np.random.default_rng(9)
    path = write_tensors(
        tmp_path / "x.safetensors",
        {"layers.0.w.weight": (rng.standard_normal((12, 20)) * 1e19).astype(np.float32)},
    )
    f32 = load_metrics(
        analyze(path, tmp_path / "a.parquet", AnalyzeSettings(dtype="float32")).output
    )
    f64 = load_metrics(
        analyze(path, tmp_path / "b.parquet", AnalyzeSettings(dtype="float64")).output
    )
    assert f32.status.item() == "ok", f32.reason.item()
    assert f32.lambda_max.item() == pytest.approx(f64.lambda_max.item(), rel=1e-12)
