"""Training trajectories (issue 24): spectra_trajectory.parquet holds an adapter's table at each
measured step. The tables here are real: a PEFT LoRA adapter on the tiny causal LM, analysed in
memory (``analyze(model, weights="adapter")``) at steps 0 (B = 0, as PEFT initialises it), 10,
20 and 30, with B's columns weighted so that each module's effective rank climbs, stays or falls
from step 20 to 30. Every expected number below is recomputed in the test from those input
tables, in float64, by plain loops: never by the code under test."""

from __future__ import annotations

import base64
import copy
import json
import re

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_report import Page, assert_self_contained_and_inert

from esdtool import analyze, compare, load_metrics, load_trajectory, report
from esdtool.errors import MetricsSchemaError, OptionError
from esdtool.io.table import COLUMN_NAMES, SCHEMA
from esdtool.io.trajectory import TRAJECTORY_NAME, write_trajectory
from helpers import run_cli

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
import torch  # noqa: E402

STEPS = (0, 10, 20, 30)
# The spread k of B's columns (column j weighted exp(-k j)) at steps 10, 20 and 30: the smaller
# k, the more even the columns and the higher the update's effective rank.
SPREAD = {
    "climbs": {10: 1.5, 20: 0.8, 30: 0.15},
    "stays": {10: 1.5, 20: 0.4, 30: 0.4},
    "falls": {10: 0.8, 20: 0.15, 30: 1.5},
}
HOSTILE = "<script>alert('trajectory')</script>"


def _rank_share_rows(table: pd.DataFrame) -> list[dict]:
    """The LoRA update rows of one table as plain records (an all-zero update: rank 0)."""
    rows = []
    for r in table.to_dict("records"):
        if pd.isna(r["lora_rank"]) or r["status"] not in ("ok", "zero"):
            continue
        rows.append({
            "module": r["module"],
            "layer": None if pd.isna(r["layer"]) else int(r["layer"]),
            "used": 0.0 if pd.isna(r["effective_rank"]) else float(r["effective_rank"]),
            "usable": float(min(int(r["lora_rank"]), int(r["M"]))),
        })  # fmt: skip
    return rows


@pytest.fixture(scope="module")
def run(tiny_causal_lm, tmp_path_factory):
    """The adapter's tables at STEPS (in memory), the trajectory written from them, the last
    step's table as a file, and which modules were made to climb at the last step."""
    work = tmp_path_factory.mktemp("trajectory")
    transformers.logging.set_verbosity_error()
    base = transformers.AutoModelForCausalLM.from_pretrained(tiny_causal_lm)
    # v_proj is 32 x 64: r = 40 is more than it can use (min(r, M) = 32); lm_head sits outside
    # the blocks.
    config = peft.LoraConfig(r=8, lora_alpha=16, rank_pattern={"v_proj": 40},
                             target_modules=["q_proj", "v_proj", "o_proj", "lm_head"])  # fmt: skip
    model = peft.get_peft_model(copy.deepcopy(base), config)
    factors = sorted((n, p) for n, p in model.named_parameters() if "lora_B" in n)
    generator = torch.Generator().manual_seed(0)
    start = {n: torch.randn(p.shape, generator=generator, dtype=p.dtype) for n, p in factors}
    kinds = {n: list(SPREAD)[i % 3] for i, (n, _) in enumerate(factors)}
    tables = [(0, analyze(model, weights="adapter").table)]
    for step in STEPS[1:]:
        with torch.no_grad():
            for name, param in factors:
                k = SPREAD[kinds[name]][step]
                weights = torch.exp(-k * torch.arange(param.shape[1], dtype=param.dtype))
                param.copy_(0.05 * start[name] * weights)
        tables.append((step, analyze(model, weights="adapter").table))
    final = analyze(model, work / "adapter.parquet", weights="adapter").output
    metadata = {**tables[0][1].attrs["esdtool"], "trajectory_every": 10}
    path = write_trajectory(tables[::-1], work / TRAJECTORY_NAME, metadata)  # any order
    return {"tables": tables, "path": path, "final": final, "metadata": metadata, "work": work}


