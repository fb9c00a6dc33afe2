"""One spectral pass, every HT-SR plan (issue 27): pruning sparsity (AlphaPruning), per-module
learning rate (TempBalance) and weight decay (AlphaDecay), each checked against a plain numpy
re-implementation of its published code (tests/origin_alphapruning.py,
tests/origin_tempbalance.py) on the reference's own fixture (AlphaPruning's published Llama-2-7B
alpha_peak vector) or MiniLM's real table."""

from __future__ import annotations

import functools
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
    return metrics_frame(rows, {"source": "llama2-7b-stand-in", "source_kind": "memory"})


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
                plan = allocate(llama2_table, settings=settings, report=False).modules
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
                allocate(llama2_table, settings=settings, report=False)
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
    settings = AllocateSettings(target="lr", lr_map=how)
    plan = allocate(minilm_table, target="lr", settings=settings, report=False).modules
    alphas = plan.table.alpha.to_numpy()
    reference = tb.tempbalance_lrs(alphas, 1e-3, f"tb_{how}" if how != "linear" else
                                   "tb_linear_map")  # fmt: skip
    assert np.max(np.abs(plan.table.lr_factor.to_numpy() * 1e-3 - reference)) < 1e-12 * 1e-3
    assert len(plan.table) == 36 and plan.model_order


@pytest.mark.parametrize("how", ["linear", "sqrt", "log2", "sigmoid"])
def test_weight_decay_factors_equal_alphadecay(minilm_table, how):
    """Each AlphaDecay map (0.6666 / 3 by default; sigmoid within each block) on MiniLM's
    alphas, against get_layer_temps to 1e-12, any alpha column (a FARMS one too)."""
    # a FARMS column as analyze --estimator farms fills it (here: other alphas in it)
    farms = minilm_table.assign(alpha_ks_farms=minilm_table.alpha_fix_finger * 1.1)
    farms.attrs = minilm_table.attrs
    for column in ("alpha_median", "alpha_ks", "alpha_ks_farms"):
        settings = AllocateSettings(target="weight-decay", wd_map=how, alpha_column=column)
        plan = allocate(farms, settings=settings, report=False).modules
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
    default = allocate(table, target="lr", report=False).modules
    every = allocate(
        table, settings=AllocateSettings(target="lr", min_evals=2), report=False
    ).modules
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


def test_alphapruning_preset_computes_their_alpha_peak(minilm_dir, tmp_path, capsys):
    """analyze --preset alphapruning: float32 eigenvalues, zeros kept, and alpha_peak equal to
    the numpy re-implementation of net_esd_estimator(fix_fingers="xmin_peak") within float32's
    rounding; allocate --preset alphapruning plans from it, and refuses a table without it."""
    from esdtool import load_metrics

    table_path = tmp_path / "ap.parquet"
    code, _, stderr = run_cli(["analyze", minilm_dir, "-o", table_path, "--preset", "alphapruning",
                               "--include", r"encoder\.layer\.[01]\.", "-q"], capsys)  # fmt: skip
    assert code == 0, stderr
    table = load_metrics(table_path)
    ok = table[table.status == "ok"]
    assert len(ok) == 12 and table.attrs["esdtool"]["settings"]["eig_threshold"] == 0.0
    for row in ok.itertuples():
        evals = np.asarray(row.eigenvalues, dtype=np.float64)
        reference = ap.alpha_peak(evals, "float64")
        assert row.alpha_peak == pytest.approx(reference, rel=2e-5), row.name
        assert row.alpha_peak != row.alpha_fix_finger  # another xmin rule, another number
    out = tmp_path / "plan"
    code, _, stderr = run_cli(["allocate", table_path, "--preset", "alphapruning",
                                    "--sparsity", "0.7", "-o", out, "--json"], capsys)  # fmt: skip
    assert code == 0, stderr
    record = json.loads((out / "esdtool_plan.json").read_text())
    assert record["metric"] == "alpha_peak" and record["allocate_settings"]["mapping"] == "block"
    ratios = pd.read_csv(out / "allocation.csv")
    means = ok.groupby("layer").alpha_peak.mean()
    assert np.allclose(ratios.mapped_alpha, ratios.layer.map(means), rtol=1e-12)
    plain = tmp_path / "plain.parquet"
    run_cli(["analyze", minilm_dir, "-o", plain, "--include", r"encoder\.layer\.0\.", "-q"],
            capsys)  # fmt: skip
    code, _, stderr = run_cli(["allocate", plain, "--preset", "alphapruning", "--sparsity", "0.7",
                               "-o", tmp_path / "no"], capsys)  # fmt: skip
    assert code == 2 and "--preset alphapruning" in stderr


