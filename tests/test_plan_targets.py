"""One spectral pass, every HT-SR plan (issue 27): pruning sparsity (AlphaPruning), per-module
learning rate (TempBalance) and weight decay (AlphaDecay), each checked against a plain numpy
re-implementation of its published code (tests/origin_alphapruning.py,
tests/origin_tempbalance.py) on the reference's own fixture (AlphaPruning's published Llama-2-7B
alpha_peak vector) or MiniLM's real table."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import origin_alphapruning as ap
import origin_tempbalance as tb
import pandas as pd
import pytest

from esdtool.errors import OptionError
from esdtool.io.table import MatrixRow, metrics_frame
from esdtool.plan.directory import allocate
from esdtool.plan.layerwise import largest_epsilon
from esdtool.plan.ranks import AllocateSettings
from helpers import run_cli

REFERENCE = Path(__file__).parent / "reference" / "llama2-7b-hf.alpha_peak.json"
# Llama-2-7B's Linear modules of one block, in named_modules order, with (out, in) features.
LLAMA_BLOCK = (("self_attn.q_proj", 4096, 4096), ("self_attn.k_proj", 4096, 4096),
               ("self_attn.v_proj", 4096, 4096), ("self_attn.o_proj", 4096, 4096),
               ("mlp.gate_proj", 11008, 4096), ("mlp.up_proj", 11008, 4096),
               ("mlp.down_proj", 4096, 11008))  # fmt: skip


@pytest.fixture(scope="module")
def llama2_table() -> pd.DataFrame:
    """A metrics table holding AlphaPruning's published alpha_peak of Llama-2-7B's 224
    block Linears, in model order, with their true shapes."""
    values = json.loads(REFERENCE.read_text())["values"]
    assert len(values) == 224
    rows = []
    for k, alpha in enumerate(values):
        layer, (kind, out, inp) = divmod(k, 7)[0], LLAMA_BLOCK[k % 7]
        module = f"model.layers.{layer}.{kind}"
        rows.append(MatrixRow(name=f"{module}.weight", module=module, role="linear",
                              layer=layer, shard="model.safetensors", dtype="F16", rows=out,
                              cols=inp, status="ok", alpha_peak=alpha))  # fmt: skip
    return metrics_frame(rows, {"source": "llama2-7b-stand-in"})


def _numels() -> np.ndarray:
    return np.array([out * inp for _, out, inp in LLAMA_BLOCK] * 32, dtype=float)


@pytest.mark.parametrize("mapping", ["block", "module"])
def test_pruning_ratios_equal_ww_sparsity_on_the_published_llama2_vector(llama2_table, mapping):
    """Every S in {0.5, 0.7, 0.8} and epsilon in {0.2, 0.3, 0.5}: ratios equal ww_sparsity's to
    1e-12 where they stay in [0, 1); the others are refused naming the modules and the largest
    epsilon that fits (which does fit, and a hair above it does not)."""
    values = np.array(json.loads(REFERENCE.read_text())["values"])
    refused = 0
    for sparsity in (0.5, 0.7, 0.8):
        for epsilon in (0.2, 0.3, 0.5):
            reference = ap.ww_sparsity(values, _numels(), sparsity, epsilon,
                                       7 if mapping == "block" else None)  # fmt: skip
            settings = AllocateSettings(
                target="pruning",
                alpha_column="alpha_peak",
                sparsity=sparsity,
                epsilon=epsilon,
                mapping=mapping,
            )
            if reference.max() < 1:
                plan = allocate(llama2_table, settings=settings).modules
                ours = plan.table.sparsity.to_numpy()
                assert np.max(np.abs(ours - reference)) < 1e-12
                assert plan.mean_sparsity == pytest.approx(sparsity, abs=1e-14)
                # their float32 numerator: one common factor, within 7e-8 of ours
                faithful = ap.ww_sparsity(values, _numels(), sparsity, epsilon,
                                          7 if mapping == "block" else None, True)  # fmt: skip
                assert np.ptp(ours / faithful) < 1e-15 and abs(ours[0] / faithful[0] - 1) < 7e-8
                continue
            refused += 1
            with pytest.raises(OptionError) as caught:
                allocate(llama2_table, settings=settings)
            message = str(caught.value)
            over = [f"model.layers.{k // 7}.{LLAMA_BLOCK[k % 7][0]}" for k in
                    np.flatnonzero(reference >= 1)]  # fmt: skip
            assert f"{len(over)} module(s)" in message and repr(over[0]) in message
            mapped = values if mapping == "module" else np.repeat(values.reshape(32, 7).mean(1), 7)
            limit = largest_epsilon(mapped, _numels(), sparsity)
            assert f"{limit:.6g}" in message
            below = ap.ww_sparsity(values, _numels(), sparsity, limit * (1 - 1e-9),
                                   7 if mapping == "block" else None)  # fmt: skip
            above = ap.ww_sparsity(values, _numels(), sparsity, limit * (1 + 1e-9),
                                   7 if mapping == "block" else None)  # fmt: skip
            assert below.max() < 1 <= above.max()
    assert refused >= 1  # S 0.8 with epsilon 0.5 puts some above 1


@pytest.mark.parametrize("how", ["linear", "sqrt", "log2", "step"])
def test_lr_factors_equal_tempbalance(minilm_table, how):
    """Each TempBalance map on MiniLM's alphas: the factors times a base lr equal
    get_layer_temps' learning rates to 1e-12 (their step map with a stable order)."""
    plan = allocate(minilm_table, target="lr",
                    settings=AllocateSettings(target="lr", lr_map=how)).modules  # fmt: skip
    alphas = plan.table.alpha.to_numpy()
    reference = tb.tempbalance_lrs(alphas, 1e-3, f"tb_{how}" if how != "linear" else
                                   "tb_linear_map")  # fmt: skip
    assert np.max(np.abs(plan.table.lr_factor.to_numpy() * 1e-3 - reference)) < 1e-12 * 1e-3
    assert len(plan.table) == 36 and plan.model_order