def test_write_then_load_gives_back_each_step_table(run):
    """Columns step then the schema's, with its types; each step's rows are its table; the
    metadata is the one given plus the steps; load_metrics refuses the file in one line."""
    path = run["path"]
    schema = pq.read_schema(path)
    assert schema.names == ["step", *COLUMN_NAMES]
    assert schema.field("step").type == pa.int64()
    assert [schema.field(f.name).type for f in SCHEMA] == list(SCHEMA.types)
    meta = json.loads(schema.metadata[b"esdtool"])
    assert meta == {**run["metadata"], "trajectory": {"steps": list(STEPS)}}

    loaded = load_trajectory(path)
    assert loaded.step.tolist() == sorted(loaded.step.tolist())
    assert loaded.attrs["esdtool"] == meta
    for step, table in run["tables"]:
        rows = loaded[loaded.step == step].drop(columns="step").reset_index(drop=True)
        assert len(rows) == len(table) > 0
        for a, b in zip(rows.pop("eigenvalues"), table["eigenvalues"], strict=True):
            np.testing.assert_array_equal(a, b)
        pd.testing.assert_frame_equal(rows, table.drop(columns="eigenvalues"))
    updates = loaded[loaded.adapter == "lora"]
    assert (updates[updates.step == 0].status == "zero").all()  # B = 0 at step 0
    assert (updates[updates.step > 0].status == "ok").all()

    with pytest.raises(MetricsSchemaError, match="is a training trajectory") as caught:
        load_metrics(path)
    assert str(path) in str(caught.value) and "\n" not in str(caught.value)


def test_writing_refuses_steps_that_cannot_be_read_back(run, tmp_path):
    (_, first), (_, second) = run["tables"][:2]
    out = tmp_path / TRAJECTORY_NAME
    for steps, match in [
        ([], "no steps"),
        ([(10, first), (10, second)], "step 10 is given twice"),
        ([(-1, first)], "step -1 is not an integer >= 0"),
        ([(1.5, first)], "step 1.5 is not an integer >= 0"),
        ([(True, first)], "step True is not an integer >= 0"),
    ]:
        with pytest.raises(OptionError, match=re.escape(match)):
            write_trajectory(steps, out, {})
    doubled = pd.concat([first, first.iloc[:1]], ignore_index=True)
    with pytest.raises(MetricsSchemaError, match=r"step 3 measures module .* twice"):
        write_trajectory([(3, doubled)], out, {})
    assert not out.exists()


def _rewrite(path, out, table=None, meta=None):
    """``path``'s trajectory written to ``out`` with its arrow table or metadata replaced."""
    original = pq.read_table(path)
    table = original if table is None else table
    meta = json.loads(original.schema.metadata[b"esdtool"]) if meta is None else meta
    pq.write_table(table.replace_schema_metadata({b"esdtool": json.dumps(meta)}), out)
    return out


def _column(table: pa.Table, name: str, array) -> pa.Table:
    return table.set_column(table.schema.get_field_index(name), name, array)


def _hostile(kind, path, out):
    table = pq.read_table(path)
    meta = json.loads(table.schema.metadata[b"esdtool"])
    steps = table.column("step").to_pylist()
    if kind == "metrics table":
        return load_metrics_file(path, out)
    if kind == "not parquet":
        out.write_bytes(b"PAR1 not really")
        return out
    if kind == "directory":
        out.mkdir()
        return out
    if kind == "missing column":
        return _rewrite(path, out, table.drop_columns(["lambda_max"]))
    if kind == "missing step":
        return _rewrite(path, out, table.drop_columns(["step"]))
    if kind == "typed wrong":
        return _rewrite(
            path, out, _column(table, "lambda_max", table.column("lambda_max").cast(pa.string()))
        )
    if kind == "non-integer step":
        values = pa.array([s + 0.5 for s in steps], pa.float64())
        return _rewrite(path, out, _column(table, "step", values))
    if kind == "negative step":
        values = pa.array([-10 if s == 10 else s for s in steps], pa.int64())
        return _rewrite(path, out, _column(table, "step", values))
    if kind == "null step":
        values = pa.array([None if s == 10 else s for s in steps], pa.int64())
        return _rewrite(path, out, _column(table, "step", values))
    if kind == "steps not listed":
        return _rewrite(path, out, meta={**meta, "trajectory": {"steps": [0, 10, 20]}})
    if kind == "listed steps negative":
        return _rewrite(path, out, meta={**meta, "trajectory": {"steps": [-1, 0, 10]}})
    if kind == "listed steps not a list":
        return _rewrite(path, out, meta={**meta, "trajectory": "<b>all</b>"})
    if kind == "module twice":
        step20 = table.filter(pa.compute.equal(table.column("step"), 20))
        ok = step20.filter(pa.compute.equal(step20.column("status"), "ok")).slice(0, 1)
        return _rewrite(path, out, pa.concat_tables([table, ok]))
    raise AssertionError(kind)


