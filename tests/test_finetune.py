"""esdtool finetune: the whole CLI loop analyze -> allocate -> finetune on a tiny causal LM, each
data format, one-line errors before any training, and two processes under torchrun (gloo)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from helpers import ARITHMETIC, ROOT, run_cli, write_jsonl

pytest.importorskip("trl", reason="pip install 'esdtool[finetune]'")
pytest.importorskip("datasets", reason="pip install 'esdtool[finetune]'")

RECORDS = ARITHMETIC


def test_cli_loop_trains_and_saves_the_planned_adapter(tiny_causal_lm, plan, tmp_path, capsys):
    data = write_jsonl(tmp_path / "train.jsonl", RECORDS, repeat=8)
    out = tmp_path / "run"
    code, stdout, stderr = run_cli(
        ["finetune", tiny_causal_lm, "--adapter-config", plan, "--data", data, "-o", out,
         "--max-steps", "30", "--lr", "5e-3", "--logging-steps", "1", "--json"],
        capsys,
    )  # fmt: skip
    assert code == 0, stderr
    result = json.loads(stdout)  # stdout holds only the JSON summary
    assert result["steps"] == 30 and result["data_format"] == "prompt/completion"
    assert len(result["losses"]) == 30
    first = result["losses"][0][1]
    last5 = sum(loss for _, loss in result["losses"][-5:]) / 5
    assert last5 < 0.5 * first, result["losses"]

    # A standard PEFT adapter directory: reloads, and each lora_A/lora_B has the planned rank.
    import peft
    import transformers

    base = transformers.AutoModelForCausalLM.from_pretrained(tiny_causal_lm)
    model = peft.PeftModel.from_pretrained(base, out)
    planned = pd.read_csv(plan / "allocation.csv")
    planned = dict(zip(planned.module[planned.selected], planned["rank"][planned.selected],
                       strict=True))  # fmt: skip
    found = {}
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
            assert a.shape[0] == b.shape[1]
            found[name.removeprefix("base_model.model.")] = a.shape[0]
    assert found == planned == result["ranks"]
    assert (out / "tokenizer.json").is_file()
    run = json.loads((out / "esdtool_run.json").read_text())
    assert run["plan"]["metrics"] == str((plan.parent / "m.parquet").resolve())
    assert run["settings"]["max_steps"] == 30 and run["data_format"] == "prompt/completion"
    trainable = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    assert trainable == result["trainable_params"]
    assert trainable == int(pd.read_csv(plan / "allocation.csv").params.sum())

    # The run read its adapter back: one row per adapted module, planned rank = the plan's,
    # spectrum = that of PEFT's own delta weight, and the summary's share from those rows.
    from esdtool import load_metrics

    table = load_metrics(out / "adapter_metrics.parquet")
    rows = table[table.lora_rank.notna()].set_index("module")
    assert rows.lora_rank.astype(int).to_dict() == planned
    layers = {n.removeprefix("base_model.model."): m for n, m in model.named_modules()}
    for module, row in rows.iterrows():
        delta = layers[module].get_delta_weight("default").detach().double().numpy()
        truth = np.sort(np.linalg.svd(delta, compute_uv=False) ** 2)
        np.testing.assert_allclose(row.eigenvalues, truth, rtol=1e-4, atol=1e-5 * truth[-1])
    used = int(rows.effective_rank.sum())
    assert result["rank_use"] == [len(rows), int(rows.lora_rank.sum()), used]
    assert 0 < used <= int(rows.lora_rank.sum())
    assert 'id="usage"' in (out / "adapter_report.html").read_text()
    assert not list(out.glob(".*.partial"))  # the resume file went with the table


ALPACA_HEAD = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
)


@pytest.mark.parametrize("kind", ["prompt", "messages", "alpaca", "text"])
def test_each_data_format_trains_on_its_completion_only(tiny_causal_lm, plan, tmp_path, kind):
    """The first batch the Trainer sees: the tokens with a loss (label != -100) decode to the
    completion and its end-of-sequence token, the masked ones to the rendered prompt; plain
    text has a loss on every token."""
    from transformers import TrainerCallback

    from esdtool.training.recipe import FinetuneSettings, finetune

    class FirstBatch(TrainerCallback):
        def on_train_begin(self, args, state, control, train_dataloader=None, **kwargs):
            self.batch = next(iter(train_dataloader))
            self.tokenizer = kwargs["processing_class"]

    if kind == "messages":
        records = [{"messages": [{"role": "user", "content": r["prompt"]},
                                 {"role": "assistant", "content": r["completion"]}]}
                   for r in RECORDS]  # fmt: skip
        rendered = [f"<|user|>{r['prompt']}</s><|assistant|>" for r in RECORDS]
    elif kind == "alpaca":
        records = [
            {"instruction": "Add.", "input": r["prompt"], "output": r["completion"]}
            for r in RECORDS
        ]
        rendered = [
            f"{ALPACA_HEAD}### Instruction:\nAdd.\n\n### Input:\n{r['prompt']}\n\n### Response:\n"
            for r in RECORDS
        ]
    elif kind == "text":
        records = [{"text": r["prompt"] + r["completion"]} for r in RECORDS]
        rendered = [""] * len(RECORDS)  # nothing masked
    else:
        records, rendered = RECORDS, [r["prompt"] for r in RECORDS]
    completions = [r["prompt"] + r["completion"] if kind == "text" else r["completion"]
                   for r in RECORDS]  # fmt: skip
    expected = {(p, c + "</s>") for p, c in zip(rendered, completions, strict=True)}

    data = write_jsonl(tmp_path / "d.jsonl", records)
    settings = FinetuneSettings(max_steps=2, logging_steps=1, batch_size=2)
    first = FirstBatch()
    result = finetune(tiny_causal_lm, plan, data, tmp_path / "run", settings, progress=False,
                      callbacks=[first])  # fmt: skip
    names = {"prompt": "prompt/completion", "messages": "messages",
             "alpaca": "instruction/input/output", "text": "text"}  # fmt: skip
    assert result.data_format == names[kind] and result.steps == 2
    assert (tmp_path / "run" / "adapter_model.safetensors").is_file()

    batch, decode = first.batch, first.tokenizer.decode
    for i in range(len(batch["input_ids"])):
        attended = batch["attention_mask"][i] == 1
        ids, labels = batch["input_ids"][i][attended], batch["labels"][i][attended]
        scored = labels != -100
        assert (labels[scored] == ids[scored]).all()
        assert scored[int(scored.int().argmax()) :].all()  # masked prompt, then scored to the end
        assert (decode(ids[~scored]), decode(ids[scored])) in expected


def test_data_files_of_each_type_and_the_alpaca_template(tmp_path):
    from esdtool.training.data import ALPACA_NO_INPUT, alpaca_prompt, load_training_data

    frame = pd.DataFrame(
        {"instruction": ["Add.", "Sub."], "input": ["2 3", ""], "output": ["5", "-1"]}
    )
    paths = {
        "jsonl": tmp_path / "d.jsonl",
        "json": tmp_path / "d.json",
        "parquet": tmp_path / "d.parquet",
        "csv": tmp_path / "d.csv",
    }
    frame.to_json(paths["jsonl"], orient="records", lines=True)
    frame.to_json(paths["json"], orient="records")
    frame.to_parquet(paths["parquet"])
    frame.to_csv(paths["csv"], index=False)
    for path in paths.values():
        records, fmt = load_training_data(path)
        assert fmt == "instruction/input/output" and records.column_names == [
            "prompt",
            "completion",
        ]
        assert records[0]["prompt"].endswith("### Input:\n2 3\n\n### Response:\n")
        assert records[0]["completion"] == "5"
        # An empty input uses the shorter template (CSV reads it as missing, JSON as "").
        assert records[1]["prompt"] == ALPACA_NO_INPUT.format(instruction="Sub.")
    assert alpaca_prompt("Do it.", None).startswith(
        "Below is an instruction that describes a task."
    )


def test_dry_run_prints_ranks_and_trains_nothing(tiny_causal_lm, plan, tmp_path, capsys):
    data = write_jsonl(tmp_path / "train.jsonl", RECORDS)
    out = tmp_path / "run"
    code, stdout, stderr = run_cli(
        ["finetune", tiny_causal_lm, "--adapter-config", plan, "--data", data, "-o", out,
         "--dry-run"],
        capsys,
    )  # fmt: skip
    assert code == 0, stderr
    assert "dry run" in stdout and "model.layers.1.mlp.up_proj" in stdout
    assert "trainable params" in stdout
    assert not out.exists()


def test_bad_finetune_input_is_one_line_before_training(
    tiny_causal_lm, plan, minilm_metrics, tmp_path, capsys
):
    good = write_jsonl(tmp_path / "train.jsonl", RECORDS)
    odd = write_jsonl(tmp_path / "odd.jsonl", [{"question": "q", "answer": "a"}])
    # A plan made for another model (MiniLM's modules are not in the Llama).
    code, _, stderr = run_cli(
        ["allocate", minilm_metrics, "-o", tmp_path / "bert-plan", "--no-report", "-q"], capsys
    )
    assert code == 0, stderr
    encoder_plan = tmp_path / "encoder-plan"
    code, _, stderr = run_cli(
        ["allocate", minilm_metrics, "-o", encoder_plan, "--no-report", "-q",
         "--task-type", "FEATURE_EXTRACTION"],
        capsys,
    )  # fmt: skip
    assert code == 0, stderr
    cases = [
        (["--adapter-config", encoder_plan, "--data", good], "finetune trains causal LMs"),
        (["--adapter-config", tmp_path / "bert-plan", "--data", good], "does not fit"),
        (["--adapter-config", plan, "--data", odd], "fit no known format"),
        (["--adapter-config", plan, "--data", tmp_path / "none.jsonl"], "no such file"),
        (["--adapter-config", tmp_path, "--data", good], "no adapter_config.json"),
        (["--adapter-config", plan, "--data", good, "--lr", "0"], "--lr must lie in (0, 1)"),
    ]
    import torch

    if not torch.cuda.is_available():
        cases.append((["--adapter-config", plan, "--data", good, "--qlora"], "needs a CUDA GPU"))
    for args, message in cases:
        out = tmp_path / "run"
        code, _, stderr = run_cli(["finetune", tiny_causal_lm, *args, "-o", out], capsys)
        # Progress bars (loading weights) may come first; the error is one line, the last.
        last = stderr.rstrip("\n").split("\n")[-1]
        assert code == 2 and last.startswith("Error:") and message in last, (args, stderr)
        assert stderr.count("Error:") == 1 and "Traceback" not in stderr
        assert not out.exists()  # nothing trained, nothing written
    _, _, stderr = run_cli(
        ["finetune", tiny_causal_lm, "--adapter-config", plan, "--data", odd], capsys
    )
    assert "messages; prompt/completion; instruction/input/output; text" in stderr
    # Every problem at once, before any weights load: bad data, a foreign plan, no checkpoint.
    code, _, stderr = run_cli(
        ["finetune", tiny_causal_lm, "--adapter-config", tmp_path / "bert-plan", "--data", odd,
         "-o", tmp_path / "run", "--resume-from-checkpoint", "last"],
        capsys,
    )  # fmt: skip
    assert code == 2 and stderr.count("Error:") == 1 and "3 problems" in stderr, stderr
    for part in ("fit no known format", "does not fit", "no checkpoint-* directory"):
        assert part in stderr, (part, stderr)


def test_two_processes_under_torchrun_train_one_adapter(tiny_causal_lm, plan, tmp_path):
    """DDP through the Trainer on CPU (gloo): same command, two ranks, one adapter saved."""
    data = write_jsonl(tmp_path / "train.jsonl", RECORDS, repeat=8)
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
        "--master-addr", "127.0.0.1", "--master-port", "29531",
        "-m", "esdtool", "finetune", str(tiny_causal_lm), "--adapter-config", str(plan),
        "--data", str(data), "-o", str(out), "--max-steps", "30", "--lr", "5e-3",
        "--logging-steps", "1", "--batch-size", "2", "--json", "--spectral-every", "10",
    ]  # fmt: skip
    proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    if proc.returncode != 0 and "EADDRINUSE" in proc.stderr + proc.stdout:
        pytest.skip("torchrun could not bind its rendezvous port")
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1  # one summary, from rank 0
    result = json.loads(lines[0])
    assert result["steps"] == 30
    first = result["losses"][0][1]
    last5 = sum(loss for _, loss in result["losses"][-5:]) / 5
    assert last5 < 0.5 * first, result["losses"]
    run = json.loads((out / "esdtool_run.json").read_text())
    assert run["world_size"] == 2
    assert (out / "adapter_model.safetensors").is_file()
    # both ranks analysed the saved adapter; rank 0 wrote its table and report
    assert result["rank_use"] and result["rank_use"][1] == sum(result["ranks"].values())
    assert (out / "adapter_metrics.parquet").is_file() and (out / "adapter_report.html").is_file()
    # the spectra watched on rank 0 only: one trajectory, its last step the saved adapter's rows
    from esdtool import load_metrics, load_trajectory

    trajectory = load_trajectory(out / "spectra_trajectory.parquet")
    assert sorted(set(trajectory.step)) == [0, 10, 20, 30]
    last = trajectory[trajectory.step == 30].set_index("module").effective_rank.sort_index()
    saved = load_metrics(out / "adapter_metrics.parquet").set_index("module").effective_rank
    pd.testing.assert_series_equal(last, saved.sort_index())
    assert result["system"]["steps"] == 30


def test_finetune_needs_its_extra_named(monkeypatch, tmp_path):
    """Without trl the error names the missing package and the extra to install."""
    import sys

    from esdtool.errors import MissingExtraError
    from esdtool.training.recipe import finetune

    monkeypatch.setitem(sys.modules, "trl", None)  # "import trl" now raises ImportError
    with pytest.raises(MissingExtraError) as info:
        finetune("x", tmp_path, "d.jsonl", tmp_path / "out")
    assert "(trl missing)" in str(info.value) and "esdtool[finetune]" in info.value.hint


def test_same_seed_same_adapter(tiny_causal_lm, plan, tmp_path):
    """--seed fixes the adapters' initial weights too, not only the data order."""
    from esdtool.training.recipe import FinetuneSettings, finetune

    data = write_jsonl(tmp_path / "d.jsonl", RECORDS)
    settings = FinetuneSettings(max_steps=1, batch_size=2, seed=7)
    outputs = []
    for name in ("a", "b"):
        finetune(tiny_causal_lm, plan, data, tmp_path / name, settings, progress=False)
        outputs.append((tmp_path / name / "adapter_model.safetensors").read_bytes())
    assert outputs[0] == outputs[1]


