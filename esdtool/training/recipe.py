"""``finetune``: train LoRA adapters with an esdtool plan (the CLI's twin), thin over
transformers + PEFT + TRL.

A short recipe after a validated config (:func:`esdtool.training.config.prepare` checks every
input first and lists every problem): **setup** loads the model from safetensors only and
applies the plan with ``peft.get_peft_model``, checked again on the loaded model; **train** is
TRL's SFTTrainer, so the same call runs as one process or under ``accelerate launch`` /
``torchrun`` (DDP through the Trainer); **save** writes the adapter and a run record (only the
main process writes files); **read back** analyses the saved adapter (every process shares the
work, as ``esdtool analyze`` does under torchrun) into adapter_metrics.parquet and
adapter_report.html, so the run says how much of the planned rank the training used.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from esdtool.errors import EsdtoolError, ModelLoadError, OptionError, PlanMismatchError
from esdtool.io.trajectory import TRAJECTORY_NAME
from esdtool.plan.peft_config import PLAN_RECORD
from esdtool.plan.verify import adapted_modules, apply_plan, plan_problems, raise_problems
from esdtool.training.config import FACTORS_RECORD, FinetuneSettings, Prepared, prepare
from esdtool.training.groups import param_groups
from esdtool.version import __version__

__all__ = ["FinetuneResult", "FinetuneSettings", "finetune"]

RUN_RECORD = "esdtool_run.json"
ADAPTER_METRICS = "adapter_metrics.parquet"
ADAPTER_REPORT = "adapter_report.html"


@dataclass(frozen=True)
class FinetuneResult:
    """What a run did: steps, losses, parameters, ranks, where the adapter went.

    rank_use: (modules, planned rank, used rank) of the saved adapter: the sum of the adapted
    modules' r and of their updates' effective ranks (adapter_metrics.parquet has each one).
    analysis_error: why the saved adapter could not be analysed (the adapter is saved anyway).
    system: what the run cost (:class:`~esdtool.training.monitor.SystemSummary` as a dict:
    wall time, peak memory, mean tokens/s and samples/s, mean GPU utilisation where a GPU is).
    trajectory: spectra_trajectory.parquet, with --spectral-every.
    """

    output_dir: Path
    data_format: str
    ranks: dict[str, int]
    trainable_params: int
    total_params: int
    steps: int = 0
    first_loss: float | None = None
    final_loss: float | None = None
    eval_loss: float | None = None
    test_loss: float | None = None
    losses: list[tuple[int, float]] = field(default_factory=list)
    dry_run: bool = False
    adapter_metrics: Path | None = None
    rank_use: tuple[int, int, int] | None = None
    analysis_error: str | None = None
    system: dict[str, Any] | None = None
    trajectory: Path | None = None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["output_dir"] = str(self.output_dir)
        for key in ("adapter_metrics", "trajectory"):
            if data[key] is not None:
                data[key] = str(data[key])
        return data


def finetune(
    model: str | os.PathLike[str],
    adapter_config: str | os.PathLike[str],
    data: str | os.PathLike[str],
    output_dir: str | os.PathLike[str],
    settings: FinetuneSettings | None = None,
    *,
    eval_data: str | os.PathLike[str] | None = None,
    test_data: str | os.PathLike[str] | None = None,
    revision: str | None = None,
    token: str | None = None,
    resume_from_checkpoint: str | bool | None = None,
    dry_run: bool = False,
    progress: bool = True,
    callbacks: list[Any] | None = None,
    adapter_report: bool = True,
    lr_plan: str | os.PathLike[str] | None = None,
    wd_plan: str | os.PathLike[str] | None = None,
) -> FinetuneResult:
    """Train the adapters planned in ``adapter_config`` (a directory holding
    adapter_config.json) on ``model`` with ``data``; save them to ``output_dir``.

    Everything that can be checked is checked before the weights load, and every problem is
    listed at once (:func:`~esdtool.training.config.prepare`). ``dry_run`` stops after the plan
    is applied to the loaded model. ``progress`` False: no progress bars and no loss lines on
    stdout (the CLI's --quiet/--json). ``adapter_report`` False: the saved adapter is read back
    into adapter_metrics.parquet without drawing adapter_report.html (ablate's many runs).
    ``lr_plan`` / ``wd_plan``: plan directories of ``allocate --target lr`` / ``weight-decay``:
    each planned module's LoRA parameters train at ``settings.lr`` / ``settings.weight_decay``
    times its factor (AdamW parameter groups, :func:`esdtool.param_groups`; the scheduler
    scales them alike), recorded in esdtool_run.json and in every checkpoint, so a resume
    under other factors is refused.
    """
    settings = settings or FinetuneSettings()
    plan_dir, outdir = Path(adapter_config), Path(output_dir)
    run = prepare(
        model, plan_dir, data, outdir, settings, eval_data=eval_data, test_data=test_data,
        revision=revision, token=token, resume_from_checkpoint=resume_from_checkpoint,
        lr_plan=lr_plan, wd_plan=wd_plan,
    )  # fmt: skip
    if not progress:
        run.stack["datasets"].disable_progress_bars()
        run.stack["transformers"].utils.logging.disable_progress_bar()

    peft_model = _setup(run, settings, plan_dir, model)
    plans = [p for p in (lr_plan, wd_plan) if p is not None]
    if plans:  # the plans name this model's modules (a dry run says so before any step)
        param_groups(peft_model, plans, settings.lr, settings.weight_decay)
    ranks = {name: m.r["default"] for name, m in adapted_modules(peft_model).items()}
    trainable, total = (int(n) for n in peft_model.get_nb_trainable_parameters())
    result = FinetuneResult(outdir, run.data_format, ranks, trainable, total, dry_run=dry_run)
    if dry_run:
        return result

    from esdtool.training.monitor import SystemMonitorCallback
    from esdtool.training.spectral import SpectralCallback

    stale = outdir / TRAJECTORY_NAME  # an earlier run's spectra must not pass for this run's
    if stale.is_file() and (_is_main_process() and resume_from_checkpoint in (None, False)):
        stale.unlink()
    # The caller's own monitor, if it passed one, is the run's (a second would halve its CPU
    # readings); else finetune's.
    given = [c for c in callbacks or [] if isinstance(c, SystemMonitorCallback)]
    monitor = given[0] if given else SystemMonitorCallback()
    callbacks = [c for c in callbacks or [] if c is not monitor]
    watchers: list[Any] = [monitor]
    spectral = None
    if settings.spectral_every:
        spectral = SpectralCallback(settings.spectral_every, outdir)
        watchers.append(spectral)
    callbacks = [*(callbacks or []), _factors_callback()(run.factors)]
    trainer = _trainer(run, peft_model, outdir, settings, progress, callbacks, watchers)
    if getattr(run.config, "init_lora_weights", None) == "eva" and not resume_from_checkpoint:
        _eva(peft_model, trainer.get_train_dataloader(), run.config, progress)
        ranks = {name: m.r["default"] for name, m in adapted_modules(peft_model).items()}
        trainable, total = (int(n) for n in peft_model.get_nb_trainable_parameters())
    optimizer = None
    if plans:  # after EVA, which replaces the adapters' parameters; the Trainer keeps it
        import torch

        groups = param_groups(peft_model, plans, settings.lr, settings.weight_decay)
        optimizer = torch.optim.AdamW(groups, lr=settings.lr, weight_decay=settings.weight_decay)
        trainer.optimizer = optimizer
    try:
        trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    except ValueError as exc:  # torch: the checkpoint's optimizer has other parameter groups
        if resume_from_checkpoint and "parameter group" in str(exc):
            raise PlanMismatchError(
                f"{outdir}: the checkpoint's optimizer was built with other parameter groups "
                "(other --lr-plan / --wd-plan factors, or none)",
                hint="resume with the plans it was trained with, or start a new --output-dir",
            ) from exc
        raise
    trainer.save_model(str(outdir))  # adapter_config.json + adapter_model.safetensors + tokenizer
    eval_loss = None
    if run.evaluation is not None:  # the number to compare plans by, at the end of training
        eval_loss = float(trainer.evaluate()["eval_loss"])
    test_loss = None
    if run.test is not None:  # held out from every choice made on the eval data
        test_loss = float(trainer.evaluate(run.test, metric_key_prefix="test")["test_loss"])
    losses = [
        (int(entry["step"]), float(entry["loss"]))
        for entry in trainer.state.log_history
        if "loss" in entry
    ]
    trajectory = spectral.output if spectral is not None else None
    metrics, rank_use, error = _read_back(outdir, trajectory, adapter_report)
    if spectral is not None and spectral.error is not None:
        error = "; ".join(e for e in (error, spectral.error) if e)
    result = FinetuneResult(
        outdir, run.data_format, ranks, trainable, total,
        steps=int(trainer.state.global_step),
        first_loss=losses[0][1] if losses else None,
        final_loss=losses[-1][1] if losses else None,
        eval_loss=eval_loss,
        test_loss=test_loss,
        losses=losses,
        adapter_metrics=metrics, rank_use=rank_use, analysis_error=error,
        system=monitor.summary.to_dict() if monitor.summary is not None else None,
        trajectory=trajectory,
    )  # fmt: skip
    if trainer.is_world_process_zero():
        record = {
            "esdtool_version": __version__,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "model": os.fspath(model),
            "revision": revision,
            "adapter_config": os.fspath(adapter_config),
            "plan": _plan_record(plan_dir),
            "data": os.fspath(data),
            "eval_data": os.fspath(eval_data) if eval_data is not None else None,
            "test_data": os.fspath(test_data) if test_data is not None else None,
            "data_format": run.data_format,
            "settings": asdict(settings),
            "world_size": int(os.environ.get("WORLD_SIZE", "1")),
            "lr_plan": os.fspath(lr_plan) if lr_plan is not None else None,
            "wd_plan": os.fspath(wd_plan) if wd_plan is not None else None,
            "param_groups": _groups_record(optimizer),
            "result": {k: v for k, v in result.to_dict().items() if k != "losses"},
        }
        (outdir / RUN_RECORD).write_text(json.dumps(record, indent=2) + "\n")
    return result


class _EvaStalled(Exception):
    pass


def _eva(peft_model: Any, batches: Any, config: Any, progress: bool) -> None:
    """EVA: each module's A from the SVD of its inputs on the training batches, the ranks
    redistributed by explained variance (PEFT's own initialisation), before any step. PEFT
    cycles the batches until every module's components converge, forever when a batch holds
    fewer (unmasked) tokens than r x rho: bounded here, and said in one line."""
    from peft import initialize_lora_eva_weights
    from peft.tuners.lora.eva import forward_fn_dict

    limit = max(200, 20 * len(batches))
    calls = [0]

    def forward(model: Any, inputs: Any) -> Any:
        calls[0] += 1
        if calls[0] > limit:
            raise _EvaStalled
        return forward_fn_dict(model, inputs)

    try:
        initialize_lora_eva_weights(peft_model, batches, forward_fn=forward,
                                    show_progress_bar=progress)  # fmt: skip
    except _EvaStalled:
        eva = getattr(config, "eva_config", None)
        rho = getattr(eva, "rho", 2.0)
        raise OptionError(
            f"EVA initialisation did not converge in {limit} batches: a batch must hold more "
            f"(unmasked) tokens than r x rho (here up to {int(config.r * rho)}) for every "
            "module's SVD",
            hint="a larger --batch-size, longer records, or eva_config use_label_mask false "
            "(every token, not only the completions')",
        ) from None


def _is_main_process() -> bool:
    """Whether this process writes the run's files (rank 0 under torchrun, or alone)."""
    return int(os.environ.get("RANK", "0")) == 0


def _read_back(
    outdir: Path, trajectory: Path | None = None, page: bool = True
) -> tuple[Path | None, tuple[int, int, int] | None, str | None]:
    """Analyse the adapter just saved in ``outdir`` (every process takes a share): its table
    and its report there (with the spectra over training, when they were watched). A failure
    is returned as text, never raised: the trained adapter is already safe."""
    from esdtool.analysis import analyze
    from esdtool.render import report

    try:
        analysed = analyze(outdir, outdir / ADAPTER_METRICS, resume=False)
        if analysed.table is not None and page:  # the process that gathered every row (rank 0)
            report(analysed.table, outdir / ADAPTER_REPORT, trajectory=trajectory)
    except EsdtoolError as exc:
        return None, None, str(exc)
    return outdir / ADAPTER_METRICS, analysed.rank_use, None


def _setup(run: Prepared, settings: FinetuneSettings, plan_dir: Path, model: object) -> Any:
    """The base model loaded, seeded, with the plan's adapters applied and checked again."""
    base = _load_model(run.stack["transformers"], run.model_dir, settings)
    run.stack["transformers"].set_seed(settings.seed)  # the adapters' initial weights too
    peft_model = apply_plan(base, run.config)
    raise_problems(plan_problems(peft_model, plan_dir), plan_dir, model)
    return peft_model


def _load_model(transformers: Any, model_dir: Path, settings: FinetuneSettings) -> Any:
    import torch

    kwargs: dict[str, Any] = {"use_safetensors": True}  # never unpickle a checkpoint
    if settings.qlora:
        kwargs["quantization_config"] = transformers.BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16 if _use_bf16(settings) else torch.float16,
        )
        # One GPU per process under torchrun / accelerate (else every rank loads on cuda:0).
        kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", "0"))}
    elif _use_bf16(settings):
        kwargs["dtype"] = torch.bfloat16
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir), **kwargs)
    except Exception as exc:
        raise ModelLoadError(f"{model_dir}: cannot load as a causal LM ({exc})") from exc
    if settings.qlora:
        import peft

        model = peft.prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=settings.gradient_checkpointing
        )
    return model


