"""What a fine-tuning run needs, validated all at once before anything heavy loads.

:class:`FinetuneSettings` checks its own values and lists every bad one. :func:`prepare` then
checks everything else that can be checked cheaply: the extra is installed, --qlora has CUDA,
the plan directory holds a LoRA config, the data (and eval data) fit a format, the model and its
tokenizer resolve, a checkpoint exists to resume from, and the plan fits the model (PEFT on the
meta device, :func:`esdtool.plan.verify.verify_plan`). Every problem found is reported in one
error; the recipe (:mod:`esdtool.training.recipe`) starts only from a clean :class:`Prepared`.
"""

from __future__ import annotations

import importlib
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from esdtool.errors import (
    DataFormatError,
    EsdtoolError,
    MissingExtraError,
    ModelLoadError,
    OptionError,
    OutputError,
    PlanMismatchError,
    listed,
)
from esdtool.extras import require
from esdtool.io.atomic import check_output_dir
from esdtool.io.source import TOKENIZER_PATTERNS, resolve_source
from esdtool.plan.module_plan import load_factors
from esdtool.plan.peft_config import CONFIG_NAME
from esdtool.plan.verify import raise_problems, read_plan, verify_plan
from esdtool.training.bounded import bound_records
from esdtool.training.data import load_training_data
from esdtool.untrusted import read_json_file

# Learning-rate schedules finetune offers: transformers' ``SchedulerType`` names that need no
# scheduler arguments beyond warmup (cosine_with_min_lr, warmup_stable_decay and
# reduce_lr_on_plateau need settings or an evaluation loop of their own).
SCHEDULERS = (
    "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
    "inverse_sqrt",
)  # fmt: skip
# The learning rate transformers' polynomial schedule decays to (its lr_end default): --lr
# must lie above it, or the scheduler refuses to start once the model is loaded.
POLYNOMIAL_LR_END = 1e-7
# Where logs go (transformers' reporting integrations), with the package each one needs and the
# esdtool extra that installs it.
REPORTERS = {
    "tensorboard": ("tensorboard", "tensorboard"),
    "wandb": ("wandb", "wandb"),
    "mlflow": ("mlflow", "mlflow"),
}