def test_alpha_peak_keeps_their_quirks():
    """Their lower bound is log10(0.95 xmin2) against linear eigenvalues: with a peak above
    1/0.95 it cuts, below it nothing is cut; a zero eigenvalue gives no number (their histc
    refuses log10 0); a spectrum where no candidate fits gives their alpha 0."""
    import torch

    from esdtool.spectral.peak import alpha_peak

    rng = np.random.default_rng(3)
    for scale in (1e-3, 1.0, 50.0):  # peaks below and above the quirk's threshold
        evals = np.sort(rng.pareto(2.5, 400) + 1) * scale
        ours = alpha_peak(torch.tensor(evals, dtype=torch.float32))
        assert ours == pytest.approx(ap.alpha_peak(evals.astype(np.float32).astype(float)),
                                     rel=2e-5)  # fmt: skip
    # a power law from 2 cut at 9, under a narrow cluster at 20 (the histogram's peak): their
    # bound, log10(19) = 1.28, keeps the power law's start among the candidates (alpha 2.36);
    # a bound of 0.95 x 20 would leave only the cluster (alpha 981)
    tail = 2 * (np.random.default_rng(0).pareto(1.0, 1700) + 1)
    cluster = 20 + np.random.default_rng(0).normal(0, 0.05, 120)
    evals = np.sort(np.concatenate([tail[tail < 9], cluster]))
    ours = alpha_peak(torch.tensor(evals, dtype=torch.float32))
    assert ours == pytest.approx(ap.alpha_peak(evals.astype(np.float32).astype(float)), rel=2e-5)
    assert ours < 3
    assert np.isnan(alpha_peak(torch.tensor([0.0, 1.0, 2.0, 3.0])))
    flat = torch.full((20,), 2.0)  # every alpha is 1 + n / 0 = inf: theirs is inf, no number
    assert np.isinf(ap.alpha_peak(np.full(20, 2.0))) and np.isnan(alpha_peak(flat))


def test_param_groups_give_each_module_its_factors(tiny_causal_lm, plan, tmp_path):
    """param_groups on the PEFT model: every LoRA parameter's group has lr x its module's lr
    factor and weight decay x its weight-decay factor (the module read off the parameter's
    name here), the rest the base values; torch's AdamW takes the groups as they are."""
    import peft
    import torch
    import transformers

    from esdtool import load_metrics, param_groups
    from esdtool.plan.verify import read_plan

    table = load_metrics(plan.parent / "m.parquet")
    lr_settings = AllocateSettings(target="lr", min_evals=2)
    wd_settings = AllocateSettings(target="weight-decay", wd_map="sqrt")
    lr_plan = allocate(table, tmp_path / "lr", settings=lr_settings, report=False)
    wd_plan = allocate(table, tmp_path / "wd", settings=wd_settings, report=False)
    base = transformers.AutoModelForCausalLM.from_pretrained(tiny_causal_lm)
    model = peft.get_peft_model(base, peft.LoraConfig(**{
        k: v for k, v in read_plan(plan)[0].items() if k not in ("peft_type",)}))  # fmt: skip
    groups = param_groups(model, [tmp_path / "lr", wd_plan], lr=1e-3, weight_decay=0.1)
    optimizer = torch.optim.AdamW(groups)
    lr_f, wd_f = lr_plan.modules.values, wd_plan.modules.values
    where = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    checked = 0
    for name, param in model.named_parameters():
        if not param.requires_grad:
            assert id(param) not in where
            continue
        module = name.removeprefix("base_model.model.").split(".lora_")[0]
        group = where[id(param)]
        assert group["lr"] == pytest.approx(1e-3 * lr_f.get(module, 1.0), rel=1e-15)
        assert group["weight_decay"] == pytest.approx(0.1 * wd_f.get(module, 1.0), rel=1e-15)
        checked += module in lr_f
    assert checked > 0
    with pytest.raises(OptionError, match="two lr plans"):
        param_groups(model, [lr_plan, tmp_path / "lr"], lr=1e-3)
    other = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(OptionError, match="no planned module holds a trainable parameter"):
        param_groups(other, lr_plan, lr=1e-3)


