"""`esdtool finetune`: train LoRA adapters with a plan from esdtool allocate."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table
from rich.text import Text

from esdtool.cli._console import hush, out, safe
from esdtool.cli._options import JsonOpt, QuietOpt, RevisionOpt
from esdtool.cli._train_options import (
    BatchSizeOpt,
    EpochsOpt,
    GradAccumOpt,
    GradientCheckpointingOpt,
    LrSchedulerOpt,
    MaxGradNormOpt,
    MaxLengthOpt,
    MaxStepsOpt,
    QloraOpt,
    WarmupRatioOpt,
    WarmupStepsOpt,
    WeightDecayOpt,
)

if TYPE_CHECKING:
    from esdtool.training import FinetuneResult

HELP = (
    "Train LoRA adapters on a causal LM with the ranks esdtool allocate planned "
    "(transformers + PEFT + TRL; needs the extra: pip install 'esdtool\\[finetune]').\n\n"
    "DATA is a .jsonl / .json / .parquet / .csv file or a hub dataset id, with records in one "
    "of these formats: messages (chat), prompt/completion, instruction/input/output (Alpaca, "
    "as the LLM-Adapters math and commonsense sets), or text. With a prompt the loss is on the "
    "completion only.\n\n"
    "Several GPUs: run the same command under accelerate launch -m esdtool finetune ... or "
    "torchrun --nproc-per-node K -m esdtool finetune ... (DDP through the Trainer)."
)

EXAMPLES = """[bold]Examples[/bold]

  esdtool finetune meta-llama/Llama-3.2-1B --adapter-config lora-plan --data train.jsonl -o run

  esdtool finetune ./my-model --adapter-config lora-plan --data train.jsonl --dry-run

  esdtool finetune ./my-model --adapter-config lora-plan --data train.jsonl -o run \\
    --warmup-steps 100 --lr-scheduler cosine --report-to tensorboard --spectral-every 50

  torchrun --nproc-per-node 4 -m esdtool finetune ./my-model --adapter-config lora-plan \\
    --data train.jsonl -o run --batch-size 8"""


def finetune(
    model: Annotated[
        str,
        typer.Argument(help="Hub id or local model directory (safetensors).", show_default=False),
    ],
    adapter_config: Annotated[
        Path,
        typer.Option(
            "--adapter-config", help="Directory written by esdtool allocate.", show_default=False
        ),
    ],
    data: Annotated[
        str,
        typer.Option(
            "--data", help="Training data: a file or a hub dataset id.", show_default=False
        ),
    ],
    output_dir: Annotated[
        Path, typer.Option("--output-dir", "-o", help="Where the adapter and checkpoints go.")
    ] = Path("esdtool-finetune"),
    eval_data: Annotated[
        str | None,
        typer.Option("--eval-data", help="Evaluation data, same formats.", show_default=False),
    ] = None,
    test_data: Annotated[
        str | None,
        typer.Option(
            "--test-data",
            help="Held-out data, evaluated once after training (the test loss).",
            show_default=False,
        ),
    ] = None,
    lr_plan: Annotated[
        Path | None,
        typer.Option(
            "--lr-plan",
            help="A plan directory of `esdtool allocate --target lr`: each planned module's "
            "LoRA parameters train at --lr x its factor (TempBalance).",
            show_default=False,
        ),
    ] = None,
    wd_plan: Annotated[
        Path | None,
        typer.Option(
            "--wd-plan",
            help="A plan directory of `esdtool allocate --target weight-decay`: each planned "
            "module's LoRA parameters decay at --weight-decay x its factor (AlphaDecay).",
            show_default=False,
        ),
    ] = None,
    epochs: EpochsOpt = 1.0,
    max_steps: MaxStepsOpt = -1,
    lr: Annotated[float, typer.Option("--lr", help="Peak learning rate.")] = 2e-4,
    batch_size: BatchSizeOpt = 4,
    grad_accum: GradAccumOpt = 1,
    max_length: MaxLengthOpt = 1024,
    bf16: Annotated[
        bool | None,
        typer.Option(
            "--bf16/--no-bf16",
            help="bfloat16 training (default: on where the GPU supports it).",
            show_default=False,
        ),
    ] = None,
    gradient_checkpointing: GradientCheckpointingOpt = False,
    qlora: QloraOpt = False,
    dora: Annotated[
        bool | None,
        typer.Option(
            "--dora/--no-dora", help="DoRA (default: as the config says).", show_default=False
        ),
    ] = None,
    rslora: Annotated[
        bool | None,
        typer.Option(
            "--rslora/--no-rslora",
            help="Rank-stabilised scaling (default: as the config says).",
            show_default=False,
        ),
    ] = None,
    seed: Annotated[int, typer.Option("--seed", help="Random seed.")] = 42,
    logging_steps: Annotated[
        int, typer.Option("--logging-steps", help="Log the loss every N steps.")
    ] = 10,
    save_steps: Annotated[
        int, typer.Option("--save-steps", help="Save a resumable checkpoint every N steps.")
    ] = 500,
    warmup_steps: WarmupStepsOpt = 0,
    warmup_ratio: WarmupRatioOpt = 0.0,
    lr_scheduler: LrSchedulerOpt = "linear",
    weight_decay: WeightDecayOpt = 0.0,
    max_grad_norm: MaxGradNormOpt = 1.0,
    eval_steps: Annotated[
        int | None,
        typer.Option(
            "--eval-steps",
            help="Evaluate on --eval-data every N steps (default: every --save-steps).",
            show_default=False,
        ),
    ] = None,
    save_total_limit: Annotated[
        int, typer.Option("--save-total-limit", help="Checkpoints kept (the oldest go first).")
    ] = 2,
    report_to: Annotated[
        list[str] | None,
        typer.Option(
            "--report-to",
            help="Send the logs (loss, learning rate, system metrics, spectra) to tensorboard "
            "(under OUTPUT_DIR/runs), wandb or mlflow; repeat or comma-separate; default none.",
            show_default=False,
        ),
    ] = None,
    spectral_every: Annotated[
        int,
        typer.Option(
            "--spectral-every",
            help="Every N steps, log the adapter's spectra (effective rank, share of the "
            "planned rank used, lambda_max, stable rank per module) and keep them in "
            "spectra_trajectory.parquet; 0: off.",
        ),
    ] = 0,
    resume_from_checkpoint: Annotated[
        str | None,
        typer.Option(
            "--resume-from-checkpoint",
            help="A checkpoint directory, or 'last' for the latest in --output-dir.",
            show_default=False,
        ),
    ] = None,
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run", help="Load, apply the plan, print ranks and parameters; train nothing."
        ),
    ] = False,
    revision: RevisionOpt = None,
    quiet: QuietOpt = False,
    as_json: JsonOpt = False,
) -> None:
    from esdtool.training import FinetuneSettings
    from esdtool.training import finetune as run_finetune

    hush(quiet or as_json)
    settings = FinetuneSettings(
        epochs=epochs, max_steps=max_steps, lr=lr, batch_size=batch_size, grad_accum=grad_accum,
        max_length=max_length, bf16=bf16, gradient_checkpointing=gradient_checkpointing,
        qlora=qlora, use_dora=dora, use_rslora=rslora, seed=seed, logging_steps=logging_steps,
        save_steps=save_steps, warmup_steps=warmup_steps, warmup_ratio=warmup_ratio,
        lr_scheduler=lr_scheduler, weight_decay=weight_decay, max_grad_norm=max_grad_norm,
        eval_steps=eval_steps, save_total_limit=save_total_limit,
        report_to=",".join(report_to or []), spectral_every=spectral_every,
    )  # fmt: skip
    resume: str | bool | None = resume_from_checkpoint
    if resume == "last":
        resume = True
    result = run_finetune(
        model, adapter_config, data, output_dir, settings, eval_data=eval_data,
        test_data=test_data, revision=revision, token=os.environ.get("HF_TOKEN"),
        resume_from_checkpoint=resume, dry_run=dry_run, progress=not (quiet or as_json),
        lr_plan=lr_plan, wd_plan=wd_plan,
    )  # fmt: skip
    if int(os.environ.get("RANK", "0")) != 0:
        return  # one summary per job, from the main process
    if as_json:
        print(json.dumps(result.to_dict()))
    elif not quiet:
        _print_summary(result)


def _print_summary(result: FinetuneResult) -> None:
    if result.dry_run:
        ranks = Table(title="planned adapters (dry run: nothing trained)", title_justify="left")
        ranks.add_column("module")
        ranks.add_column("r", justify="right")
        for module, r in result.ranks.items():
            ranks.add_row(Text(safe(module)), str(r))
        out.print(ranks)
    table = Table(title="esdtool finetune", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    share = result.trainable_params / result.total_params if result.total_params else 0.0
    table.add_row("data format", result.data_format)
    table.add_row("adapted modules", str(len(result.ranks)))
    table.add_row(
        "trainable params", f"{result.trainable_params:,} of {result.total_params:,} ({share:.2%})"
    )
    if not result.dry_run:
        table.add_row("steps", str(result.steps))
        if result.first_loss is not None and result.final_loss is not None:
            table.add_row("loss", f"{result.first_loss:.4f} (first) -> {result.final_loss:.4f}")
        if result.eval_loss is not None:
            table.add_row("eval loss", f"{result.eval_loss:.4f}")
        if result.test_loss is not None:
            table.add_row("test loss", f"{result.test_loss:.4f}")
        table.add_row("adapter saved to", Text(safe(str(result.output_dir))))
        if result.rank_use is not None:
            modules, planned, used = result.rank_use
            share = f" ({100 * used / planned:.0f}%)" if planned else ""
            table.add_row(
                "planned rank used",
                f"{used} of {planned}{share} over {modules} modules (adapter_report.html)",
            )
        system = result.system or {}
        if system:
            table.add_row("time", _cost(system))
        if result.trajectory is not None:
            table.add_row("spectra over training", Text(safe(str(result.trajectory))))
        if result.analysis_error is not None:
            table.add_row("adapter analysis", Text(f"failed: {safe(result.analysis_error)}"))
    out.print(table)


def _cost(system: dict) -> str:
    """'12.3 s, 1,234 tokens/s, peak 2.10 GB (cuda allocator), GPU 87%'."""
    parts = [f"{system['wall_seconds']:.1f} s"]
    if system.get("tokens_per_second") is not None:
        parts.append(f"{system['tokens_per_second']:,.0f} tokens/s")
    if system.get("peak_memory_gb") is not None:
        parts.append(f"peak {system['peak_memory_gb']:.2f} GB ({system['peak_memory_kind']})")
    if system.get("gpu_utilization_mean") is not None:
        parts.append(f"GPU {system['gpu_utilization_mean']:.0f}%")
    return ", ".join(parts)