def _use_bf16(settings: FinetuneSettings) -> bool:
    import torch

    if settings.bf16 is not None:
        return settings.bf16
    return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())


def _trainer(
    run: Prepared,
    model: Any,
    outdir: Path,
    settings: FinetuneSettings,
    progress: bool,
    callbacks: list[Any],
    watchers: list[Any],
) -> Any:
    """TRL's SFTTrainer for the run (loss on completions only when records have a prompt)."""
    trl = run.stack["trl"]
    evaluation, fmt = run.evaluation, run.data_format
    schedule = _schedule_args(trl.SFTConfig, settings)
    fields = getattr(trl.SFTConfig, "__dataclass_fields__", {})
    # transformers 5 renamed gradient_checkpointing (the old name warns on every run)
    checkpointing = "activation_checkpointing" if "activation_checkpointing" in fields else (
        "gradient_checkpointing")  # fmt: skip
    schedule[checkpointing] = settings.gradient_checkpointing
    import torch

    schedule["dataloader_pin_memory"] = torch.cuda.is_available()  # pinning needs a GPU
    args = trl.SFTConfig(
        output_dir=str(outdir),
        num_train_epochs=settings.epochs,
        max_steps=settings.max_steps,
        learning_rate=settings.lr,
        lr_scheduler_type=settings.lr_scheduler,
        weight_decay=settings.weight_decay,
        max_grad_norm=settings.max_grad_norm,
        per_device_train_batch_size=settings.batch_size,
        per_device_eval_batch_size=settings.batch_size,
        gradient_accumulation_steps=settings.grad_accum,
        max_length=settings.max_length,
        bf16=_use_bf16(settings),
        seed=settings.seed,
        data_seed=settings.seed,
        logging_steps=settings.logging_steps,
        logging_first_step=True,
        logging_nan_inf_filter=False,  # a NaN loss is logged as NaN, never as an earlier mean
        save_steps=settings.save_steps,
        save_total_limit=settings.save_total_limit,
        eval_strategy="steps" if evaluation is not None else "no",
        eval_steps=(settings.eval_steps or settings.save_steps) if evaluation is not None else None,
        report_to=list(settings.report_to) or "none",
        include_num_input_tokens_seen=_token_count_mode(),
        completion_only_loss=settings.completion_only_loss if fmt != "text" else None,
        dataset_text_field="text",
        packing=False,
        ddp_find_unused_parameters=False,
        **schedule,
    )
    # PEFT still asks transformers 5 for is_gradient_checkpointing: noise the user cannot act on
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated")
    trainer = trl.SFTTrainer(
        model=model,
        args=args,
        train_dataset=run.train,
        eval_dataset=evaluation,
        processing_class=run.tokenizer,
    )
    if not progress:
        from transformers.trainer_callback import PrinterCallback, ProgressCallback

        trainer.remove_callback(PrinterCallback)
        trainer.remove_callback(ProgressCallback)
    trainer.add_callback(_log_last_step_callback()())
    for callback in callbacks:
        trainer.add_callback(callback)
    from esdtool.training.monitor import put_first

    # esdtool's own watchers go first, so what they add to each log reaches the reporters.
    for watcher in reversed(watchers):
        put_first(trainer, watcher)
    return trainer


