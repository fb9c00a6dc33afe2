"""esdtool ablate (issue 25): arms at one budget counted by PEFT on the real model, the controls'
relations, the statistics against scipy's, and the grid on the tiny causal LM: identical arms
not distinguishable, a planted difference detected, a NaN run failed with its reason, a kill
resumed and shards summarised to the unsharded answer."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from helpers import ARITHMETIC, ROOT, run_cli, write_jsonl

pytest.importorskip("trl", reason="pip install 'esdtool[finetune]'")
scipy_stats = pytest.importorskip("scipy.stats")

HELD_OUT = [{"prompt": f"Q: what is {a} plus 7? A:", "completion": f" {a + 7}."} for a in range(4)]
FAST = ["--max-steps", "4", "--batch-size", "4", "--lrs", "5e-3"]


@pytest.fixture(scope="module")
def metrics(plan) -> Path:
    return plan.parent / "m.parquet"  # the tiny causal LM's table (conftest's plan fixture)


@pytest.fixture(scope="module")
def farms_metrics(tiny_causal_lm, tmp_path_factory) -> Path:
    """The tiny causal LM's table with FARMS columns too (windows that fit its 32- and 64-wide
    matrices), so the esd-farms arm can be built beside the others."""
    from esdtool import AnalyzeSettings, analyze

    out = tmp_path_factory.mktemp("farms") / "m.parquet"
    settings = AnalyzeSettings(estimator="farms", farms_rows=32, farms_q=1.0, farms_grid=3)
    return analyze(tiny_causal_lm, out, settings).output


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, Path]:
    where = tmp_path_factory.mktemp("ablate-data")
    return (write_jsonl(where / "train.jsonl", ARITHMETIC),
            write_jsonl(where / "eval.jsonl", HELD_OUT))  # fmt: skip


def _trainable(model_dir: Path, config: dict) -> int:
    """Parameters that require a gradient once PEFT applies ``config`` to the real model (the
    module's own count, not PEFT's get_nb_trainable_parameters)."""
    import peft
    import transformers

    base = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    fields = {k: v for k, v in config.items() if k not in ("peft_type", "base_model_name_or_path")}
    model = peft.get_peft_model(base, peft.LoraConfig(**fields))
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_every_arm_is_within_one_percent_of_the_budget(tiny_causal_lm, farms_metrics):
    """Each built-in arm's trainable parameters, counted on the real model with PEFT applied,
    lie within 1% of uniform rank 8 on every candidate, and within 1% at --budget-rank 4 and a
    --budget-params budget too."""
    from esdtool import load_metrics
    from esdtool.ablation.arms import ARMS, budget_of, build_arms
    from esdtool.plan.peft_config import lora_config_dict
    from esdtool.plan.ranks import AllocateSettings, candidates

    table = load_metrics(farms_metrics)
    settings = AllocateSettings()
    cands, _ = candidates(table, settings)
    sizes = int((cands.rows + cands.cols).sum())
    for budget in (budget_of(cands, None, None), budget_of(cands, 4, None), 12_345):
        assert budget_of(cands, None, None) == 8 * sizes
        for arm in build_arms(table, list(ARMS), settings, budget, seed=0):
            count = _trainable(tiny_causal_lm, lora_config_dict(arm.allocation))
            assert count == arm.params, arm.name
            assert abs(count / budget - 1) <= 0.01, (arm.name, count, budget)


def test_an_arm_more_than_one_percent_off_is_refused_with_its_numbers():
    """check_budget: 0.9% off passes, 1.1% off is one line naming the arm and its count."""
    from esdtool.ablation.arms import Arm, check_budget

    assert check_budget(Arm("a", None, "", 10_090, peft_params=10_090), 10_000) is None
    why = check_budget(Arm("b", None, "", 0, peft_params=9_890), 10_000)
    assert why is not None and why.startswith("arm b: 9,890 trainable parameters, -1.1% off")


def test_the_controls_keep_what_they_control_for(farms_metrics):
    """shuffled: esd's modules and the same multiset of ranks, the cost unchanged; placement:
    esd's modules at one rank (r or r + 1); complement: every candidate esd leaves out and
    none it keeps; random: as many modules as esd; shuffled and random the same for one
    --arm-seed and different for another."""
    from esdtool import load_metrics
    from esdtool.ablation.arms import ARMS, build_arms
    from esdtool.plan.ranks import AllocateSettings

    table = load_metrics(farms_metrics)
    settings = AllocateSettings()

    def arms(seed):
        return {a.name: a for a in build_arms(table, list(ARMS), settings, 17_920, seed)}

    one, again, other = arms(0), arms(0), arms(5)
    esd = one["esd"].ranks
    assert set(one["shuffled"].ranks) == set(esd)
    assert Counter(one["shuffled"].ranks.values()) == Counter(esd.values())
    assert one["shuffled"].params == one["esd"].params
    assert set(one["placement"].ranks) == set(esd)
    assert max(one["placement"].ranks.values()) - min(one["placement"].ranks.values()) <= 1
    candidates = set(one["uniform"].ranks)
    assert set(one["complement"].ranks) == candidates - set(esd)
    assert len(one["random"].ranks) == len(esd)
    for name in ("shuffled", "random"):
        assert one[name].ranks == again[name].ranks
    assert one["random"].ranks != other["random"].ranks
    assert one["shuffled"].ranks != other["shuffled"].ranks or len(set(esd.values())) == 1


def test_intervals_equal_scipys_and_seeds_needed_is_the_smallest(tmp_path):
    """The t interval equals scipy.stats.t.interval on the same values; seeds_needed is the
    smallest n whose interval, at this spread, excludes 0."""
    from esdtool.ablation.stats import seeds_needed, t_interval, verdict

    rng = np.random.default_rng(0)
    for n in (2, 3, 5, 12):
        values = rng.normal(0.3, 1.0, n)
        mine = t_interval(values)
        low, high = scipy_stats.t.interval(0.95, n - 1, loc=values.mean(),
                                           scale=scipy_stats.sem(values))  # fmt: skip
        assert (mine.low, mine.high) == pytest.approx((low, high), rel=1e-12)
        assert mine.covers_zero == (low <= 0 <= high)
    need = seeds_needed(0.1, 0.5)

    def excludes(n):
        return scipy_stats.t.ppf(0.975, n - 1) * 0.5 / np.sqrt(n) < 0.1

    assert excludes(need) and not excludes(need - 1)
    same = t_interval([0.0, 0.0, 0.0])
    assert same.covers_zero and "not distinguishable with 3 seeds" in verdict("x", same, "loss")


def test_an_arm_without_pairs_says_so():
    """An arm whose runs, or uniform's, all failed has no pair: the verdict says so instead of
    an interval of nothing."""
    from esdtool.ablation.summary import summarise

    rows = [{"arm": "uniform", "lr": 1e-3, "seed": 1, "status": "failed", "reason": "x",
             "eval_loss": None, "test_loss": None},
            {"arm": "esd", "lr": 1e-3, "seed": 1, "status": "ok", "reason": None,
             "eval_loss": 2.0, "test_loss": None}]  # fmt: skip
    esd = summarise(rows, ("uniform", "esd"), has_test=False)[1]
    assert esd.diff.n == 0 and "no pair to compare" in esd.verdict
    assert esd.final.n == 1 and esd.lr == 1e-3


@pytest.mark.parametrize(("examples", "batch", "accum", "epochs", "world"),
                         [(16, 4, 1, 1.0, 1), (17, 4, 1, 2.0, 1), (17, 4, 3, 1.0, 1),
                          (5, 8, 4, 1.5, 1), (33, 2, 2, 0.5, 1), (17, 4, 1, 1.0, 2)])  # fmt: skip
def test_planned_steps_are_the_trainers(examples, batch, accum, epochs, world, tmp_path):
    """The probe scales to the steps a run plans: the count transformers' Trainer itself
    derives from the data, the batch, the accumulation and the epochs (its dataloader of this
    many examples, split over ``world`` processes as its DistributedSampler splits them)."""
    import torch
    import transformers

    from esdtool.ablation.estimate import planned_steps

    trainer_cls = transformers.Trainer
    if not hasattr(trainer_cls, "set_initial_training_values"):
        pytest.skip("this transformers has no set_initial_training_values")
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=batch, num_train_epochs=epochs,
        gradient_accumulation_steps=accum, report_to=[], use_cpu=True,
    )  # fmt: skip
    trainer = trainer_cls(model=torch.nn.Linear(2, 2), args=args)
    per_process = -(-examples // world)  # DistributedSampler pads to equal shares
    loader = torch.utils.data.DataLoader(list(range(per_process)), batch_size=batch)
    expected = trainer.set_initial_training_values(args, loader)[-1]
    settings = {"max_steps": -1, "batch_size": batch, "grad_accum": accum, "epochs": epochs}
    assert planned_steps(settings, examples, world) == expected
    assert planned_steps({**settings, "max_steps": 7}, examples, world) == 7


def test_bad_options_and_budgets_are_one_line_before_any_run(tiny_causal_lm, metrics, data,
                                                             tmp_path, capsys):  # fmt: skip
    """Unknown arm, no uniform, a bad learning rate, both budgets, a budget no arm can meet,
    a bad shard: exit 2, one line, no output directory."""
    train, held = data
    base = ["ablate", tiny_causal_lm, "--metrics", metrics, "--data", train,
            "--eval-data", held, "-o", tmp_path / "t"]  # fmt: skip
    for args, message in (
        (["--arms", "uniform,esd,lucky"], "no arm lucky"),
        (["--arms", "esd"], "keep it in --arms"),
        (["--lrs", "0,2e-4"], "--lrs must lie in (0, 1)"),
        (["--budget-rank", "4", "--budget-params", "9000"], "exclusive"),
        (["--budget-params", "10"], "off the budget"),
        (["--shard", "3/2"], "--shard 3/2"),
        (["--arm", "Bad Name=x"], "a name of lowercase letters"),
        (["--lrs", "1e-4,1.0000001e-4"], "names one learning rate twice"),
    ):
        code, _, stderr = run_cli([*base, *args], capsys)
        assert code == 2 and message in stderr and "Traceback" not in stderr, (args, stderr)
        assert len(stderr.strip().splitlines()) == 1
        assert not (tmp_path / "t").exists()


def _plan_like(uniform: Path, where: Path, alpha: float, random_b: bool = False) -> Path:
    """A copy of the uniform arm's plan whose every lora_alpha is ``alpha`` x r: the same
    parameters, another scaling (tiny: the update cannot move; huge with a random B: the
    forward pass overflows at once)."""
    shutil.copytree(uniform, where)
    config = json.loads((where / "adapter_config.json").read_text())
    config["lora_alpha"] = alpha * config["r"]
    config["alpha_pattern"] = {k: alpha * r for k, r in config["rank_pattern"].items()}
    if random_b:
        config["init_lora_weights"] = False
    (where / "adapter_config.json").write_text(json.dumps(config))
    return where


@pytest.fixture(scope="module")
def uniform_plan(metrics, tmp_path_factory) -> Path:
    """Uniform rank 8 on every candidate, written by allocate (every module kept at 8)."""
    from esdtool import AllocateSettings, allocate

    out = tmp_path_factory.mktemp("uniform") / "plan"
    allocate(metrics, out, AllocateSettings(top_n_percentile=1.0, min_rank=8, max_rank=8),
             report=False)  # fmt: skip
    return out


@pytest.mark.slow
def test_identical_arms_tie_a_crippled_arm_loses_a_nan_arm_fails(
    tiny_causal_lm, metrics, data, uniform_plan, tmp_path, capsys
):
    """Grid of 3 seeds: 'same' (uniform's own plan again) pairs to differences of exactly 0,
    not distinguishable; 'frozen' (lora_alpha 1e-6 r: the update cannot move the model) is
    detected as worse, its interval clear of 0; 'overflow' (lora_alpha 1e30 r, B random) goes
    NaN and fails every run with the reason, and the grid completes. runs.csv has one row per
    run, summary.csv equals a recomputation from runs.csv with scipy, and the page is offline
    and escaped."""
    train, held = data
    same = _plan_like(uniform_plan, tmp_path / "same", 2.0)
    frozen = _plan_like(uniform_plan, tmp_path / "frozen", 1e-6)
    overflow = _plan_like(uniform_plan, tmp_path / "overflow", 1e30, random_b=True)
    out = tmp_path / "trials"
    code, stdout, stderr = run_cli(
        ["ablate", tiny_causal_lm, "--metrics", metrics, "--data", train, "--eval-data", held,
         "-o", out, "--arms", "uniform", "--arm", f"same={same}", "--arm", f"frozen={frozen}",
         "--arm", f"overflow={overflow}", "--seeds", "3", "--json", *FAST],
        capsys,
    )  # fmt: skip
    assert code == 0, stderr
    result = json.loads(stdout)
    assert len(result["ran"]) == 12
    runs = pd.read_csv(out / "runs.csv")
    assert len(runs) == 12
    assert set(runs[runs.arm == "overflow"].status) == {"failed"}
    assert runs[runs.arm == "overflow"].reason.str.contains("nan|NaN|inf").all()
    assert set(runs[runs.arm != "overflow"].status) == {"ok"}

    summary = pd.read_csv(out / "summary.csv").set_index("arm")
    assert summary.loc["same", "diff_to_uniform"] == 0
    assert "not distinguishable with 3 seeds" in summary.loc["same", "verdict"]
    assert "worse than uniform" in summary.loc["frozen", "verdict"]
    assert summary.loc["frozen", "diff_ci_low"] > 0
    assert summary.loc["overflow", "failed_runs"] == 3

    ok = runs[runs.status == "ok"]
    for arm in ("uniform", "frozen"):
        values = ok[ok.arm == arm].sort_values("seed").eval_loss.to_numpy()
        low, high = scipy_stats.t.interval(0.95, 2, loc=values.mean(),
                                           scale=scipy_stats.sem(values))  # fmt: skip
        assert summary.loc[arm, "mean"] == pytest.approx(values.mean(), rel=1e-12)
        assert (summary.loc[arm, "ci_low"], summary.loc[arm, "ci_high"]) == pytest.approx(
            (low, high), rel=1e-9
        )
    page = (out / "ablation.html").read_text()
    assert "default-src 'none'" in page and "<script" not in page
    assert "optimistic" in page  # no --test-data
    for name in ("uniform", "same", "frozen", "overflow"):
        record = json.loads((out / "runs" / name / "lr0.005" / "seed1.json").read_text())
        assert {"run_info", "train_info", "meta_info"} <= set(record)
        assert record["train_info"]["status"] == ("failed" if name == "overflow" else "success")


def _results(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.glob("runs/**/seed*.json"))
            if not p.name.endswith(".spec.json")}  # fmt: skip


@pytest.mark.slow
def test_a_killed_grid_resumes_and_shards_summarise_to_the_same_answer(
    tiny_causal_lm, metrics, data, uniform_plan, tmp_path, capsys
):
    """SIGKILL the grid (4 runs) once two runs have finished: the same command again keeps
    those two byte for byte and runs only the rest. The same grid as --shard 1/2 then 2/2 in
    another directory, then --summarize, gives the same summary.csv (CPU training is
    deterministic for a seed). A dry run first estimates the time from a probe of 3 of the 4
    steps and leaves nothing behind; between the shards, from the finished runs."""
    train, held = data
    same = _plan_like(uniform_plan, tmp_path / "same", 2.0)
    args = [str(tiny_causal_lm), "--metrics", str(metrics), "--data", str(train),
            "--eval-data", str(held), "--arms", "uniform", "--arm", f"same={same}",
            "--seeds", "2", *FAST]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    whole = tmp_path / "whole"
    command = [sys.executable, "-m", "esdtool", "ablate", *args, "-o", str(whole), "--json"]
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    dry = subprocess.run([*command, "--dry-run"], env={**env, "TMPDIR": str(scratch)},
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert dry.returncode == 0, dry.stderr
    probed = json.loads(dry.stdout)
    assert probed["estimate_basis"].startswith("a probe run of 3 steps"), probed
    assert 0 < probed["estimate_seconds"] < 3600
    assert not whole.exists() and not list(scratch.iterdir())  # the probe's scratch is gone
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, start_new_session=True)  # fmt: skip
    deadline = time.monotonic() + 300
    while len(_results(whole)) < 2 and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    kept = _results(whole)
    assert 2 <= len(kept) < 4
    again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    ran = json.loads(again.stdout)["ran"]
    assert len(ran) == 4 - len(kept)
    after = _results(whole)
    assert len(after) == 4 and all(after[k] == v for k, v in kept.items())

    sharded = tmp_path / "sharded"
    for part in ("1/2", "2/2"):
        proc = subprocess.run([*command[:-3], "-o", str(sharded), "--shard", part, "-q"],
                              env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        if part == "1/2":
            code, stdout, stderr = run_cli(
                ["ablate", *args, "-o", sharded, "--shard", "2/2", "--dry-run", "--json"], capsys
            )
            assert code == 0, stderr
            assert json.loads(stdout)["estimate_basis"].startswith("the 2 finished runs' mean")
    code, _, stderr = run_cli(["ablate", "--summarize", sharded, "-q"], capsys)
    assert code == 0, stderr
    assert (sharded / "summary.csv").read_text() == (whole / "summary.csv").read_text()


@pytest.mark.slow
def test_exact_match_and_forgetting_reach_the_summary(tiny_causal_lm, metrics, data, tmp_path,
                                                      capsys):  # fmt: skip
    """--metric exact-match: each run's eval exact match is the saved adapter's, recomputed
    here with the same grader; summary.csv reports eval_exact_match and the rate is chosen by
    it; --forgetting-data gives each run its loss change against the base model."""
    import peft
    import transformers

    from esdtool.training.data import load_training_data
    from esdtool.training.evaluate import exact_match, forgetting, prompts_and_answers

    train, held = data
    texts = ["def f(x):\n    return x * 2\n", "import os"]
    general = write_jsonl(tmp_path / "general.jsonl", [{"text": t} for t in texts])
    out = tmp_path / "trials"
    code, _, stderr = run_cli(
        ["ablate", tiny_causal_lm, "--metrics", metrics, "--data", train, "--eval-data", held,
         "-o", out, "--arms", "uniform", "--seeds", "1", "--metric", "exact-match",
         "--max-new-tokens", "4", "--forgetting-data", general, "-q", *FAST],
        capsys,
    )  # fmt: skip
    assert code == 0, stderr
    runs = pd.read_csv(out / "runs.csv")
    assert len(runs) == 1 and runs.status[0] == "ok"
    run_dir = out / "runs" / "uniform" / "lr0.005" / "seed1"
    tokenizer = transformers.AutoTokenizer.from_pretrained(run_dir)
    base = transformers.AutoModelForCausalLM.from_pretrained(tiny_causal_lm)
    model = peft.PeftModel.from_pretrained(base, run_dir)
    pairs = prompts_and_answers(load_training_data(held)[0], tokenizer)
    assert runs.eval_exact_match[0] == exact_match(model, tokenizer, pairs, max_new_tokens=4).score
    assert runs.forgetting[0] == pytest.approx(forgetting(model, tokenizer, texts), rel=1e-9)
    summary = pd.read_csv(out / "summary.csv")
    assert summary.metric[0] == "eval_exact_match"
    assert summary["mean"][0] == runs.eval_exact_match[0]


@pytest.mark.slow
def test_runs_go_one_per_device_at_once_and_under_torchrun(tiny_causal_lm, metrics, data,
                                                           tmp_path, capsys):  # fmt: skip
    """--gpus 0,1: the two runs of the grid train at the same time, one with
    CUDA_VISIBLE_DEVICES=0 and one with 1 (on this CPU machine both train on the CPU: the
    variable is what a GPU machine uses). --nproc-per-run 2: the run trains under torchrun
    with two processes (gloo here), and one result is written."""
    train, held = data
    base = ["ablate", tiny_causal_lm, "--metrics", metrics, "--data", train, "--eval-data", held,
            "--arms", "uniform", "-q", *FAST]  # fmt: skip
    code, _, stderr = run_cli([*base, "-o", tmp_path / "pair", "--seeds", "2", "--gpus", "0,1"],
                              capsys)  # fmt: skip
    assert code == 0, stderr
    where = tmp_path / "pair" / "runs" / "uniform" / "lr0.005"
    results = [json.loads(p.read_text()) for p in sorted(where.glob("seed?.json"))]
    assert sorted(r["meta_info"]["devices"]["CUDA_VISIBLE_DEVICES"] for r in results) == ["0", "1"]
    spans = []
    for r in results:
        start = pd.Timestamp(r["run_info"]["created_at"]).timestamp()
        spans.append((start, start + r["run_info"]["total_time"]))
    assert max(s for s, _ in spans) < min(e for _, e in spans)  # the two overlapped in time

    code, _, stderr = run_cli([*base, "-o", tmp_path / "ddp", "--seeds", "1",
                               "--nproc-per-run", "2"], capsys)  # fmt: skip
    assert code == 0, stderr
    result = json.loads((tmp_path / "ddp" / "runs" / "uniform" / "lr0.005" / "seed1.json")
                        .read_text())  # fmt: skip
    assert result["esdtool"]["status"] == "ok", result["esdtool"]["reason"]
    assert result["meta_info"]["devices"]["world_size"] == 2


def test_the_lora_ar_arm_is_the_origins_plan_at_the_budget(tiny_causal_lm, metrics, data,
                                                          tmp_path):  # fmt: skip
    """--arms uniform,lora-ar on a table analysed without the preset: the model is analysed
    with --preset lora-ar (kept in the output directory), and the arm adapts exactly the
    modules Adaptive Rank LoRA's own plan keeps (allocate --preset lora-ar on that table), in
    the preset's 4..64, within 1% of the budget counted by PEFT; a dry run writes nothing else."""
    from esdtool import AblateSettings, AllocateSettings, ablate, allocate

    train, held = data
    out = tmp_path / "trials"
    settings = AblateSettings(arms=("uniform", "lora-ar"), lrs=(5e-3,), seeds=1)
    result = ablate(tiny_causal_lm, metrics, train, held, out, settings, dry_run=True,
                    probe_steps=0)  # fmt: skip
    assert result.estimate is None
    arm = {a.name: a for a in result.arms}["lora-ar"]
    assert abs(arm.peft_params / result.budget - 1) <= 0.01
    preset_table = out / "lora-ar-metrics.parquet"
    assert sorted(p.name for p in out.iterdir()) == ["lora-ar-metrics.parquet"]
    origin = allocate(preset_table, settings=AllocateSettings.from_preset("lora-ar"), report=False)
    assert set(arm.ranks) == set(origin.allocation.kept.module)
    assert all(4 <= r <= 64 for r in arm.ranks.values())
    again = ablate(tiny_causal_lm, metrics, train, held, out, settings, dry_run=True,
                   probe_steps=0)  # fmt: skip
    assert {a.name: a.ranks for a in again.arms} == {a.name: a.ranks for a in result.arms}


@pytest.mark.slow
def test_the_eva_arm_redistributes_rank_on_the_training_data(tiny_causal_lm, metrics, data,
                                                            tmp_path, capsys):  # fmt: skip
    """--arms uniform,eva: the eva run starts from uniform's plan with PEFT's EVA
    initialisation: its saved adapter's ranks are redistributed (not all 8) with their total
    kept (8 per module), and runs.csv counts the parameters it trained, as the saved adapter
    holds them."""
    from safetensors.numpy import load_file

    train, held = data
    out = tmp_path / "trials"
    code, _, stderr = run_cli(
        ["ablate", tiny_causal_lm, "--metrics", metrics, "--data", train, "--eval-data", held,
         "-o", out, "--arms", "uniform,eva", "--seeds", "1", "-q", "--max-steps", "4",
         "--batch-size", "16", "--lrs", "5e-3"],
        capsys,
    )  # fmt: skip
    assert code == 0, stderr
    runs = pd.read_csv(out / "runs.csv").set_index("arm")
    assert runs.loc["eva", "status"] == "ok", runs.loc["eva", "reason"]
    run_dir = out / "runs" / "eva" / "lr0.005" / "seed1"
    config = json.loads((run_dir / "adapter_config.json").read_text())
    planned = json.loads((out / "arms" / "eva" / "adapter_config.json").read_text())
    assert planned["init_lora_weights"] == "eva" and set(planned["rank_pattern"].values()) == {8}
    tensors = load_file(str(run_dir / "adapter_model.safetensors"))
    ranks = {k.removesuffix(".lora_A.weight"): v.shape[0] for k, v in tensors.items()
             if k.endswith("lora_A.weight")}  # fmt: skip
    assert len(ranks) == len(planned["rank_pattern"]) and sum(ranks.values()) == 8 * len(ranks)
    assert len(set(ranks.values())) > 1, ranks  # redistributed
    assert runs.loc["eva", "trainable_params"] == sum(v.size for v in tensors.values())
    assert config["init_lora_weights"] == "eva"


def test_eva_that_cannot_converge_is_one_line_not_a_hang(tiny_causal_lm, uniform_plan, data,
                                                         tmp_path):  # fmt: skip
    """Batches of 2 records hold fewer completion tokens than r x rho = 16: PEFT's EVA would
    cycle them forever; finetune stops it and says why in one line."""
    from esdtool.errors import OptionError
    from esdtool.training import FinetuneSettings, finetune

    train, _ = data
    plan = tmp_path / "eva"
    shutil.copytree(uniform_plan, plan)
    (plan / "allocation.csv").unlink()
    config = json.loads((plan / "adapter_config.json").read_text())
    config.update(init_lora_weights="eva", eva_config={"rho": 2.0})
    (plan / "adapter_config.json").write_text(json.dumps(config))
    started = time.monotonic()
    with pytest.raises(OptionError, match="EVA initialisation did not converge"):
        finetune(tiny_causal_lm, plan, train, tmp_path / "run",
                 FinetuneSettings(max_steps=2, batch_size=2), progress=False)  # fmt: skip
    assert time.monotonic() - started < 120


def _result(arm: str, lr: float, seed: int, loss: float | None, status: str = "ok") -> dict:
    return {"run_info": {"total_time": 1.0}, "train_info": {"num_trainable_params": 100},
            "esdtool": {"arm": arm, "lr": lr, "seed": seed, "status": status,
                        "reason": None if status == "ok" else "=cmd|' /C calc'!A0",
                        "eval_loss": loss, "test_loss": None}}  # fmt: skip


def test_summarize_reads_every_result_and_refuses_a_broken_design(tmp_path, capsys):
    """--summarize on hand-made results: each arm's rate is its lowest mean eval loss, the
    paired differences are by seed (scipy's interval), a result esdtool did not write (a seed
    that is not a number) is ignored, a reason that a spreadsheet would run is written as text;
    a design file with a field of another type is one line, exit 2."""
    root = tmp_path / "trials"
    design = {"settings": {"arms": ["uniform", "esd"], "plans": {}, "lrs": [0.001, 0.01],
                           "seeds": 3, "metric": "loss"},
              "inputs": {"model": "m"}, "budget": 100,
              "arms": {"uniform": {"how": "u", "params": 100, "peft_params": 100},
                       "esd": {"how": "e", "params": 100, "peft_params": 100}}}  # fmt: skip
    root.mkdir()
    (root / "ablation.json").write_text(json.dumps(design))
    losses = {("uniform", 0.001): [2.0, 2.2, 2.1], ("uniform", 0.01): [1.5, 1.7, 1.9],
              ("esd", 0.001): [1.4, 1.5, 1.9], ("esd", 0.01): [1.65, 1.65, 1.6]}  # fmt: skip
    for (arm, lr), values in losses.items():
        for seed, loss in enumerate(values, start=1):
            where = root / "runs" / arm / f"lr{lr:g}" / f"seed{seed}.json"
            where.parent.mkdir(parents=True, exist_ok=True)
            where.write_text(json.dumps(_result(arm, lr, seed, loss)))
    hostile = root / "runs" / "esd" / "lr0.01" / "seed3.json"
    bad = _result("esd", 0.01, 3, 0.1)
    bad["esdtool"]["seed"] = "3"  # not a result esdtool wrote: left out
    hostile.write_text(json.dumps(bad))
    failed = root / "runs" / "uniform" / "lr0.001" / "seed3.json"
    failed.write_text(json.dumps(_result("uniform", 0.001, 3, None, "failed")))
    code, _, stderr = run_cli(["ablate", "--summarize", root, "-q"], capsys)
    assert code == 0, stderr
    summary = pd.read_csv(root / "summary.csv").set_index("arm")
    assert summary.loc["uniform", "chosen_lr"] == 0.01  # mean 1.7 < mean 2.1 (two seeds)
    assert summary.loc["esd", "chosen_lr"] == 0.001  # mean 1.6 < 1.65 (seed 3 not esdtool's)
    diffs = np.array([1.4 - 1.5, 1.5 - 1.7, 1.9 - 1.9])
    low, high = scipy_stats.t.interval(0.95, 2, loc=diffs.mean(), scale=scipy_stats.sem(diffs))
    assert summary.loc["esd", "diff_to_uniform"] == pytest.approx(diffs.mean())
    assert (summary.loc["esd", "diff_ci_low"], summary.loc["esd", "diff_ci_high"]) == (
        pytest.approx(low),
        pytest.approx(high),
    )
    runs = (root / "runs.csv").read_text()
    assert "'=cmd|" in runs and "\n=cmd" not in runs and ",=cmd" not in runs
    assert len(pd.read_csv(root / "runs.csv")) == 11  # 12 files, one not esdtool's

    design["settings"]["seeds"] = "3"
    (root / "ablation.json").write_text(json.dumps(design))
    code, _, stderr = run_cli(["ablate", "--summarize", root], capsys)
    assert code == 2 and "not an ablation design esdtool wrote" in stderr
    assert "Traceback" not in stderr and len(stderr.strip().splitlines()) == 1


def test_a_data_file_changed_under_its_path_is_another_design(tiny_causal_lm, metrics,
                                                              tmp_path):  # fmt: skip
    """The design records what its files held: eval data rewritten under the same path makes
    the same command refuse, instead of mixing runs on the old data with runs on the new."""
    from esdtool import AblateSettings, AllocateSettings, ablate
    from esdtool.ablation.design import DESIGN, check_same_design, design_record
    from esdtool.errors import OptionError

    train = write_jsonl(tmp_path / "train.jsonl", ARITHMETIC)
    held = write_jsonl(tmp_path / "eval.jsonl", HELD_OUT)
    out = tmp_path / "trials"
    settings = AblateSettings(arms=("uniform",), lrs=(5e-3,), seeds=1)
    ablate(tiny_causal_lm, metrics, train, held, out, settings, dry_run=True, probe_steps=0)
    out.mkdir()  # a dry run writes nothing: record the design as a real call would
    record = design_record(tiny_causal_lm, metrics, {"data": str(train), "eval_data": str(held)},
                            settings, AllocateSettings(), [], 0)  # fmt: skip
    assert record["fingerprints"]["eval_data"] is not None
    write_jsonl(held, HELD_OUT[:2])  # same path, other records
    again = design_record(tiny_causal_lm, metrics, {"data": str(train), "eval_data": str(held)},
                           settings, AllocateSettings(), [], 0)  # fmt: skip
    assert again["fingerprints"]["eval_data"] != record["fingerprints"]["eval_data"]
    assert again["fingerprints"]["data"] == record["fingerprints"]["data"]
    (out / DESIGN).write_text(json.dumps(record, default=str))
    with pytest.raises(OptionError, match="its fingerprints differ"):
        check_same_design(out, again)


def test_a_run_refuses_to_mix_code_versions(tmp_path):
    """Each run imports the installed esdtool: a run whose code differs from the code the grid
    started with fails at once with the reason, instead of mixing versions in one answer; its
    result records the fingerprint."""
    from esdtool.ablation.worker import code_fingerprint, run

    spec = {"finetune": {"max_steps": 1}, "code": "0" * 64, "run_dir": str(tmp_path / "r"),
            "experiment_name": "x", "peft_config": {}, "meta_info": {}, "arm": "uniform",
            "lr": 1e-3, "seed": 1}  # fmt: skip
    result = run(spec)
    assert result["esdtool"]["status"] == "failed"
    assert "esdtool's code changed since the grid started" in result["esdtool"]["reason"]
    assert result["meta_info"]["devices"]["esdtool_code"] == "0" * 64
    assert len(code_fingerprint()) == 64 and code_fingerprint() == code_fingerprint()


def test_the_probe_scales_steps_and_evaluations_apart(monkeypatch):
    """A probe of 3 steps that took 10 s in all, 5 s of it training of which 2 s one
    evaluation: a run of 100 steps evaluating every 20 (the last step a multiple) costs the 5 s
    outside training, 100 steps of 1 s and 5 evaluations of 2 s; 4 such runs on 2 slots take
    twice that. Nothing of the probe is left on disk."""
    from esdtool.ablation import estimate
    from esdtool.ablation.grid import Run

    seen = {}

    def fake(run, root, common, **kwargs):
        seen["root"], seen["finetune"] = root, common["finetune"]
        return {"esdtool": {"status": "ok", "reason": None, "steps": 3},
                "run_info": {"total_time": 10.0},
                "train_info": {"train_time": 5.0, "evaluations": 1, "eval_time": 2.0}}  # fmt: skip

    monkeypatch.setattr(estimate, "execute", fake)
    finetune = {"max_steps": -1, "warmup_steps": 5, "warmup_ratio": 0.0, "eval_steps": None,
                "save_steps": 20}  # fmt: skip
    found = estimate.probe(Run("uniform", 1e-3, 1), {"finetune": finetune}, lambda root: None,
                           3, 100, pending=4, slots=2)  # fmt: skip
    assert found.seconds == pytest.approx(2 * (5 + 100 * 1.0 + 5 * 2.0))
    assert "5 evaluation(s) of 2 s" in found.basis
    assert seen["finetune"]["max_steps"] == 3 and seen["finetune"]["warmup_steps"] == 0
    assert not seen["root"].exists()