@pytest.mark.parametrize("how", ["linear", "sqrt", "log2", "sigmoid"])
def test_weight_decay_factors_equal_alphadecay(minilm_table, how):
    """Each AlphaDecay map (0.6666 / 3 by default; sigmoid within each block) on MiniLM's
    alphas, against get_layer_temps to 1e-12, any alpha column (a FARMS one too)."""
    for column in ("alpha_median", "alpha_ks"):
        settings = AllocateSettings(target="weight-decay", wd_map=how, alpha_column=column)
        plan = allocate(minilm_table, settings=settings).modules
        alphas = plan.table.alpha.to_numpy()
        name = {"linear": "tb_linear_map", "sigmoid": "layerwise_sigmoid"}.get(how, f"tb_{how}")
        reference = tb.alphadecay_wds(alphas, 0.1, name, blocks=plan.table.layer.to_numpy())
        assert np.max(np.abs(plan.table.weight_decay_factor.to_numpy() * 0.1 - reference)) < 1e-13


def test_min_evals_leaves_small_modules_at_the_base_value(tiny_causal_lm, plan):
    """TempBalance and AlphaDecay leave modules with fewer than 50 eigenvalues out: the tiny
    LM's 32-row k/v projections get no factor, and the note says so; --min-evals 2 takes
    them."""
    from esdtool import load_metrics

    table = load_metrics(plan.parent / "m.parquet")
    default = allocate(table, target="lr").modules
    every = allocate(table, settings=AllocateSettings(target="lr", min_evals=2)).modules
    small = set(every.table.module[np.minimum(every.table.rows, every.table.cols) < 50])
    assert small and not small & set(default.table.module)
    assert any("fewer than 50 eigenvalues" in n for n in default.notes)


