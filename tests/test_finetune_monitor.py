"""Training you can watch (issue 24): the training options reach the optimizer, logs reach
TensorBoard (read back with TensorBoard's own event reader), system metrics and their summary,
and SpectralCallback's numbers equal the read-back of the saved adapter. Training stays tiny:
at most 6 steps of the tiny causal LM."""

from __future__ import annotations

import json
import math
import sys
import types
from pathlib import Path

import pandas as pd
import pytest

from helpers import ARITHMETIC, finetune_json, run_cli, write_jsonl

pytest.importorskip("trl", reason="pip install 'esdtool[finetune]'")
pytest.importorskip("datasets", reason="pip install 'esdtool[finetune]'")


def _scalars(run: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of the run's TensorBoard event files, by tag: (step, value) in order."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logdirs = sorted((run / "runs").iterdir())
    assert len(logdirs) == 1, logdirs
    events = EventAccumulator(str(logdirs[0]), size_guidance={"scalars": 0})
    events.Reload()
    return {
        tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]
    }


def _linear(k: int, warmup: int, total: int) -> float:
    """transformers' linear schedule with warmup, written from its definition."""
    if k < warmup:
        return k / warmup
    return max(0.0, (total - k) / (total - warmup))


def _cosine(k: int, warmup: int, total: int) -> float:
    if k < warmup:
        return k / warmup
    progress = (k - warmup) / (total - warmup)
    return 0.5 * (1 + math.cos(math.pi * progress))


@pytest.mark.slow
def test_tensorboard_holds_loss_lr_throughput_rss_and_spectra(tiny_causal_lm, plan, tmp_path,
                                                              capsys):  # fmt: skip
    """--report-to tensorboard --spectral-every 2: TensorBoard's event reader finds, at every
    logged step, the loss, the learning rate, tokens/s and RSS, and at steps 2 and 4 (and 0 in
    the trajectory) each module's effective rank, the last of which equals the read-back of the
    saved adapter (adapter_metrics.parquet)."""
    data = write_jsonl(tmp_path / "train.jsonl", ARITHMETIC)
    out = tmp_path / "run"
    result = finetune_json(capsys, tiny_causal_lm, plan, data, out, "--max-steps", "4", "--lr",
                       "1e-2", "--report-to", "tensorboard", "--spectral-every", "2")  # fmt: skip
    scalars = _scalars(out)
    for tag in ("train/loss", "train/learning_rate", "train/system/tokens_per_second",
                "train/system/rss_gb", "train/system/cpu_percent"):  # fmt: skip
        assert [s for s, _ in scalars[tag]] == [1, 2, 3, 4], tag
    assert [v for _, v in scalars["train/loss"]] == pytest.approx(
        [loss for _, loss in result["losses"]], rel=1e-6
    )
    assert all(0.05 < v < 64 for _, v in scalars["train/system/rss_gb"])
    assert not any("gpu" in tag for tag in scalars)  # no GPU here: nothing said about GPUs

    metrics = pd.read_parquet(out / "adapter_metrics.parquet")
    updates = metrics[metrics.lora_rank.notna()]
    assert len(updates) == len(result["ranks"]) > 0
    for row in updates.itertuples():
        tag = f"train/spectral/{row.module}/effective_rank"
        assert [s for s, _ in scalars[tag]] == [2, 4], tag
        assert scalars[tag][-1][1] == row.effective_rank
        share = scalars[f"train/spectral/{row.module}/rank_share"][-1][1]
        assert share == pytest.approx(row.effective_rank / min(row.lora_rank, row.M), rel=1e-6)
        lam = scalars[f"train/spectral/{row.module}/lambda_max"][-1][1]
        assert lam == pytest.approx(row.lambda_max, rel=1e-6)  # TensorBoard stores float32
    used = scalars["train/spectral/rank_used"][-1][1]
    assert used == updates.effective_rank.sum() == result["rank_use"][2]

    system = result["system"]
    assert system["steps"] == 4 and system["wall_seconds"] > 0
    assert "gpu_utilization_mean" not in system
    record = json.loads((out / "esdtool_run.json").read_text())
    assert record["result"]["system"] == system
    assert record["settings"]["report_to"] == ["tensorboard"]
    assert result["trajectory"] == str(out / "spectra_trajectory.parquet")
    assert "Training trajectory" in (out / "adapter_report.html").read_text()