@dataclass(frozen=True)
class FinetuneSettings:
    """Training options, with the meaning TRL's ``SFTConfig`` gives them. ``bf16`` None: on
    where the GPU supports it. ``use_dora`` / ``use_rslora`` None: as the adapter config says.

    warmup_steps / warmup_ratio: a linear warmup from 0 to ``lr`` over that many optimizer
    steps, or that share of them (one or the other). lr_scheduler: one of :data:`SCHEDULERS`.
    weight_decay: AdamW's decoupled weight decay. max_grad_norm: gradient clipping (0: none).
    eval_steps: evaluate on the eval data every N steps (None: every ``save_steps``).
    save_total_limit: checkpoints kept (the oldest go first). report_to: transformers'
    integrations the logs go to (``tensorboard``, ``wandb``, ``mlflow``; empty: none).
    spectral_every: every N steps, the adapter's spectra (:class:`SpectralCallback`; 0: off).
    """

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
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    lr_scheduler: str = "linear"
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    eval_steps: int | None = None
    save_total_limit: int = 2
    report_to: tuple[str, ...] = ()
    spectral_every: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.report_to, str):  # "tensorboard" or "tensorboard,wandb"
            names = [n.strip() for n in self.report_to.split(",") if n.strip()]
            object.__setattr__(self, "report_to", tuple(names))
        else:
            object.__setattr__(self, "report_to", tuple(self.report_to or ()))
        if set(self.report_to) == {"none"}:
            object.__setattr__(self, "report_to", ())
        unknown = [n for n in self.report_to if n not in REPORTERS and n != "none"]
        mistyped = _mistyped(self)
        if mistyped:  # the range checks below would fail on them with a raw TypeError
            raise OptionError("; ".join(mistyped))
        checks = [
            (math.isfinite(self.epochs) and self.epochs > 0,
             f"--epochs must be a finite number > 0, not {self.epochs}"),
            (self.max_steps == -1 or self.max_steps > 0,
             f"--max-steps must be > 0 (or -1: use --epochs), not {self.max_steps}"),
            (math.isfinite(self.lr) and 0 < self.lr < 1, f"--lr must lie in (0, 1), not {self.lr}"),
            (self.batch_size >= 1, f"--batch-size must be at least 1, not {self.batch_size}"),
            (self.grad_accum >= 1, f"--grad-accum must be at least 1, not {self.grad_accum}"),
            (self.max_length >= 8, f"--max-length must be at least 8, not {self.max_length}"),
            (0 <= self.seed < 2**32, f"--seed must lie in [0, 2^32), not {self.seed}"),
            (self.logging_steps >= 1,
             f"--logging-steps must be at least 1, not {self.logging_steps}"),
            (self.save_steps >= 1, f"--save-steps must be at least 1, not {self.save_steps}"),
            (self.warmup_steps >= 0, f"--warmup-steps must be >= 0, not {self.warmup_steps}"),
            (math.isfinite(self.warmup_ratio) and 0 <= self.warmup_ratio < 1,
             f"--warmup-ratio must lie in [0, 1), not {self.warmup_ratio}"),
            (not (self.warmup_steps and self.warmup_ratio),
             "--warmup-steps and --warmup-ratio both set: give one"),
            (self.max_steps == -1 or self.warmup_steps < self.max_steps,
             f"--warmup-steps {self.warmup_steps} is not below --max-steps {self.max_steps}: "
             "the learning rate would never reach --lr"),
            # transformers warms up over ceil(ratio x steps) steps
            (self.max_steps == -1 or not math.isfinite(self.warmup_ratio)
             or math.ceil(self.warmup_ratio * self.max_steps) < self.max_steps,
             f"--warmup-ratio {self.warmup_ratio} warms up over all --max-steps "
             f"{self.max_steps}: the learning rate would never reach --lr"),
            (self.lr_scheduler in SCHEDULERS,
             f"--lr-scheduler must be one of {', '.join(SCHEDULERS)}, not {self.lr_scheduler!r}"),
            (self.lr_scheduler != "constant" or not (self.warmup_steps or self.warmup_ratio),
             "--lr-scheduler constant has no warmup: use constant_with_warmup"),
            (self.lr_scheduler != "polynomial" or not 0 < self.lr <= POLYNOMIAL_LR_END,
             f"--lr-scheduler polynomial decays to {POLYNOMIAL_LR_END:g}: --lr must be above "
             f"it, not {self.lr:g}"),
            (math.isfinite(self.weight_decay) and self.weight_decay >= 0,
             f"--weight-decay must be a finite number >= 0, not {self.weight_decay}"),
            (math.isfinite(self.max_grad_norm) and self.max_grad_norm >= 0,
             f"--max-grad-norm must be a finite number >= 0 (0: no clipping), "
             f"not {self.max_grad_norm}"),
            (self.eval_steps is None or self.eval_steps >= 1,
             f"--eval-steps must be at least 1, not {self.eval_steps}"),
            (self.save_total_limit >= 1,
             f"--save-total-limit must be at least 1, not {self.save_total_limit}"),
            (not unknown,
             f"--report-to takes {', '.join(REPORTERS)} or none, not {', '.join(unknown)}"),
            ("none" not in self.report_to,
             f"--report-to none turns reporting off: it cannot go with "
             f"{', '.join(n for n in self.report_to if n != 'none')}"),
            (len(set(self.report_to)) == len(self.report_to),
             f"--report-to names one integration twice ({', '.join(self.report_to)})"),
            (self.spectral_every >= 0,
             f"--spectral-every must be >= 0 (0: off), not {self.spectral_every}"),
        ]  # fmt: skip
        problems = [message for ok, message in checks if not ok]
        if problems:
            raise OptionError("; ".join(problems))


_INTEGERS = ("max_steps", "batch_size", "grad_accum", "max_length", "seed", "logging_steps",
             "save_steps", "warmup_steps", "save_total_limit", "spectral_every")  # fmt: skip
