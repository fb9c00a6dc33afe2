"""The plan options practitioners reach for (issue 28, item 4): ranks on a multiple of K, a
budget as a share of the model's parameters, and target presets, on MiniLM's real table and the
tiny causal LM's, each checked against an independent count (safetensors' own tensors, the
module names)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from safetensors import safe_open

from esdtool.errors import OptionError
from esdtool.plan.ranks import AllocateSettings, allocate_ranks
from helpers import run_cli, write_tensors


@pytest.mark.parametrize("budget", [None, {"match_rank": 8}, {"match_rank": 16}])
def test_every_rank_is_a_multiple_and_the_budget_still_holds(minilm_table, budget):
    """--rank-multiple 8: every kept rank is a multiple of 8 within 8..64, and a budget is met
    within 1% (or the plan's note says it is missed)."""
    plan = allocate_ranks(minilm_table, AllocateSettings(rank_multiple=8, **(budget or {})))
    ranks = plan.kept["rank"].to_numpy()
    assert (ranks % 8 == 0).all() and ranks.min() >= 8 and ranks.max() <= 64
    if budget:
        off = abs(plan.total_params / plan.budget - 1)
        assert off <= 0.01 or any("missed" in n for n in plan.notes)
    else:  # without a budget: the nearest multiple of the plan's own rank
        free = allocate_ranks(minilm_table, AllocateSettings()).kept["rank"].to_numpy()
        assert (np.abs(ranks - free) <= 4).all()


def test_a_matrix_too_small_for_the_multiple_keeps_its_largest_rank(tiny_causal_lm, plan):
    """The tiny causal LM's k/v are 32 x 64: with --rank-multiple 48 and --max-rank 64 their
    range 4..32 holds no multiple of 48, so they keep 32 and the plan says how many."""
    from esdtool import load_metrics

    table = load_metrics(plan.parent / "m.parquet")
    out = allocate_ranks(table, AllocateSettings(rank_multiple=48, top_n_percentile=1.0))
    small = out.kept[(out.kept.rows == 32) | (out.kept.cols == 32)]
    assert len(small) and (small["rank"] == 32).all()
    assert (out.kept.drop(small.index)["rank"] % 48 == 0).all()
    assert any(f"{len(small)} module(s) cannot take a rank that is a multiple of 48" in n
               for n in out.notes)  # fmt: skip


def test_budget_percent_is_a_share_of_the_checkpoints_parameters(minilm_dir, minilm_table):
    """--budget-percent 1: the budget is 1% of every tensor's elements in the checkpoint, as
    safetensors itself lists them."""
    total = 0
    with safe_open(str(next(minilm_dir.glob("*.safetensors"))), "pt") as f:
        for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
            total += int(np.prod(f.get_slice(name).get_shape()))
    plan = allocate_ranks(minilm_table, AllocateSettings(budget_percent=1.0))
    assert plan.budget == round(total / 100)
    assert abs(plan.total_params / plan.budget - 1) <= 0.01


def test_budget_percent_refuses_a_partial_table(minilm_dir, tmp_path, capsys):
    """A table analysed with --include holds only some tensors: no parameter count to take a
    share of, said in one line."""
    out = tmp_path / "part.parquet"
    code, _, stderr = run_cli(["analyze", minilm_dir, "-o", out, "--include", "attention",
                               "-q"], capsys)  # fmt: skip
    assert code == 0, stderr
    code, _, stderr = run_cli(["allocate", out, "-o", tmp_path / "p", "--budget-percent", "1"],
                              capsys)  # fmt: skip
    assert code == 2 and "--include/--exclude" in stderr
    assert len(stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("preset", "words"),
    [("attention", ("attention.",)), ("mlp", ("intermediate.", ".output.dense"))],
)
def test_target_presets_pick_the_block_projections_there(minilm_table, preset, words):
    """attention: MiniLM's query/key/value/attention.output.dense; mlp: its intermediate and
    block output dense (not attention.output.dense); all-linear: the default candidates."""
    plan = allocate_ranks(minilm_table, AllocateSettings(targets=preset, top_n_percentile=1.0))
    linear = minilm_table[(minilm_table.role == "linear") & (minilm_table.status == "ok")]
    mine = [any(w in m for w in words) and (preset != "mlp" or "attention" not in m)
            for m in linear.module]  # fmt: skip
    expected = set(linear.module[mine])
    assert set(plan.table.module) == expected
    assert len(expected) == (24 if preset == "attention" else 12)
    everything = allocate_ranks(minilm_table, AllocateSettings(targets="all-linear"))
    default = allocate_ranks(minilm_table, AllocateSettings())
    assert everything.table.equals(default.table)


def test_target_presets_on_a_llama(plan):
    """On the tiny Llama: attention is self_attn.{q,k,v,o}_proj, mlp is mlp.{gate,up,down}_proj."""
    from esdtool import load_metrics

    table = load_metrics(plan.parent / "m.parquet")
    for preset, kinds in (("attention", {"q_proj", "k_proj", "v_proj", "o_proj"}),
                          ("mlp", {"gate_proj", "up_proj", "down_proj"})):  # fmt: skip
        got = allocate_ranks(table, AllocateSettings(targets=preset, top_n_percentile=1.0))
        assert {m.rsplit(".", 1)[-1] for m in got.table.module} == kinds
        assert len(got.table) == 2 * len(kinds)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--rank-multiple", "0"], "--rank-multiple must be an integer in 1..1024"),
        (["--rank-multiple", "128"], "--rank-multiple 128 is above --max-rank 64"),
        (["--budget-percent", "0"], "--budget-percent must lie in (0, 100]"),
        (["--budget-percent", "101"], "--budget-percent must lie in (0, 100]"),
        (
            ["--budget-percent", "1", "--match-rank", "8"],
            "--match-rank and --budget-percent are exclusive",
        ),
    ],
)
def test_bad_plan_options_are_one_line(minilm_metrics, tmp_path, capsys, options, message):
    code, _, stderr = run_cli(["allocate", minilm_metrics, "-o", tmp_path / "p", *options], capsys)
    assert code == 2 and message in stderr, stderr
    assert len(stderr.strip().splitlines()) == 1