def test_finetune_trains_with_the_plans_groups_and_refuses_to_resume_under_others(
    tiny_causal_lm, plan, tmp_path, capsys
):
    """finetune --lr-plan --wd-plan: the optimizer the Trainer steps has each module's
    groups (read in a callback), esdtool_run.json records them, every checkpoint records the
    factors; resuming with another lr plan, or none, is one line, exit 2."""
    from transformers import TrainerCallback

    from esdtool import finetune, load_metrics
    from esdtool.training import FinetuneSettings
    from helpers import write_jsonl

    table = load_metrics(plan.parent / "m.parquet")
    allocate(
        table, tmp_path / "lr", settings=AllocateSettings(target="lr", min_evals=2), report=False
    )
    step = AllocateSettings(target="lr", lr_map="step", min_evals=2)
    allocate(table, tmp_path / "lr-step", settings=step, report=False)
    allocate(
        table,
        tmp_path / "wd",
        settings=AllocateSettings(target="weight-decay", min_evals=2),
        report=False,
    )
    factors = json.loads((tmp_path / "lr" / "lr_factors.json").read_text())
    decays = json.loads((tmp_path / "wd" / "weight_decay_factors.json").read_text())
    seen: dict[str, tuple[float, float]] = {}

    class Grab(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
            where = {id(p): g for g in optimizer.param_groups for p in g["params"]}
            for name, param in model.named_parameters():
                if param.requires_grad:
                    module = name.removeprefix("base_model.model.").split(".lora_")[0]
                    seen[module] = (where[id(param)]["lr"], where[id(param)]["weight_decay"])

    records = [{"prompt": f"q{i} ", "completion": f"a{i}"} for i in range(8)]
    data = write_jsonl(tmp_path / "d.jsonl", records)
    out = tmp_path / "run"
    settings = FinetuneSettings(max_steps=4, save_steps=2, lr=5e-3, weight_decay=0.01,
                                batch_size=4, logging_steps=1)  # fmt: skip
    finetune(tiny_causal_lm, plan, data, out, settings, progress=False, callbacks=[Grab()],
             lr_plan=tmp_path / "lr", wd_plan=tmp_path / "wd", adapter_report=False)  # fmt: skip
    adapted = {m for m in seen if m in factors}
    assert adapted
    for module in adapted:
        assert seen[module][0] == pytest.approx(5e-3 * factors[module], rel=1e-12)
        assert seen[module][1] == pytest.approx(0.01 * decays.get(module, 1.0), rel=1e-12)
    record = json.loads((out / "esdtool_run.json").read_text())
    recorded = {g["module"]: g["lr"] for g in record["param_groups"] if g["module"]}
    assert recorded == {m: pytest.approx(5e-3 * factors[m], rel=1e-12) for m in recorded}
    saved = json.loads((out / "checkpoint-2" / "esdtool_factors.json").read_text())
    assert saved == {"lr": factors, "weight-decay": decays}
    common = ["finetune", tiny_causal_lm, "--adapter-config", plan, "--data", data, "-o", out,
              "--max-steps", "6", "--resume-from-checkpoint", "last", "--wd-plan",
              tmp_path / "wd"]  # fmt: skip
    for lr_args in (["--lr-plan", tmp_path / "lr-step"], []):
        code, _, stderr = run_cli([*common, *lr_args], capsys)
        assert code == 2 and "other lr factors" in stderr, stderr
        assert len(stderr.strip().splitlines()) == 1
    # a checkpoint without its factors record (killed between the two writes): the optimizer's
    # own groups still refuse a resume without the plans, in one line
    for record in out.glob("checkpoint-*/esdtool_factors.json"):
        record.unlink()
    code, _, stderr = run_cli(common[:-2], capsys)
    assert code == 2 and "other parameter groups" in stderr, stderr


def _synthetic(modules: dict[str, float], shape=(64, 64)) -> pd.DataFrame:
    rows = [MatrixRow(name=f"{m}.weight", module=m, role="linear", layer=None, shard="x",
                      dtype="F32", rows=shape[0], cols=shape[1], status="ok", alpha_peak=a)
            for m, a in modules.items()]  # fmt: skip
    table = metrics_frame(rows, {"source": "synthetic", "source_kind": "memory"})
    table["alpha_median"] = table["alpha_peak"].where(table["alpha_peak"] > 1)  # a fit is > 1
    from esdtool.analysis.roles import block_index

    table["layer"] = [block_index(n) for n in table.name]
    return table


def test_blocks_of_two_stacks_stay_apart():
    """An encoder's layer 0 and a decoder's layer 0 are two blocks: block mapping and the
    sigmoid map average and z-score within each, not across the stacks; a module outside the
    blocks keeps factor 1 under sigmoid (its own group)."""
    table = _synthetic({"model.encoder.layers.0.q": 2.0, "model.encoder.layers.0.k": 3.0,
                        "model.decoder.layers.0.q": 6.0, "model.decoder.layers.0.k": 8.0,
                        "lm_head": 4.0})  # fmt: skip
    settings = AllocateSettings(target="pruning", sparsity=0.5, alpha_column="alpha_peak",
                                targets=r"layers|lm_head")  # fmt: skip
    plan = allocate(table, settings=settings, report=False).modules.table.set_index("module")
    assert plan.mapped_alpha.to_dict() == {
        "model.encoder.layers.0.q": 2.5, "model.encoder.layers.0.k": 2.5,
        "model.decoder.layers.0.q": 7.0, "model.decoder.layers.0.k": 7.0, "lm_head": 4.0,
    }  # fmt: skip
    wd = AllocateSettings(target="weight-decay", wd_map="sigmoid", targets=r"layers|lm_head",
                          min_evals=2)  # fmt: skip
    factors = allocate(table, settings=wd, report=False).modules.values
    reference = tb.alphadecay_wds(np.array([2.0, 3.0]), 1.0, "layerwise_sigmoid",
                                  blocks=np.array([0, 0]))  # fmt: skip
    assert factors["model.encoder.layers.0.q"] == pytest.approx(reference[0], rel=1e-12)
    decoder = tb.alphadecay_wds(np.array([6.0, 8.0]), 1.0, "layerwise_sigmoid",
                                blocks=np.array([0, 0]))  # fmt: skip
    assert factors["model.decoder.layers.0.q"] == pytest.approx(decoder[0], rel=1e-12)
    assert factors["lm_head"] == 1.0


def test_a_factor_of_zero_is_refused_and_hostile_factor_files_are_one_line(tmp_path):
    """alpha_peak's 0 ("no fit") under the sqrt map would give an lr of 0: refused. Factor
    files that are deeply nested, hold a 400-digit integer or are not regular files are one
    OptionError each, never a RecursionError, OverflowError or a hang."""
    import os

    from esdtool import param_groups
    from esdtool.plan.module_plan import load_factors

    table = _synthetic({"model.layers.0.q": 0.0, "model.layers.0.k": 3.0})
    with pytest.raises(OptionError, match="factor of 0"):
        sqrt = AllocateSettings(target="lr", lr_map="sqrt", min_evals=2, alpha_column="alpha_peak")
        allocate(table, settings=sqrt, report=False)
    good = _synthetic({"model.layers.0.q": 2.0, "model.layers.0.k": 3.0})
    allocate(good, tmp_path / "lr", settings=AllocateSettings(target="lr", min_evals=2),
             report=False)  # fmt: skip
    factors = tmp_path / "lr" / "lr_factors.json"
    for content in ("[" * 100_000, '{"model.layers.0.q": 1' + "0" * 400 + "}", '{"\u0000": 1}'):
        factors.write_text(content)
        with pytest.raises(OptionError, match=r"lr_factors\.json"):
            load_factors(tmp_path / "lr", "lr")
        with pytest.raises(OptionError):
            param_groups(torch_model(), tmp_path / "lr", lr=1e-3)
    factors.unlink()
    os.mkfifo(factors)
    with pytest.raises(OptionError, match="not a regular file"):
        load_factors(tmp_path / "lr", "lr")


def torch_model():
    import torch

    model = torch.nn.Module()
    model.model = torch.nn.Module()
    model.model.layers = torch.nn.ModuleList([torch.nn.Module()])
    model.model.layers[0].q = torch.nn.Linear(4, 4)
    return model


def test_lists_only_where_the_plan_covers_every_block_linear(tiny_causal_lm, plan, tmp_path,
                                                             capsys):  # fmt: skip
    """AlphaPruning's list and llm-compressor's recipe give values by position over every
    Linear of the blocks: a plan of some of them (--targets) writes neither and says why;
    all of them writes both. A LoRA plan may replace a pruning plan's directory."""
    table = plan.parent / "m.parquet"
    some, every = tmp_path / "some", tmp_path / "every"
    code, _, stderr = run_cli(["allocate", table, "--target", "pruning", "--sparsity", "0.5",
                               "--targets", "q_proj|v_proj", "-o", some], capsys)  # fmt: skip
    assert code == 0 and "no sparsity_list.json / recipe.yaml" in stderr
    assert not (some / "sparsity_list.json").exists() and not (some / "recipe.yaml").exists()
    code, _, stderr = run_cli(["allocate", table, "--target", "pruning", "--sparsity", "0.5",
                               "-o", every, "-q"], capsys)  # fmt: skip
    assert code == 0 and (every / "sparsity_list.json").is_file(), stderr
    code, _, stderr = run_cli(["allocate", table, "-o", every, "-q"], capsys)
    assert code == 0 and (every / "adapter_config.json").is_file(), stderr


def test_a_hub_tables_order_comes_from_the_cache_never_the_network(tmp_path, monkeypatch):
    """A table of a hub model whose config.json is not in the HF cache: rows in the table's
    order, said in a note, and nothing fetched (HF_HUB_OFFLINE would refuse a fetch)."""
    import huggingface_hub

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    calls = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: calls.append(a))
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda *a, **k: calls.append(a))
    table = _synthetic({"model.layers.0.q": 2.0, "model.layers.0.k": 3.0})
    table.attrs["esdtool"] = {"source": "acme/model", "source_kind": "hub", "revision": "a" * 40}
    plan = allocate(table, settings=AllocateSettings(target="lr", min_evals=2), report=False)
    assert not plan.modules.model_order and calls == []
    assert any("not in the HF cache" in n for n in plan.modules.notes)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--target", "lr", "--lr-map", "sqrt", "--min-factor", "0.1"], "the sqrt map has none"),
        (
            ["--target", "lr", "--lr-map", "step", "--normalise-within", "shape"],
            "--normalise-within shape applies to the linear map",
        ),
        (
            ["--preset", "alphapruning", "--target", "lora", "--sparsity", "0.5"],
            "--preset alphapruning plans --target pruning, not lora",
        ),
        (["--preset", "alphapruning", "--target", "lr"], "plans --target pruning, not lr"),
    ],
)
def test_options_a_map_or_preset_does_not_take_are_refused(tmp_path, capsys, args, message):
    code, _, stderr = run_cli(["allocate", tmp_path / "absent.parquet", *args,
                               "-o", tmp_path / "out"], capsys)  # fmt: skip
    assert code == 2 and message in stderr, stderr