_NUMBERS = ("epochs", "lr", "warmup_ratio", "weight_decay", "max_grad_norm")
_TEXT = ("lr_scheduler",)


def _mistyped(settings: FinetuneSettings) -> list[str]:
    """Library callers can pass anything: a field of the wrong type, one line each."""
    problems = []
    for name in (*_INTEGERS, "eval_steps"):
        value = getattr(settings, name)
        if name == "eval_steps" and value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            problems.append(f"{name} must be an integer, not {value!r}")
    for name in _NUMBERS:
        value = getattr(settings, name)
        if isinstance(value, bool) or not isinstance(value, int | float):
            problems.append(f"{name} must be a number, not {value!r}")
    for name in _TEXT:
        if not isinstance(getattr(settings, name), str):
            problems.append(f"{name} must be a string, not {getattr(settings, name)!r}")
    return problems


@dataclass(frozen=True)
class Prepared:
    """A run that passed every check: what the recipe trains with.

    stack:     the imported transformers / peft / trl / datasets modules.
    config:    the plan as a ``peft.LoraConfig`` (task type, DoRA / rsLoRA as asked).
    train, evaluation, test: TRL-shaped records (``evaluation`` / ``test`` None without
    eval or test data).
    data_format: the format the data was read as.
    model_dir: the local directory of the model (a hub snapshot for hub ids).
    tokenizer: the model's tokenizer, with a pad token.
    factors:   the lr / weight-decay plans' factors by target ("lr", "weight-decay"), module ->
               factor; empty without --lr-plan / --wd-plan.
    """

    stack: dict[str, Any]
    config: Any
    train: Any
    evaluation: Any
    data_format: str
    model_dir: Path
    tokenizer: Any
    test: Any = None
    factors: dict[str, dict[str, float]] = field(default_factory=dict)