def load_metrics_file(path, out):
    """A metrics table (no trajectory metadata): one step's rows under a plain table's."""
    table = pq.read_table(path)
    meta = json.loads(table.schema.metadata[b"esdtool"])
    del meta["trajectory"]
    rows = table.filter(pa.compute.equal(table.column("step"), 30)).drop_columns(["step"])
    return _rewrite(path, out, rows, meta)


HOSTILE_FILES = {
    "metrics table": "is a metrics table, not a training trajectory",
    "not parquet": "not a training trajectory (not a parquet file)",
    "directory": "is a directory, not a training trajectory",
    "missing column": "missing columns lambda_max",
    "missing step": "missing columns step",
    "typed wrong": "lambda_max is string, not double",
    "non-integer step": "step is double, not int64",
    "negative step": "step holds negative values (-10)",
    "null step": "step has nulls",
    "steps not listed": "the rows hold steps 0, 10, 20, 30, the metadata lists 0, 10, 20",
    "listed steps negative": "trajectory steps [-1, 0, 10] are not integers >= 0",
    "listed steps not a list": "trajectory steps null are not integers >= 0",
    "module twice": "step 20 measures module '",
}


@pytest.mark.parametrize("kind", list(HOSTILE_FILES))
def test_hostile_trajectory_files_are_refused_in_one_line(run, tmp_path, capsys, kind):
    """Each file is refused by load_trajectory, by compare and by report --trajectory, in one
    line naming the file and what is wrong with it."""
    bad = _hostile(kind, run["path"], tmp_path / "bad.parquet")
    with pytest.raises(MetricsSchemaError) as caught:
        load_trajectory(bad)
    message = str(caught.value)
    assert message.startswith(f"{bad}: ") and HOSTILE_FILES[kind] in message, message
    assert "\n" not in message
    if kind in ("metrics table", "not parquet", "directory"):
        return  # compare reads these as tables, and says so
    report_args = ["report", run["final"], "-o", tmp_path / "r.html", "--trajectory", bad]
    for args in (["compare", bad, "-o", tmp_path / "cmp"], report_args):
        code, _, stderr = run_cli(args, capsys)
        assert code == 2 and stderr.count("\n") == 1 and str(bad) in stderr, stderr
        assert HOSTILE_FILES[kind] in stderr, stderr


def _effective_ranks(table: pd.DataFrame) -> dict[str, float]:
    return {r["module"]: r["used"] for r in _rank_share_rows(table)}


def _measured(table: pd.DataFrame) -> dict[str, float]:
    """effective_rank of every measured row (ok or zero) by module: what compare matches."""
    rows = table[table.status.isin(["ok", "zero"])]
    return {m: float(e) for m, e in zip(rows.module, rows.effective_rank, strict=True)}