def test_logged_learning_rate_follows_warmup_and_schedule(tiny_causal_lm, plan, tmp_path,
                                                          capsys):  # fmt: skip
    """The scheduler and warmup reach the optimizer: the learning rate logged at step s (the
    one step s trained with) is lr x f(s - 1), f transformers' schedule written here from its
    definition; linear with --warmup-steps 2 and cosine with --warmup-ratio 0.34 (ceil(6 x
    0.34) = 3 warmup steps) over 6 steps. Weight decay and clipping reach the optimizer's
    parameter groups and the Trainer's arguments."""
    data = write_jsonl(tmp_path / "train.jsonl", ARITHMETIC)
    lr = 1e-2
    for name, options, expected in (
        ("linear", ["--warmup-steps", "2"], [_linear(k, 2, 6) for k in range(6)]),
        ("cosine", ["--warmup-ratio", "0.34", "--lr-scheduler", "cosine"],
         [_cosine(k, 3, 6) for k in range(6)]),
    ):  # fmt: skip
        out = tmp_path / name
        finetune_json(capsys, tiny_causal_lm, plan, data, out, "--max-steps", "6", "--lr", str(lr),
                  "--save-steps", "6", "--weight-decay", "0.05", "--max-grad-norm", "0.5",
                  *options)  # fmt: skip
        state = json.loads((out / "checkpoint-6" / "trainer_state.json").read_text())
        logged = [(e["step"], e["learning_rate"]) for e in state["log_history"] if "loss" in e]
        assert [s for s, _ in logged] == [1, 2, 3, 4, 5, 6]
        assert [v for _, v in logged] == pytest.approx([lr * f for f in expected], abs=1e-12)
        args = json.loads((out / "esdtool_run.json").read_text())["settings"]
        assert args["weight_decay"] == 0.05 and args["max_grad_norm"] == 0.5

    import torch

    optimizer = torch.load(tmp_path / "linear" / "checkpoint-6" / "optimizer.pt",
                           weights_only=True)  # fmt: skip
    decays = sorted({g["weight_decay"] for g in optimizer["param_groups"]})
    assert decays == [0.0, 0.05] or decays == [0.05]  # transformers exempts biases and norms


def test_tokens_per_second_counts_the_tokens_trained_on(tiny_causal_lm, plan, tmp_path, capsys):
    """The summary's tokens are the tokens of the 16 records of one epoch (prompt, completion
    and end-of-sequence, not the padding of the shorter records of a batch: 4 steps of 4),
    counted here with the tokenizer; tokens/s is that over the wall time, and samples/s 16
    over it."""
    import transformers

    records = [{"prompt": f"Q: what is {a} plus {b}? A:", "completion": f" {a + b}."}
               for a in range(4) for b in (5, 50, 5000, 50000000)]  # fmt: skip
    data = write_jsonl(tmp_path / "train.jsonl", records)
    out = tmp_path / "run"
    result = finetune_json(capsys, tiny_causal_lm, plan, data, out, "--max-steps", "4")
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_causal_lm)
    lengths = [len(tokenizer(r["prompt"] + r["completion"])["input_ids"]) + 1 for r in records]
    assert len(set(lengths)) > 1  # batches are padded
    expected = sum(lengths)
    system = result["system"]
    assert system["tokens"] == expected
    assert system["tokens_per_second"] == pytest.approx(expected / system["wall_seconds"])
    assert system["samples_per_second"] == pytest.approx(16 / system["wall_seconds"])
    assert system["peak_memory_kind"] == "process peak RSS" and system["peak_memory_gb"] > 0.05


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--warmup-steps", "-1"], "--warmup-steps must be >= 0"),
        (["--warmup-ratio", "1.5"], "--warmup-ratio must lie in [0, 1)"),
        (["--warmup-steps", "2", "--warmup-ratio", "0.1"], "both set"),
        (["--warmup-steps", "5", "--max-steps", "5"], "is not below --max-steps 5"),
        # transformers warms up over ceil(0.8 x 4) = 4 steps: all of them
        (
            ["--warmup-ratio", "0.8", "--max-steps", "4"],
            "--warmup-ratio 0.8 warms up over all --max-steps 4",
        ),
        (["--lr-scheduler", "cosyne"], "--lr-scheduler must be one of linear, cosine"),
        (["--lr-scheduler", "constant", "--warmup-steps", "3"], "use constant_with_warmup"),
        (["--weight-decay", "-0.1"], "--weight-decay must be a finite number >= 0"),
        (["--max-grad-norm", "nan"], "--max-grad-norm must be a finite number >= 0"),
        (["--eval-steps", "0"], "--eval-steps must be at least 1"),
        (["--save-total-limit", "0"], "--save-total-limit must be at least 1"),
        (["--report-to", "tensorbored"], "--report-to takes tensorboard, wandb, mlflow or none"),
        (["--report-to", "tensorboard,tensorboard"], "names one integration twice"),
        (
            ["--report-to", "none,tensorboard"],
            "--report-to none turns reporting off: it cannot go with tensorboard",
        ),
        (["--report-to", "none", "--report-to", "wandb"], "it cannot go with wandb"),
        # transformers' polynomial schedule decays to lr_end=1e-7 and refuses a lower --lr
        # only once the model is loaded (ValueError in get_polynomial_decay_schedule_with_warmup)
        (
            ["--lr-scheduler", "polynomial", "--lr", "1e-7"],
            "--lr-scheduler polynomial decays to 1e-07: --lr must be above it, not 1e-07",
        ),
        (["--spectral-every", "-5"], "--spectral-every must be >= 0"),
    ],
)
def test_bad_training_option_is_one_line_before_loading(args, message, tmp_path, capsys):
    """Each bad option: exit 2, one line naming it, before anything loads (the model named
    does not exist, and that is not what is reported), and no output directory made."""
    out = tmp_path / "run"
    code, _, stderr = run_cli(
        ["finetune", str(tmp_path / "no-model"), "--adapter-config", str(tmp_path / "no-plan"),
         "--data", str(tmp_path / "none.jsonl"), "-o", out, *args],
        capsys,
    )  # fmt: skip
    assert code == 2
    line = stderr.strip().splitlines()[0]
    assert message in line and "no-model" not in line, stderr
    assert "Traceback" not in stderr and not out.exists()