def prepare(
    model: str | os.PathLike[str],
    plan_dir: Path,
    data: str | os.PathLike[str],
    output_dir: Path,
    settings: FinetuneSettings,
    *,
    eval_data: str | os.PathLike[str] | None = None,
    test_data: str | os.PathLike[str] | None = None,
    revision: str | None = None,
    token: str | None = None,
    resume_from_checkpoint: str | bool | None = None,
    lr_plan: str | os.PathLike[str] | None = None,
    wd_plan: str | os.PathLike[str] | None = None,
) -> Prepared:
    """Check every input of a run (see the module docstring); raise one error listing every
    problem, of the first problem's type."""
    stack = require("finetune")  # nothing below can be checked without the extra
    problems: list[EsdtoolError] = []

    def check(step: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return step(*args, **kwargs)
        except EsdtoolError as exc:
            problems.append(exc)
            return None

    check(_check_output_dir, output_dir, plan_dir, model)
    resolved = check(resolve_source, model, revision, token, also=TOKENIZER_PATTERNS)
    if resolved is not None:
        _check_causal_lm(model, resolved.config)  # the root cause: say it alone
    if settings.qlora:
        check(_check_qlora)
    config = check(_load_plan, stack["peft"], plan_dir, settings)
    loaded = check(load_training_data, data)
    evaluation = check(load_training_data, eval_data) if eval_data is not None else None
    test = check(load_training_data, test_data) if test_data is not None else None
    model_dir = resolved.files[0].parent if resolved is not None else None
    tokenizer = check(_load_tokenizer, stack["transformers"], model_dir) if model_dir else None
    chat = loaded is not None and loaded[1] == "messages"
    if chat and tokenizer is not None and not getattr(tokenizer, "chat_template", None):
        problems.append(
            DataFormatError(
                f"{data}: messages records need a chat template, and {model}'s tokenizer has none",
                hint="use prompt/completion records, or a model with a chat template",
            )
        )
    factors: dict[str, dict[str, float]] = {}
    if wd_plan is not None and settings.weight_decay == 0:
        problems.append(
            OptionError(
                "--wd-plan scales --weight-decay, which is 0: every factor would give 0",
                hint="give --weight-decay (e.g. 0.01)",
            )
        )
    for target, where in (("lr", lr_plan), ("weight-decay", wd_plan)):
        found = check(load_factors, where, target) if where is not None else None
        if found is not None:
            factors[target] = found
    if resume_from_checkpoint is not None and resume_from_checkpoint is not False:
        check(_check_resume, resume_from_checkpoint, output_dir, plan_dir, settings, factors)
    if settings.bf16:
        check(_check_bf16)
    if settings.eval_steps is not None and eval_data is None:
        problems.append(OptionError("--eval-steps needs --eval-data: there is nothing to evaluate"))
    for name in settings.report_to:
        check(_check_reporter, name)
    if config is not None and model_dir is not None:
        check(lambda: raise_problems(verify_plan(plan_dir, model_dir), plan_dir, model))
    if problems:
        first = problems[0]
        if len(problems) == 1:
            raise first
        message = f"{len(problems)} problems: " + "; ".join(str(p) for p in problems)
        hints = list(dict.fromkeys(p.hint for p in problems if p.hint))  # each once, in order
        raise type(first)(message, hint="; ".join(hints) or None)
    assert config is not None and loaded is not None and model_dir is not None
    # Each record cut to what training sees, before TRL tokenizes it whole (bounded memory).
    train = bound_records(loaded[0], tokenizer, settings.max_length)
    if evaluation is not None:
        evaluation = (bound_records(evaluation[0], tokenizer, settings.max_length), evaluation[1])
    if test is not None:
        test = (bound_records(test[0], tokenizer, settings.max_length), test[1])
    return Prepared(
        stack=stack,
        config=config,
        train=train,
        evaluation=evaluation[0] if evaluation is not None else None,
        test=test[0] if test is not None else None,
        data_format=loaded[1],
        model_dir=model_dir,
        tokenizer=tokenizer,
        factors=factors,
    )


_CAUSAL = ("ForCausalLM", "LMHeadModel")


def _check_causal_lm(model: object, config: dict[str, Any] | None) -> None:
    """finetune trains causal LMs: an encoder (MiniLM, BERT) or a classifier is refused in one
    line, before a plan written for it sends the user round in circles."""
    architectures = (config or {}).get("architectures")
    if not isinstance(architectures, list) or not architectures:
        return  # nothing said: transformers decides when it loads
    if any(isinstance(a, str) and a.endswith(_CAUSAL) for a in architectures):
        return
    kind = (config or {}).get("model_type")
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    generation = any(isinstance(a, str) and a.endswith("ForConditionalGeneration")
                     for a in architectures)  # fmt: skip
    if generation and kind in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return  # e.g. Gemma 3: AutoModelForCausalLM loads it
    raise ModelLoadError(
        f"{model}: a {kind} model ({', '.join(map(str, architectures))}), not a causal LM; "
        "finetune trains causal LMs (decoders such as Llama, Qwen or Mistral)",
        hint="for this model apply the plan in your own training loop "
        "(esdtool.allocate(table).to_lora_config() with peft.get_peft_model); to try finetune "
        "offline, make a tiny causal LM as docs/tutorial.md shows",
    )


# What a Trainer run leaves in its output directory: a directory holding anything else is the
# user's, and finetune does not write into it.
_RUN_FILES = {
    "adapter_config.json", "adapter_model.safetensors", "README.md", "training_args.bin",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
    "vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json", "esdtool_run.json",
    # The saved adapter read back (recipe._read_back), and its resume file while that runs.
    "adapter_metrics.parquet", "adapter_report.html", ".adapter_metrics.parquet.partial",
    # --report-to tensorboard's event files (transformers' default runs/<date>_<host>/), and
    # --spectral-every's trajectory.
    "runs", "spectra_trajectory.parquet",
}  # fmt: skip


def _check_output_dir(output_dir: Path, *inputs: Any) -> None:
    """The output directory is new, empty, or an earlier run's (what the Trainer writes and
    checkpoint-* directories), and neither the plan's nor the model's directory: the Trainer
    writes adapter_config.json, README.md and the tokenizer's files there."""
    check_output_dir(output_dir)
    target = Path(os.path.realpath(output_dir))
    for source in inputs:
        if source is not None and Path(os.path.realpath(os.fspath(source))) == target:
            raise OutputError(
                f"{output_dir}: is also an input ({source}); the run would overwrite its files",
                hint="give finetune another --output-dir",
            )
    if target.is_dir():
        names = {p.name: p.is_dir() for p in target.iterdir()}
        runs = [n for n, is_dir in names.items() if is_dir and n.startswith("checkpoint-")]
        foreign = sorted(n for n in names if n not in _RUN_FILES and n not in runs)
        if names and not foreign and not runs and "esdtool_run.json" not in names:
            foreign = sorted(names)  # a run's file names, but no run wrote them
        if foreign:
            shown = listed(foreign, 3)
            raise OutputError(
                f"{output_dir}: holds files a fine-tuning run did not write ({shown}); the run "
                "would write among them",
                hint="give finetune a new or empty --output-dir",
            )


# What changes an adapter's arithmetic: a checkpoint trained under other values of these would
# be resumed under the new ones and saved claiming them for weights trained under the old.
RESUME_FIELDS = ("r", "rank_pattern", "target_modules", "lora_alpha", "alpha_pattern",
                 "use_rslora", "use_dora", "modules_to_save", "lora_dropout")  # fmt: skip
_RESUME_DEFAULTS: dict[str, Any] = {"alpha_pattern": {}, "rank_pattern": {}, "use_rslora": False,
                                    "use_dora": False, "modules_to_save": None,
                                    "lora_dropout": 0.0}  # fmt: skip


def _check_resume(
    resume: str | bool,
    output_dir: Path,
    plan_dir: Path,
    settings: FinetuneSettings | None = None,
    factors: dict[str, dict[str, float]] | None = None,
) -> None:
    """--resume-from-checkpoint names a Trainer checkpoint (``last``: the newest in the output
    directory) trained with this plan: every field that changes the adapter's arithmetic
    (:data:`RESUME_FIELDS`, with --dora / --rslora applied) equal, else one line naming them,
    before any weight is loaded."""
    if resume is True:
        found = _last_checkpoint(output_dir)
        if found is None:
            raise OptionError(
                f"{output_dir}: no checkpoint-* directory to resume from",
                hint="drop --resume-from-checkpoint, or pass the output dir of an earlier run",
            )
        checkpoint = found
    else:
        checkpoint = Path(os.fspath(resume))
        if not (checkpoint / "trainer_state.json").is_file():
            raise OptionError(
                f"{checkpoint}: not a training checkpoint (no trainer_state.json)",
                hint="pass a checkpoint-N directory of an earlier run, or 'last'",
            )
    saved = read_factors(checkpoint)
    if saved is None:  # unknown: the Trainer's own check of its optimizer groups is the last word
        saved = factors or {}
    if saved != (factors or {}):
        changed = sorted(t for t in {*saved, *(factors or {})}
                         if saved.get(t) != (factors or {}).get(t))  # fmt: skip
        raise PlanMismatchError(
            f"{checkpoint}: was trained with other {' and '.join(changed)} factors than given "
            "(--lr-plan / --wd-plan): the optimizer state would carry its groups' values",
            hint="resume with the plans it was trained with, or start a new --output-dir",
        )
    if not (checkpoint / CONFIG_NAME).is_file() or not (plan_dir / CONFIG_NAME).is_file():
        return  # what the plan check or the Trainer reports
    mine, theirs = dict(read_plan(plan_dir)[0]), read_plan(checkpoint)[0]
    if settings is not None and settings.use_dora is not None:
        mine["use_dora"] = settings.use_dora
    if settings is not None and settings.use_rslora is not None:
        mine["use_rslora"] = settings.use_rslora

    def value(config: dict[str, Any], key: str) -> Any:
        found = config.get(key)
        if found is None:  # absent or null: PEFT's default
            found = _RESUME_DEFAULTS.get(key)
        if key == "target_modules" and isinstance(found, list):
            return sorted(found)  # PEFT saves a set as a list, in any order
        return found

    changed = [k for k in RESUME_FIELDS if value(mine, k) != value(theirs, k)]
    if changed:
        raise PlanMismatchError(
            f"{checkpoint}: was trained with other {', '.join(changed)} than "
            f"{plan_dir / CONFIG_NAME} (and the --dora / --rslora given): resuming would train "
            "its weights under the new values and save them as if trained so throughout",
            hint="resume with the plan and options it was trained with, or start a new "
            "--output-dir",
        )


# Written into each checkpoint: the lr / weight-decay factors its optimizer groups came from.
FACTORS_RECORD = "esdtool_factors.json"


def read_factors(checkpoint: Path) -> dict[str, dict[str, float]] | None:
    """The factors a checkpoint was trained with ({}: none), or None when it records nothing
    (a checkpoint of an esdtool before plans, or one killed between its save and this file)."""
    where = checkpoint / FACTORS_RECORD
    try:
        data = read_json_file(where)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise OptionError(f"{where}: unreadable ({exc})") from None
    if not isinstance(data, dict):
        raise OptionError(f"{where}: not an object")
    return data


def _check_reporter(name: str) -> None:
    """--report-to NAME: its package is installed (one line naming the extra, not transformers'
    error mid-setup), and W&B will not stop to ask for a login."""
    package, extra = REPORTERS[name]
    try:
        importlib.import_module(package)
    except ImportError as exc:
        raise MissingExtraError(
            f"--report-to {name} needs the {package} package, which is not installed",
            hint=f"pip install 'esdtool[{extra}]' (or pip install {package})",
        ) from exc
    if name == "wandb" and not _wandb_can_log():
        raise OptionError(
            "--report-to wandb: no W&B login on this machine, and WANDB_MODE is not offline; "
            "the run would stop to ask for an API key",
            hint="wandb login (or WANDB_API_KEY=...), or WANDB_MODE=offline to log locally",
        )


def _wandb_can_log() -> bool:
    """Whether wandb.init runs unattended: offline or disabled, or a key in the environment or
    in ~/.netrc (where ``wandb login`` writes it)."""
    if os.environ.get("WANDB_MODE", "").lower() in ("offline", "disabled", "dryrun"):
        return True
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_DISABLED", "").lower() == "true":
        return True
    try:
        import netrc

        host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("//")[-1]
        return netrc.netrc().authenticators(host.split("/")[0]) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def _check_bf16() -> None:
    import torch

    if not (torch.cuda.is_available() and torch.cuda.is_bf16_supported()):
        raise OptionError(
            "--bf16 needs a GPU with bfloat16 support, and none is present",
            hint="drop --bf16 (the default picks it where the GPU supports it)",
        )


def _check_qlora() -> None:
    import torch

    if not torch.cuda.is_available():
        raise OptionError(
            "--qlora needs a CUDA GPU (4-bit NF4 through bitsandbytes), and none is present",
            hint="drop --qlora to train in full precision on this machine",
        )
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as exc:
        raise MissingExtraError(
            "--qlora needs bitsandbytes", hint="pip install bitsandbytes"
        ) from exc


def _load_plan(peft: Any, plan_dir: Path, settings: FinetuneSettings) -> Any:
    if not (plan_dir / CONFIG_NAME).is_file():
        raise OptionError(
            f"{plan_dir}: no {CONFIG_NAME} here",
            hint="pass the directory esdtool allocate wrote (-o OUTDIR)",
        )
    read_plan(plan_dir)  # NaN alphas, fractional ranks, a broken allocation.csv: one line, now
    try:
        config = peft.LoraConfig.from_pretrained(str(plan_dir))
    except Exception as exc:  # a hand-edited or foreign file
        raise OptionError(f"{plan_dir / CONFIG_NAME}: not a LoRA config ({exc})") from exc
    task = config.task_type
    if task not in (None, "CAUSAL_LM"):
        raise OptionError(
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
        raise ModelLoadError(f"{model_dir}: cannot load its tokenizer ({exc})") from exc
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _last_checkpoint(outdir: Path) -> Path | None:
    from transformers.trainer_utils import get_last_checkpoint

    found = get_last_checkpoint(str(outdir)) if outdir.is_dir() else None
    return Path(found) if found else None