def test_compare_of_a_trajectory_compares_its_steps(run, tmp_path, capsys):
    """One trajectory: its steps are the tables, labelled "step N"; each step's effective
    ranks are that step's input table's (an untrained update at step 0: 0; the tied lm_head
    weight PEFT saves in full is a row too)."""
    code, stdout, stderr = run_cli(
        ["compare", run["path"], "-o", tmp_path / "cmp", "--json"], capsys
    )
    assert code == 0, stderr
    summary = json.loads(stdout)
    labels = [f"step {s}" for s in STEPS]
    assert summary["tables"] == labels
    compared = pd.read_csv(tmp_path / "cmp" / "comparison.csv").set_index("module")
    for step, table in run["tables"]:
        expected = _measured(table)
        got = compared[f"effective_rank@step {step}"].dropna().to_dict()
        assert got == expected, step
    first, last = _measured(run["tables"][0][1]), _measured(run["tables"][-1][1])
    assert compared["delta_effective_rank"].to_dict() == {m: last[m] - first[m] for m in last}
    assert summary["modules_compared"] == len(last) == 8  # 7 LoRA updates, the saved lm_head
    assert set(first.values()) >= {0.0}
    html = (tmp_path / "cmp" / "report.html").read_text()
    svgs = [base64.b64decode(data).decode() for data in re.findall(r"base64,([^\"]+)", html)]
    over = [svg for svg in svgs if "effective_rank over the tables" in svg]
    assert len(over) == 1 and "training step" in over[0]  # drawn against the step, not 0 1 2 3
    record = json.loads((tmp_path / "cmp" / "esdtool_compare.json").read_text())
    assert record["labels"] == labels and record["steps"] == list(STEPS)

    loaded = compare([load_trajectory(run["path"])])
    assert loaded.labels == labels
    with pytest.raises(OptionError, match="compare takes one trajectory on its own"):
        compare([run["path"], run["final"]])
    code, _, stderr = run_cli(["compare", run["final"], run["path"], "-o", tmp_path / "x"],
                              capsys)  # fmt: skip
    assert code == 2 and stderr.count("\n") == 1 and "one trajectory on its own" in stderr
    one = write_trajectory(run["tables"][:1], tmp_path / "one.parquet", run["metadata"])
    with pytest.raises(OptionError, match=r"holds one step \(0\): compare needs two") as caught:
        compare([one])
    assert str(caught.value).startswith(f"{one}: ")


def _shares_by_hand(tables) -> dict[tuple[int, int | None], float]:
    """Per (step, layer): sum of effective_rank / sum of min(lora_rank, M), in float64."""
    shares = {}
    for step, table in tables:
        used, usable = {}, {}
        for r in _rank_share_rows(table):
            used[r["layer"]] = used.get(r["layer"], 0.0) + r["used"]
            usable[r["layer"]] = usable.get(r["layer"], 0.0) + r["usable"]
        shares.update({(step, layer): used[layer] / usable[layer] for layer in used})
    return shares


def test_share_of_planned_rank_per_layer_equals_a_recomputation(run):
    from esdtool.render.trajectory import rank_share_by_layer

    got = rank_share_by_layer(load_trajectory(run["path"]))
    expected = _shares_by_hand(run["tables"])
    keys = [(int(s), None if pd.isna(layer) else int(layer))
            for s, layer in zip(got.step, got.layer, strict=True)]  # fmt: skip
    assert sorted(keys, key=str) == sorted(expected, key=str)
    for key, share in zip(keys, got.share, strict=True):
        assert share == pytest.approx(expected[key], rel=1e-15, abs=1e-15), key
    # The fixture exercises what the rule is for: v_proj's r = 40 counts as M = 32, lm_head
    # is outside the blocks, and the shares move.
    assert (None in {layer for _, layer in expected}) and len(set(expected.values())) > 3
    assert got.share.between(0, 1).all()


def _climbing_by_hand(tables) -> dict[str, tuple[float, float]]:
    """Modules whose effective_rank at the last step is greater than at the step before it."""
    (_, before), (_, last) = tables[-2], tables[-1]
    old, new = _effective_ranks(before), _effective_ranks(last)
    return {m: (old[m], new[m]) for m in new if m in old and new[m] > old[m]}


def test_still_climbing_lists_the_modules_the_rule_gives(run, tmp_path):
    from esdtool.render.trajectory import still_climbing

    expected = _climbing_by_hand(run["tables"])
    all_modules = _effective_ranks(run["tables"][-1][1])
    assert 0 < len(expected) < len(all_modules)  # the fixture has climbers and others
    got = still_climbing(load_trajectory(run["path"]))
    assert {m: (b, a) for m, b, a in zip(got.module, got.before, got.last, strict=True)} == expected
    assert list(got.rise) == sorted(got.rise, reverse=True)

    result = report(run["final"], tmp_path / "r.html", trajectory=run["path"])
    html = result.html
    section = html[html.index('<section id="trajectory">') : html.index('<section id="spectra">')]
    listed = re.findall(r"<tr><td>([^<]+(?:<wbr>[^<]+)*)</td><td>", section)
    assert {name.replace("<wbr>", "") for name in listed} == set(expected)
    assert (
        "effective_rank at the last measured step is greater than at the step measured "
        "just before it" in section
    )
    assert "from step 20 to step 30" in section and "4 measured steps, 0 to 30" in section
    assert_self_contained_and_inert(Page(html))


