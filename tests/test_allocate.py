"""allocate: ranks against an independent computation of method.md section 6, PEFT loading
the written config, budget mode, and bad input."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from esdtool.plan.directory import allocate
from esdtool.plan.ranks import AllocateSettings
from helpers import run_cli


def expected_plan(metrics, p=0.5, rmin=4, rmax=64, scaling="linear", select="highest"):
    """Section 6 straight from the text, with plain Python lists (independent of the package)."""
    rows = metrics[(metrics.status == "ok") & (metrics.role == "linear")]
    names, alpha, spikes = list(rows.module), list(rows.alpha_median), list(rows.num_spikes)
    a = [(x - min(alpha)) / (max(alpha) - min(alpha) + 1e-8) for x in alpha]
    s = [1 - (x - min(spikes)) / (max(spikes) - min(spikes) + 1e-8) for x in spikes]
    score = [0.7 * x + 0.3 * y for x, y in zip(a, s, strict=True)]
    k = max(1, math.floor(p * len(names)))
    ranked = sorted(range(len(names)), key=lambda i: score[i], reverse=select == "highest")
    kept = ranked[:k]
    f = {"linear": lambda v: v, "log": math.log1p, "sqrt": math.sqrt}[scaling]
    fs = [f(score[i]) for i in kept]
    plan = {}
    for i, fv in zip(kept, fs, strict=True):
        raw = rmin + (rmax - rmin) * (fv - min(fs)) / (max(fs) - min(fs) + 1e-8)
        plan[names[i]] = int(min(rmax, max(rmin, round(raw))))  # round() is half-to-even
    return plan


@pytest.mark.parametrize(
    ("scaling", "select"), [("linear", "highest"), ("log", "highest"), ("sqrt", "highest"),
                            ("linear", "lowest")]
)  # fmt: skip
def test_minilm_plan_matches_the_spec(minilm_table, minilm_metrics, tmp_path, scaling, select):
    path = minilm_metrics
    settings = AllocateSettings(rank_scaling=scaling, select=select)
    result = allocate(path, tmp_path / "plan", settings, report=False)
    table = result.allocation.table
    assert len(table) == 36 and table.selected.sum() == 18
    expected = expected_plan(minilm_table, scaling=scaling, select=select)
    config = json.loads(result.config.read_text())
    got = {k[1:].replace("\\", ""): v for k, v in config["rank_pattern"].items()}
    assert got == expected
    assert min(got.values()) == 4 and max(got.values()) == 64
    alphas = {k[1:].replace("\\", ""): v for k, v in config["alpha_pattern"].items()}
    assert alphas == {m: 2 * r for m, r in expected.items()}


def test_peft_applies_exactly_the_planned_ranks_to_minilm(minilm_dir, minilm_metrics, tmp_path):
    """get_peft_model on the real model: each kept module gets its r and lora_alpha, no other
    module an adapter, and the trainable count equals allocation.csv's."""
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")

    path = minilm_metrics
    result = allocate(path, tmp_path / "plan", task_type="FEATURE_EXTRACTION", report=False)
    config = peft.LoraConfig.from_pretrained(str(tmp_path / "plan"))
    model = peft.get_peft_model(transformers.AutoModel.from_pretrained(minilm_dir), config)
    adapted = {
        name.removeprefix("base_model.model."): module
        for name, module in model.named_modules()
        if hasattr(module, "lora_A") and "default" in module.lora_A
    }
    plan = pd.read_csv(result.csv)
    kept = plan[plan.selected]
    assert set(adapted) == set(kept.module)
    for row in kept.itertuples():
        module = adapted[row.module]
        assert module.r["default"] == row.rank
        assert module.lora_alpha["default"] == row.lora_alpha
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == plan.params.sum()


def test_match_rank_budget(minilm_metrics, tmp_path):
    path = minilm_metrics
    unscaled = allocate(path, tmp_path / "a", report=False).allocation.kept
    result = allocate(path, tmp_path / "b", AllocateSettings(match_rank=8), report=False)
    result = result.allocation
    uniform = 8 * (result.table.rows + result.table.cols).sum()  # uniform r=8, every candidate
    assert result.total_params == pytest.approx(uniform, rel=0.01)
    kept = result.kept
    # order by score preserved: a higher score never gets a lower rank
    by_score = kept.sort_values("score")["rank"].to_numpy()
    assert (np.diff(by_score) >= 0).all()
    assert list(kept.module) == list(unscaled.module)
    assert not result.notes
    # the plan's size as a uniform rank on all candidates: r * sum(rows + cols) = its cost
    sizes = result.table.rows + result.table.cols
    assert result.equal_cost_rank == pytest.approx((kept["rank"] * (kept.rows + kept.cols)).sum()
                                                   / sizes.sum())  # fmt: skip
    assert result.equal_cost_rank == pytest.approx(8, rel=0.01)