def test_the_cli_writes_multiples_into_the_config(minilm_metrics, tmp_path, capsys):
    """allocate --rank-multiple 8 --budget-percent 2: the adapter_config.json PEFT loads holds
    only multiples of 8."""
    out = tmp_path / "plan"
    code, stdout, stderr = run_cli(["allocate", minilm_metrics, "-o", out, "--rank-multiple",
                                    "8", "--budget-percent", "2", "--json"], capsys)  # fmt: skip
    assert code == 0, stderr
    config = json.loads((out / "adapter_config.json").read_text())
    assert all(r % 8 == 0 for r in config["rank_pattern"].values()) and config["r"] % 8 == 0
    assert json.loads(stdout)["budget_params"] > 0


def test_the_parameter_count_is_every_stored_element(tmp_path):
    """--budget-percent's base: every element of the checkpoint, counted from the table's
    shapes as safetensors' own tensor listing counts them (a scalar 1, a vector its length, a
    matrix rows x cols, batched experts each); a table analysed with --exclude has no count."""
    from esdtool import analyze
    from esdtool.analysis import AnalyzeSettings
    from esdtool.plan.targets import model_params

    path = write_tensors(tmp_path / "m.safetensors", {
        "scale": np.array(2.0, dtype=np.float32),
        "norm.weight": np.ones(48, dtype=np.float32),
        "proj.weight": np.random.default_rng(0).normal(size=(40, 24)).astype(np.float32),
        "experts.weight": np.random.default_rng(1).normal(size=(3, 16, 12)).astype(np.float32),
    })  # fmt: skip
    with safe_open(str(path), "np") as f:
        expected = sum(int(np.prod(f.get_slice(k).get_shape())) for k in f.keys())  # noqa: SIM118
    table = analyze(path, settings=AnalyzeSettings(min_evals=2)).table
    assert model_params(table) == expected == 1 + 48 + 40 * 24 + 3 * 16 * 12
    for option in ("include", "exclude"):
        table.attrs["esdtool"] = {"settings": {option: "proj"}}
        with pytest.raises(OptionError) as caught:
            model_params(table)
        assert str(caught.value) == (
            "--budget-percent needs the model's parameter count, and this table was analysed "
            "with --include/--exclude (some tensors are not in it)"
        )
        assert caught.value.hint == "give --budget-params, or analyse every tensor"
    # a row without a shape (a tensor that could not be read) counts nothing, a row without
    # cols (a vector) its rows
    rows = pd.DataFrame({"rows": pd.array([4, 6, None], dtype="Int64"),
                         "cols": pd.array([8, None, None], dtype="Int64")})  # fmt: skip
    assert model_params(rows) == 4 * 8 + 6