def test_trajectory_text_is_escaped(run, tmp_path):
    """A module named with markup comes out as text in the trajectory section: the page runs
    no script of the table's and keeps its one own script."""
    climber = next(iter(_climbing_by_hand(run["tables"])))
    hostile = f"{climber}.{HOSTILE}"

    def renamed(table):
        table = table.copy()
        table["module"] = table["module"].replace(climber, hostile)
        return table

    trajectory = [(step, renamed(table)) for step, table in run["tables"]]
    path = write_trajectory(trajectory, tmp_path / "t.parquet", run["metadata"])
    html = report(renamed(load_metrics(run["final"])), tmp_path / "r.html", trajectory=path).html
    section = html[html.index('<section id="trajectory">') : html.index('<section id="spectra">')]
    assert "<script>alert" not in html
    assert "&lt;script&gt;alert(&#39;trajectory&#39;)&lt;/script&gt;" in section
    page = Page(html)
    assert_self_contained_and_inert(page)
    assert len(page.scripts) == 1


def test_report_cli_trajectory_and_its_refusals(run, minilm_metrics, tmp_path, capsys):
    out = tmp_path / "r.html"
    code, stdout, stderr = run_cli(
        ["report", run["final"], "-o", out, "--trajectory", run["path"], "--json"], capsys
    )
    assert code == 0, stderr
    assert json.loads(stdout)["report"] == str(out)
    html = out.read_text()
    assert '<section id="trajectory">' in html and 'href="#trajectory"' in html
    assert "(measured every 10 steps)" in html
    without = report(run["final"]).html
    assert '<section id="trajectory">' not in without
    one = write_trajectory(run["tables"][-1:], tmp_path / "one.parquet", run["metadata"])
    html = report(run["final"], trajectory=one).html
    assert "One step was measured: there is no step before it to compare with." in html

    for metrics, output, trajectory, message in [
        (minilm_metrics, out, run["path"], "holds no LoRA update"),
        (run["final"], out, run["final"], "is a metrics table, not a training trajectory"),
        (run["final"], run["path"], run["path"], "is also an input"),
    ]:
        code, _, stderr = run_cli(
            ["report", metrics, "-o", output, "--trajectory", trajectory], capsys
        )
        assert code == 2 and stderr.count("\n") == 1 and message in stderr, stderr
    assert load_trajectory(run["path"]).step.nunique() == len(STEPS)  # not overwritten


def test_a_run_that_diverged_keeps_its_trajectory_in_the_report(
    run, tiny_causal_lm, tmp_path, capsys
):
    """Training that went to NaN leaves an adapter whose every update is 'nonfinite' (no
    effective rank): its report still draws the trajectory that led there, as finetune's
    read-back does with --spectral-every (it lost adapter_report.html and said "this table holds
    no LoRA update"). The last step has no share of rank used (n/a)."""
    base = transformers.AutoModelForCausalLM.from_pretrained(tiny_causal_lm)
    config = peft.LoraConfig(r=8, lora_alpha=16, rank_pattern={"v_proj": 40},
                             target_modules=["q_proj", "v_proj", "o_proj", "lm_head"])  # fmt: skip
    model = peft.get_peft_model(base, config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.fill_(float("nan"))
    diverged = analyze(model, weights="adapter").table
    updates = diverged[diverged.lora_rank.notna()]
    assert len(updates) and set(updates.status) == {"nonfinite"}
    path = write_trajectory([*run["tables"], (40, diverged)], tmp_path / "t.parquet",
                            run["metadata"])  # fmt: skip
    html = report(diverged, tmp_path / "r.html", trajectory=path).html
    assert '<section id="trajectory">' in html
    assert "5 measured steps, 0 to 40" in html and "and n/a at step 40" in html
    # Without the tied lm_head PEFT saves in full, step 40 has no measured row to compare: one
    # line that names the step.
    alone = write_trajectory([*run["tables"], (40, diverged[diverged.status != "ok"])],
                             tmp_path / "alone.parquet", run["metadata"])  # fmt: skip
    capsys.readouterr()
    code, _, stderr = run_cli(["compare", alone, "-o", tmp_path / "cmp"], capsys)
    assert code == 2 and stderr.count("\n") == 1, stderr
    assert "step 40: no measured row (status ok or zero) to compare" in stderr