def test_report_to_off_in_the_library_as_on_the_command_line():
    """FinetuneSettings(report_to=...) takes what transformers' report_to takes for "off" (None,
    "none", an empty list) as the CLI's "none" and "", not a TypeError."""
    from esdtool.training import FinetuneSettings

    for off in (None, "none", "", [], ["none"], ("none", "none")):
        assert FinetuneSettings(report_to=off).report_to == (), off
    assert FinetuneSettings(report_to=["tensorboard"]).report_to == ("tensorboard",)


def test_eval_steps_needs_eval_data_and_a_missing_reporter_names_its_extra(
    tiny_causal_lm, plan, tmp_path, capsys, monkeypatch
):
    """Checks that need the other inputs, listed together before the model loads: --eval-steps
    without --eval-data, and --report-to mlflow where mlflow is not installed (one problem each,
    the extra to install named)."""
    monkeypatch.setitem(sys.modules, "mlflow", None)  # import mlflow raises ImportError
    data = write_jsonl(tmp_path / "train.jsonl", ARITHMETIC)
    code, _, stderr = run_cli(
        ["finetune", tiny_causal_lm, "--adapter-config", plan, "--data", data,
         "-o", tmp_path / "run", "--eval-steps", "2", "--report-to", "mlflow"],
        capsys,
    )  # fmt: skip
    assert code == 2 and "Traceback" not in stderr
    assert "2 problems" in stderr and "--eval-steps needs --eval-data" in stderr
    assert "--report-to mlflow needs the mlflow package" in stderr
    assert "esdtool[mlflow]" in stderr
    assert not (tmp_path / "run").exists()


def test_wandb_without_a_login_is_refused_offline_mode_is_not(monkeypatch, tmp_path):
    """--report-to wandb would stop the run to ask for an API key: refused in one line unless
    W&B can log unattended (WANDB_MODE=offline, a key in the environment or in ~/.netrc)."""
    from esdtool.errors import OptionError
    from esdtool.training.config import _check_reporter

    monkeypatch.setitem(sys.modules, "wandb", types.ModuleType("wandb"))
    for key in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_DISABLED", "WANDB_BASE_URL"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.delenv("NETRC", raising=False)
    with pytest.raises(OptionError, match="no W&B login"):
        _check_reporter("wandb")
    (tmp_path / ".netrc").write_text("machine api.wandb.ai login user password k3y\n")
    (tmp_path / ".netrc").chmod(0o600)
    _check_reporter("wandb")
    (tmp_path / ".netrc").unlink()
    monkeypatch.setenv("WANDB_MODE", "offline")
    _check_reporter("wandb")


