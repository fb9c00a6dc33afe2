"""`esdtool ablate`: equal-budget trials of rank plans against uniform LoRA."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table
from rich.text import Text

from esdtool.cli._console import err, hush, out, safe
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
    from esdtool.ablation import AblateResult

HELP = (
    "Does the plan beat uniform LoRA at the same cost? Train every arm (uniform, esdtool's "
    "plan and its controls) at one budget of trainable parameters, counted by PEFT, over a "
    "grid of learning rates and seeds; choose each arm's learning rate on --eval-data; "
    "report each arm's mean and 95% interval and its paired difference to uniform.\n\n"
    "Arms: uniform (every candidate at one rank), esd (esdtool's plan), shuffled (esd's "
    "modules and ranks, ranks permuted among modules of one size), placement (esd's modules "
    "at one rank), complement (the modules esd leaves out), random (as many modules, drawn at "
    "random), and any plan directory with --arm NAME=DIR.\n\n"
    "Each run is its own process (a crash or NaN ends that run only); re-running the same "
    "command keeps finished runs. Every finetune option applies to every run."
)

EXAMPLES = """[bold]Examples[/bold]

  esdtool ablate ./my-model --metrics metrics.parquet --data train.jsonl \\
    --eval-data eval.jsonl --test-data test.jsonl -o trials --max-steps 200

  esdtool ablate ./my-model --metrics metrics.parquet --data train.jsonl \\
    --eval-data eval.jsonl -o trials --arms uniform,esd,random --lrs 1e-4,3e-4 --seeds 5

  # a Slurm array of 4 tasks, then the summary of every shard's runs
  sbatch --array=0-3 --wrap "esdtool ablate ... -o trials"
  esdtool ablate --summarize trials"""


def ablate(
    model: Annotated[
        str | None,
        typer.Argument(help="Hub id or local model directory (safetensors).", show_default=False),
    ] = None,
    metrics: Annotated[
        Path | None,
        typer.Option(
            "--metrics", help="The model's table from esdtool analyze.", show_default=False
        ),
    ] = None,
    data: Annotated[
        str | None, typer.Option("--data", help="Training data.", show_default=False)
    ] = None,
    eval_data: Annotated[
        str | None,
        typer.Option(
            "--eval-data", help="Data that chooses each arm's learning rate.", show_default=False
        ),
    ] = None,
    test_data: Annotated[
        str | None,
        typer.Option(
            "--test-data",
            help="Held-out data for the final numbers (else eval).",
            show_default=False,
        ),
    ] = None,
    forgetting_data: Annotated[
        str | None,
        typer.Option(
            "--forgetting-data",
            help="General text: each run's loss on it minus the base model's (forgetting).",
            show_default=False,
        ),
    ] = None,
    metric: Annotated[
        str,
        typer.Option(
            "--metric",
            help="What chooses each arm's learning rate and is reported: "
            "loss, or exact-match (greedy answers graded as GSM8K: after ####, else "
            "the last number).",
        ),
    ] = "loss",
    answer_regex: Annotated[
        str | None,
        typer.Option(
            "--answer-regex", help="Where the answer is (RE2; its first group).", show_default=False
        ),
    ] = None,
    max_new_tokens: Annotated[
        int, typer.Option("--max-new-tokens", help="Longest greedy answer for exact-match.")
    ] = 64,
    output_dir: Annotated[
        Path, typer.Option("--output-dir", "-o", help="Where the runs and the summary go.")
    ] = Path("esdtool-ablation"),
    arms: Annotated[
        str,
        typer.Option("--arms", help="Built-in arms, comma-separated (uniform is required)."),
    ] = "uniform,esd,shuffled,placement",
    arm: Annotated[
        list[str] | None,
        typer.Option("--arm", help="Another arm: NAME=PLAN_DIR (repeatable).", show_default=False),
    ] = None,
    lrs: Annotated[
        str | None,
        typer.Option(
            "--lrs",
            help="Learning rates, comma-separated (default: 5, four per decade, centred on --lr).",
            show_default=False,
        ),
    ] = None,
    seeds: Annotated[int, typer.Option("--seeds", help="Seeds per arm and rate.")] = 3,
    budget_rank: Annotated[
        int | None,
        typer.Option(
            "--budget-rank",
            help="Budget: uniform rank R on every candidate (default 8).",
            show_default=False,
        ),
    ] = None,
    budget_params: Annotated[
        int | None,
        typer.Option("--budget-params", help="Budget: N trainable parameters.", show_default=False),
    ] = None,
    arm_seed: Annotated[
        int, typer.Option("--arm-seed", help="Seed of the shuffled and random arms' draws.")
    ] = 0,
    shard: Annotated[
        str | None,
        typer.Option(
            "--shard",
            help="Run shard I of N of the grid (default: Slurm's array "
            "variables when set, else all).",
            show_default=False,
        ),
    ] = None,
    gpus: Annotated[
        str | None,
        typer.Option(
            "--gpus",
            help="Devices to run on at once, e.g. 0,1,2,3: one run per "
            "device (or per --nproc-per-run devices).",
            show_default=False,
        ),
    ] = None,
    nproc_per_run: Annotated[
        int, typer.Option("--nproc-per-run", help="Processes per run under torchrun (DDP).")
    ] = 1,
    retry_failed: Annotated[
        bool, typer.Option("--retry-failed", help="Run the failed runs again.")
    ] = False,
    summarize: Annotated[
        Path | None,
        typer.Option(
            "--summarize",
            help="Only summarise the finished runs of this directory.",
            show_default=False,
        ),
    ] = None,
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run",
            help="Check everything, print the grid, the budgets and an estimate of the time.",
        ),
    ] = False,
    probe_steps: Annotated[
        int,
        typer.Option(
            "--probe-steps",
            help="Steps of the first run a dry run trains to estimate the time, when no run "
            "has finished (0: no probe).",
        ),
    ] = 3,
    epochs: EpochsOpt = 1.0,
    max_steps: MaxStepsOpt = -1,
    lr: Annotated[float, typer.Option("--lr", help="Centre of the default --lrs.")] = 2e-4,
    batch_size: BatchSizeOpt = 4,
    grad_accum: GradAccumOpt = 1,
    max_length: MaxLengthOpt = 1024,
    warmup_steps: WarmupStepsOpt = 0,
    warmup_ratio: WarmupRatioOpt = 0.0,
    lr_scheduler: LrSchedulerOpt = "linear",
    weight_decay: WeightDecayOpt = 0.0,
    max_grad_norm: MaxGradNormOpt = 1.0,
    qlora: QloraOpt = False,
    gradient_checkpointing: GradientCheckpointingOpt = False,
    revision: RevisionOpt = None,
    quiet: QuietOpt = False,
    as_json: JsonOpt = False,
) -> None:
    from esdtool.ablation import AblateSettings, parse_shard
    from esdtool.ablation import ablate as run_ablation
    from esdtool.ablation import summarize as run_summary
    from esdtool.errors import OptionError
    from esdtool.training import FinetuneSettings

    hush(quiet or as_json)
    if summarize is not None:
        result = run_summary(summarize)
        _report(result, quiet, as_json)
        return
    missing = [flag for flag, value in (("MODEL", model), ("--metrics", metrics),
               ("--data", data), ("--eval-data", eval_data)) if value is None]  # fmt: skip
    if missing:
        raise OptionError(
            f"ablate needs {', '.join(missing)}",
            hint="or --summarize DIR to summarise an ablation's finished runs",
        )
    plans = {}
    for item in arm or []:
        name, sep, where = item.partition("=")
        if not sep or not where:
            raise OptionError(f"--arm takes NAME=PLAN_DIR, not {item!r}")
        plans[name] = Path(where)
    finetune = FinetuneSettings(
        epochs=epochs, max_steps=max_steps, lr=lr, batch_size=batch_size, grad_accum=grad_accum,
        max_length=max_length, qlora=qlora, gradient_checkpointing=gradient_checkpointing,
        warmup_steps=warmup_steps, warmup_ratio=warmup_ratio, lr_scheduler=lr_scheduler,
        weight_decay=weight_decay, max_grad_norm=max_grad_norm,
    )  # fmt: skip
    settings = AblateSettings(
        arms=tuple(a.strip() for a in arms.split(",") if a.strip()), plans=plans,
        lrs=_floats(lrs), seeds=seeds, budget_rank=budget_rank, budget_params=budget_params,
        arm_seed=arm_seed, metric=metric, answer_regex=answer_regex,
        max_new_tokens=max_new_tokens, finetune=finetune, nproc_per_run=nproc_per_run,
        gpus=tuple(g for g in (gpus or "").split(",") if g.strip()),
    )  # fmt: skip
    result = run_ablation(
        model, metrics, data, eval_data, output_dir, settings, test_data=test_data,  # type: ignore[arg-type]
        forgetting_data=forgetting_data,
        shard_index=parse_shard(shard), retry_failed=retry_failed, dry_run=dry_run,
        probe_steps=probe_steps, revision=revision, progress=None if quiet or as_json else _Lines(),
    )  # fmt: skip
    _report(result, quiet, as_json)


def _floats(text: str | None) -> tuple[float, ...] | None:
    from esdtool.errors import OptionError

    if text is None:
        return None
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError as exc:
        raise OptionError(f"--lrs takes numbers separated by commas, not {text!r}") from exc


class _Lines:
    """One line per finished run, with the grid's progress and an ETA."""

    def start(self, total: int, pending: int) -> None:
        self.total, self.pending, self.done, self.started = total, pending, 0, time.monotonic()
        err.print(f"{pending} run(s) to go of {total} in the grid", markup=False)

    def finished(self, run: Any, result: dict[str, Any], seconds: float) -> None:
        self.done += 1
        mine = result["esdtool"]
        spent = time.monotonic() - self.started
        eta = spent / self.done * (self.pending - self.done)
        what = (f"eval loss {mine['eval_loss']:.4f}" if mine["status"] == "ok"
                else f"failed: {mine['reason']}")  # fmt: skip
        err.print(f"[{self.done}/{self.pending}] {safe(run.name)}: {safe(what)} "
                  f"({seconds:.0f} s; ETA {eta:.0f} s)", markup=False)  # fmt: skip