def test_a_budget_the_rank_range_cannot_reach_is_said_not_hidden(minilm_metrics, tmp_path, capsys):
    """Half the candidates at rank <= 64 cannot cost what uniform r=64 on all of them costs."""
    code, _, stderr = run_cli(
        ["allocate", minilm_metrics, "-o", tmp_path / "p", "--match-rank", "64",
         "--task-type", "FEATURE_EXTRACTION", "--no-report"], capsys,
    )  # fmt: skip
    assert code == 0
    plan = pd.read_csv(tmp_path / "p" / "allocation.csv")
    budget = 64 * (plan.rows + plan.cols).sum()
    assert plan.params.sum() < 0.99 * budget and plan[plan.selected]["rank"].eq(64).all()
    text = " ".join(stderr.split())
    assert f"budget {budget:,} missed" in text and "--max-rank" in text
    code, stdout, _ = run_cli(
        ["allocate", minilm_metrics, "-o", tmp_path / "q", "--match-rank", "64",
         "--task-type", "FEATURE_EXTRACTION", "--no-report", "--json"], capsys,
    )  # fmt: skip
    assert any(f"budget {budget:,} missed" in n for n in json.loads(stdout)["notes"])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--top-n-percentile", "0"], "--top-n-percentile"),
        (["--top-n-percentile", "1.5"], "--top-n-percentile"),
        (["--min-rank", "70"], "--min-rank 70 is larger than --max-rank 64"),
        (["--targets", "no_such_module"], "no candidate modules"),
        (["--match-rank", "0"], "--match-rank must be at least 1"),
    ],
)
def test_bad_allocate_input_is_one_line(minilm_metrics, tmp_path, capsys, args, message):
    path = minilm_metrics
    code, _, stderr = run_cli(["allocate", path, "-o", tmp_path / "plan", *args], capsys)
    assert code == 2 and message in stderr and stderr.count("\n") == 1


def test_allocate_refuses_a_parquet_that_is_not_an_esdtool_table(tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"a": [1]}), tmp_path / "x.parquet")
    code, _, stderr = run_cli(["allocate", tmp_path / "x.parquet", "-o", tmp_path / "p"], capsys)
    assert code == 2 and "x.parquet" in stderr and "not an esdtool metrics table" in stderr


def test_verify_passes_for_minilm_and_tiny_llama(minilm_metrics, tiny_llama, tmp_path, capsys):
    pytest.importorskip("peft")
    from esdtool import analyze

    code, stdout, stderr = run_cli(
        ["allocate", minilm_metrics, "-o", tmp_path / "bert", "--verify", "--json", "--no-report"],
        capsys,
    )
    assert code == 0, stderr
    assert json.loads(stdout)["adapted"] == 18
    llama = analyze(tiny_llama, tmp_path / "llama.parquet").output
    code, stdout, stderr = run_cli(
        ["allocate", llama, "-o", tmp_path / "llama", "--verify", "--json"], capsys
    )
    assert code == 0, stderr
    assert json.loads(stdout)["adapted"] == 7  # half of 2 layers x 7 projections


def test_verify_reports_every_mismatch(minilm_metrics, minilm_dir, tmp_path):
    """A tampered plan: one rank edited, one module renamed to one the model lacks."""
    pytest.importorskip("peft")
    from esdtool.plan.verify import verify_plan

    plan = tmp_path / "plan"
    allocate(minilm_metrics, plan, report=False)
    csv = plan / "allocation.csv"

    table = pd.read_csv(csv)
    kept = table.index[table.selected]
    table.loc[kept[0], "rank"] += 1
    table.loc[kept[1], "module"] = "encoder.layer.9.attention.self.query"
    table.to_csv(csv, index=False)
    problems = verify_plan(plan, minilm_dir)
    assert any("planned" in p and str(table.loc[kept[0], "module"]) in p for p in problems)
    assert any(p.startswith("encoder.layer.9.attention.self.query: planned") for p in problems)
    assert any("not in the plan" in p for p in problems)  # the renamed one's real module


def test_two_tensors_of_one_module_are_refused(tmp_path, capsys):
    import numpy as np

    from esdtool import analyze
    from helpers import write_tensors

    rng = np.random.default_rng(0)
    path = write_tensors(
        tmp_path / "dup.safetensors",
        {
            "model.layers.0.mlp.up_proj.weight": rng.standard_normal((32, 48)).astype("f4"),
            "model.layers.0.mlp.up_proj": rng.standard_normal((32, 48)).astype("f4"),
        },
    )
    metrics = analyze(path, tmp_path / "m.parquet").output
    code, _, stderr = run_cli(["allocate", metrics, "-o", tmp_path / "plan"], capsys)
    assert code == 2 and "comes from two tensors" in stderr and stderr.count("\n") == 1
    assert not (tmp_path / "plan" / "adapter_config.json").exists()
