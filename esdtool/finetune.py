"""``finetune``: train LoRA adapters with an esdtool plan (the CLI's twin), thin over
transformers + PEFT + TRL.

The model is loaded from safetensors only, the plan (an ``allocate`` output directory) is applied
with ``peft.get_peft_model`` and checked before any training: every module the plan names must
exist in the model and get exactly its planned rank. Training is TRL's SFTTrainer, so the same
call runs as one process or under ``accelerate launch`` / ``torchrun`` (DDP through the Trainer;
only the main process writes files).
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from esdtool import __version__
from esdtool.errors import EsdtoolError, SettingsError
from esdtool.peft_config import CONFIG_NAME, PLAN_RECORD
from esdtool.source import TOKENIZER_PATTERNS, resolve_source

RUN_RECORD = "esdtool_run.json"


class PlanNotApplicableError(EsdtoolError):
    """The adapter config does not fit the model (modules it names are missing)."""


@dataclass(frozen=True)
class FinetuneSettings:
    """Training options. ``bf16`` None: on where the GPU supports it. ``use_dora`` /
    ``use_rslora`` None: as the adapter config says."""

    epochs: float = 1.0
    max_steps: int = -1
    lr: float = 2e-4
    batch_size: int = 4
    grad_accum: int = 1
    max_length: int = 1024
    bf16: bool | None = None
    gradient_checkpointing: bool = False
    qlora: bool = False
    use_dora: bool | None = None
    use_rslora: bool | None = None
    seed: int = 42
    logging_steps: int = 10
    save_steps: int = 500
    completion_only_loss: bool = True

    def __post_init__(self) -> None:
        checks = [
            (self.epochs > 0, f"--epochs must be > 0, got {self.epochs}"),
            (self.max_steps == -1 or self.max_steps > 0, "--max-steps must be > 0"),
            (0 < self.lr < 1, f"--lr must be in (0, 1), got {self.lr}"),
            (self.batch_size >= 1, "--batch-size must be at least 1"),
            (self.grad_accum >= 1, "--grad-accum must be at least 1"),
            (self.max_length >= 8, "--max-length must be at least 8"),
            (self.logging_steps >= 1, "logging steps must be at least 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise SettingsError(message)


@dataclass(frozen=True)
class FinetuneResult:
    """What a run did: steps, losses, parameters, ranks, where the adapter went."""

    output_dir: Path
    data_format: str
    ranks: dict[str, int]
    trainable_params: int
    total_params: int
    steps: int = 0
    first_loss: float | None = None
    final_loss: float | None = None
    eval_loss: float | None = None
    losses: list[tuple[int, float]] = field(default_factory=list)
    dry_run: bool = False

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["output_dir"] = str(self.output_dir)
        return data


def finetune(
    model: str | os.PathLike[str],
    adapter_config: str | os.PathLike[str],
    data: str | os.PathLike[str],
    output_dir: str | os.PathLike[str],
    settings: FinetuneSettings | None = None,
    *,
    eval_data: str | os.PathLike[str] | None = None,
    revision: str | None = None,
    token: str | None = None,
    resume_from_checkpoint: str | bool | None = None,
    dry_run: bool = False,
    progress: bool = True,
    callbacks: list[Any] | None = None,
) -> FinetuneResult:
    """Train the adapters planned in ``adapter_config`` (a directory holding
    adapter_config.json) on ``model`` with ``data``; save them to ``output_dir``.

    Everything that can be checked is checked before training: the extra is installed, --qlora
    has CUDA, the data fits a format, the plan's modules exist. ``dry_run`` stops there.
    ``progress`` False: no progress bars and no loss lines on stdout (the CLI's --quiet/--json).
    """
    settings = settings or FinetuneSettings()
    stack = _import_stack()
    if settings.qlora:
        _check_qlora()
    config = _load_plan(stack["peft"], Path(adapter_config), settings)

    from esdtool.data import load_training_data

    if not progress:
        import datasets
        import transformers

        datasets.disable_progress_bars()
        transformers.utils.logging.disable_progress_bar()

    train, fmt = load_training_data(data)
    evaluation = load_training_data(eval_data)[0] if eval_data is not None else None
    model_dir = resolve_source(model, revision, token, also=TOKENIZER_PATTERNS).files[0].parent
    tokenizer = _load_tokenizer(stack["transformers"], model_dir)
    if fmt == "messages" and not getattr(tokenizer, "chat_template", None):
        raise SettingsError(
            f"{data}: messages records need a chat template, and {model}'s tokenizer has none",
            hint="use prompt/completion records, or a model with a chat template",
        )

    if resume_from_checkpoint is True and _last_checkpoint(Path(output_dir)) is None:
        raise SettingsError(
            f"{output_dir}: no checkpoint-* directory to resume from",
            hint="drop --resume-from-checkpoint, or pass the output dir of an earlier run",
        )
    base = _load_model(stack["transformers"], model_dir, settings)
    stack["transformers"].set_seed(settings.seed)  # the adapters' initial weights too
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        try:
            peft_model = stack["peft"].get_peft_model(base, config)
        except ValueError as exc:  # PEFT: "Target modules ... not found in the base model"
            raise PlanNotApplicableError(
                f"{Path(adapter_config) / CONFIG_NAME}: does not fit {model}: "
                + ("none of its target_modules exist in the model" if "not found" in str(exc)
                   else str(exc)),
                hint="re-run esdtool allocate on a metrics table of this model",
            ) from exc  # fmt: skip
    ranks = _check_applied(peft_model, config, Path(adapter_config), model)
    _check_shapes(peft_model, Path(adapter_config), model)
    trainable, total = peft_model.get_nb_trainable_parameters()
    outdir = Path(output_dir)
    result = FinetuneResult(outdir, fmt, ranks, int(trainable), int(total), dry_run=dry_run)
    if dry_run:
        return result

    trainer = _trainer(stack, peft_model, tokenizer, train, evaluation, outdir, settings, fmt)
    if not progress:
        from transformers.trainer_callback import PrinterCallback, ProgressCallback

        trainer.remove_callback(PrinterCallback)
        trainer.remove_callback(ProgressCallback)
    for callback in callbacks or []:
        trainer.add_callback(callback)
    trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    trainer.save_model(str(outdir))  # adapter_config.json + adapter_model.safetensors + tokenizer
    eval_loss = None
    if evaluation is not None:  # the number to compare plans by, at the end of training
        eval_loss = float(trainer.evaluate()["eval_loss"])
    losses = [
        (int(entry["step"]), float(entry["loss"]))
        for entry in trainer.state.log_history
        if "loss" in entry
    ]
    result = FinetuneResult(
        outdir,
        fmt,
        ranks,
        int(trainable),
        int(total),
        steps=int(trainer.state.global_step),
        first_loss=losses[0][1] if losses else None,
        final_loss=losses[-1][1] if losses else None,
        eval_loss=eval_loss,
        losses=losses,
    )
    if trainer.is_world_process_zero():
        record = {
            "esdtool_version": __version__,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "model": os.fspath(model),
            "revision": revision,
            "adapter_config": os.fspath(adapter_config),
            "plan": _plan_record(Path(adapter_config)),
            "data": os.fspath(data),
            "eval_data": os.fspath(eval_data) if eval_data is not None else None,
            "data_format": fmt,
            "settings": asdict(settings),
            "world_size": int(os.environ.get("WORLD_SIZE", "1")),
            "result": {k: v for k, v in result.to_dict().items() if k != "losses"},
        }
        (outdir / RUN_RECORD).write_text(json.dumps(record, indent=2) + "\n")
    return result


def _import_stack() -> dict[str, Any]:
    try:
        import datasets  # noqa: F401
        import peft
        import transformers
        import trl
    except ImportError as exc:
        raise SettingsError(
            f"finetune needs transformers, peft, trl, accelerate and datasets "
            f"({exc.name} is missing)",
            hint="pip install 'esdtool[finetune]', or pip install -e '.[finetune]' in a clone",
        ) from exc
    return {"peft": peft, "transformers": transformers, "trl": trl}


def _check_qlora() -> None:
    import torch

    if not torch.cuda.is_available():
        raise SettingsError(
            "--qlora needs a CUDA GPU (4-bit NF4 through bitsandbytes), and none is present",
            hint="drop --qlora to train in full precision on this machine",
        )
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as exc:
        raise SettingsError("--qlora needs bitsandbytes", hint="pip install bitsandbytes") from exc


def _load_plan(peft: Any, plan_dir: Path, settings: FinetuneSettings) -> Any:
    if not (plan_dir / CONFIG_NAME).is_file():
        raise SettingsError(
            f"{plan_dir}: no {CONFIG_NAME} here",
            hint="pass the directory esdtool allocate wrote (-o OUTDIR)",
        )
    try:
        config = peft.LoraConfig.from_pretrained(str(plan_dir))
    except Exception as exc:  # a hand-edited or foreign file
        raise SettingsError(f"{plan_dir / CONFIG_NAME}: not a LoRA config ({exc})") from exc
    task = config.task_type
    if task not in (None, "CAUSAL_LM"):
        raise SettingsError(
            f"{plan_dir / CONFIG_NAME}: task_type {task}; finetune trains causal LMs",
            hint="re-run esdtool allocate with --task-type CAUSAL_LM",
        )
    config.task_type = "CAUSAL_LM"
    config.inference_mode = False
    if settings.use_dora is not None:
        config.use_dora = settings.use_dora
    if settings.use_rslora is not None:
        config.use_rslora = settings.use_rslora
    return config


def _load_tokenizer(transformers: Any, model_dir: Path) -> Any:
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(model_dir))
    except Exception as exc:
        raise SettingsError(f"{model_dir}: cannot load its tokenizer ({exc})") from exc
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


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
        raise SettingsError(f"{model_dir}: cannot load as a causal LM ({exc})") from exc
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


def _check_applied(peft_model: Any, config: Any, plan_dir: Path, model: object) -> dict[str, int]:
    """Each rank_pattern key must match exactly one adapted module, with its rank."""
    from esdtool.verify import adapted_modules, matches_key

    adapted = {name: module.r["default"] for name, module in adapted_modules(peft_model).items()}
    missing = []
    for key, rank in (config.rank_pattern or {}).items():
        hits = [n for n in adapted if matches_key(key, n)]
        if not hits:
            missing.append(key.removeprefix("^").replace("\\", ""))
        elif any(adapted[n] != rank for n in hits):
            raise PlanNotApplicableError(f"{plan_dir / CONFIG_NAME}: {key}: rank not applied")
    if missing:
        shown = ", ".join(missing[:5]) + (
            f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        )
        raise PlanNotApplicableError(
            f"{plan_dir / CONFIG_NAME}: {len(missing)} planned module(s) not in {model}: {shown}",
            hint="re-run esdtool allocate on a metrics table of this model",
        )
    return adapted


def _last_checkpoint(outdir: Path) -> Path | None:
    from transformers.trainer_utils import get_last_checkpoint

    found = get_last_checkpoint(str(outdir)) if outdir.is_dir() else None
    return Path(found) if found else None


def _check_shapes(peft_model: Any, plan_dir: Path, model: object) -> None:
    """The plan must be for this model, not just for one with the same module names: each
    planned module's weight must have the shape allocation.csv recorded (rows x cols)."""
    import pandas as pd

    csv = plan_dir / "allocation.csv"
    if not csv.is_file():
        return  # a hand-written config: names were checked, shapes cannot be
    plan = pd.read_csv(csv)
    plan = plan[plan.selected]
    modules = dict(peft_model.base_model.model.named_modules())
    wrong = []
    for row in plan.itertuples():
        layer = modules.get(row.module)
        layer = getattr(layer, "base_layer", layer)
        if hasattr(layer, "in_features") and hasattr(layer, "out_features"):
            shape = (layer.out_features, layer.in_features)  # also right for 4-bit packed weights
        else:
            shape = tuple(getattr(getattr(layer, "weight", None), "shape", ()))  # e.g. Conv1D
        if len(shape) == 2 and sorted(shape) != sorted((row.rows, row.cols)):
            wrong.append(f"{row.module} is {shape[0]}x{shape[1]}, planned {row.rows}x{row.cols}")
    if wrong:
        raise PlanNotApplicableError(
            f"{csv}: planned for another model than {model}: {wrong[0]}"
            + (f" (and {len(wrong) - 1} more)" if len(wrong) > 1 else ""),
            hint="re-run esdtool analyze and allocate on this model",
        )


def _trainer(
    stack: dict[str, Any],
    model: Any,
    tokenizer: Any,
    train: Any,
    evaluation: Any,
    outdir: Path,
    settings: FinetuneSettings,
    fmt: str,
) -> Any:
    trl = stack["trl"]
    args = trl.SFTConfig(
        output_dir=str(outdir),
        num_train_epochs=settings.epochs,
        max_steps=settings.max_steps,
        learning_rate=settings.lr,
        per_device_train_batch_size=settings.batch_size,
        per_device_eval_batch_size=settings.batch_size,
        gradient_accumulation_steps=settings.grad_accum,
        max_length=settings.max_length,
        bf16=_use_bf16(settings),
        gradient_checkpointing=settings.gradient_checkpointing,
        seed=settings.seed,
        data_seed=settings.seed,
        logging_steps=settings.logging_steps,
        logging_first_step=True,
        save_steps=settings.save_steps,
        save_total_limit=2,
        eval_strategy="steps" if evaluation is not None else "no",
        eval_steps=settings.save_steps if evaluation is not None else None,
        report_to="none",
        completion_only_loss=settings.completion_only_loss if fmt != "text" else None,
        dataset_text_field="text",
        packing=False,
        ddp_find_unused_parameters=False,
    )
    return trl.SFTTrainer(
        model=model,
        args=args,
        train_dataset=train,
        eval_dataset=evaluation,
        processing_class=tokenizer,
    )


def _plan_record(plan_dir: Path) -> Any:
    """What allocate recorded about the plan (metrics table, source, settings), if it did."""
    try:
        return json.loads((plan_dir / PLAN_RECORD).read_text())
    except (OSError, ValueError):
        return None