class _FakeNvml(types.ModuleType):
    """nvidia-ml-py's calls for two GPUs with fixed readings; the second reports no power."""

    NVML_TEMPERATURE_GPU = 0

    def __init__(self) -> None:
        super().__init__("pynvml")
        self.shutdown = False

    def nvmlInit(self):
        pass

    def nvmlShutdown(self):
        self.shutdown = True

    def nvmlDeviceGetCount(self):
        return 2

    def nvmlDeviceGetHandleByIndex(self, i):
        return i

    def nvmlDeviceGetUtilizationRates(self, h):
        return types.SimpleNamespace(gpu=[87, 41][h])

    def nvmlDeviceGetMemoryInfo(self, h):
        return types.SimpleNamespace(used=[3, 5][h] * 1024**3)

    def nvmlDeviceGetTemperature(self, h, sensor):
        return [61, 55][h]

    def nvmlDeviceGetPowerUsage(self, h):
        if h == 1:
            raise RuntimeError("NVMLError_NotSupported")
        return 251_500  # milliwatts


def _drive(callback, logs_per_step: int = 2):
    """The calls a Trainer makes to a callback over 2 steps with a loss logged at each."""
    args = types.SimpleNamespace(
        per_device_train_batch_size=4, gradient_accumulation_steps=2, world_size=1,
        include_num_input_tokens_seen="non_padding",
    )  # fmt: skip
    state = types.SimpleNamespace(global_step=0, num_input_tokens_seen=0,
                                  is_world_process_zero=True)  # fmt: skip
    callback.on_train_begin(args, state, None)
    logged = []
    for step in range(1, logs_per_step + 1):
        state.global_step, state.num_input_tokens_seen = step, 100 * step
        logs = {"loss": 1.0}
        callback.on_log(args, state, None, logs=logs)
        logged.append(logs)
    eval_logs = {"eval_loss": 2.0}
    callback.on_log(args, state, None, logs=eval_logs)
    assert eval_logs == {"eval_loss": 2.0}  # evaluation logs carry no step's cost
    callback.on_train_end(args, state, None)
    return logged


def test_gpu_readings_come_from_nvml_per_device(monkeypatch):
    """Where nvidia-ml-py is present: each GPU's utilisation, memory, temperature and power as
    NVML gives them (a reading a device does not support left out), the summary's mean
    utilisation over steps and devices, and NVML shut down at the end."""
    from esdtool.training.monitor import SystemMonitorCallback

    fake = _FakeNvml()
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    ticks = iter(range(0, 100, 2))  # a clock that moves 2 s at each reading
    monkeypatch.setattr("esdtool.training.monitor.time.perf_counter", lambda: next(ticks))
    callback = SystemMonitorCallback()
    logged = _drive(callback)
    for logs in logged:
        assert logs["system/gpu0/utilization"] == 87 and logs["system/gpu1/utilization"] == 41
        assert logs["system/gpu0/memory_used_gb"] == 3 and logs["system/gpu1/memory_used_gb"] == 5
        assert logs["system/gpu0/temperature_c"] == 61 and logs["system/gpu0/power_w"] == 251.5
        assert "system/gpu1/power_w" not in logs
        # one step of 4 x 2 samples and 100 tokens in the 2 s since the last log
        assert logs["system/samples_per_second"] == 4.0
        assert logs["system/tokens_per_second"] == 50.0
        assert logs["system/rss_gb"] > 0
    summary = callback.summary.to_dict()
    assert summary["gpus"] == 2 and summary["gpu_utilization_mean"] == pytest.approx(64.0)
    assert summary["tokens"] == 200 and summary["steps"] == 2 and summary["wall_seconds"] == 6
    assert summary["tokens_per_second"] == pytest.approx(200 / 6)
    assert summary["samples_per_second"] == pytest.approx(16 / 6)
    assert fake.shutdown


def test_without_nvml_nothing_is_said_about_gpus(monkeypatch):
    """No nvidia-ml-py (or no driver): no GPU key in the logs, none in the summary."""
    from esdtool.training.monitor import SystemMonitorCallback

    monkeypatch.setitem(sys.modules, "pynvml", None)
    callback = SystemMonitorCallback()
    for logs in _drive(callback):
        assert not any("gpu" in key for key in logs)
        assert {"system/cpu_percent", "system/rss_gb", "system/tokens_per_second"} <= set(logs)
    assert not any("gpu" in key for key in callback.summary.to_dict())