def test_training_targets_must_be_text(tmp_path):
    from esdtool.errors import DataFormatError
    from esdtool.training.data import load_training_data

    (tmp_path / "a.csv").write_text("instruction,input,output\nAdd.,2 3,5\nSay.,x,\n")
    records, _ = load_training_data(tmp_path / "a.csv")
    assert [r["completion"] for r in records] == ["5", ""]  # not 5.0, not "None"
    write_jsonl(tmp_path / "n.jsonl", [{"prompt": "2+3=", "completion": 5}])
    with pytest.raises(DataFormatError, match="record 0: completion is int, not text"):
        load_training_data(tmp_path / "n.jsonl")


def test_plans_that_do_not_fit_are_refused_before_training(tiny_causal_lm, plan, tmp_path):
    import shutil

    from esdtool.errors import PlanMismatchError
    from esdtool.training.recipe import FinetuneSettings, finetune

    data = write_jsonl(tmp_path / "d.jsonl", RECORDS)
    settings = FinetuneSettings(max_steps=1)

    # Same module names, other shapes: a plan made for a bigger sibling model.
    other = tmp_path / "other-plan"
    shutil.copytree(plan, other)
    table = pd.read_csv(other / "allocation.csv")
    table.loc[table.selected, "cols"] *= 2
    table.to_csv(other / "allocation.csv", index=False)
    with pytest.raises(PlanMismatchError, match="a plan for another model"):
        finetune(tiny_causal_lm, other, data, tmp_path / "run", settings, dry_run=True)

    # One planned module the model lacks, among ones it has.
    extra = tmp_path / "extra-plan"
    shutil.copytree(plan, extra)
    config = json.loads((extra / "adapter_config.json").read_text())
    config["rank_pattern"]["^model\\.layers\\.9\\.mlp\\.up_proj"] = 8
    (extra / "adapter_config.json").write_text(json.dumps(config))
    missing = r"1 problem\(s\): .*layers.*9.*planned, but no such module"
    with pytest.raises(PlanMismatchError, match=missing):
        finetune(tiny_causal_lm, extra, data, tmp_path / "run", settings, dry_run=True)

    from esdtool.errors import OptionError

    with pytest.raises(OptionError, match="no checkpoint-\\* directory to resume from"):
        finetune(tiny_causal_lm, plan, data, tmp_path / "run", settings,
                 resume_from_checkpoint=True)  # fmt: skip
    assert not (tmp_path / "run").exists()