def test_a_wd_plan_without_weight_decay_is_refused(tiny_causal_lm, plan, tmp_path, capsys):
    from esdtool import load_metrics
    from helpers import write_jsonl

    table = load_metrics(plan.parent / "m.parquet")
    allocate(table, tmp_path / "wd", settings=AllocateSettings(target="weight-decay"),
             report=False)  # fmt: skip
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a ", "completion": "b"}])
    code, _, stderr = run_cli(["finetune", tiny_causal_lm, "--adapter-config", plan, "--data",
                               data, "-o", tmp_path / "run", "--wd-plan", tmp_path / "wd",
                               "--dry-run"], capsys)  # fmt: skip
    assert code == 2 and "--wd-plan scales --weight-decay, which is 0" in stderr


def test_a_flat_spectrum_leaves_a_table_every_reader_takes(tmp_path, capsys):
    """An identity weight's spectrum is flat: their alpha is inf; the preset stores no
    alpha_peak (null), so the table still loads and plans (the module is left out, noted)."""
    import torch
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(0)
    save_file({"model.layers.0.self_attn.q_proj.weight": torch.eye(64),
               "model.layers.0.self_attn.k_proj.weight": torch.randn(64, 64, generator=generator),
               "model.layers.0.self_attn.v_proj.weight": torch.randn(64, 64, generator=generator)},
              str(tmp_path / "model.safetensors"))  # fmt: skip
    table = tmp_path / "t.parquet"
    code, _, stderr = run_cli(["analyze", tmp_path / "model.safetensors", "-o", table,
                               "--preset", "alphapruning", "-q"], capsys)  # fmt: skip
    assert code == 0, stderr
    args = ["--sparsity", "0.5", "--mapping", "module", "-o", tmp_path / "p"]
    code, _, stderr = run_cli(["allocate", table, "--preset", "alphapruning", *args], capsys)
    assert code == 0, stderr
    assert "q_proj: no alpha_peak" in stderr