def test_scalars_count_rank_above_the_matrix_as_unusable():
    """The logged share of planned rank used is effective rank over min(r, M): r = 40 on a
    matrix of 20 columns can use 20 at most; an untrained (zero) update uses none; rows that
    are not LoRA updates (a lora_B part) are left out of the totals."""
    from esdtool.training.spectral import scalars

    table = pd.DataFrame({
        "module": ["base_model.model.a", "b", "c", "b.lora_B"],
        "status": ["ok", "ok", "zero", "ok"],
        "lora_rank": [40, 8, 8, None], "M": [20, 64, 64, 64],
        "effective_rank": [10.0, 6.0, None, 3.0], "lambda_max": [2.0, 3.0, None, 1.0],
        "stable_rank": [1.5, 2.5, None, 1.0],
    })  # fmt: skip
    found = scalars(table)
    assert found["spectral/a/rank_share"] == 0.5 and found["spectral/b/rank_share"] == 0.75
    assert found["spectral/c/effective_rank"] == 0 and found["spectral/c/rank_share"] == 0
    assert found["spectral/a/lambda_max"] == 2.0 and found["spectral/b/stable_rank"] == 2.5
    assert found["spectral/rank_used"] == 16 and found["spectral/rank_share"] == 16 / 36
    assert "spectral/b.lora_B/effective_rank" not in found
    assert set(scalars(table, modules=False)) == {"spectral/rank_used", "spectral/rank_share"}


def test_spectral_callback_refuses_what_it_cannot_read(tiny_causal_lm):
    """A model without a PEFT adapter, and LoRA factors sharded as DeepSpeed ZeRO-3 marks them
    (a ds_id on each parameter): one line each, saying why."""
    import peft
    import transformers

    from esdtool import SpectralCallback
    from esdtool.errors import OptionError
    from esdtool.training.spectral import check_model

    with pytest.raises(OptionError, match=r"every=\.\.\.\) must be an integer >= 1"):
        SpectralCallback(every=0)
    base = transformers.AutoModelForCausalLM.from_pretrained(tiny_causal_lm)
    with pytest.raises(OptionError, match="watches a PEFT model's LoRA adapter"):
        check_model(base)
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["q_proj"]))
    check_model(model)
    for name, param in model.named_parameters():
        if "lora_A" in name:
            param.ds_id = 7
            break
    with pytest.raises(OptionError, match=r"sharded .* not supported"):
        check_model(model)


def test_spectral_callback_refuses_a_model_wrapped_in_fsdp_1(tiny_causal_lm, tmp_path):
    """FSDP 1, which accelerate launch gives with the FSDP config docs/finetune.md describes:
    the Trainer hands callbacks the FullyShardedDataParallel wrapper, whose LoRA parameters are
    plain ones (slices of a flat parameter; use_orig_params keeps their names) and whose state
    dict is a collective. Refused in one line, as ZeRO-3 and FSDP 2 are; it passed, and the main
    process went on to read the state dict alone. One gloo process on CPU, FSDP 1's own
    wrapper."""
    import peft
    import torch
    import torch.distributed as dist
    import transformers
    from torch.distributed.fsdp import FullyShardedDataParallel

    from esdtool.errors import OptionError
    from esdtool.training.spectral import check_model

    base = transformers.AutoModelForCausalLM.from_pretrained(tiny_causal_lm)
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["q_proj"]))
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0,
                            world_size=1)  # fmt: skip
    try:
        wrapped = FullyShardedDataParallel(
            model, use_orig_params=True, device_id=torch.device("cpu")
        )
        assert any("lora_A" in name for name, _ in wrapped.named_parameters())
        with pytest.raises(OptionError) as caught:
            check_model(wrapped)
    finally:
        dist.destroy_process_group()
    message = str(caught.value)
    assert "sharded (the model is wrapped in FullyShardedDataParallel)" in message, message
    assert "\n" not in message