def test_plan_directories_and_their_files(minilm_metrics, minilm_dir, tmp_path, capsys):
    """The CLI writes each target's directory: the record (target, metric, settings, the
    table's sha256), sparsity.json and the list in the model's named_modules order (read here
    off BertModel built from config.json), an llm-compressor recipe with one ratio per layer,
    factors files, and a report drawing the plan with its alpha."""
    import hashlib

    import transformers
    import yaml

    out = tmp_path / "prune"
    code, stdout, stderr = run_cli(["allocate", minilm_metrics, "--target", "pruning",
                                    "--sparsity", "0.6", "-o", out, "--json"], capsys)  # fmt: skip
    assert code == 0, stderr
    summary = json.loads(stdout)
    assert summary["sparsity_weighted_mean"] == pytest.approx(0.6, abs=1e-14)
    record = json.loads((out / "esdtool_plan.json").read_text())
    digest = hashlib.sha256(Path(minilm_metrics).read_bytes()).hexdigest()
    assert record["target"] == "pruning" and record["metric"] == "alpha_median"
    assert record["table_fingerprint"] == f"sha256:{digest}"
    assert record["allocate_settings"]["sparsity"] == 0.6 and record["model_order"]
    ratios = json.loads((out / "sparsity.json").read_text())
    config = transformers.AutoConfig.from_pretrained(minilm_dir)
    with __import__("torch").device("meta"):
        model = transformers.AutoModel.from_config(config)
    order = [n for n, m in model.named_modules() if type(m).__name__ == "Linear"
             and ".layer." in n]  # fmt: skip
    assert list(ratios) == order
    assert json.loads((out / "sparsity_list.json").read_text()) == list(ratios.values())
    recipe = yaml.safe_load((out / "recipe.yaml").read_text())
    modifier = recipe["oneshot_stage"]["pruning_modifiers"]["SparseGPTModifier"]
    per_layer = [ratios[f"encoder.layer.{i}.attention.self.query"] for i in range(6)]
    assert modifier["sparsity"] == per_layer
    assert modifier["targets"] == [r"re:^encoder\.layer\.[0-9]+$"]
    html = (out / "report.html").read_text()
    assert 'id="plan"' in html and "Pruning plan" in html
    assert f"{ratios[order[0]]:.6g}" in html

    for target, name, column in (("lr", "lr_factors.json", "lr_factor"),
                                 ("weight-decay", "weight_decay_factors.json",
                                  "weight_decay_factor")):  # fmt: skip
        where = tmp_path / target
        code, _, stderr = run_cli(["allocate", minilm_metrics, "--target", target, "-o", where,
                                   "-q"], capsys)  # fmt: skip
        assert code == 0 and stderr == "", stderr
        factors = json.loads((where / name).read_text())
        csv = pd.read_csv(where / "allocation.csv")
        assert list(factors) == list(csv.module)
        assert np.allclose(list(factors.values()), csv[column], rtol=1e-15)


def test_llm_compressor_loads_the_recipe(minilm_metrics, tmp_path):
    """llm-compressor's own loader reads the recipe: a SparseGPTModifier with the plan's list
    (llm-compressor pins its own transformers, so it lives outside the test extras)."""
    pytest.importorskip("llmcompressor")
    from llmcompressor.recipe import Recipe

    result = allocate(minilm_metrics, tmp_path / "p", target="pruning",
                      settings=AllocateSettings(target="pruning", sparsity=0.5))  # fmt: skip
    recipe = Recipe.create_instance(str(tmp_path / "p" / "recipe.yaml"))
    (modifier,) = recipe.modifiers
    assert type(modifier).__name__ == "SparseGPTModifier"
    assert len(modifier.sparsity) == 6 and modifier.sparsity[0] == pytest.approx(
        result.modules.table.sparsity.iloc[0]
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--target", "pruning", "--sparsity", "0.5", "--epsilon", "0"], "--epsilon must lie"),
        (["--target", "pruning", "--sparsity", "0.5", "--epsilon", "1"], "--epsilon must lie"),
        (["--target", "pruning", "--sparsity", "1"], "--sparsity must lie in (0, 1)"),
        (["--target", "pruning", "--sparsity", "0"], "--sparsity must lie in (0, 1)"),
        (["--target", "pruning"], "needs --sparsity"),
        (["--target", "lr", "--lr-map", "sigmoid"], "--lr-map must be one of"),
        (["--target", "weight-decay", "--wd-map", "step"], "--wd-map must be one of"),
        (["--target", "lr", "--wd-map", "linear"], "--wd-map applies to --target weight-decay"),
        (["--target", "pruning", "--sparsity", "0.5", "--max-rank", "8"], "--max-rank applies"),
        (["--target", "lr", "--min-factor", "2", "--max-factor", "1"], "is above --max-factor"),
        (["--target", "prune"], "--target must be one of"),
        (["--target", "lr", "--verify"], "--verify applies to --target lora"),
    ],
)
def test_bad_target_options_are_one_line_before_any_work(tmp_path, capsys, args, message):
    """Checked before the table is read: the table path does not even exist."""
    code, _, stderr = run_cli(["allocate", tmp_path / "absent.parquet", *args,
                                    "-o", tmp_path / "out"], capsys)  # fmt: skip
    assert code == 2 and message in stderr and "Traceback" not in stderr
    assert len(stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()