def test_pruning_normalised_within_shape_and_its_epsilon_bound(llama2_table):
    """--normalise-within shape: alpha min-max within each shape (Llama-2's 4096 x 4096 and
    4096 x 11008 modules apart), then one scale to the target, equal to a plain numpy
    computation to 1e-12; the largest epsilon the refusal names is exact for these groups
    (a hair below it fits, a hair above it does not)."""
    values = np.array(json.loads(REFERENCE.read_text())["values"])
    numel = _numels()
    shapes = np.array([min(o, i) * 100000 + max(o, i) for _, o, i in LLAMA_BLOCK] * 32)

    def reference(epsilon: float, sparsity: float) -> np.ndarray:
        u = np.empty_like(values)
        for shape in np.unique(shapes):
            part = values[shapes == shape]
            u[shapes == shape] = (part - part.min()) / (part.max() - part.min())
        r = (1 - epsilon) + 2 * epsilon * u
        return r * (numel.sum() * sparsity / (numel * r).sum())

    common = {"target": "pruning", "alpha_column": "alpha_peak", "mapping": "module",
              "normalise_within": "shape"}  # fmt: skip
    settings = AllocateSettings(sparsity=0.5, epsilon=0.3, **common)
    ours = allocate(llama2_table, settings=settings, report=False).modules.table.sparsity
    assert np.max(np.abs(ours.to_numpy() - reference(0.3, 0.5))) < 1e-12
    refused = AllocateSettings(sparsity=0.8, epsilon=0.5, **common)
    with pytest.raises(OptionError) as caught:
        allocate(llama2_table, settings=refused, report=False)
    limit = float(str(caught.value).split("just below ")[1].split(" ")[0])
    assert reference(limit * (1 - 1e-5), 0.8).max() < 1 <= reference(limit * (1 + 1e-5), 0.8).max()