@pytest.mark.slow
def test_callback_in_a_plain_trainer_from_zero_to_the_saved_adapter(tiny_causal_lm, tmp_path):
    """SpectralCallback in a user's own transformers Trainer (not esdtool finetune): at step 0
    the zero-initialised B uses no rank (every row 'zero'); at the last step its rows equal
    ``esdtool analyze`` of the adapter saved at that step, column for column; attached with
    attach(), its scalars reach TensorBoard; spectra_trajectory.parquet holds steps 0, 3, 5."""
    import peft
    import torch
    import transformers

    from esdtool import SpectralCallback, analyze

    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_causal_lm)
    base = transformers.AutoModelForCausalLM.from_pretrained(tiny_causal_lm)
    model = peft.get_peft_model(
        base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"])
    )
    texts = [r["prompt"] + r["completion"] for r in ARITHMETIC]
    encoded = [tokenizer(t)["input_ids"] for t in texts]
    dataset = [{"input_ids": torch.tensor(ids), "labels": torch.tensor(ids)} for ids in encoded]
    out = tmp_path / "trainer"
    args = transformers.TrainingArguments(
        output_dir=str(out), max_steps=5, per_device_train_batch_size=1, learning_rate=1e-2,
        logging_steps=1, report_to="tensorboard", save_strategy="no", disable_tqdm=True,
    )  # fmt: skip
    trainer = transformers.Trainer(model=model, args=args, train_dataset=dataset)
    callback = SpectralCallback(every=3).attach(trainer)
    trainer.train()

    steps = [step for step, _ in callback.trajectory]
    assert steps == [0, 3, 5]
    first = callback.trajectory[0][1]
    updates = first[first.lora_rank.notna()]
    assert len(updates) == 6 and set(updates.status) == {"zero"}
    assert (updates.effective_rank.fillna(0) == 0).all()

    model.save_pretrained(tmp_path / "adapter")
    saved = analyze(tmp_path / "adapter").table
    last = callback.trajectory[-1][1]
    columns = [c for c in saved.columns if c not in ("seconds", "shard", "name")]
    mine = last[columns].sort_values("module").reset_index(drop=True)
    theirs = saved[columns].sort_values("module").reset_index(drop=True)
    pd.testing.assert_frame_equal(mine, theirs)

    scalars = _scalars(out)
    assert [s for s, _ in scalars["train/spectral/rank_used"]] == [3, 5]
    assert scalars["train/spectral/rank_used"][-1][1] == pytest.approx(
        float(saved.effective_rank.sum())
    )
    from esdtool import load_trajectory

    trajectory = load_trajectory(out / "spectra_trajectory.parquet")
    assert sorted(set(trajectory.step)) == [0, 3, 5]


def test_trajectory_spans_the_steps_a_run_trained_resumed_or_stopped_early(tiny_causal_lm,
                                                                           tmp_path):  # fmt: skip
    """The trajectory brackets what was trained: a run stopped early at step 2 of 4 (as
    EarlyStoppingCallback stops it) ends with step 2, the adapter it leaves, equal to analyze of
    that adapter saved; a run resumed from checkpoint-2 starts at step 2, from the checkpoint's
    weights (equal to analyze of checkpoint-2), not at its first step after it."""
    import peft
    import torch
    import transformers

    from esdtool import SpectralCallback, analyze, load_trajectory

    class StopAt2(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 2:
                control.should_training_stop = True

    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_causal_lm)
    ids = [tokenizer(r["prompt"] + r["completion"])["input_ids"] for r in ARITHMETIC]
    dataset = [{"input_ids": torch.tensor(i), "labels": torch.tensor(i)} for i in ids]

    def trainer(out, callbacks, **options):
        base = transformers.AutoModelForCausalLM.from_pretrained(tiny_causal_lm)
        model = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["q_proj"]))
        args = transformers.TrainingArguments(
            output_dir=str(out), max_steps=4, per_device_train_batch_size=1, learning_rate=1e-2,
            report_to="none", disable_tqdm=True, **options,
        )  # fmt: skip
        return transformers.Trainer(model=model, args=args, train_dataset=dataset,
                                    callbacks=callbacks)  # fmt: skip

    def same(table, saved):
        columns = ["module", "status", "effective_rank", "lambda_max", "stable_rank"]
        mine = table[columns].sort_values("module").reset_index(drop=True)
        theirs = saved[columns].sort_values("module").reset_index(drop=True)
        pd.testing.assert_frame_equal(mine, theirs)

    stopped = SpectralCallback(every=3)
    run = trainer(tmp_path / "stopped", [StopAt2(), stopped], save_strategy="no")
    run.train()
    assert run.state.global_step == 2
    assert [step for step, _ in stopped.trajectory] == [0, 2]
    run.model.save_pretrained(tmp_path / "at-2")
    same(stopped.trajectory[-1][1], analyze(tmp_path / "at-2").table)
    assert sorted(set(load_trajectory(stopped.output).step)) == [0, 2]

    out = tmp_path / "resumed"
    trainer(out, [StopAt2()], save_strategy="steps", save_steps=2).train()
    resumed = SpectralCallback(every=3)
    trainer(out, [resumed], save_strategy="no").train(
        resume_from_checkpoint=str(out / "checkpoint-2")
    )
    assert [step for step, _ in resumed.trajectory] == [2, 3, 4]
    same(resumed.trajectory[0][1], analyze(out / "checkpoint-2").table)