def _schedule_args(config: type, settings: FinetuneSettings) -> dict[str, Any]:
    """Warmup as this transformers takes it: ``warmup_ratio`` where the field exists (4.x),
    else a float ``warmup_steps`` below 1 is the ratio (5.x)."""
    fields = getattr(config, "__dataclass_fields__", {})
    if settings.warmup_ratio and "warmup_ratio" in fields:
        return {"warmup_ratio": settings.warmup_ratio, "warmup_steps": 0}
    return {"warmup_steps": settings.warmup_ratio or settings.warmup_steps}


def _token_count_mode() -> str | bool:
    """Count input tokens without padding where transformers can (4.57 on), else all."""
    import transformers
    from packaging.version import Version

    return "non_padding" if Version(transformers.__version__) >= Version("4.57") else True


def _groups_record(optimizer: Any) -> list[dict[str, Any]] | None:
    """What each parameter group of a planned optimizer holds: module, lr, weight decay and
    parameter count (None: the Trainer's own optimizer)."""
    if optimizer is None:
        return None
    return [
        {"module": g.get("module"), "lr": g.get("initial_lr", g["lr"]),
         "weight_decay": g["weight_decay"], "parameters": sum(p.numel() for p in g["params"])}
        for g in optimizer.param_groups
    ]  # fmt: skip


def _factors_callback() -> type:
    from transformers import TrainerCallback

    class SaveFactors(TrainerCallback):
        """Write the lr / weight-decay factors beside each checkpoint's optimizer state, so
        resuming under other factors is refused before the state is loaded."""

        def __init__(self, factors: dict[str, dict[str, float]]) -> None:
            self.factors = factors

        def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
            where = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if state.is_world_process_zero and where.is_dir():
                (where / FACTORS_RECORD).write_text(json.dumps(self.factors) + "\n")
            return control

    return SaveFactors


def _log_last_step_callback() -> type:
    from transformers import TrainerCallback

    class LogLastStep(TrainerCallback):
        """Log the loss at the last step too, so the final loss is the last step's, not the
        last multiple of --logging-steps (with 2 steps and logging every 10 the "final" loss
        was the first step's)."""

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
            if state.global_step >= state.max_steps:
                control.should_log = True
            return control

    return LogLastStep


def _plan_record(plan_dir: Path) -> Any:
    """What allocate recorded about the plan (metrics table, source, settings), if it did."""
    try:
        return json.loads((plan_dir / PLAN_RECORD).read_text())
    except (OSError, ValueError):
        return None