def _largest_ratio(alpha, numel, sparsity, epsilon, within=None) -> float:
    from esdtool.plan.layerwise import pruning_ratios

    return float(pruning_ratios(alpha, numel, sparsity, epsilon, within).max())


def test_largest_epsilon_is_where_the_largest_ratio_reaches_one_by_bisection():
    """The closed form against a plain bisection on the ratios themselves, on 300 random small
    plans (1 to 5000 elements a module, sparsities 0.05 to 0.95, ties, groups that are all
    ties, so the offset of the largest ratio is 0): the largest ratio stays below 1 a hair
    under the bound and reaches it a hair over, and where no epsilon up to 1 reaches it the
    answer is 1, never more."""
    rng = np.random.default_rng(7)
    capped = tied = 0
    for trial in range(300):
        n = int(rng.integers(2, 7))
        numel = rng.integers(1, 5000, n).astype(float)
        alpha = np.round(rng.uniform(2, 6, n), 1 if trial % 3 else 3)
        within = None
        if trial % 5 == 0:  # every module its own group: all ties, u = 0.5
            within, tied = np.arange(n), tied + 1
        elif np.ptp(alpha) == 0:
            continue
        sparsity = float(rng.uniform(0.05, 0.95))
        bound = largest_epsilon(alpha, numel, sparsity, within)
        top = functools.partial(_largest_ratio, alpha, numel, sparsity, within=within)
        assert 0 < bound <= 1, (trial, bound)
        if bound == 1:
            capped += 1
            assert top(1 - 1e-9) < 1, trial
            continue
        lo, hi = 0.0, 1.0  # bisection on the ratios: the epsilon where the largest reaches 1
        for _ in range(80):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if top(mid) < 1 else (lo, mid)
        assert abs(bound - lo) < 1e-9 * max(1.0, bound), (trial, bound, lo)
    assert capped >= 20 and tied >= 20  # both kinds of answer 1 were met