def test_a_callback_passed_and_attached_is_called_once(tiny_causal_lm, tmp_path):
    """callbacks=[monitor] and then monitor.attach(trainer), as a user following both halves of
    the docs does: the trainer holds each callback once, first. Held twice, the second on_log
    read the CPU share over the microseconds since the first and logged 0.0 at every step."""
    import peft
    import torch
    import transformers

    from esdtool import SpectralCallback, SystemMonitorCallback

    cpu = []

    class Seen(transformers.TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if "loss" in logs:
                cpu.append(logs["system/cpu_percent"])

    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_causal_lm)
    ids = [tokenizer(r["prompt"] + r["completion"])["input_ids"] for r in ARITHMETIC]
    base = transformers.AutoModelForCausalLM.from_pretrained(tiny_causal_lm)
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["q_proj"]))
    monitor, spectral = SystemMonitorCallback(), SpectralCallback(every=5)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, logging_steps=1,
        report_to="none", save_strategy="no", disable_tqdm=True,
    )  # fmt: skip
    trainer = transformers.Trainer(
        model=model, args=args, callbacks=[monitor, spectral, Seen()],
        train_dataset=[{"input_ids": torch.tensor(i), "labels": torch.tensor(i)} for i in ids],
    )  # fmt: skip
    spectral.attach(trainer)
    monitor.attach(trainer)
    held = trainer.callback_handler.callbacks
    assert held[:2] == [monitor, spectral]
    assert sum(c is monitor for c in held) == sum(c is spectral for c in held) == 1
    trainer.train()
    assert len(cpu) == 2 and all(v > 0 for v in cpu), cpu


def test_settings_of_the_wrong_type_are_one_line_each():
    """Library callers pass anything: None where an integer goes (transformers reads a None
    save_total_limit as keep-all; here it is refused, not a raw TypeError), a string rate."""
    from esdtool.errors import OptionError
    from esdtool.training import FinetuneSettings

    with pytest.raises(OptionError) as caught:
        FinetuneSettings(save_total_limit=None, lr="1e-4", max_steps=True)
    text = str(caught.value)
    assert "save_total_limit must be an integer, not None" in text
    assert "lr must be a number, not '1e-4'" in text and "max_steps must be an integer" in text


def test_a_rerun_without_spectra_drops_the_earlier_runs_trajectory(tiny_causal_lm, plan,
                                                                   tmp_path, capsys):  # fmt: skip
    """A run directory reused without --spectral-every: the earlier run's
    spectra_trajectory.parquet is removed, never left to pass for this run's; a trajectory
    that cannot be written costs the run nothing but the file (the adapter is saved, the
    summary says why)."""
    data = write_jsonl(tmp_path / "train.jsonl", ARITHMETIC)
    out = tmp_path / "run"
    finetune_json(
        capsys, tiny_causal_lm, plan, data, out, "--max-steps", "2", "--spectral-every", "1"
    )
    assert (out / "spectra_trajectory.parquet").is_file()
    finetune_json(capsys, tiny_causal_lm, plan, data, out, "--max-steps", "2")
    assert not (out / "spectra_trajectory.parquet").exists()

    (out / "adapter_model.safetensors").unlink()
    (out / "spectra_trajectory.parquet").mkdir()  # a directory where the file would go
    result = finetune_json(capsys, tiny_causal_lm, plan, data, out, "--max-steps", "1",
                       "--spectral-every", "1")  # fmt: skip
    assert (out / "adapter_model.safetensors").is_file() and result["trajectory"] is None
    assert "spectra_trajectory.parquet: not written" in result["analysis_error"]