def _report(result: AblateResult, quiet: bool, as_json: bool) -> None:
    if as_json:
        print(json.dumps(result.to_dict(), default=str))
        return
    if quiet:
        return
    budget = Table(title=f"arms at {result.budget:,} trainable parameters", title_justify="left")
    for column in ("arm", "how", "PEFT count", "off"):
        budget.add_column(column)
    for a in result.arms:
        off = f"{(a.peft_params or 0) / result.budget - 1:+.2%}" if result.budget else ""
        budget.add_row(a.name, Text(safe(a.how)), f"{a.peft_params:,}", off)
    out.print(budget)
    if result.dry_run:
        grid = f"{len(result.runs)} runs, {len(result.skipped)} already finished"
        found = result.estimate
        if found is None:
            eta = "not estimated (no run pending, or --probe-steps 0)"
        elif found.seconds is None:
            eta = f"unknown ({found.basis})"
        else:
            eta = f"about {_duration(found.seconds)} (an estimate from {found.basis})"
        out.print(f"dry run: {grid}; time: {safe(eta)}", markup=False)
        return
    for s in result.summaries:
        if s.arm != "uniform":
            out.print(safe(s.verdict), markup=False)
    for warning in result.warnings:
        err.print(f"Warning: {safe(warning)}", markup=False, style="yellow", soft_wrap=True)
    out.print(f"summary: {safe(str(result.output_dir / 'summary.csv'))}, page: "
              f"{safe(str(result.output_dir / 'ablation.html'))}", markup=False)  # fmt: skip


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
